#!/usr/bin/env python3
"""Memory of members that stop reading (issue: a non-reading member must cost O(queue)
references to shared frames, never a private copy of a frame).

Opens N WebSocket members of one room with a tiny receive buffer, has them join and then
never read; posts large system events through the HTTP API in several windows; reports
the gateway's RSS before and after, per stalled member. Standard library only.

    python3 loadtest/stalled_readers.py --url 127.0.0.1:18900 --pid $GW \
        --members 200 --windows 5 --events 15 --size 60000
"""

import argparse
import base64
import json
import os
import socket
import struct
import time
import urllib.request


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def masked_text(payload: bytes) -> bytes:
    mask = os.urandom(4)
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", 0x81, 0x80 | n)
    else:
        head = struct.pack("!BBH", 0x81, 0x80 | 126, n)
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return head + mask + body


def member(host, port, room, rcvbuf):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.connect((host, port))
    key = base64.b64encode(os.urandom(16)).decode()
    s.sendall(
        (
            f"GET /ws HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    buf = b""
    while b"\r\n\r\n" not in buf:
        buf += s.recv(4096)
    assert buf.startswith(b"HTTP/1.1 101"), buf[:80]
    s.sendall(masked_text(json.dumps({"op": "join", "room": room}).encode()))
    return s


def post(host, port, token, room, text):
    req = urllib.request.Request(
        f"http://{host}:{port}/api/v1/rooms/{room}/events",
        data=json.dumps({"type": "system", "text": text}).encode(),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(req) as r:
        assert r.status == 202


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="127.0.0.1:18900", help="host:port of the gateway")
    ap.add_argument("--pid", type=int, required=True, help="gateway pid (for RSS)")
    ap.add_argument("--members", type=int, default=200)
    ap.add_argument("--windows", type=int, default=5)
    ap.add_argument("--events", type=int, default=15, help="events per window")
    ap.add_argument("--size", type=int, default=60000, help="bytes of text per event")
    ap.add_argument("--rcvbuf", type=int, default=4096)
    ap.add_argument("--token", default="dev-api-token-change-me")
    ap.add_argument("--room", default="stall")
    a = ap.parse_args()
    host, port = a.url.split(":")
    port = int(port)
    members = [member(host, port, a.room, a.rcvbuf) for _ in range(a.members)]
    time.sleep(1.0)
    before = rss_kib(a.pid)
    for w in range(a.windows):
        for e in range(a.events):
            post(host, port, a.token, a.room, f"{w}.{e}:" + "x" * a.size)
        time.sleep(0.3)
    time.sleep(2.0)
    after = rss_kib(a.pid)
    alive = 0
    for s in members:
        s.setblocking(False)
        try:
            data = s.recv(1)
            alive += 1 if data else 0
        except BlockingIOError:
            alive += 1
        except OSError:
            pass
    window = a.events * (a.size + 100)
    print(
        json.dumps(
            {
                "members": a.members,
                "window_bytes": window,
                "windows": a.windows,
                "rss_before_kib": before,
                "rss_after_kib": after,
                "growth_per_member_kib": round((after - before) / a.members, 1),
                "members_still_open": alive,
            }
        )
    )
    for s in members:
        s.close()


if __name__ == "__main__":
    main()
