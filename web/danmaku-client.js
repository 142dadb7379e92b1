// danmaku-client.js — browser and Node (>= 20) client for the danmaku gateway's wire
// protocol v1.1 (PROTOCOL.md). An ES module with no build step and no runtime
// dependencies; types are JSDoc (check with `tsc --allowJs --checkJs --noEmit`).
//
//   import { DanmakuClient } from '/danmaku-client.js';
//   const client = new DanmakuClient({ url: 'wss://live.example/ws', token });
//   client.on('chat', (ev, { room }) => show(ev.user.name, ev.text));
//   client.on('status', (status) => indicator.textContent = status);
//   await client.connect();
//   await client.join('room-1', { history: 20 });
//   await client.chat('room-1', 'hello!');            // resolves on `ack`
//   const cents = await client.grab('room-1', packet); // resolves with the amount
//
// What it does for you:
// - `ref` management: every op carries a fresh `ref`; its reply (`ack`, `joined`, `pong`
//   or `error`) settles the op's promise. An `error` rejects with a DanmakuError whose
//   `code` is the protocol's error code, plus `retryAfterMs` whenever the server sends
//   `retry_after_ms` (`rate_limited`, slow mode's included; a `muted` with an end).
// - Reconnects with jittered exponential backoff. Close 1001 (node draining) and 4010
//   (slow consumer, resync) reconnect at once. With `urls`, each reconnect goes to the
//   next endpoint, so a draining node is not the first one tried again.
// - Recovery (protocol v1.1): the client remembers the id of the last event it got in
//   each room; after every reconnect it re-joins the room with `since` = that id (and the
//   room's `history`). When the gateway still holds every event that followed it
//   (`joined.recovered`), those are delivered like live ones (`meta.recovered`), and the
//   gap is closed; else the room's recent history is delivered and the page is told it
//   may have missed some (`rejoined` callback). No event is delivered twice (events are
//   keyed by `id` and `ts`, a bounded set per room).
// - Heartbeat: browsers answer the server's WebSocket pings themselves; on top, the
//   client sends an app-level `ping` every `heartbeat_ms` (from `hello`) and treats a
//   `pong` that does not come back in time as a dead socket (drop, reconnect).
// - Ops issued while (re)connecting wait for the connection (up to `requestTimeoutMs`).
// - JSON (text frames) or MessagePack (binary frames), chosen by `format`.
//
// Moderation (protocol v1.1):
// - `chat`/`gift` may reject with `muted` (muted in the room, or the room's chat is
//   closed; `retryAfterMs` when the mute has an end) or `filtered` (the text matched a
//   blocked word; nothing was broadcast). Slow mode rejects with `rate_limited`.
// - A `recall` event names an earlier event of the room (`target`, its `id`) to take
//   off the screen; it is delivered like any event, from `history` too, where its
//   target may be long gone. A recalled event arriving after its recall (a replayed
//   history) is dropped.
// - Close 4030 (banned): no reconnect. Status `banned`, a `banned` callback, pending
//   and later ops reject with `banned`; only an explicit connect() tries again. A
//   handshake refused with HTTP 403 counts the same where the WebSocket says so
//   (Node's `ws`); browsers hide the status, so there the usual backoff applies.

import { decode as msgpackDecode, encode as msgpackEncode } from './msgpack.js';

/** Room event types, each with its own callback (`client.on(type, ...)`). */
export const EVENT_TYPES = /** @type {const} */ ([
  'chat',
  'gift',
  'redpacket',
  'grab',
  'redpacket_done',
  'presence',
  'system',
  'recall',
]);

/** Close codes of PROTOCOL.md. */
export const CloseCode = Object.freeze({
  NORMAL: 1000,
  GOING_AWAY: 1001,
  POLICY: 1008,
  TOO_BIG: 1009,
  IDLE: 4000,
  SLOW_CONSUMER: 4010,
  BANNED: 4030,
});

