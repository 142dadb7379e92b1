// The client's connection logic against a scripted fake gateway (the `ws` package's
// server), for the cases a real gateway cannot be made to produce on demand: a socket
// that stops answering pings, a 4010 resync, refused connections, lost replies, the
// moderation cases (recalls, a 4030 ban, muted/filtered refusals) and recovery on
// reconnect (`since`, `recovered`).

import assert from 'node:assert/strict';
import net from 'node:net';
import { afterEach, test } from 'node:test';
import WebSocket, { WebSocketServer } from 'ws';
import { DanmakuClient, DanmakuError } from '../danmaku-client.js';
import { freePort, waitFor } from '../support/gateway.mjs';

/**
 * @typedef {object} FakeConn
 * @property {WebSocket} ws
 * @property {URL} url the upgrade request's URL (token, format)
 * @property {any[]} frames ops received
 */

/**
 * A fake gateway. `script(frame, conn, server)` may answer an op itself (return true);
 * otherwise join → joined (with `server.history`), ping → pong, anything else → ack.
 * With `server.log` (the room's events, oldest first), a join with `since` is answered
 * as a v1.1 gateway would: `recovered: true` and the events after `since` when the log
 * holds it and `server.recover` is on, else `recovered: false` and the log's last
 * `history` events. Without `server.log`, `since` is ignored (a gateway without recovery).
 * @param {{ heartbeatMs?: number, script?: (frame: any, conn: FakeConn, srv: any) => boolean | void }} [opts]
 */
async function fakeGateway(opts = {}) {
  /** @type {any} */
  let self;
  const wss = new WebSocketServer({
    host: '127.0.0.1',
    port: 0,
    // `srv.refuse = 403`: the handshake is answered with that HTTP status, no upgrade.
    verifyClient: (_info, cb) => {
      self.handshakes++;
      if (self.refuse) cb(false, self.refuse, 'refused', { 'content-type': 'application/json' });
      else cb(true);
    },
  });
  await new Promise((r) => wss.once('listening', r));
  const { port } = /** @type {net.AddressInfo} */ (wss.address());
  const srv = {
    url: `ws://127.0.0.1:${port}/ws`,
    /** @type {FakeConn[]} */
    conns: [],
    /** @type {any[]} */
    history: [],
    /** @type {any[] | null} the recovery log; null: no recovery (no `recovered` field) */
    log: null,
    recover: true,
    mutePings: false,
    /** HTTP status to refuse handshakes with (0: accept) */
    refuse: 0,
    handshakes: 0,
    close: () => new Promise((r) => {
      for (const c of wss.clients) c.terminate();
      wss.close(r);
    }),
    /** @param {FakeConn} conn @param {any} frame */
    send: (conn, frame) => conn.ws.send(JSON.stringify(frame)),
  };
  self = srv;
  wss.on('connection', (ws, req) => {
    /** @type {FakeConn} */
    const conn = { ws, url: new URL(req.url ?? '/', 'http://x'), frames: [] };
    srv.conns.push(conn);
    srv.send(conn, { op: 'hello', conn: String(srv.conns.length), node: 'fake', user: null, heartbeat_ms: opts.heartbeatMs ?? 30000 });
    ws.on('message', (data) => {
      const frame = JSON.parse(data.toString());
      conn.frames.push(frame);
      if (opts.script?.(frame, conn, srv)) return;
      const ref = frame.ref;
      if (frame.op === 'join') {
        /** @type {any} */
        const joined = { op: 'joined', room: frame.room, online: 1, history: frame.history ? srv.history : [], redpackets: [], ref };
        if (frame.since !== undefined && srv.log) {
          const at = srv.log.findIndex((e) => e.id === frame.since);
          joined.recovered = srv.recover && at >= 0;
          joined.history = joined.recovered ? srv.log.slice(at + 1) : frame.history ? srv.log.slice(-frame.history) : [];
        }
        srv.send(conn, joined);
      } else if (frame.op === 'ping') {
        if (!srv.mutePings) srv.send(conn, { op: 'pong', ref });
      } else {
        srv.send(conn, { op: 'ack', ref });
      }
    });
  });
  servers.push(srv);
  return srv;
}

