// The client library against the REAL gateway binary (target/debug/danmaku-gateway,
// built by cargo first), started as a child process with a temp config.

import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import WebSocket from 'ws';
import { DanmakuClient, DanmakuError } from '../danmaku-client.js';
import { Gateway, signToken, waitFor } from '../support/gateway.mjs';

/** @type {Gateway} */
let gw;
/** @type {DanmakuClient[]} */
const clients = [];
let seq = 0;

/**
 * A connected client; `user` null = anonymous.
 * @param {string | null} user @param {Partial<import('../danmaku-client.js').ClientOptions>} [opts]
 */
async function connect(user, opts = {}) {
  const c = new DanmakuClient({
    url: gw.wsUrl,
    WebSocket,
    token: user === null ? undefined : signToken(user, `${user}-name`),
    reconnect: { initialDelayMs: 50, maxDelayMs: 300 },
    ...opts,
  });
  clients.push(c);
  await c.connect();
  return c;
}

/** A fresh room and user ids per test, so rate limits and history never leak across. */
function fresh(/** @type {string} */ tag) {
  seq++;
  return { room: `web-${tag}-${seq}`, a: `${tag}-a-${seq}`, b: `${tag}-b-${seq}` };
}

/**
 * Collects `type` events of a client.
 * @param {DanmakuClient} c @param {keyof import('../danmaku-client.js').ClientEvents} type
 * @returns {Array<[any, any]>}
 */
function collect(c, type) {
  /** @type {Array<[any, any]>} */
  const got = [];
  c.on(type, (...args) => {
    got.push([args[0], args[1]]);
  });
  return got;
}

before(async () => {
  gw = await Gateway.start();
});

after(async () => {
  for (const c of clients) c.close();
  await gw?.dispose();
});

test('connects with a token: status callbacks and hello', async () => {
  const { a } = fresh('hello');
  const c = new DanmakuClient({ url: gw.wsUrl, WebSocket, token: signToken(a, 'Ann') });
  clients.push(c);
  /** @type {string[]} */
  const statuses = [];
  c.on('status', (s) => statuses.push(s));
  const hello = await c.connect();
  assert.equal(hello.op, 'hello');
  assert.deepEqual(hello.user, { id: a, name: 'Ann' });
  assert.equal(hello.node, 'web-test');
  assert.equal(hello.heartbeat_ms, 1000);
  assert.deepEqual(c.user, { id: a, name: 'Ann' });
  assert.deepEqual(statuses, ['connecting', 'open']);
  assert.equal(c.status, 'open');
  assert.ok((await c.ping()) >= 0, 'ping resolves with the round trip');
  c.close();
  assert.equal(c.status, 'closed');
  await assert.rejects(c.chat('x', 'late'), (e) => e instanceof DanmakuError && e.code === 'closed');
});

test('an op before connect() is refused with not_connected', async () => {
  const c = new DanmakuClient({ url: gw.wsUrl, WebSocket });
  await assert.rejects(c.join('x'), { code: 'not_connected' });
});

test('join with history: recent events, oldest first, also given to the callbacks', async () => {
  const { room, a, b } = fresh('history');
  const writer = await connect(a);
  const own = collect(writer, 'chat');
  await writer.join(room);
  for (const text of ['one', 'two', 'three']) await writer.chat(room, text);
  // Once the sender has its own chats back, the room's window is flushed into history.
  await waitFor(() => own.length === 3, 'the batch');
  const reader = await connect(b);
  const seen = collect(reader, 'chat');
  const joined = await reader.join(room, { history: 10 });
  assert.equal(joined.op, 'joined');
  assert.equal(joined.room, room);
  assert.equal(joined.online, 2);
  assert.deepEqual(
    joined.history.map((/** @type {any} */ e) => e.text),
    ['one', 'two', 'three'],
  );
  assert.deepEqual(joined.redpackets, []);
  assert.deepEqual(
    seen.map(([ev, meta]) => [ev.text, meta.room, meta.history]),
    [
      ['one', room, true],
      ['two', room, true],
      ['three', room, true],
    ],
  );
  assert.deepEqual(reader.rooms, [room]);
  assert.equal(reader.online(room), 2);
});