/**
 * @typedef {{ id: string, name: string }} User
 *
 * @typedef {{ id: string, ts: number }} EventBase
 * @typedef {EventBase & { type: 'chat', user: User, text: string }} ChatEvent
 * @typedef {EventBase & { type: 'gift', user: User, gift: string, count: number }} GiftEvent
 * @typedef {EventBase & { type: 'redpacket', packet: string, user: User, total: number,
 *   shares: number, expires_at: number }} RedpacketEvent
 * @typedef {EventBase & { type: 'grab', packet: string, user: User, amount: number }} GrabEvent
 * @typedef {EventBase & { type: 'redpacket_done', packet: string, grabbed: number,
 *   total_grabbed: number, expired: boolean }} RedpacketDoneEvent
 * @typedef {EventBase & { type: 'presence', online: number }} PresenceEvent
 * @typedef {EventBase & { type: 'system', text: string, data?: unknown }} SystemEvent
 * @typedef {EventBase & { type: 'recall', target: string }} RecallEvent a moderator took
 *   back the room's earlier event `target` (its `id`): take it off the screen
 * @typedef {ChatEvent | GiftEvent | RedpacketEvent | GrabEvent | RedpacketDoneEvent |
 *   PresenceEvent | SystemEvent | RecallEvent} RoomEvent
 *
 * @typedef {{ packet: string, user: User, total: number, shares: number,
 *   expires_at: number, remaining: number }} OpenPacket
 *
 * @typedef {{ op: 'hello', conn: string, node: string, user: User | null,
 *   heartbeat_ms: number }} HelloFrame
 * @typedef {{ op: 'joined', room: string, online: number, history: RoomEvent[],
 *   redpackets: OpenPacket[], recovered?: boolean, ref?: number }} JoinedFrame
 *   `recovered` is there when the join named `since` (always a boolean then, even from a
 *   gateway that does not know `since`: false): true when `history` holds exactly the
 *   room's events that followed `since`, oldest first (possibly none)
 * @typedef {{ op: 'ack', ref?: number, amount?: number }} AckFrame
 * @typedef {{ op: 'pong', ref?: number }} PongFrame
 * @typedef {{ op: 'error', ref?: number, code: string, message: string,
 *   retry_after_ms?: number }} ErrorFrame
 * @typedef {{ op: 'batch', room: string, events: RoomEvent[] }} BatchFrame
 * @typedef {HelloFrame | JoinedFrame | AckFrame | PongFrame | ErrorFrame | BatchFrame} ServerFrame
 *
 * @typedef {'idle' | 'connecting' | 'open' | 'reconnecting' | 'closed' | 'banned'} Status
 *   `closed` and `banned` (close 4030) are final until connect() is called again
 *
 * @typedef {object} StatusDetail
 * @property {number} [attempt] reconnect attempt (0 = first try after a drop)
 * @property {number} [delayMs] wait before the next attempt ('reconnecting')
 * @property {number} [code] close code of the socket that went away
 * @property {string} [reason] close reason
 * @property {HelloFrame} [hello] the `hello` of the new connection ('open')
 *
 * @typedef {object} EventMeta
 * @property {string} room the room the event belongs to
 * @property {boolean} history true when it came from `joined.history` (a join with
 *   `history`, or the re-join after a reconnect), false when it came live in a `batch`
 * @property {true} [recovered] only there (true) on an event from the `history` of a join
 *   that recovered (`joined.recovered`): one that happened while the client was away
 *   and that it never had; show it as if it came live
 *
 * @typedef {object} JoinedMeta
 * @property {boolean} rejoin true when the client re-joined by itself after a reconnect
 * @property {boolean} resync true when that reconnect followed a 4010 (events were lost)
 *
 * @typedef {object} RejoinInfo what an automatic re-join after a reconnect found
 * @property {boolean} recovered true when the gap was closed: the gateway still held
 *   every event of the room after the last one the client had (`since`), and they have
 *   just been delivered (`meta.recovered`); false when some may have been missed (the
 *   room's recent `history` was delivered instead, without what was already seen), e.g.
 *   after a gateway restart without a cluster, a gap longer than the gateway's recovery
 *   log, or a room where no event had come yet (nothing to name in `since`)
 * @property {string | null} since the `since` the re-join sent (null: none)
 * @property {number} missed events of the re-join's `history` delivered now (not seen
 *   before): with `recovered`, every event of the gap
 * @property {boolean} resync true when the reconnect followed a 4010 (slow consumer)
 *
 * @typedef {object} JoinOptions
 * @property {number} [history] recent events to receive (0..=100); also what every
 *   automatic re-join asks for (else `rejoinHistory`)
 * @property {string} [since] the id of the last event the app got in this room (e.g.
 *   kept from before a page reload, see `lastEventId()`): the `joined` reply then says
 *   whether its `history` is exactly what followed (`recovered`)
 *
 * @typedef {object} CloseInfo
 * @property {number} code
 * @property {string} reason
 *
 * Callbacks by event name: their argument lists.
 * @typedef {{
 *   chat: [ChatEvent, EventMeta],
 *   gift: [GiftEvent, EventMeta],
 *   redpacket: [RedpacketEvent, EventMeta],
 *   grab: [GrabEvent, EventMeta],
 *   redpacket_done: [RedpacketDoneEvent, EventMeta],
 *   presence: [PresenceEvent, EventMeta],
 *   system: [SystemEvent, EventMeta],
 *   recall: [RecallEvent, EventMeta],
 *   event: [RoomEvent, EventMeta],
 *   status: [Status, StatusDetail],
 *   open: [HelloFrame],
 *   close: [CloseInfo],
 *   banned: [CloseInfo],
 *   joined: [JoinedFrame, JoinedMeta],
 *   rejoined: [string, RejoinInfo],
 *   online: [string, number],
 *   error: [DanmakuError],
 * }} ClientEvents
 *
 * @typedef {object} ReconnectOptions
 * @property {number} [initialDelayMs=500] first backoff step
 * @property {number} [maxDelayMs=15000] backoff cap
 * @property {number} [factor=2] growth per failed attempt
 * @property {number} [jitter=0.5] 0..1: each delay is drawn from [delay*(1-jitter), delay]
 *
 * @typedef {object} ClientOptions
 * @property {string} [url] the gateway's WebSocket endpoint, e.g. `wss://host/ws`
 *   (this or `urls`)
 * @property {string[]} [urls] several endpoints (e.g. one per node): the first is tried
 *   first, and every reconnect moves on to the next one (round robin), so a node that
 *   drains (1001) or died is not the one tried again first
 * @property {string | null | (() => string | null | undefined | Promise<string | null | undefined>)} [token]
 *   a JWT, or a function returning one (called before every (re)connect, so a token
 *   can be refreshed). Absent: anonymous, read-only.
 * @property {'json' | 'msgpack'} [format='json']
 * @property {any} [WebSocket] a WebSocket implementation (e.g. the `ws` package on
 *   Node 20); default `globalThis.WebSocket`
 * @property {boolean | ReconnectOptions} [reconnect=true]
 * @property {number} [rejoinHistory=20] `history` asked for when re-joining after a
 *   reconnect a room that was joined without `history` (else the join's `history`)
 * @property {number} [requestTimeoutMs=10000] an op without reply after this rejects `timeout`
 * @property {number} [connectTimeoutMs=10000] a socket without `hello` after this is dropped
 * @property {number} [pingIntervalMs] app-level ping period; default `hello.heartbeat_ms`
 * @property {number} [pongTimeoutMs] a ping unanswered this long means a dead socket;
 *   default the ping period
 */