/** @type {Array<{ close: () => Promise<unknown> }>} */
const servers = [];
/** @type {DanmakuClient[]} */
const clients = [];

/** @param {string} url @param {Partial<import('../danmaku-client.js').ClientOptions>} [opts] */
function client(url, opts = {}) {
  const c = new DanmakuClient({ url, WebSocket, reconnect: { initialDelayMs: 30, maxDelayMs: 200 }, ...opts });
  clients.push(c);
  return c;
}

afterEach(async () => {
  for (const c of clients.splice(0)) c.close();
  for (const s of servers.splice(0)) await s.close();
});

const ev = (/** @type {number} */ n) => ({ id: `fake-${n}`, ts: 1000 + n, type: 'chat', user: { id: 'u', name: 'U' }, text: `m${n}` });

test('sends token and format in the URL, and JSON or MessagePack frames', async () => {
  const srv = await fakeGateway();
  const c = client(srv.url, { token: () => Promise.resolve('tok-1') });
  await c.connect();
  await c.chat('r', 'hi');
  assert.equal(srv.conns[0].url.searchParams.get('token'), 'tok-1');
  assert.equal(srv.conns[0].url.searchParams.get('format'), null);
  assert.deepEqual(srv.conns[0].frames[0], { op: 'chat', room: 'r', text: 'hi', ref: srv.conns[0].frames[0].ref });
});

test('a missing pong means a dead socket: dropped and reconnected', async () => {
  const srv = await fakeGateway({ heartbeatMs: 100 });
  srv.mutePings = true;
  const c = client(srv.url);
  /** @type {any[]} */
  const statuses = [];
  c.on('status', (s, d) => statuses.push([s, d]));
  await c.connect();
  await waitFor(() => srv.conns.length >= 2, 'a second connection', 3000);
  const drop = statuses.find(([s]) => s === 'reconnecting')?.[1];
  assert.equal(drop.code, 4000);
  assert.equal(drop.reason, 'no pong');
  assert.ok(srv.conns[0].frames.some((f) => f.op === 'ping'), 'app-level pings were sent');
  srv.mutePings = false;
  await waitFor(() => c.status === 'open', 'open again');
  // With pongs coming back the connection stays.
  const n = srv.conns.length;
  await new Promise((r) => setTimeout(r, 400));
  assert.equal(srv.conns.length, n);
});

test('4010: reconnect at once, re-join with history, no event delivered twice', async () => {
  const srv = await fakeGateway();
  srv.history = [ev(1), ev(2)];
  const c = client(srv.url, { rejoinHistory: 50 });
  /** @type {any[]} */
  const statuses = [];
  c.on('status', (s, d) => statuses.push([s, d]));
  const chats = /** @type {any[]} */ ([]);
  c.on('chat', (e, meta) => chats.push([e.text, meta.history]));
  const joins = /** @type {any[]} */ ([]);
  c.on('joined', (j, meta) => joins.push(meta));
  await c.connect();
  await c.join('room-1');
  srv.send(srv.conns[0], { op: 'batch', room: 'room-1', events: [ev(1), ev(2)] });
  await waitFor(() => chats.length === 2, 'live events');
  // The slow-consumer close: events were lost in between.
  srv.history = [ev(1), ev(2), ev(3)];
  srv.conns[0].ws.close(4010, 'slow consumer');
  await waitFor(() => joins.length === 2, 're-joined');
  const drop = statuses.find(([s]) => s === 'reconnecting')?.[1];
  assert.equal(drop.code, 4010);
  assert.equal(drop.delayMs, 0);
  const rejoin = srv.conns[1].frames.find((f) => f.op === 'join');
  assert.equal(rejoin.room, 'room-1');
  assert.equal(rejoin.history, 50);
  assert.deepEqual(joins[1], { rejoin: true, resync: true });
  assert.deepEqual(chats, [
    ['m1', false],
    ['m2', false],
    ['m3', true],
  ]);
});