test('chat resolves on ack; every member gets the event, the sender included', async () => {
  const { room, a, b } = fresh('chat');
  const alice = await connect(a);
  const bob = await connect(b);
  await alice.join(room);
  await bob.join(room);
  const atBob = collect(bob, 'chat');
  const atAlice = collect(alice, 'chat');
  const all = collect(bob, 'event');
  const ack = await alice.chat(room, 'hello bob');
  assert.equal(ack.op, 'ack');
  assert.equal(typeof ack.ref, 'number');
  await waitFor(() => atBob.length === 1 && atAlice.length === 1, 'the chat at both');
  const [ev, meta] = atBob[0];
  assert.equal(ev.type, 'chat');
  assert.equal(ev.text, 'hello bob');
  assert.deepEqual(ev.user, { id: a, name: `${a}-name` });
  assert.equal(typeof ev.id, 'string');
  assert.equal(typeof ev.ts, 'number');
  assert.deepEqual(meta, { room, history: false });
  assert.ok(all.some(([e]) => e.id === ev.id), "'event' sees every event");
});

test('errors reject with the protocol code', async () => {
  const { room, a } = fresh('err');
  const c = await connect(a);
  const notJoined = await c.chat(room, 'hi').catch((e) => e);
  assert.ok(notJoined instanceof DanmakuError);
  assert.equal(notJoined.code, 'not_joined');
  assert.equal(notJoined.op, 'chat');
  assert.match(notJoined.message, /^not_joined/);
  await assert.rejects(c.leave(room), { code: 'not_joined' });
  await c.join(room);
  await assert.rejects(c.chat(room, 'x'.repeat(201)), { code: 'too_large' });
  await assert.rejects(c.gift(room, 'rocket'), { code: 'forbidden' }, 'paid gifts come from the backend');
  await assert.rejects(c.grab(room, 'rp-nope'), { code: 'packet_not_found' });

  // chat: 1/s, burst 5 → the sixth in a row is rate limited, with a retry hint.
  const results = await Promise.allSettled(Array.from({ length: 6 }, (_, i) => c.chat(room, `m${i}`)));
  const limited = results.find((r) => r.status === 'rejected');
  assert.ok(limited && limited.status === 'rejected', 'one was refused');
  assert.equal(limited.reason.code, 'rate_limited');
  assert.ok(limited.reason.retryAfterMs > 0, 'retry_after_ms carried');

  // The connection survives refused ops.
  assert.ok((await c.ping()) >= 0);
});

test('an anonymous viewer watches but cannot write (unauthorized)', async () => {
  const { room, a } = fresh('anon');
  const viewer = await connect(null);
  assert.equal(viewer.user, null);
  const joined = await viewer.join(room);
  assert.equal(joined.room, room);
  await assert.rejects(viewer.chat(room, 'hi'), { code: 'unauthorized' });
  const seen = collect(viewer, 'chat');
  const writer = await connect(a);
  await writer.join(room);
  await writer.chat(room, 'for the viewers');
  await waitFor(() => seen.length === 1, 'the chat at the anonymous viewer');
});

test('gift: ack, and a gift event with the count', async () => {
  const { room, a, b } = fresh('gift');
  const alice = await connect(a);
  const bob = await connect(b);
  await alice.join(room);
  await bob.join(room);
  const gifts = collect(bob, 'gift');
  await alice.gift(room, 'rose', 3);
  await waitFor(() => gifts.length === 1, 'gift event');
  const [ev] = gifts[0];
  assert.equal(ev.gift, 'rose');
  assert.equal(ev.count, 3);
  assert.equal(ev.user.id, a);
});