/** An op refused by the server (`code` is the protocol error code) or by the client. */
export class DanmakuError extends Error {
  /**
   * @param {string} code protocol code (`not_joined`, `rate_limited`, `muted`, `filtered`,
   *   ...) or a client one: `timeout`, `disconnected` (the socket went away before the
   *   reply), `closed` (close() was called), `banned` (closed with 4030), `not_connected`
   *   (connect() was never called), `bad_frame`
   * @param {string} [message]
   * @param {{ retryAfterMs?: number, ref?: number, op?: string }} [extra]
   */
  constructor(code, message, extra = {}) {
    super(message ? `${code}: ${message}` : code);
    this.name = 'DanmakuError';
    /** @type {string} */
    this.code = code;
    /** @type {number | undefined} with `rate_limited` (slow mode too) and a `muted` that
     * ends: when to try again */
    this.retryAfterMs = extra.retryAfterMs;
    /** @type {number | undefined} */
    this.ref = extra.ref;
    /** @type {string | undefined} the op that was refused */
    this.op = extra.op;
  }
}

/** Event ids remembered per room for de-duplication of replayed history (and recalled
 * ids, to drop a recalled event that a replayed history brings back). */
const SEEN_PER_ROOM = 1000;
const MAX_REF = 2 ** 31 - 1;
const OPEN = 1;

/**
 * @typedef {{ resolve: (v: any) => void, reject: (e: Error) => void, timer: any,
 *   op: string, room?: string, internal?: boolean, sent: boolean }} Pending
 *
 * @typedef {{ online: number, history: number, lastId: string | null }} RoomState
 *   `lastId`: the last event (not `presence`, which the recovery log does not keep)
 *   received in the room, live or from a `history`
 */

export class DanmakuClient {
  /** @param {ClientOptions} options */
  constructor(options) {
    const urls = Array.isArray(options?.urls) && options.urls.length ? [...options.urls] : [options?.url];
    if (!urls.every((u) => typeof u === 'string')) throw new TypeError('options.url (or options.urls) is required');
    const format = options.format ?? 'json';
    if (format !== 'json' && format !== 'msgpack') throw new TypeError('format must be json or msgpack');
    const WS = options.WebSocket ?? /** @type {any} */ (globalThis).WebSocket;
    if (typeof WS !== 'function') {
      throw new TypeError('no WebSocket implementation: pass options.WebSocket (e.g. the ws package)');
    }
    /** @private @type {string[]} */ this._urls = /** @type {string[]} */ (urls);
    /** @private */ this._urlIndex = 0;
    /** The endpoint of the current (or next) connection attempt. */
    this.url = this._urls[0];
    this.format = format;
    /** @private */ this._WS = WS;
    /** @private */ this._token = options.token;
    const rc = options.reconnect ?? true;
    /** @private */ this._reconnect =
      rc === false
        ? null
        : {
            initialDelayMs: 500,
            maxDelayMs: 15000,
            factor: 2,
            jitter: 0.5,
            ...(typeof rc === 'object' ? rc : {}),
          };
    /** @private */ this._rejoinHistory = options.rejoinHistory ?? 20;
    /** @private */ this._requestTimeoutMs = options.requestTimeoutMs ?? 10000;
    /** @private */ this._connectTimeoutMs = options.connectTimeoutMs ?? 10000;
    /** @private */ this._pingIntervalMs = options.pingIntervalMs;
    /** @private */ this._pongTimeoutMs = options.pongTimeoutMs;

    /** @type {Status} */
    this.status = 'idle';
    /** @type {HelloFrame | null} the current connection's `hello` */
    this.hello = null;
    /** @private @type {any} */ this._ws = null;
    /** @private */ this._ref = 0;
    /** @private @type {Map<number, Pending>} */ this._pending = new Map();
    /** @private @type {Array<{ resolve: () => void, reject: (e: Error) => void }>} */
    this._openWaiters = [];
    /** @private @type {Map<string, Set<(...args: any[]) => void>>} */ this._listeners = new Map();
    /** Rooms joined (and re-joined after reconnects): online count, the `history` the
     * join asked for, the id of the last event received (the next re-join's `since`).
     * @private @type {Map<string, RoomState>} */
    this._rooms = new Map();
    /** @private @type {Map<string, { set: Set<string>, order: string[] }>} */ this._seen = new Map();
    /** Per room: recalled event id → the recall's `ts` (a recall only targets earlier events).
     * @private @type {Map<string, Map<string, number>>} */
    this._recalled = new Map();
    /** @private */ this._attempt = 0;
    /** @private */ this._closing = false;
    /** @private */ this._gen = 0;
    /** @private */ this._resync = false;
    /** @private */ this._reconnected = false;
    /** @private @type {any} */ this._retryTimer = null;
    /** @private @type {any} */ this._connectTimer = null;
    /** @private @type {any} */ this._pingTimer = null;
    /** @private @type {any} */ this._pongTimer = null;
    /** @private @type {number | null} */ this._heartbeatRef = null;
    /** @private */ this._onNetworkOnline = () => {
      if (this.status === 'reconnecting') this._retryNow();
    };
  }