test('1001 reconnects at once; leave() while away stops the re-join', async () => {
  const srv = await fakeGateway();
  const c = client(srv.url);
  await c.connect();
  await c.join('a');
  await c.join('b');
  /** @type {any[]} */
  const statuses = [];
  /** @type {Promise<unknown> | undefined} */
  let left;
  c.on('status', (s, d) => {
    statuses.push([s, d]);
    // Leaving while disconnected: nothing to send, the next connection just skips it.
    if (s === 'reconnecting') left = c.leave('a');
  });
  srv.conns[0].ws.close(1001, 'draining');
  await waitFor(() => statuses.some(([s]) => s === 'reconnecting'), 'reconnecting');
  assert.equal(statuses.find(([s]) => s === 'reconnecting')[1].delayMs, 0);
  assert.equal(await left, undefined);
  await waitFor(() => srv.conns.length === 2 && srv.conns[1].frames.length === 1, 're-join');
  assert.deepEqual(srv.conns[1].frames.map((f) => [f.op, f.room]), [['join', 'b']]);
  assert.deepEqual(c.rooms, ['b']);
});

test('batches of a room left are not delivered', async () => {
  const srv = await fakeGateway();
  const c = client(srv.url);
  const chats = /** @type {string[]} */ ([]);
  c.on('chat', (e) => chats.push(e.text));
  await c.connect();
  await c.join('r');
  await c.leave('r');
  srv.send(srv.conns[0], { op: 'batch', room: 'r', events: [ev(1)] });
  await c.join('s');
  srv.send(srv.conns[0], { op: 'batch', room: 's', events: [ev(2)] });
  await waitFor(() => chats.length === 1, 'the chat of s');
  assert.deepEqual(chats, ['m2']);
});

test('backoff grows exponentially with jitter while the gateway is down', async () => {
  const port = await freePort(); // nothing listens there
  const c = client(`ws://127.0.0.1:${port}/ws`, {
    reconnect: { initialDelayMs: 20, maxDelayMs: 80, factor: 2, jitter: 0.5 },
  });
  /** @type {number[]} */
  const delays = [];
  c.on('status', (s, d) => s === 'reconnecting' && delays.push(d.delayMs ?? -1));
  c.connect().catch(() => {});
  await waitFor(() => delays.length >= 5, 'five retries', 5000);
  const bounds = [20, 40, 80, 80, 80];
  delays.slice(0, 5).forEach((d, i) => {
    assert.ok(d >= bounds[i] / 2 && d <= bounds[i], `delay ${i} = ${d}, want ${bounds[i] / 2}..${bounds[i]}`);
  });
});

test('lost replies time out; ops on a dropped socket reject with disconnected', async () => {
  const srv = await fakeGateway({
    script: (frame, conn) => {
      if (frame.op === 'chat' && frame.text === 'lost') return true; // never answered
      if (frame.op === 'chat' && frame.text === 'drop') {
        conn.ws.terminate();
        return true;
      }
    },
  });
  const c = client(srv.url, { requestTimeoutMs: 200 });
  await c.connect();
  await assert.rejects(c.chat('r', 'lost'), { code: 'timeout', op: 'chat' });
  await assert.rejects(c.chat('r', 'drop'), { code: 'disconnected' });
  await waitFor(() => c.status === 'open', 'reconnected');
});

test('an error frame without ref goes to the error callback', async () => {
  const srv = await fakeGateway();
  const c = client(srv.url);
  /** @type {any[]} */
  const errors = [];
  c.on('error', (e) => errors.push(e));
  await c.connect();
  srv.send(srv.conns[0], { op: 'error', code: 'bad_request', message: 'unparsable frame' });
  await waitFor(() => errors.length === 1, 'error callback');
  assert.equal(errors[0].code, 'bad_request');
});

test('close() stops for good: no reconnect', async () => {
  const srv = await fakeGateway();
  const c = client(srv.url);
  await c.connect();
  c.close();
  await new Promise((r) => setTimeout(r, 200));
  assert.equal(srv.conns.length, 1);
  assert.equal(c.status, 'closed');
});

test('without reconnect, a drop ends in closed', async () => {
  const srv = await fakeGateway();
  const c = client(srv.url, { reconnect: false });
  await c.connect();
  srv.conns[0].ws.close(1001, 'bye');
  await waitFor(() => c.status === 'closed', 'closed');
});

// ---------------------------------------------------------------------------------------
// Moderation (protocol v1.1)

const recall = (/** @type {string} */ id, /** @type {number} */ ts, /** @type {string} */ target) => ({ id, ts, type: 'recall', target });