test('red packet from the HTTP API: events, grabs resolve with amounts that sum up', async () => {
  const { room, a, b } = fresh('rp');
  const alice = await connect(a);
  const bob = await connect(b);
  await alice.join(room);
  await bob.join(room);
  const packets = collect(bob, 'redpacket');
  const grabs = collect(bob, 'grab');
  const done = collect(bob, 'redpacket_done');
  const packet = await gw.redpacket(room, 100, 2);
  await waitFor(() => packets.length === 1, 'redpacket event');
  const [rp] = packets[0];
  assert.equal(rp.packet, packet);
  assert.equal(rp.total, 100);
  assert.equal(rp.shares, 2);
  assert.deepEqual(rp.user, { id: 's', name: 'S' });
  assert.ok(rp.expires_at > Date.now());

  // A late joiner sees it among the room's open packets.
  const carol = await connect(`${a}-late`);
  const joined = await carol.join(room);
  assert.deepEqual(
    joined.redpackets.map((p) => [p.packet, p.remaining]),
    [[packet, 2]],
  );

  const first = await alice.grab(room, packet);
  const second = await bob.grab(room, packet);
  assert.equal(typeof first, 'number');
  assert.ok(first >= 1 && second >= 1);
  assert.equal(first + second, 100);
  await assert.rejects(alice.grab(room, packet), { code: 'already_grabbed' });
  await assert.rejects(carol.grab(room, packet), (/** @type {any} */ e) => ['packet_empty', 'packet_expired'].includes(e.code));
  await waitFor(() => grabs.length === 2 && done.length === 1, 'grab and done events');
  assert.deepEqual(grabs.map(([g]) => g.amount).sort(), [first, second].sort());
  assert.equal(done[0][0].grabbed, 2);
  assert.equal(done[0][0].total_grabbed, 100);
  assert.equal(done[0][0].expired, false);
});

test('msgpack format: the same ops and events over binary frames', async () => {
  const { room, a, b } = fresh('mp');
  const alice = await connect(a, { format: 'msgpack' });
  const bob = await connect(b, { format: 'msgpack' });
  assert.equal(alice.hello?.heartbeat_ms, 1000);
  await alice.join(room);
  await bob.join(room);
  const chats = collect(bob, 'chat');
  await alice.chat(room, 'binary héllo 弹幕');
  await waitFor(() => chats.length === 1, 'chat over msgpack');
  assert.equal(chats[0][0].text, 'binary héllo 弹幕');
  assert.ok(chats[0][0].ts > 1_600_000_000_000, 'u64 timestamps decode as numbers');
  await assert.rejects(alice.leave(`${room}-other`), { code: 'not_joined' });
  const packet = await gw.redpacket(room, 100, 2);
  const amount = await bob.grab(room, packet);
  assert.ok(amount >= 1 && amount <= 99);
  // A JSON client in the same room sees the same events.
  const json = await connect(`${a}-json`);
  const joined = await json.join(room, { history: 10 });
  assert.ok(joined.history.some((e) => e.type === 'chat' && e.text === 'binary héllo 弹幕'));
});

test('heartbeat: app-level pings keep flowing with the server heartbeat', async () => {
  const { a } = fresh('hb');
  const c = await connect(a);
  const statuses = collect(c, 'status');
  // heartbeat_ms is 1000 in the test config: the server closes a silent socket after
  // 2 s and the client pings every 1 s; after 3.5 s the connection is still the same.
  await new Promise((r) => setTimeout(r, 3500));
  assert.equal(c.status, 'open');
  assert.deepEqual(statuses, [], 'no reconnect');
});