  // ---------------------------------------------------------------------------------
  // Events

  /**
   * Subscribes to an event; returns a function that unsubscribes.
   *
   * - a room event type (`chat`, `gift`, `redpacket`, `grab`, `redpacket_done`,
   *   `presence`, `system`, `recall`): `(event, { room, history })`; a `recall`'s
   *   `target` is the `id` of the event to take off the screen (it may be one never
   *   delivered, e.g. older than the history asked for)
   * - `event`: every room event, `(event, { room, history })`
   * - `status`: `(status, detail)` — `connecting`, `open`, `reconnecting`, `closed`,
   *   `banned`
   * - `open`: `(hello)` after every (re)connect; `close`: `({ code, reason })`
   * - `banned`: `({ code, reason })` when the server closed with 4030 (no reconnect)
   * - `joined`: `(joinedFrame, { rejoin, resync })`, for joins and automatic re-joins
   *   (before the frame's `history` events are delivered)
   * - `rejoined`: `(room, { recovered, since, missed, resync })` after an automatic
   *   re-join's `history` was delivered: whether the gap was closed (`recovered`) or some
   *   events may have been missed
   * - `online`: `(room, count)` whenever a room's online count changes
   * - `error`: `(DanmakuError)` for errors no promise receives (an `error` frame
   *   without `ref`, an undecodable frame, a failed automatic re-join)
   *
   * @template {keyof ClientEvents} K
   * @param {K} type
   * @param {(...args: ClientEvents[K]) => void} fn
   * @returns {() => void}
   */
  on(type, fn) {
    let set = this._listeners.get(type);
    if (!set) this._listeners.set(type, (set = new Set()));
    set.add(/** @type {(...args: any[]) => void} */ (fn));
    return () => this.off(type, fn);
  }

  /**
   * @template {keyof ClientEvents} K
   * @param {K} type @param {(...args: ClientEvents[K]) => void} fn
   */
  off(type, fn) {
    this._listeners.get(type)?.delete(/** @type {(...args: any[]) => void} */ (fn));
  }

  /** @private @param {string} type @param {...any} args */
  _emit(type, ...args) {
    const set = this._listeners.get(type);
    if (!set) return;
    for (const fn of [...set]) {
      try {
        fn(...args);
      } catch (e) {
        // A listener's bug must not break the socket loop; surface it asynchronously.
        setTimeout(() => {
          throw e;
        });
      }
    }
  }

  // ---------------------------------------------------------------------------------
  // Connection

  /**
   * Opens the connection (retrying with backoff as configured); resolves with `hello`.
   * @returns {Promise<HelloFrame>}
   */
  connect() {
    if (this.status === 'open' && this.hello) return Promise.resolve(this.hello);
    const opened = this._whenOpen(Infinity).then(() => /** @type {HelloFrame} */ (this.hello));
    if (this.status === 'idle' || this.status === 'closed' || this.status === 'banned') {
      this._closing = false;
      this._attempt = 0;
      const g = /** @type {any} */ (globalThis);
      g.addEventListener?.('online', this._onNetworkOnline);
      this._open();
    }
    return opened;
  }

  /** Closes for good (no reconnect); pending ops reject with `closed`. */
  close() {
    this._closing = true;
    clearTimeout(this._retryTimer);
    const ws = this._ws;
    this._teardown();
    if (ws) {
      try {
        ws.close(CloseCode.NORMAL, 'client closed');
      } catch {
        /* already closing */
      }
    }
    const g = /** @type {any} */ (globalThis);
    g.removeEventListener?.('online', this._onNetworkOnline);
    this._failAll(new DanmakuError('closed', 'client closed'), true);
    this._rooms.clear();
    this._setStatus('closed', { code: CloseCode.NORMAL, reason: 'client closed' });
  }

  /** The signed-in user of the current connection, or null when anonymous. */
  get user() {
    return this.hello?.user ?? null;
  }

  /** Rooms this client is in (and re-joins after a reconnect). */
  get rooms() {
    return [...this._rooms.keys()];
  }

  /** @param {string} room @returns {number | undefined} the room's last known online count */
  online(room) {
    return this._rooms.get(room)?.online;
  }

  /**
   * The id of the last event received in a room (live or from a `history`; `presence`
   * aside): what the next automatic re-join sends as `since`. An app that wants to
   * recover across a page reload can keep it and pass it to `join(room, { since })`.
   * @param {string} room @returns {string | undefined}
   */
  lastEventId(room) {
    return this._rooms.get(room)?.lastId ?? undefined;
  }

  /**
   * Drops the current connection and reconnects at once (the rooms are re-joined with
   * `since`, as after any reconnect), e.g. when the app knows the socket is stale (the
   * device woke up, the network changed). While waiting to reconnect: tries now. Does
   * nothing when idle, closed or banned (see connect()).
   */
  reconnect() {
    if (this.status === 'reconnecting') {
      this._retryNow();
      return;
    }
    if (this.status !== 'open' && this.status !== 'connecting') return;
    const ws = this._teardown();
    if (ws) {
      try {
        ws.close(CloseCode.NORMAL, 'client reconnects');
      } catch {
        /* already closing */
      }
    }
    this._afterGone(CloseCode.NORMAL, 'client reconnects', true);
  }