test('recall: delivered with its room (live and from history); a recalled event replayed later is dropped', async () => {
  const srv = await fakeGateway();
  // History may hold a recall whose target is gone: delivered all the same.
  srv.history = [ev(1), recall('fake-r0', 1500, 'fake-0')];
  const c = client(srv.url);
  /** @type {any[]} */
  const recalls = [];
  c.on('recall', (e, meta) => recalls.push([e.target, meta]));
  /** @type {string[]} */
  const types = [];
  c.on('event', (e) => types.push(e.type));
  const chats = /** @type {any[]} */ ([]);
  c.on('chat', (e) => chats.push([e.id, e.ts]));
  await c.connect();
  await c.join('r', { history: 10 });
  assert.deepEqual(recalls, [['fake-0', { room: 'r', history: true }]]);

  srv.send(srv.conns[0], { op: 'batch', room: 'r', events: [ev(2), recall('fake-r1', 2000, 'fake-2')] });
  await waitFor(() => recalls.length === 2, 'the live recall');
  assert.deepEqual(recalls[1], ['fake-2', { room: 'r', history: false }]);
  assert.deepEqual(types, ['chat', 'recall', 'chat', 'recall'], "'event' sees recalls too");

  // A recall of fake-5 before fake-5 itself was seen (e.g. history replayed by another
  // node): the event, older than its recall, is dropped; an event reusing the id later
  // (a restarted node numbers from 1 again) is a different one and comes through.
  srv.send(srv.conns[0], {
    op: 'batch',
    room: 'r',
    events: [recall('fake-r2', 2100, 'fake-5'), ev(5), { ...ev(5), ts: 5000 }, recall('fake-r2', 2100, 'fake-5')],
  });
  await waitFor(() => chats.length === 3, 'the new fake-5');
  assert.deepEqual(chats, [
    ['fake-1', 1001],
    ['fake-2', 1002],
    ['fake-5', 5000],
  ]);
  assert.equal(recalls.length, 3, 'a duplicate recall is delivered once');
});

test('close 4030: status banned, a banned callback, no reconnect; ops reject with banned', async () => {
  const srv = await fakeGateway({
    script: (frame) => frame.op === 'chat' && frame.text === 'unanswered',
  });
  const c = client(srv.url);
  /** @type {any[]} */
  const statuses = [];
  c.on('status', (s, d) => statuses.push([s, d]));
  /** @type {any[]} */
  const banned = [];
  c.on('banned', (info) => banned.push(info));
  await c.connect();
  await c.join('r');
  const onTheWire = c.chat('r', 'unanswered');
  await waitFor(() => srv.conns[0].frames.some((f) => f.text === 'unanswered'), 'the chat on the wire');
  srv.conns[0].ws.close(4030, 'banned');
  await assert.rejects(onTheWire, { code: 'banned', op: 'chat' });
  await waitFor(() => c.status === 'banned', 'banned');
  assert.deepEqual(banned, [{ code: 4030, reason: 'banned' }]);
  assert.deepEqual(statuses.at(-1), ['banned', { code: 4030, reason: 'banned' }]);
  assert.ok(!statuses.some(([s]) => s === 'reconnecting'), 'no reconnect scheduled');
  await assert.rejects(c.chat('r', 'later'), { code: 'banned', op: 'chat' });
  await new Promise((r) => setTimeout(r, 300)); // several backoff steps of this client
  assert.equal(srv.handshakes, 1, 'no reconnect');
  assert.equal(srv.conns.length, 1);

  // The app may try again on purpose (the ban ended): the rooms are re-joined.
  await c.connect();
  assert.equal(c.status, 'open');
  await waitFor(() => srv.conns[1]?.frames.some((f) => f.op === 'join' && f.room === 'r'), 're-join');
});

test('close 4030 without reconnect also ends in banned', async () => {
  const srv = await fakeGateway();
  const c = client(srv.url, { reconnect: false });
  await c.connect();
  srv.conns[0].ws.close(4030, 'banned');
  await waitFor(() => c.status === 'banned', 'banned');
});