test('reconnect: after the gateway restarts, rooms are re-joined and events flow again', async () => {
  const { room, a, b } = fresh('re');
  const alice = await connect(a);
  await alice.join(room);
  /** @type {Array<[string, any]>} */
  const statuses = [];
  alice.on('status', (s, d) => statuses.push([s, d]));
  const rejoined = collect(alice, 'joined');
  const chats = collect(alice, 'chat');

  const restarted = gw.restart(); // SIGTERM: drain, close 1001; then a new process
  await waitFor(() => statuses.some(([s]) => s === 'reconnecting'), 'reconnecting', 10000);
  const first = statuses.find(([s]) => s === 'reconnecting')?.[1];
  assert.equal(first.code, 1001, 'the drain closed us with 1001');
  assert.equal(first.delayMs, 0, '1001 reconnects at once');
  // Ops issued while the node is away wait for the new connection.
  const pending = alice.ping();
  await restarted;
  await waitFor(() => alice.status === 'open' && rejoined.length === 1, 're-joined', 15000);
  assert.equal(rejoined[0][0].room, room);
  assert.deepEqual(rejoined[0][1], { rejoin: true, resync: false });
  assert.deepEqual(alice.rooms, [room]);
  assert.ok((await pending) >= 0);

  const bob = await connect(b);
  await bob.join(room);
  await bob.chat(room, 'after the restart');
  await waitFor(() => chats.some(([e]) => e.text === 'after the restart'), 'live chat after reconnect');
});

// ---------------------------------------------------------------------------------------
// Moderation (protocol v1.1), driven through the HTTP API

test('recall: members get a recall event naming the chat; a late joiner never sees the chat', async () => {
  const { room, a, b } = fresh('recall');
  const alice = await connect(a);
  const bob = await connect(b);
  await alice.join(room);
  await bob.join(room);
  const chats = collect(bob, 'chat');
  const recalls = collect(bob, 'recall');
  await alice.chat(room, 'take me back');
  await waitFor(() => chats.length === 1, 'the chat');
  const target = chats[0][0].id;
  const r = await gw.api('DELETE', `/api/v1/rooms/${room}/events/${encodeURIComponent(target)}`);
  assert.equal(r.status, 202, JSON.stringify(r.body));
  await waitFor(() => recalls.length === 1, 'the recall');
  const [ev, meta] = recalls[0];
  assert.equal(ev.type, 'recall');
  assert.equal(ev.target, target);
  assert.equal(ev.id, r.body.id);
  assert.deepEqual(meta, { room, history: false });

  const late = await connect(`${a}-late`);
  const lateChats = collect(late, 'chat');
  const joined = await late.join(room, { history: 20 });
  assert.ok(!joined.history.some((e) => e.id === target), 'the recalled chat left the history');
  assert.deepEqual(lateChats, []);
});

test('mute: chat and gift reject with muted (retryAfterMs when timed); others get nothing', async () => {
  const { room, a, b } = fresh('mute');
  const alice = await connect(a);
  const bob = await connect(b);
  await alice.join(room);
  await bob.join(room);
  const atAlice = collect(alice, 'chat');
  let r = await gw.api('PUT', `/api/v1/rooms/${room}/mutes/${b}`, { duration_s: 60 });
  assert.equal(r.status, 204, JSON.stringify(r.body));
  const muted = await bob.chat(room, 'muted words').catch((e) => e);
  assert.ok(muted instanceof DanmakuError);
  assert.equal(muted.code, 'muted');
  assert.equal(muted.op, 'chat');
  assert.ok(muted.retryAfterMs > 50_000 && muted.retryAfterMs <= 60_000, `retryAfterMs ${muted.retryAfterMs}`);
  await assert.rejects(bob.gift(room, 'rose'), { code: 'muted', op: 'gift' });
  // Until lifted: no retry hint.
  r = await gw.api('PUT', `/api/v1/rooms/${room}/mutes/${b}`, {});
  assert.equal(r.status, 204);
  await assert.rejects(bob.chat(room, 'still muted'), (/** @type {any} */ e) => e.code === 'muted' && e.retryAfterMs === undefined);
  await alice.chat(room, 'marker');
  await waitFor(() => atAlice.length === 1, 'the marker');
  assert.deepEqual(atAlice.map(([e]) => e.text), ['marker'], 'the muted chats were not broadcast');
  r = await gw.api('DELETE', `/api/v1/rooms/${room}/mutes/${b}`);
  assert.equal(r.status, 204);
  await bob.chat(room, 'free again');
  await waitFor(() => atAlice.length === 2, 'the chat after unmute');
});