  /** @private @param {Status} status @param {StatusDetail} [detail] */
  _setStatus(status, detail = {}) {
    this.status = status;
    this._emit('status', status, detail);
  }

  /** @private */
  async _open() {
    clearTimeout(this._retryTimer);
    this._retryTimer = null;
    this._setStatus('connecting', { attempt: this._attempt });
    // A newer attempt (e.g. the browser came back online) supersedes this one.
    const gen = ++this._gen;
    let token;
    try {
      token = typeof this._token === 'function' ? await this._token() : this._token;
    } catch (e) {
      if (this._closing || gen !== this._gen) return;
      this._emit('error', new DanmakuError('token', String(/** @type {any} */ (e)?.message ?? e)));
      this._retryAfterFailure('token fetch failed');
      return;
    }
    if (this._closing || gen !== this._gen || this.status !== 'connecting') return;
    const url = new URL(this.url);
    if (token) url.searchParams.set('token', token);
    if (this.format !== 'json') url.searchParams.set('format', this.format);
    let ws;
    try {
      ws = new this._WS(url.toString());
    } catch (e) {
      this._emit('error', new DanmakuError('connect', String(/** @type {any} */ (e)?.message ?? e)));
      this._retryAfterFailure('connect failed');
      return;
    }
    this._ws = ws;
    ws.binaryType = 'arraybuffer';
    ws.onmessage = (/** @type {{ data: any }} */ e) => {
      if (ws === this._ws) this._onData(e.data);
    };
    /** @type {string} */
    let failure = '';
    ws.onclose = (/** @type {{ code: number, reason: string }} */ e) => {
      if (ws !== this._ws) return;
      // A handshake refused with 403 is a banned user (the gateway's only 403 on /ws).
      // Only Node's `ws` says so (`Unexpected server response: 403`); browsers hide it.
      if (!this.hello && /\b403\b/.test(failure)) this._onSocketGone(CloseCode.BANNED, 'banned (HTTP 403)');
      else this._onSocketGone(e.code, e.reason);
    };
    ws.onerror = (/** @type {any} */ e) => {
      // A close event follows.
      failure = String(e?.message ?? e?.error?.message ?? '');
    };
    this._connectTimer = setTimeout(() => {
      if (ws === this._ws) this._drop(4000, 'no hello in time');
    }, this._connectTimeoutMs);
  }

  /** Forgets the current socket: timers stopped, handlers detached. @private */
  _teardown() {
    clearTimeout(this._connectTimer);
    clearTimeout(this._pingTimer);
    clearTimeout(this._pongTimer);
    this._heartbeatRef = null;
    const ws = this._ws;
    this._ws = null;
    this.hello = null;
    if (ws) {
      ws.onmessage = null;
      ws.onclose = null;
      ws.onerror = () => {};
    }
    return ws;
  }

  /** Gives up on a socket that looks dead, then reconnects. @private @param {number} code @param {string} reason */
  _drop(code, reason) {
    const ws = this._teardown();
    if (ws) {
      try {
        if (typeof ws.terminate === 'function') ws.terminate();
        else ws.close(code, reason);
      } catch {
        /* ignore */
      }
    }
    this._afterGone(code, reason);
  }

  /** @private @param {number} code @param {string} reason */
  _onSocketGone(code, reason) {
    this._teardown();
    this._afterGone(code, reason);
  }

  /**
   * @private @param {number} code @param {string} reason
   * @param {boolean} [now] reconnect without waiting (reconnect())
   */
  _afterGone(code, reason, now = false) {
    const wasOpen = this.status === 'open';
    this._emit('close', { code, reason });
    // Ops already on the wire will never be answered; queued ones wait for the next socket.
    const lost = code === CloseCode.BANNED ? 'banned' : 'disconnected';
    for (const [ref, p] of this._pending) {
      if (!p.sent) continue;
      this._pending.delete(ref);
      clearTimeout(p.timer);
      if (!p.internal) p.reject(new DanmakuError(lost, `connection closed (${code})`, { ref, op: p.op }));
    }
    if (this._closing) return;
    if (code === CloseCode.BANNED) {
      // Reconnecting would only be refused (HTTP 403) until the ban ends: stop here.
      // The rooms stay, re-joined should the app call connect() again.
      this._reconnected = true;
      const err = new DanmakuError('banned', reason || 'banned');
      this._failAll(err, true);
      this._setStatus('banned', { code, reason });
      this._emit('banned', { code, reason });
      return;
    }
    if (!this._reconnect) {
      this._failAll(new DanmakuError('closed', `connection closed (${code})`), true);
      this._setStatus('closed', { code, reason });
      return;
    }
    if (code === CloseCode.SLOW_CONSUMER) this._resync = true;
    // 1001: the node drains and another takes us; 4010: resync. Both: at once, once.
    if (now || ((code === CloseCode.GOING_AWAY || code === CloseCode.SLOW_CONSUMER) && wasOpen)) {
      this._scheduleReconnect(0, reason, code);
    } else {
      this._scheduleReconnect(this._backoff(), reason, code);
    }
  }

  /** An attempt that failed before a socket existed (token, constructor). @private @param {string} reason */
  _retryAfterFailure(reason) {
    if (!this._reconnect) {
      this._failAll(new DanmakuError('closed', reason), true);
      this._setStatus('closed', { reason });
      return;
    }
    this._scheduleReconnect(this._backoff(), reason);
  }