test('a handshake refused with HTTP 403 means banned (no retry loop); other refusals retry', async () => {
  const srv = await fakeGateway();
  srv.refuse = 503;
  const c = client(srv.url);
  /** @type {string[]} */
  const statuses = [];
  c.on('status', (s) => statuses.push(s));
  const opened = c.connect();
  await waitFor(() => srv.handshakes >= 3, 'retries after 503', 3000);
  assert.ok(statuses.includes('reconnecting'));
  srv.refuse = 403;
  await assert.rejects(opened, { code: 'banned' });
  assert.equal(c.status, 'banned');
  const n = srv.handshakes;
  await new Promise((r) => setTimeout(r, 300));
  assert.equal(srv.handshakes, n, 'no retry after 403');
});

test('muted, filtered and slow-mode refusals reject with their codes and retry hints', async () => {
  const srv = await fakeGateway({
    script: (frame, conn, s) => {
      const answer = (/** @type {Record<string, unknown>} */ f) => {
        s.send(conn, { op: 'error', ref: frame.ref, ...f });
        return true;
      };
      if (frame.op === 'chat' && frame.text === 'muted for a while') {
        return answer({ code: 'muted', message: 'muted in this room', retry_after_ms: 4500 });
      }
      if (frame.op === 'chat' && frame.text === 'chat closed') {
        return answer({ code: 'muted', message: "the room's chat is closed" });
      }
      if (frame.op === 'chat' && frame.text === 'blocked word') {
        return answer({ code: 'filtered', message: 'blocked word' });
      }
      if (frame.op === 'chat' && frame.text === 'too soon') {
        return answer({ code: 'rate_limited', message: 'slow mode', retry_after_ms: 2500 });
      }
      if (frame.op === 'gift') return answer({ code: 'muted', message: 'muted in this room', retry_after_ms: 1000 });
    },
  });
  const c = client(srv.url);
  await c.connect();
  await c.join('r');
  const muted = await c.chat('r', 'muted for a while').catch((e) => e);
  assert.ok(muted instanceof DanmakuError);
  assert.equal(muted.code, 'muted');
  assert.equal(muted.retryAfterMs, 4500);
  assert.equal(muted.op, 'chat');
  assert.match(muted.message, /^muted: muted in this room/);
  const closed = await c.chat('r', 'chat closed').catch((e) => e);
  assert.equal(closed.code, 'muted');
  assert.equal(closed.retryAfterMs, undefined, 'no end: no retry hint');
  await assert.rejects(c.chat('r', 'blocked word'), { code: 'filtered', op: 'chat', retryAfterMs: undefined });
  await assert.rejects(c.chat('r', 'too soon'), { code: 'rate_limited', retryAfterMs: 2500 });
  await assert.rejects(c.gift('r', 'rose'), { code: 'muted', op: 'gift', retryAfterMs: 1000 });
  // Refusals do not touch the connection.
  await c.chat('r', 'fine');
  assert.equal(c.status, 'open');
  assert.equal(srv.conns.length, 1);
});

test('a token function that keeps failing is retried with backoff, not in a tight loop', async () => {
  const srv = await fakeGateway();
  let calls = 0;
  const c = client(srv.url, {
    token: () => {
      calls++;
      return Promise.reject(new Error('login service down'));
    },
    reconnect: { initialDelayMs: 50, maxDelayMs: 200 },
  });
  /** @type {any[]} */
  const errors = [];
  c.on('error', (e) => errors.push(e.code));
  c.connect().catch(() => {});
  await new Promise((r) => setTimeout(r, 400));
  assert.ok(calls >= 2 && calls <= 8, `token asked ${calls} times in 400 ms`);
  assert.equal(errors[0], 'token');
  assert.equal(srv.conns.length, 0);
});

// ---------------------------------------------------------------------------------------
// Recovery on reconnect (protocol v1.1): `since` on re-join, `recovered`

const presence = (/** @type {number} */ n, /** @type {number} */ online) => ({ id: `fake-p${n}`, ts: 1000 + n, type: 'presence', online });

/**
 * Records a client's chats (text, meta) and `rejoined` reports.
 * @param {DanmakuClient} c
 */
function watch(c) {
  const chats = /** @type {Array<[string, any]>} */ ([]);
  c.on('chat', (e, meta) => chats.push([e.text, meta]));
  const rejoins = /** @type {Array<[string, any]>} */ ([]);
  c.on('rejoined', (room, info) => rejoins.push([room, info]));
  return { chats, rejoins };
}