test('filtered: a blocked word rejects with filtered and is not broadcast', async () => {
  const { room, a, b } = fresh('filter');
  const alice = await connect(a);
  const bob = await connect(b);
  await alice.join(room);
  await bob.join(room);
  const atAlice = collect(alice, 'chat');
  const set = await gw.api('PUT', '/api/v1/filters', { block: ['forbiddenword'], mask: [] });
  assert.equal(set.status, 200, JSON.stringify(set.body));
  try {
    const err = await bob.chat(room, 'this has a ForbiddenWord in it').catch((e) => e);
    assert.ok(err instanceof DanmakuError);
    assert.equal(err.code, 'filtered');
    assert.equal(err.retryAfterMs, undefined);
    await alice.chat(room, 'marker');
    await waitFor(() => atAlice.length === 1, 'the marker');
    assert.deepEqual(atAlice.map(([e]) => e.text), ['marker']);
  } finally {
    await gw.api('PUT', '/api/v1/filters', { block: [], mask: [] });
  }
});

test('slow mode: the second chat in the window is rate_limited with retryAfterMs', async () => {
  const { room, a } = fresh('slow');
  const c = await connect(a);
  await c.join(room);
  const r = await gw.api('PUT', `/api/v1/rooms/${room}/settings`, { slow_mode_s: 10 });
  assert.equal(r.status, 200, JSON.stringify(r.body));
  assert.equal(r.body.slow_mode_s, 10);
  await c.chat(room, 'one');
  const err = await c.chat(room, 'two').catch((e) => e);
  assert.equal(err.code, 'rate_limited');
  assert.ok(err.retryAfterMs > 5000 && err.retryAfterMs <= 10_000, `retryAfterMs ${err.retryAfterMs}`);
});

test('ban: close 4030, status banned, no reconnect; a new connection is refused (HTTP 403)', async () => {
  const { room, a } = fresh('ban');
  const c = await connect(a);
  await c.join(room);
  const statuses = collect(c, 'status');
  const banned = collect(c, 'banned');
  const r = await gw.api('PUT', `/api/v1/bans/${a}`, { duration_s: 600 });
  assert.equal(r.status, 204, JSON.stringify(r.body));
  await waitFor(() => c.status === 'banned', 'banned', 5000);
  assert.equal(banned[0][0].code, 4030);
  await new Promise((res) => setTimeout(res, 500));
  assert.deepEqual(statuses.map(([s]) => s), ['banned'], 'no reconnect');
  await assert.rejects(c.chat(room, 'hello?'), { code: 'banned' });

  // Connecting again while banned: the handshake's 403 ends in `banned`, not a retry loop.
  const again = new DanmakuClient({ url: gw.wsUrl, WebSocket, token: signToken(a, a), reconnect: { initialDelayMs: 50 } });
  clients.push(again);
  await assert.rejects(again.connect(), { code: 'banned' });
  assert.equal(again.status, 'banned');
  const un = await gw.api('DELETE', `/api/v1/bans/${a}`);
  assert.equal(un.status, 204);
  await again.connect();
  assert.equal(again.status, 'open');
});

// ---------------------------------------------------------------------------------------
// Recovery on reconnect (protocol v1.1): `join` with `since`, `joined.recovered`