  /** @private */
  _backoff() {
    const r = /** @type {Required<ReconnectOptions>} */ (this._reconnect);
    const base = Math.min(r.maxDelayMs, r.initialDelayMs * r.factor ** Math.min(this._attempt, 30));
    this._attempt++;
    return Math.round(base * (1 - r.jitter * Math.random()));
  }

  /** @private @param {number} delayMs @param {string} reason @param {number} [code] */
  _scheduleReconnect(delayMs, reason, code) {
    this._reconnected = true;
    // Several endpoints: the next attempt goes to the next one (a drained or dead node
    // is not tried again first).
    if (this._urls.length > 1) {
      this._urlIndex = (this._urlIndex + 1) % this._urls.length;
      this.url = this._urls[this._urlIndex];
    }
    this._setStatus('reconnecting', { attempt: this._attempt, delayMs, code, reason });
    clearTimeout(this._retryTimer);
    this._retryTimer = setTimeout(() => this._open(), delayMs);
  }

  /** @private */
  _retryNow() {
    if (this.status !== 'reconnecting' || this._ws) return;
    this._open();
  }

  /** @private @param {Error} err @param {boolean} includeWaiters */
  _failAll(err, includeWaiters) {
    for (const [ref, p] of this._pending) {
      clearTimeout(p.timer);
      if (!p.internal) p.reject(new DanmakuError(/** @type {any} */ (err).code, err.message, { ref, op: p.op }));
    }
    this._pending.clear();
    if (includeWaiters) {
      const waiters = this._openWaiters;
      this._openWaiters = [];
      for (const w of waiters) w.reject(err);
    }
  }

  /**
   * Resolves when the connection is open (hello received).
   * @private @param {number} timeoutMs
   * @returns {Promise<void>}
   */
  _whenOpen(timeoutMs) {
    if (this.status === 'open') return Promise.resolve();
    return new Promise((resolve, reject) => {
      /** @type {any} */
      let timer;
      const waiter = {
        resolve: () => {
          clearTimeout(timer);
          resolve();
        },
        reject: (/** @type {Error} */ e) => {
          clearTimeout(timer);
          reject(e);
        },
      };
      this._openWaiters.push(waiter);
      if (Number.isFinite(timeoutMs)) {
        timer = setTimeout(() => {
          this._openWaiters = this._openWaiters.filter((w) => w !== waiter);
          reject(new DanmakuError('timeout', 'not connected in time'));
        }, timeoutMs);
      }
    });
  }

  // ---------------------------------------------------------------------------------
  // Frames in

  /** @private @param {any} data */
  _onData(data) {
    /** @type {any} */
    let frame;
    try {
      if (typeof data === 'string') frame = JSON.parse(data);
      else frame = msgpackDecode(data);
    } catch (e) {
      this._emit('error', new DanmakuError('bad_frame', `undecodable frame: ${/** @type {any} */ (e)?.message ?? e}`));
      return;
    }
    if (!frame || typeof frame !== 'object') return;
    switch (frame.op) {
      case 'hello':
        return this._onHello(frame);
      case 'batch':
        return this._onBatch(frame);
      case 'joined':
      case 'ack':
      case 'pong':
      case 'error':
        return this._onReply(frame);
      default:
      // An op this version does not know: ignore (protocol v1 only adds fields/ops).
    }
  }

  /** @private @param {HelloFrame} hello */
  _onHello(hello) {
    clearTimeout(this._connectTimer);
    this.hello = hello;
    this._attempt = 0;
    const resync = this._resync;
    const rejoin = this._reconnected;
    this._resync = false;
    this._setStatus('open', { hello });
    this._emit('open', hello);
    this._startHeartbeat();
    // Re-join first, so queued ops (e.g. a chat typed while offline) find their rooms.
    if (rejoin) {
      for (const room of this._rooms.keys()) this._rejoin(room, resync);
    }
    for (const [ref, p] of this._pending) {
      if (!p.sent) this._sendPending(ref, p);
    }
    const waiters = this._openWaiters;
    this._openWaiters = [];
    for (const w of waiters) w.resolve();
  }

  /** @private @param {string} room @param {boolean} resync */
  _rejoin(room, resync) {
    const state = this._rooms.get(room);
    if (!state) return;
    // Where the room's stream stopped for us: the gateway sends what followed, if it can.
    const since = state.lastId ?? undefined;
    const history = state.history > 0 ? state.history : this._rejoinHistory;
    /** @type {Record<string, unknown>} */
    const frame = { op: 'join', room, history };
    if (since !== undefined) frame.since = since;
    const ref = this._nextRef();
    this._pending.set(ref, {
      op: 'join',
      room,
      internal: true,
      sent: false,
      timer: setTimeout(() => this._pending.delete(ref), this._requestTimeoutMs),
      resolve: (/** @type {JoinedFrame} */ joined) => this._joined(joined, { rejoin: true, resync }, 0, since),
      reject: (e) => {
        this._emit('error', e);
        const err = /** @type {DanmakuError} */ (e);
        // A refused re-join (e.g. rate_limited): try again while the room is wanted.
        if (err.code === 'rate_limited' && this._rooms.has(room)) {
          setTimeout(() => {
            if (this.status === 'open' && this._rooms.has(room)) this._rejoin(room, resync);
          }, err.retryAfterMs ?? 1000);
        } else if (err.code === 'bad_request' && since !== undefined && this._rooms.get(room) === state) {
          // A `since` the gateway will not take (e.g. an app's own, too long): forget the
          // position and join as without it rather than not at all.
          if (state.lastId === since) state.lastId = null;
          if (this.status === 'open') this._rejoin(room, resync);
        }
      },
    });
    this._sendPending(ref, /** @type {Pending} */ (this._pending.get(ref)), frame);
  }