test('re-join after a drop sends since = the last event id and the join\'s history; a recovered gap is delivered once, as recovered', async () => {
  const srv = await fakeGateway();
  srv.log = [ev(1), ev(2)];
  srv.history = [ev(1), ev(2)];
  const c = client(srv.url, { rejoinHistory: 50 });
  const { chats, rejoins } = watch(c);
  /** @type {any[]} */
  const statuses = [];
  c.on('status', (s, d) => statuses.push([s, d]));
  await c.connect();
  const first = await c.join('r', { history: 5 });
  assert.equal(first.recovered, undefined, 'no since, no recovered');
  assert.equal(srv.conns[0].frames[0].since, undefined, 'the first join sends no since');
  assert.equal(c.lastEventId('r'), 'fake-2', 'history moves the position');
  // Live events; presence is never in the recovery log, so it never becomes `since`.
  srv.log.push(ev(3), ev(4));
  srv.send(srv.conns[0], { op: 'batch', room: 'r', events: [ev(3), ev(4), presence(5, 3)] });
  await waitFor(() => chats.length === 4 && c.online('r') === 3, 'live events');
  assert.equal(c.lastEventId('r'), 'fake-4');

  // The network blinks; two events happen meanwhile.
  srv.conns[0].ws.terminate();
  srv.log.push(ev(6), ev(7));
  await waitFor(() => rejoins.length === 1, 're-joined');
  const drop = statuses.find(([s]) => s === 'reconnecting')?.[1];
  assert.equal(drop.code, 1006);
  assert.ok(drop.delayMs > 0, 'an abnormal close waits its backoff step');
  const rejoin = srv.conns[1].frames.find((f) => f.op === 'join');
  assert.deepEqual(rejoin, { op: 'join', room: 'r', history: 5, since: 'fake-4', ref: rejoin.ref });
  assert.deepEqual(rejoins[0], ['r', { recovered: true, since: 'fake-4', missed: 2, resync: false }]);
  assert.deepEqual(
    chats.map(([text, meta]) => [text, meta.history, meta.recovered]),
    [
      ['m1', true, undefined],
      ['m2', true, undefined],
      ['m3', false, undefined],
      ['m4', false, undefined],
      ['m6', true, true],
      ['m7', true, true],
    ],
  );
  assert.deepEqual(chats[4][1], { room: 'r', history: true, recovered: true });
  assert.equal(c.lastEventId('r'), 'fake-7');

  // Live again: a late duplicate of a recovered event is dropped, the next one comes.
  srv.send(srv.conns[1], { op: 'batch', room: 'r', events: [ev(7), ev(8)] });
  await waitFor(() => chats.length === 7, 'the live event after the re-join');
  assert.deepEqual(chats.at(-1), ['m8', { room: 'r', history: false }]);
  assert.equal(c.lastEventId('r'), 'fake-8');
});

test('recovered false: the recent history without what was seen, and the page is told', async () => {
  const srv = await fakeGateway();
  srv.log = [ev(1), ev(2), ev(3), ev(4)];
  srv.recover = false; // e.g. a restarted single node, or a gap longer than the log
  const c = client(srv.url, { rejoinHistory: 3 });
  const { chats, rejoins } = watch(c);
  /** @type {any[]} */
  const joined = [];
  c.on('joined', (j, meta) => joined.push([j.recovered, meta]));
  await c.connect();
  await c.join('r'); // no history: re-joins ask rejoinHistory
  srv.send(srv.conns[0], { op: 'batch', room: 'r', events: [ev(3), ev(4)] });
  await waitFor(() => chats.length === 2, 'live events');
  srv.conns[0].ws.close(4010, 'slow consumer');
  srv.log.push(ev(5), ev(6));
  await waitFor(() => rejoins.length === 1, 're-joined');
  const rejoin = srv.conns[1].frames.find((f) => f.op === 'join');
  assert.equal(rejoin.since, 'fake-4');
  assert.equal(rejoin.history, 3);
  // history = the last 3 (m4, m5, m6): m4 was seen, so 2 are new.
  assert.deepEqual(rejoins[0], ['r', { recovered: false, since: 'fake-4', missed: 2, resync: true }]);
  assert.deepEqual(joined[1], [false, { rejoin: true, resync: true }]);
  srv.send(srv.conns[1], { op: 'batch', room: 'r', events: [ev(6), ev(7)] });
  await waitFor(() => chats.length === 5, 'the live event after the re-join');
  assert.deepEqual(
    chats.map(([text, meta]) => [text, meta.history, meta.recovered]),
    [
      ['m3', false, undefined],
      ['m4', false, undefined],
      ['m5', true, undefined],
      ['m6', true, undefined],
      ['m7', false, undefined],
    ],
  );
});