for (const format of /** @type {const} */ (['json', 'msgpack'])) {
  test(`recovery (${format}): a network blink while events are posted; the re-join recovers every gap event once`, async (t) => {
    if (!(await gw.answersRecovered())) {
      t.skip('this gateway binary does not answer `recovered` (no `since` support): rebuild it');
      return;
    }
    const { room, a } = fresh(`recover-${format}`);
    // The token function holds every reconnect until the test lets it through: the gap is
    // as long as the test needs, whatever the backoff draws.
    /** @type {Promise<void> | null} */
    let gate = null;
    let open = () => {};
    const alice = await connect(a, {
      format,
      token: async () => {
        if (gate) await gate;
        return signToken(a, `${a}-name`);
      },
    });
    /** @type {Array<[any, any]>} */
    const events = [];
    alice.on('event', (ev, meta) => events.push([ev, meta]));
    const rejoined = collect(alice, 'rejoined');
    await alice.join(room, { history: 5 });
    const before = [];
    for (const text of ['before 1', 'before 2']) {
      const r = await gw.api('POST', `/api/v1/rooms/${room}/events`, { type: 'chat', user: { id: 'host', name: 'Host' }, text });
      assert.equal(r.status, 202, JSON.stringify(r.body));
      before.push(r.body.id);
    }
    await waitFor(() => before.every((id) => events.some(([e]) => e.id === id)), 'the events before the blink');
    const lastBefore = alice.lastEventId(room);
    assert.equal(lastBefore, before[1]);

    // The blink: the socket dies under the client (no close frame), reconnects wait.
    gate = new Promise((r) => (open = r));
    /** @type {any} */ (alice)._ws.terminate();
    await waitFor(() => alice.status !== 'open', 'the client noticed');
    /** @type {string[]} */
    const gap = [];
    const posts = [
      { type: 'chat', user: { id: 'host', name: 'Host' }, text: 'during the gap' },
      { type: 'gift', user: { id: 'fan-1', name: 'Fan 1' }, gift: 'rocket', count: 2 },
      { type: 'gift', user: { id: 'fan-2', name: 'Fan 2' }, gift: 'rose', count: 1 },
      { type: 'system', text: 'the stream goes on' },
    ];
    for (const body of posts) {
      const r = await gw.api('POST', `/api/v1/rooms/${room}/events`, body);
      assert.equal(r.status, 202, JSON.stringify(r.body));
      gap.push(r.body.id);
    }
    await new Promise((r) => setTimeout(r, 100)); // past a batch window: all broadcast
    assert.ok(!events.some(([e]) => gap.includes(e.id)), 'nothing of the gap came before the reconnect');
    open();

    await waitFor(() => rejoined.length === 1, 're-joined', 10000);
    assert.deepEqual(rejoined[0], [room, { recovered: true, since: lastBefore, missed: gap.length, resync: false }]);
    const after = events.filter(([e]) => gap.includes(e.id));
    assert.deepEqual(
      after.map(([e]) => e.id),
      gap,
      'every gap event, once, in order',
    );
    for (const [, meta] of after) assert.deepEqual(meta, { room, history: true, recovered: true });
    const ids = events.filter(([e]) => e.type !== 'presence').map(([e]) => e.id);
    assert.equal(new Set(ids).size, ids.length, 'no event delivered twice');
    assert.equal(alice.lastEventId(room), gap.at(-1));

    // And live again.
    const r = await gw.api('POST', `/api/v1/rooms/${room}/events`, { type: 'chat', user: { id: 'host', name: 'Host' }, text: 'live again' });
    await waitFor(() => events.some(([e]) => e.id === r.body.id), 'live after the re-join');
    assert.deepEqual(events.at(-1)?.[1], { room, history: false });
  });
}

test('recovery: never claimed across a gateway restart (single node): recovered false, history instead', async (t) => {
  if (!(await gw.answersRecovered())) {
    t.skip('this gateway binary does not answer `recovered` (no `since` support): rebuild it');
    return;
  }
  const { room, a } = fresh('norecover');
  const alice = await connect(a);
  const chats = collect(alice, 'chat');
  const rejoined = collect(alice, 'rejoined');
  await alice.join(room, { history: 5 });
  const r = await gw.api('POST', `/api/v1/rooms/${room}/events`, { type: 'chat', user: { id: 'host', name: 'Host' }, text: 'before the restart' });
  await waitFor(() => chats.length === 1, 'the chat');
  await gw.restart();
  await waitFor(() => rejoined.length === 1, 're-joined', 15000);
  assert.equal(rejoined[0][1].recovered, false);
  assert.equal(rejoined[0][1].since, r.body.id);
  assert.equal(chats.length, 1, 'nothing delivered twice');
});