  /**
   * @private @param {JoinedFrame} joined @param {JoinedMeta} meta
   * @param {number} history the `history` an app's join asked for (kept for re-joins)
   * @param {string | undefined} since the `since` the join sent
   */
  _joined(joined, meta, history, since) {
    const room = joined.room;
    let state = this._rooms.get(room);
    if (!state) this._rooms.set(room, (state = { online: 0, history: 0, lastId: null }));
    if (!meta.rejoin) state.history = history;
    let recovered = false;
    if (since !== undefined) {
      // A gateway without recovery leaves the field out: it recovered nothing.
      recovered = joined.recovered === true;
      joined.recovered = recovered;
      // The app's own position, until an event moves it.
      if (state.lastId === null) state.lastId = since;
    }
    this._setOnline(room, joined.online);
    this._emit('joined', joined, meta);
    let missed = 0;
    for (const ev of joined.history ?? []) {
      if (this._deliver(room, state, ev, true, recovered)) missed++;
    }
    if (meta.rejoin) {
      this._emit('rejoined', room, { recovered, since: since ?? null, missed, resync: meta.resync });
    }
  }

  /** @private @param {BatchFrame} batch */
  _onBatch(batch) {
    // A batch already on the wire when leave() was called: the app no longer wants it.
    const state = this._rooms.get(batch.room);
    if (!state) return;
    for (const ev of batch.events ?? []) this._deliver(batch.room, state, ev, false, false);
  }

  /**
   * Delivers one event unless it was seen already (or recalled); returns whether it was.
   * @private @param {string} room @param {RoomState} state @param {RoomEvent} ev
   * @param {boolean} history from `joined.history` @param {boolean} recovered from the
   *   `history` of a join that recovered
   * @returns {boolean}
   */
  _deliver(room, state, ev, history, recovered) {
    if (!ev || typeof ev !== 'object') return false;
    // The stream's position moves with every event, a duplicate's too (events come in
    // the room's order); presence is never in the recovery log, so it cannot be `since`.
    if (typeof ev.id === 'string' && ev.id && ev.type !== 'presence') state.lastId = ev.id;
    if (ev.id !== undefined) {
      // Ids are `<node>-<seq>`; with ts they stay unique across a node's restart.
      const key = `${ev.id}@${ev.ts}`;
      let seen = this._seen.get(room);
      if (!seen) this._seen.set(room, (seen = { set: new Set(), order: [] }));
      if (seen.set.has(key)) return false;
      seen.set.add(key);
      seen.order.push(key);
      if (seen.order.length > SEEN_PER_ROOM) seen.set.delete(/** @type {string} */ (seen.order.shift()));
    }
    if (ev.type === 'presence') this._setOnline(room, ev.online);
    if (ev.type === 'recall') {
      this._noteRecall(room, ev);
    } else if (ev.id !== undefined) {
      // A recalled event coming (back) after its recall, e.g. from a replayed history.
      const recallTs = this._recalled.get(room)?.get(ev.id);
      if (recallTs !== undefined && !(ev.ts > recallTs)) return false;
    }
    /** @type {EventMeta} */
    const meta = recovered ? { room, history, recovered: true } : { room, history };
    this._emit(ev.type, ev, meta);
    this._emit('event', ev, meta);
    return true;
  }

  /** @private @param {string} room @param {RecallEvent} ev */
  _noteRecall(room, ev) {
    if (typeof ev.target !== 'string') return;
    let recalled = this._recalled.get(room);
    if (!recalled) this._recalled.set(room, (recalled = new Map()));
    // Ids are unique per node only together with ts, so remember when: an event with the
    // same id but a later ts (a restarted node) is a different one.
    recalled.delete(ev.target);
    recalled.set(ev.target, typeof ev.ts === 'number' ? ev.ts : Infinity);
    if (recalled.size > SEEN_PER_ROOM) recalled.delete(/** @type {string} */ (recalled.keys().next().value));
  }

  /** @private @param {string} room @param {number} online */
  _setOnline(room, online) {
    const state = this._rooms.get(room);
    if (!state || typeof online !== 'number' || state.online === online) return;
    state.online = online;
    this._emit('online', room, online);
  }

  /** @private @param {any} frame */
  _onReply(frame) {
    if (frame.op === 'pong' && frame.ref !== undefined && frame.ref === this._heartbeatRef) {
      this._heartbeatRef = null;
      clearTimeout(this._pongTimer);
      this._schedulePing();
      return;
    }
    const p = frame.ref !== undefined ? this._pending.get(frame.ref) : undefined;
    if (!p) {
      if (frame.op === 'error') {
        this._emit(
          'error',
          new DanmakuError(frame.code, frame.message, { retryAfterMs: frame.retry_after_ms, ref: frame.ref }),
        );
      }
      return;
    }
    this._pending.delete(frame.ref);
    clearTimeout(p.timer);
    if (frame.op === 'error') {
      p.reject(
        new DanmakuError(frame.code, frame.message, {
          retryAfterMs: frame.retry_after_ms,
          ref: frame.ref,
          op: p.op,
        }),
      );
    } else {
      p.resolve(frame);
    }
  }

  // ---------------------------------------------------------------------------------
  // Heartbeat

  /** @private */
  _startHeartbeat() {
    clearTimeout(this._pingTimer);
    clearTimeout(this._pongTimer);
    this._heartbeatRef = null;
    this._schedulePing();
  }