test('join(room, { since }) sends it and reports recovered; a room without events re-joins without since', async () => {
  const srv = await fakeGateway();
  srv.log = [ev(9), ev(10)];
  const c = client(srv.url);
  const { chats, rejoins } = watch(c);
  await c.connect();
  const quiet = await c.join('quiet');
  assert.equal(quiet.recovered, undefined);
  assert.equal(c.lastEventId('quiet'), undefined);
  // Kept from before a page reload, say.
  const joined = await c.join('r', { history: 10, since: 'fake-9' });
  const frame = srv.conns[0].frames.find((f) => f.room === 'r');
  assert.equal(frame.since, 'fake-9');
  assert.equal(frame.history, 10);
  assert.equal(joined.recovered, true);
  assert.deepEqual(chats, [['m10', { room: 'r', history: true, recovered: true }]]);
  assert.equal(c.lastEventId('r'), 'fake-10');
  // A gateway without recovery does not answer the field: the client says false.
  srv.log = null;
  const old = await c.join('s', { since: 'fake-1' });
  assert.equal(old.recovered, false);
  assert.equal(c.lastEventId('s'), 'fake-1', 'the app\'s position stays until an event moves it');

  srv.log = [ev(9), ev(10)];
  srv.conns[0].ws.terminate();
  await waitFor(() => rejoins.length === 3, 'three re-joins');
  const byRoom = Object.fromEntries(srv.conns[1].frames.filter((f) => f.op === 'join').map((f) => [f.room, f]));
  assert.equal(byRoom.quiet.since, undefined, 'nothing to name: no since');
  assert.equal(byRoom.quiet.history, 20, 'rejoinHistory by default');
  assert.equal(byRoom.r.since, 'fake-10');
  assert.equal(byRoom.r.history, 10);
  assert.equal(byRoom.s.since, 'fake-1');
  const infos = Object.fromEntries(rejoins);
  assert.deepEqual(infos.quiet, { recovered: false, since: null, missed: 0, resync: false });
  assert.deepEqual(infos.r, { recovered: true, since: 'fake-10', missed: 0, resync: false });
  // fake-1 is not in the log: the last events instead, new to room s (not to r).
  assert.deepEqual(infos.s, { recovered: false, since: 'fake-1', missed: 2, resync: false });
  assert.deepEqual(
    chats.map(([text, meta]) => [text, meta.room]),
    [
      ['m10', 'r'],
      ['m9', 's'],
      ['m10', 's'],
    ],
    'nothing delivered twice in a room',
  );
});

test('1001 with urls: at once to the next endpoint, which recovers; a later drop rotates back', async () => {
  const a = await fakeGateway();
  const b = await fakeGateway();
  a.log = [ev(1)];
  b.log = [ev(1), ev(2)]; // a cluster-wide log: B knows what A sent
  const c = client('', { urls: [a.url, b.url] });
  const { chats, rejoins } = watch(c);
  /** @type {any[]} */
  const statuses = [];
  c.on('status', (s, d) => statuses.push([s, d]));
  assert.equal(c.url, a.url, 'the first endpoint first');
  await c.connect();
  await c.join('r');
  a.send(a.conns[0], { op: 'batch', room: 'r', events: [ev(1)] });
  await waitFor(() => chats.length === 1, 'live event');
  a.conns[0].ws.close(1001, 'draining');
  await waitFor(() => rejoins.length === 1, 're-joined on B');
  const drain = statuses.find(([s]) => s === 'reconnecting')?.[1];
  assert.equal(drain.code, 1001);
  assert.equal(drain.delayMs, 0, '1001 reconnects at once');
  assert.equal(a.conns.length, 1, 'the draining node is not tried again');
  assert.equal(b.conns.length, 1);
  assert.equal(c.url, b.url);
  assert.equal(b.conns[0].frames[0].since, 'fake-1');
  assert.deepEqual(rejoins[0], ['r', { recovered: true, since: 'fake-1', missed: 1, resync: false }]);
  assert.deepEqual(chats.map(([t]) => t), ['m1', 'm2']);

  // B dies: the next attempt goes back to A (with its backoff step).
  b.conns[0].ws.terminate();
  await waitFor(() => a.conns.length === 2 && c.status === 'open', 'back on A');
  assert.equal(statuses.filter(([s]) => s === 'reconnecting').at(-1)[1].code, 1006);
  assert.equal(c.url, a.url);
  await waitFor(() => rejoins.length === 2, 're-joined on A');
  assert.equal(a.conns[1].frames[0].since, 'fake-2');
  assert.deepEqual(rejoins[1][1], { recovered: false, since: 'fake-2', missed: 0, resync: false }, "A's log lacks fake-2");
});

test('reconnect(): drops the socket and reconnects at once, re-joining with since', async () => {
  const srv = await fakeGateway();
  srv.log = [ev(1)];
  srv.history = [ev(1)];
  const c = client(srv.url, { reconnect: { initialDelayMs: 5000, maxDelayMs: 5000 } });
  const { rejoins } = watch(c);
  /** @type {any[]} */
  const statuses = [];
  c.on('status', (s, d) => statuses.push([s, d]));
  await c.connect();
  await c.join('r', { history: 1 });
  c.reconnect();
  await waitFor(() => rejoins.length === 1, 're-joined', 2000);
  assert.deepEqual(
    statuses.find(([s]) => s === 'reconnecting'),
    ['reconnecting', { attempt: 0, delayMs: 0, code: 1000, reason: 'client reconnects' }],
  );
  assert.equal(srv.conns.length, 2);
  assert.equal(srv.conns[1].frames[0].since, 'fake-1');
  assert.equal(rejoins[0][1].recovered, true);
  c.close();
  c.reconnect(); // closed: nothing
  await new Promise((r) => setTimeout(r, 100));
  assert.equal(srv.conns.length, 2);
});

test('a ban (4030) stays final with recovery state kept for an explicit connect()', async () => {
  const srv = await fakeGateway();
  srv.log = [ev(1)];
  srv.history = [ev(1)];
  const c = client(srv.url);
  const { rejoins } = watch(c);
  await c.connect();
  await c.join('r', { history: 1 });
  srv.conns[0].ws.close(4030, 'banned');
  await waitFor(() => c.status === 'banned', 'banned');
  await new Promise((r) => setTimeout(r, 300));
  assert.equal(srv.handshakes, 1, 'no reconnect after 4030');
  await c.connect();
  await waitFor(() => rejoins.length === 1, 're-joined after connect()');
  assert.equal(srv.conns[1].frames[0].since, 'fake-1');
});

test('a re-join whose since is refused (bad_request) joins again without it', async () => {
  const srv = await fakeGateway({
    script: (frame, conn, s) => {
      // The first connection takes it (a lenient gateway); the next one refuses it.
      if (s.conns.indexOf(conn) > 0 && frame.op === 'join' && frame.since === 'x'.repeat(200)) {
        s.send(conn, { op: 'error', ref: frame.ref, code: 'bad_request', message: 'since: must be 1-128 bytes' });
        return true;
      }
    },
  });
  srv.log = [ev(1)];
  const c = client(srv.url);
  const { rejoins } = watch(c);
  /** @type {string[]} */
  const errors = [];
  c.on('error', (e) => errors.push(e.code));
  await c.connect();
  const joined = await c.join('r', { since: 'x'.repeat(200) });
  assert.equal(joined.recovered, false);
  srv.conns[0].ws.terminate();
  await waitFor(() => rejoins.length === 1, 're-joined without since');
  assert.deepEqual(errors, ['bad_request']);
  const joins = srv.conns[1].frames.filter((f) => f.op === 'join');
  assert.equal(joins.length, 2);
  assert.equal(joins[1].since, undefined);
  assert.deepEqual(rejoins[0][1], { recovered: false, since: null, missed: 0, resync: false });
});