  /** @private */
  _pingPeriod() {
    return Math.max(50, this._pingIntervalMs ?? this.hello?.heartbeat_ms ?? 25000);
  }

  /** @private */
  _schedulePing() {
    clearTimeout(this._pingTimer);
    this._pingTimer = setTimeout(() => this._sendHeartbeat(), this._pingPeriod());
  }

  /** @private */
  _sendHeartbeat() {
    if (this.status !== 'open' || !this._ws) return;
    const ref = this._nextRef();
    this._heartbeatRef = ref;
    this._send({ op: 'ping', ref });
    this._pongTimer = setTimeout(() => {
      if (this._heartbeatRef === ref) this._drop(CloseCode.IDLE, 'no pong');
    }, this._pongTimeoutMs ?? this._pingPeriod());
  }

  // ---------------------------------------------------------------------------------
  // Frames out

  /** @private */
  _nextRef() {
    this._ref = this._ref >= MAX_REF ? 1 : this._ref + 1;
    return this._ref;
  }

  /** @private @param {Record<string, unknown>} frame */
  _send(frame) {
    const ws = this._ws;
    if (!ws || ws.readyState !== OPEN) return false;
    ws.send(this.format === 'msgpack' ? msgpackEncode(frame) : JSON.stringify(frame));
    return true;
  }

  /**
   * @private @param {number} ref @param {Pending & { frame?: Record<string, unknown> }} p
   * @param {Record<string, unknown>} [frame]
   */
  _sendPending(ref, p, frame) {
    if (frame) p.frame = frame;
    if (this.status !== 'open' || !p.frame) return;
    if (this._send({ ...p.frame, ref })) p.sent = true;
  }

  /**
   * Sends an op and settles with its reply; waits for the connection if needed.
   * @private @param {Record<string, unknown> & { op: string }} frame
   * @returns {Promise<any>}
   */
  _request(frame) {
    if (this.status === 'idle') {
      return Promise.reject(new DanmakuError('not_connected', 'call connect() first', { op: frame.op }));
    }
    if (this.status === 'closed') {
      return Promise.reject(new DanmakuError('closed', 'client closed', { op: frame.op }));
    }
    if (this.status === 'banned') {
      return Promise.reject(new DanmakuError('banned', 'banned (close 4030)', { op: frame.op }));
    }
    return new Promise((resolve, reject) => {
      const ref = this._nextRef();
      /** @type {Pending & { frame?: Record<string, unknown> }} */
      const p = {
        op: frame.op,
        resolve,
        reject,
        sent: false,
        timer: setTimeout(() => {
          if (this._pending.delete(ref)) {
            reject(new DanmakuError('timeout', `no reply to ${frame.op}`, { ref, op: frame.op }));
          }
        }, this._requestTimeoutMs),
      };
      this._pending.set(ref, p);
      this._sendPending(ref, p, frame);
    });
  }

  // ---------------------------------------------------------------------------------
  // Ops

  /**
   * Joins a room; resolves with `joined` (online count, `history`, open `redpackets`;
   * with `since`, `recovered`). History events are also delivered to the event callbacks
   * with `history: true` (and `recovered: true` when the join recovered). The room is
   * re-joined automatically after every reconnect, with `since` and this `history`.
   * @param {string} room
   * @param {JoinOptions} [opts]
   * @returns {Promise<JoinedFrame>}
   */
  async join(room, opts = {}) {
    /** @type {Record<string, unknown> & { op: string }} */
    const frame = { op: 'join', room };
    if (opts.history) frame.history = opts.history;
    const since = typeof opts.since === 'string' ? opts.since : undefined;
    if (since !== undefined) frame.since = since;
    const joined = /** @type {JoinedFrame} */ (await this._request(frame));
    this._joined(joined, { rejoin: false, resync: false }, opts.history ?? 0, since);
    return joined;
  }

  /**
   * Leaves a room (and stops re-joining it).
   * @param {string} room
   * @returns {Promise<AckFrame | void>}
   */
  async leave(room) {
    const wasIn = this._rooms.delete(room);
    this._seen.delete(room);
    this._recalled.delete(room);
    // Not connected: the next connection simply will not re-join it.
    if (wasIn && this.status !== 'open') return;
    return this._request({ op: 'leave', room });
  }

  /**
   * Sends a chat message; resolves on `ack`. The message itself comes back in the
   * room's `batch` like everyone else's.
   * @param {string} room @param {string} text
   * @returns {Promise<AckFrame>}
   */
  chat(room, text) {
    return this._request({ op: 'chat', room, text });
  }

  /**
   * Sends a (free) gift; resolves on `ack`.
   * @param {string} room @param {string} gift gift id from the catalog, e.g. `rose`
   * @param {number} [count=1]
   * @returns {Promise<AckFrame>}
   */
  gift(room, gift, count = 1) {
    return this._request({ op: 'gift', room, gift, count });
  }

  /**
   * Grabs a share of a red packet; resolves with the amount (cents).
   * @param {string} room @param {string} packet
   * @returns {Promise<number>}
   */
  async grab(room, packet) {
    const ack = /** @type {AckFrame} */ (await this._request({ op: 'grab', room, packet }));
    return /** @type {number} */ (ack.amount);
  }

  /**
   * App-level ping; resolves with the round trip in milliseconds.
   * @returns {Promise<number>}
   */
  async ping() {
    const t0 = Date.now();
    await this._request({ op: 'ping' });
    return Date.now() - t0;
  }
}
