// The live demo page: danmaku over a "stream", chat, gifts with combos, red packets,
// and moderation: recalled comments vanish, muted/filtered/slow-mode refusals and a ban
// are shown, and in dev mode a small moderator panel mutes, recalls, closes the chat and
// sets slow mode through the gateway's /dev helpers. After a reconnect a brief notice
// says whether anything was missed; what the gateway recovered plays like live events.
// URL parameters: room (default "demo"), token (a JWT; without one the page asks the
// gateway for a dev token when [web] dev_tokens is on, else watches anonymously),
// name (display name for the dev token), format (json | msgpack).

import { DanmakuClient } from '/danmaku-client.js';

const $ = (/** @type {string} */ id) => /** @type {HTMLElement} */ (document.getElementById(id));
const params = new URLSearchParams(location.search);
const ROOM = /^[A-Za-z0-9_.:-]{1,64}$/.test(params.get('room') ?? '') ? String(params.get('room')) : 'demo';
const FORMAT = params.get('format') === 'msgpack' ? 'msgpack' : 'json';
const NAME = (params.get('name') ?? '').trim() || `Viewer-${1000 + Math.floor(Math.random() * 9000)}`;
const GIFTS = /** @type {Record<string, string>} */ ({ rose: 'Rose', heart: 'Heart' });
const COMBO_WINDOW_MS = 3000;
const RECONNECT_NOTICE_MS = 4000;

const money = (/** @type {number} */ cents) => `${(cents / 100).toFixed(2)}`;

// ---------------------------------------------------------------------------------------
// Danmaku: lanes, no overlap within a lane, speed by text length.

class DanmakuStage {
  /** @param {HTMLElement} layer */
  constructor(layer) {
    this.layer = layer;
    this.laneHeight = 36;
    this.topMargin = 50;
    this.gap = 24; // px between two comments of one lane
    /** @type {Array<{ t0: number, v: number, w: number } | undefined>} */
    this.lanes = [];
    /** @type {Array<{ text: string, who?: string, cls: string[], id?: string }>} */
    this.queue = [];
    this.timer = 0;
    this.colors = 0;
    this.measure = document.createElement('div');
    this.measure.className = 'danmaku danmaku-measure';
    layer.appendChild(this.measure);
  }

  /**
   * @param {string} text
   * @param {{ who?: string, self?: boolean, system?: boolean, id?: string }} [opts] `id`:
   *   the event's, so that a recall can take the comment off the stage
   */
  add(text, opts = {}) {
    const cls = ['danmaku'];
    if (opts.self) cls.push('self');
    else if (opts.system) cls.push('system');
    else if (this.colors++ % 3 === 0) cls.push(`c${1 + Math.floor(Math.random() * 4)}`);
    const item = { text, who: opts.who, cls, id: opts.id };
    // Your own comment goes first: you want to see it fly right away.
    if (opts.self) this.queue.unshift(item);
    else this.queue.push(item);
    // A flood cannot pile up forever: keep the newest (own comments first).
    while (this.queue.length > 80) {
      const i = this.queue.findIndex((q) => !q.cls.includes('self'));
      this.queue.splice(i < 0 ? 0 : i, 1);
    }
    this.pump();
  }

  /** @param {HTMLElement} el @param {{ text: string, who?: string }} item */
  fill(el, item) {
    el.textContent = '';
    if (item.who) {
      const who = document.createElement('span');
      who.className = 'who';
      who.textContent = item.who;
      el.appendChild(who);
    }
    el.appendChild(document.createTextNode(item.text));
  }

  pump() {
    clearTimeout(this.timer);
    const W = this.layer.clientWidth;
    const H = this.layer.clientHeight;
    // The top ~70% of the stage: gift toasts and the combo live below the lanes.
    const laneCount = Math.max(1, Math.floor((H * 0.7 - this.topMargin) / this.laneHeight));
    while (this.queue.length) {
      const item = this.queue[0];
      this.measure.className = item.cls.join(' ') + ' danmaku-measure';
      this.fill(this.measure, item);
      const w = this.measure.offsetWidth;
      this.measure.textContent = '';
      // Every comment crosses in ~8 s (a bit less on narrow screens), so a longer text
      // moves faster, as on the big danmaku sites.
      const duration = Math.max(5000, Math.min(9000, 6000 + W * 2.5));
      const v = (W + w) / duration; // px per ms
      const now = performance.now();
      const lane = this.freeLane(laneCount, now, W, w, v);
      if (lane < 0) {
        this.timer = window.setTimeout(() => this.pump(), 120);
        return;
      }
      this.queue.shift();
      this.lanes[lane] = { t0: now, v, w };
      const el = document.createElement('div');
      el.className = item.cls.join(' ');
      this.fill(el, item);
      el.style.top = `${this.topMargin + lane * this.laneHeight}px`;
      el.dataset.lane = String(lane);
      if (item.id) el.dataset.id = item.id;
      this.layer.appendChild(el);
      const anim = el.animate(
        [{ transform: `translateX(${W}px)` }, { transform: `translateX(${-w - 4}px)` }],
        { duration: (W + w) / v, easing: 'linear' },
      );
      anim.onfinish = () => el.remove();
    }
  }

  /**
   * Takes a recalled comment off the stage, whether it is flying or still queued.
   * @param {string} id @returns {boolean} whether there was one
   */
  remove(id) {
    const before = this.queue.length;
    this.queue = this.queue.filter((q) => q.id !== id);
    let found = this.queue.length !== before;
    for (const el of this.layer.querySelectorAll(`[data-id="${CSS.escape(id)}"]`)) {
      for (const a of el.getAnimations()) a.cancel();
      el.remove();
      found = true;
    }
    return found;
  }

  /**
   * The first lane a comment of width w and speed v can enter now without touching the
   * previous comment of that lane, ever: its tail must have entered the stage (plus a
   * gap), and, when we are faster, it must be gone before our head reaches the left edge.
   * @returns {number} lane index, or -1 when every lane is busy
   */
  freeLane(/** @type {number} */ laneCount, /** @type {number} */ now, /** @type {number} */ W, /** @type {number} */ w, /** @type {number} */ v) {
    for (let i = 0; i < laneCount; i++) {
      const p = this.lanes[i];
      if (!p) return i;
      const tailIn = p.t0 + (p.w + this.gap) / p.v;
      if (now < tailIn) continue;
      if (v > p.v && now + W / v < p.t0 + (W + p.w + this.gap) / p.v) continue;
      return i;
    }
    return -1;
  }
}

// ---------------------------------------------------------------------------------------
// Page state and rendering

const stage = new DanmakuStage($('danmaku-layer'));
const chatLog = /** @type {HTMLOListElement} */ ($('chat-log'));
const chatInput = /** @type {HTMLInputElement} */ ($('chat-input'));
const chatSend = /** @type {HTMLButtonElement} */ ($('chat-send'));
const giftButtons = /** @type {HTMLButtonElement[]} */ ([...document.querySelectorAll('.gift-btn')]);
const devRedpacket = /** @type {HTMLButtonElement} */ ($('dev-redpacket'));
/** @type {string | null} */
let myId = null;

$('room-name').textContent = ROOM;
$('stage-room').textContent = ROOM;
document.title = `${ROOM} · Danmaku live demo`;

/** @type {number | undefined} */
let noticeTimer;
/**
 * The line under the controls. `code` (a refusal's error code) lands in `data-code`.
 * @param {string} text @param {boolean} [bad] @param {string} [code]
 */
function notice(text, bad = false, code = '') {
  clearInterval(noticeTimer);
  const el = $('notice');
  el.textContent = text;
  el.classList.toggle('bad', bad);
  el.dataset.code = code;
}

/** A duration for people: `4.2 s`, `3 min 20 s`, `2 h 5 min`. @param {number} ms */
function human(ms) {
  // Rounded to what is shown first, so that 59.97 s reads "1 min", not "60.0 s".
  const s = Math.round(Math.max(0, ms) / 100) / 10;
  if (s < 60) return `${s.toFixed(1)} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min${s % 60 >= 1 ? ` ${Math.floor(s % 60)} s` : ''}`;
  return `${Math.floor(s / 3600)} h${s % 3600 >= 60 ? ` ${Math.floor((s % 3600) / 60)} min` : ''}`;
}

/**
 * Shows an op's refusal; one with a retry hint counts down, then clears itself.
 * @param {any} err
 */
function refused(err) {
  const code = err?.code ?? '';
  if (code === 'banned') return; // the ban has its own display
  const retry = err?.retryAfterMs;
  if ((code === 'rate_limited' || code === 'muted') && typeof retry === 'number' && retry > 0) {
    const until = Date.now() + retry;
    const tick = () => {
      const left = until - Date.now();
      if (left <= 0) {
        notice(code === 'muted' ? 'Your mute is over: you can chat again' : '', false);
        return;
      }
      const el = $('notice');
      el.textContent = describe(err, left);
    };
    notice(describe(err, retry), true, code);
    noticeTimer = window.setInterval(tick, 200);
  } else {
    notice(describe(err), true, code);
  }
}

/**
 * A chat log line; `id` (the event's) lets a recall find it. Returns the line.
 * @param {string} cls @param {string | null} who @param {string} text @param {boolean} [history]
 * @param {string} [id]
 */
function logLine(cls, who, text, history = false, id) {
  const li = document.createElement('li');
  if (cls) li.className = cls;
  if (history) li.classList.add('history');
  if (id) li.dataset.id = id;
  if (who) {
    const w = document.createElement('span');
    w.className = 'who';
    w.textContent = who;
    li.appendChild(w);
  }
  li.appendChild(document.createTextNode(text));
  chatLog.appendChild(li);
  while (chatLog.children.length > 150) chatLog.firstElementChild?.remove();
  chatLog.scrollTop = chatLog.scrollHeight;
  return li;
}

/**
 * What to tell the user about a refused op; `leftMs` overrides the retry hint (countdowns).
 * @param {any} err @param {number} [leftMs]
 */
function describe(err, leftMs) {
  const wait = leftMs ?? err?.retryAfterMs;
  switch (err?.code) {
    case 'rate_limited':
      // Slow mode says so in its message; the plain per-user limit does not.
      return /slow/i.test(err.message ?? '')
        ? `Slow mode is on: you can send again in ${human(wait ?? 1000)}`
        : `Slow down: try again in ${human(wait ?? 1000)}`;
    case 'muted':
      // One code for both: the gateway's message says which.
      if (/closed/i.test(err.message ?? '')) return 'The chat is closed in this room for now';
      return typeof wait === 'number' && wait > 0
        ? `You are muted in this room: you can chat again in ${human(wait)}`
        : 'You are muted in this room';
    case 'filtered':
      return 'Not sent: your message contains a blocked word (nobody saw it)';
    case 'banned':
      return 'You have been banned';
    case 'unauthorized':
      return 'Read-only viewer: open the page with ?token=… to take part';
    case 'too_large':
      return 'That message is too long';
    case 'already_grabbed':
      return 'You already grabbed this one';
    case 'packet_empty':
      return 'Too late: every share is gone';
    case 'packet_expired':
      return 'This red packet has expired';
    case 'busy':
      return 'Busy, try again';
    case 'disconnected':
    case 'timeout':
      return 'Connection trouble, try again';
    default:
      return err?.message ?? String(err);
  }
}

// Status indicator --------------------------------------------------------------------
/** @type {number | undefined} */
let countdown;
/** @param {string} status @param {any} detail */
function renderStatus(status, detail) {
  const el = $('status');
  el.dataset.status = status;
  clearInterval(countdown);
  const text = $('status-text');
  if (status === 'open') text.textContent = 'live';
  else if (status === 'connecting') text.textContent = 'connecting…';
  else if (status === 'closed') text.textContent = 'disconnected';
  else if (status === 'banned') text.textContent = 'banned';
  else if (status === 'reconnecting') {
    const until = Date.now() + (detail?.delayMs ?? 0);
    const tick = () => {
      const s = Math.max(0, (until - Date.now()) / 1000);
      text.textContent = s > 0.05 ? `reconnecting in ${s.toFixed(1)} s` : 'reconnecting…';
    };
    tick();
    countdown = window.setInterval(tick, 100);
  } else text.textContent = status;
}

// Gifts and combos ----------------------------------------------------------------------
/** Own clicks: gift → { count, timer } */
const myCombo = { gift: '', count: 0, timer: 0 };
function showMyCombo(/** @type {string} */ gift) {
  if (myCombo.gift !== gift) {
    myCombo.gift = gift;
    myCombo.count = 0;
  }
  myCombo.count++;
  const combo = $('combo');
  $('combo-icon').className = `gift-icon ${gift}`;
  $('combo-name').textContent = GIFTS[gift] ?? gift;
  const count = $('combo-count');
  count.textContent = `×${myCombo.count}`;
  count.classList.remove('bump');
  void count.offsetWidth; // restart the animation
  count.classList.add('bump');
  combo.hidden = false;
  for (const b of giftButtons) {
    const badge = /** @type {HTMLElement} */ (b.querySelector('.gift-badge'));
    badge.hidden = b.dataset.gift !== gift;
    if (b.dataset.gift === gift) badge.textContent = `×${myCombo.count}`;
  }
  clearTimeout(myCombo.timer);
  myCombo.timer = window.setTimeout(() => {
    combo.hidden = true;
    myCombo.count = 0;
    myCombo.gift = '';
    for (const b of giftButtons) /** @type {HTMLElement} */ (b.querySelector('.gift-badge')).hidden = true;
  }, COMBO_WINDOW_MS);
}

/** Everyone's gifts: one toast per (user, gift) whose count grows while gifts keep coming. */
const toasts = new Map();
/** @param {import('./danmaku-client.js').GiftEvent} ev */
function giftToast(ev) {
  const key = `${ev.user.id}/${ev.gift}`;
  let t = toasts.get(key);
  if (!t) {
    const el = document.createElement('div');
    el.className = 'gift-toast';
    const who = document.createElement('strong');
    who.textContent = ev.user.name;
    const icon = document.createElement('span');
    icon.className = `gift-icon ${ev.gift}`;
    const name = document.createElement('span');
    name.textContent = `sent ${GIFTS[ev.gift] ?? ev.gift}`;
    const count = document.createElement('span');
    count.className = 'count';
    el.append(who, name, icon, count);
    $('gift-toasts').appendChild(el);
    t = { el, count, total: 0, timer: 0 };
    toasts.set(key, t);
    const all = $('gift-toasts');
    while (all.children.length > 4) {
      const first = /** @type {HTMLElement} */ (all.firstElementChild);
      for (const [k, v] of toasts) if (v.el === first) toasts.delete(k);
      first.remove();
    }
  }
  t.total += ev.count;
  t.count.textContent = `×${t.total}`;
  clearTimeout(t.timer);
  t.timer = window.setTimeout(() => {
    t.el.remove();
    toasts.delete(key);
  }, COMBO_WINDOW_MS + 1000);
}

// Red packets -----------------------------------------------------------------------------
/** @type {{ packet: string, sender: string, total: number, shares: number, grabbed: number, done: boolean, mine: number | null, hideTimer: number } | null} */
let packet = null;
const banner = $('redpacket-banner');
const grabButton = /** @type {HTMLButtonElement} */ ($('rp-grab'));

function renderPacket() {
  if (!packet) {
    banner.hidden = true;
    return;
  }
  banner.hidden = false;
  banner.dataset.packet = packet.packet;
  $('rp-title').textContent = `${packet.sender} sent a red packet: ${money(packet.total)}`;
  $('rp-progress').textContent = packet.done
    ? `All done: ${packet.grabbed}/${packet.shares} shares taken`
    : `${packet.grabbed}/${packet.shares} shares taken`;
  grabButton.disabled = packet.done || packet.mine !== null || !myId;
  grabButton.textContent = packet.mine !== null ? 'Grabbed' : packet.done ? 'Gone' : 'Grab';
  grabButton.title = myId ? '' : 'Read-only viewers cannot grab';
}

/** @param {string} text @param {boolean} good */
function packetResult(text, good) {
  const el = $('rp-result');
  el.hidden = false;
  el.textContent = text;
  el.classList.toggle('bad', !good);
}

/** @param {{ packet: string, user: { name: string }, total: number, shares: number, remaining?: number }} p */
function showPacket(p) {
  if (packet?.packet === p.packet) {
    // Shown already (a re-join lists it again): `remaining` is the truth now.
    if (p.remaining !== undefined && !packet.done) {
      packet.grabbed = p.shares - p.remaining;
      renderPacket();
    }
    return;
  }
  if (packet) clearTimeout(packet.hideTimer);
  packet = {
    packet: p.packet,
    sender: p.user.name,
    total: p.total,
    shares: p.shares,
    grabbed: p.remaining === undefined ? 0 : p.shares - p.remaining,
    done: false,
    mine: null,
    hideTimer: 0,
  };
  $('rp-result').hidden = true;
  renderPacket();
}

grabButton.addEventListener('click', async () => {
  if (!packet || !myId) return;
  const current = packet;
  grabButton.disabled = true;
  try {
    const amount = await client.grab(ROOM, current.packet);
    current.mine = amount;
    if (packet === current) packetResult(`You got ${money(amount)}!`, true);
  } catch (e) {
    if (packet === current) packetResult(describe(e), false);
    if (/** @type {any} */ (e).code === 'already_grabbed') current.mine = 0;
  }
  if (packet === current) renderPacket();
});

// ---------------------------------------------------------------------------------------
// Connection

/** @type {{ token: string, exp: number } | null} */
let devToken = null;
let devMode = false;

async function fetchDevToken() {
  const r = await fetch(`/dev/token?name=${encodeURIComponent(NAME)}`, { cache: 'no-store' });
  if (r.status === 404) return null;
  if (!r.ok) throw new Error(`dev token: HTTP ${r.status}`);
  return /** @type {{ token: string, exp: number }} */ (await r.json());
}

/** The token for each (re)connect: the URL's, else a dev token refreshed before it expires. */
async function token() {
  if (params.get('token')) return params.get('token');
  if (!devMode) return null;
  if (!devToken || devToken.exp * 1000 - Date.now() < 60_000) devToken = await fetchDevToken();
  return devToken?.token ?? null;
}

if (!params.get('token')) {
  try {
    devToken = await fetchDevToken();
    devMode = devToken !== null;
  } catch {
    devMode = false;
  }
}
devRedpacket.hidden = !devMode;
$('mod-panel').hidden = !devMode;
chatLog.classList.toggle('moderated', devMode);

const wsUrl = `${location.protocol === 'https:' ? 'wss' : 'ws'}://${location.host}/ws`;
const client = new DanmakuClient({ url: wsUrl, token, format: FORMAT });
/** @type {any} */ (window).danmaku = client; // for the console (and the e2e test)

client.on('status', renderStatus);
client.on('open', (hello) => {
  myId = hello.user?.id ?? null;
  $('me').textContent = hello.user ? hello.user.name : 'an anonymous viewer (read-only)';
  const canWrite = myId !== null;
  chatInput.disabled = !canWrite;
  chatSend.disabled = !canWrite;
  chatInput.placeholder = canWrite
    ? 'Say something — it flies across the stream'
    : 'Read-only: open with ?token=… to chat';
  for (const b of giftButtons) b.disabled = !canWrite;
  renderPacket();
});
client.on('online', (room, n) => {
  if (room === ROOM) $('online').textContent = String(n);
});
client.on('joined', (joined, meta) => {
  if (meta.rejoin) logLine('sys', null, meta.resync ? 'Reconnected (resynced)' : 'Reconnected');
  for (const p of joined.redpackets ?? []) showPacket(p);
});
// After a reconnect the client re-joined with the last event it had (`since`): either the
// gateway sent everything that happened meanwhile (already shown, as if live), or it
// could not (a restarted node without a cluster, a long gap) and the page says so.
/** @type {number | undefined} */
let reconnectNoticeTimer;
client.on('rejoined', (room, info) => {
  if (room !== ROOM) return;
  const el = $('reconnect-notice');
  el.textContent = info.recovered ? 'Reconnected, nothing missed' : 'Reconnected, some messages may have been missed';
  el.dataset.recovered = String(info.recovered);
  el.dataset.missed = String(info.missed);
  el.hidden = false;
  clearTimeout(reconnectNoticeTimer);
  reconnectNoticeTimer = window.setTimeout(() => {
    el.hidden = true;
  }, RECONNECT_NOTICE_MS);
});

/**
 * Whether an event is shown as live: it came in a batch, or it is one the re-join
 * recovered (it happened while we were away); plain history is shown as the past.
 * @param {import('./danmaku-client.js').EventMeta} meta
 */
const isLive = (meta) => !meta.history || meta.recovered === true;
client.on('error', (e) => notice(describe(e), true));

client.on('chat', (ev, meta) => {
  const self = ev.user.id === myId;
  const live = isLive(meta);
  const li = logLine(self ? 'self chat' : 'chat', ev.user.name, ev.text, !live, ev.id);
  li.dataset.user = ev.user.id;
  if (devMode) addModActions(li, ev.user, self);
  if (live) stage.add(ev.text, { self, id: ev.id });
});
// A moderator took an event back: off the stage and out of the chat log, wherever it is.
// A recall whose target is not shown (older than the history, or never seen) does nothing.
client.on('recall', (ev, meta) => {
  if (typeof ev.target !== 'string') return;
  let found = stage.remove(ev.target);
  for (const li of chatLog.querySelectorAll(`li[data-id="${CSS.escape(ev.target)}"]`)) {
    if (li === lastGiftLine.li) lastGiftLine.li = null;
    li.remove();
    found = true;
  }
  if (found && isLive(meta)) logLine('sys recalled', null, 'A message was removed by a moderator');
});
/** The last gift line of the chat log, extended while the same user sends the same gift. */
let lastGiftLine = { key: '', count: 0, at: 0, li: /** @type {Element | null} */ (null) };
client.on('gift', (ev, meta) => {
  const live = isLive(meta);
  const key = `${ev.user.id}/${ev.gift}`;
  const now = Date.now();
  const line = lastGiftLine;
  if (line.li && line.key === key && line.li === chatLog.lastElementChild && now - line.at < COMBO_WINDOW_MS) {
    line.count += ev.count;
    line.at = now;
    /** @type {ChildNode} */ (line.li.lastChild).textContent = `sent ${GIFTS[ev.gift] ?? ev.gift} ×${line.count}`;
  } else {
    const li = logLine('gift', ev.user.name, `sent ${GIFTS[ev.gift] ?? ev.gift} ×${ev.count}`, !live, ev.id);
    lastGiftLine = { key, count: ev.count, at: now, li };
  }
  if (live) giftToast(ev);
});
client.on('redpacket', (ev, meta) => {
  const live = isLive(meta);
  logLine('rp', ev.user.name, `sent a red packet: ${money(ev.total)} in ${ev.shares} shares`, !live, ev.id);
  // A recovered one that is still open was listed in the re-join's `redpackets` already.
  if (live && ev.expires_at > Date.now()) showPacket(ev);
});
client.on('grab', (ev, meta) => {
  // History (recovered too) came before the join, whose `redpackets` counted it already.
  if (packet?.packet === ev.packet && !meta.history) {
    packet.grabbed++;
    renderPacket();
  }
  logLine('rp', ev.user.name, `grabbed ${money(ev.amount)}`, !isLive(meta), ev.id);
});
client.on('redpacket_done', (ev) => {
  if (packet?.packet !== ev.packet) return;
  const p = packet;
  p.done = true;
  p.grabbed = ev.grabbed;
  renderPacket();
  if (p.mine === null) packetResult(ev.expired ? 'Expired' : 'All shares are gone', false);
  p.hideTimer = window.setTimeout(() => {
    if (packet === p) {
      packet = null;
      renderPacket();
    }
  }, 8000);
});
client.on('system', (ev, meta) => {
  const live = isLive(meta);
  logLine('sys', null, ev.text, !live, ev.id);
  if (live) stage.add(ev.text, { system: true, id: ev.id });
});

// Banned (close 4030): the client does not reconnect; the page says so and stops.
client.on('banned', showBanned);
function showBanned() {
  notice('You have been banned', true, 'banned');
  $('banned-overlay').hidden = false;
  chatInput.disabled = true;
  chatSend.disabled = true;
  chatInput.placeholder = 'You have been banned';
  for (const b of giftButtons) b.disabled = true;
  myId = null;
  renderPacket();
  logLine('sys', null, 'You have been banned: the connection was closed');
}

// A browser does not tell a page why a WebSocket handshake failed, so a signed-in user
// (?token=) who comes back while banned would retry forever. When a connection attempt
// fails, ask /ws over plain HTTP: the gateway checks the token (and the ban) before it
// looks for an upgrade, and answers 403 {"code":"banned"}.
client.on('status', async (status, detail) => {
  const tok = params.get('token');
  if (status !== 'reconnecting' || detail.code !== 1006 || !tok) return;
  try {
    const r = await fetch(`/ws?token=${encodeURIComponent(tok)}`, { cache: 'no-store' });
    if (r.status !== 403) return;
    const body = await r.json().catch(() => null);
    if (body?.code !== 'banned' || client.status === 'open') return;
    client.close();
    renderStatus('banned', {});
    showBanned();
  } catch {
    /* the gateway is away: keep retrying */
  }
});

// Controls --------------------------------------------------------------------------------
$('chat-form').addEventListener('submit', async (e) => {
  e.preventDefault();
  const text = chatInput.value.trim();
  if (!text) return;
  try {
    await client.chat(ROOM, text);
    chatInput.value = '';
    notice('');
  } catch (err) {
    // The text stays in the input: edit it (filtered) or send it again later.
    refused(err);
  }
});

for (const b of giftButtons) {
  b.addEventListener('click', async () => {
    const gift = /** @type {string} */ (b.dataset.gift);
    showMyCombo(gift);
    try {
      await client.gift(ROOM, gift, 1);
    } catch (err) {
      refused(err);
    }
  });
}

devRedpacket.addEventListener('click', async () => {
  const r = await fetch(`/dev/redpacket?room=${encodeURIComponent(ROOM)}`, { method: 'POST' });
  if (!r.ok) notice(`Could not create a red packet (HTTP ${r.status})`, true);
});

// Moderator panel (dev mode) -------------------------------------------------------------
// The gateway's /dev/mute, /dev/unmute, /dev/recall and /dev/settings act on the room
// with the server's API token, which the page never sees; they exist only with
// [web] dev_tokens = true (404 otherwise).

/** Users this page muted: id → { name, timer }. */
const mutedHere = new Map();
const modStatus = $('mod-status');

/**
 * POSTs a dev helper; on failure shows why in the panel and returns null.
 * @param {string} what for the message @param {string} path @param {Record<string, string>} query
 * @returns {Promise<{ status: number, body: any } | null>}
 */
async function devPost(what, path, query) {
  const url = `${path}?${new URLSearchParams({ room: ROOM, ...query })}`;
  modStatus.classList.remove('bad');
  try {
    const r = await fetch(url, { method: 'POST', cache: 'no-store' });
    const text = await r.text();
    let body = null;
    try {
      body = text ? JSON.parse(text) : null;
    } catch {
      /* not JSON */
    }
    if (!r.ok) {
      modStatus.textContent = `Could not ${what}: ${body?.message ?? body?.code ?? `HTTP ${r.status}`}`;
      modStatus.classList.add('bad');
      return null;
    }
    return { status: r.status, body };
  } catch (e) {
    modStatus.textContent = `Could not ${what}: ${/** @type {any} */ (e)?.message ?? e}`;
    modStatus.classList.add('bad');
    return null;
  }
}

/** Mute / Recall buttons on a chat line. @param {HTMLElement} li @param {{ id: string, name: string }} user @param {boolean} self */
function addModActions(li, user, self) {
  const box = document.createElement('span');
  box.className = 'mod-actions';
  if (!self) {
    const mute = document.createElement('button');
    mute.type = 'button';
    mute.className = 'mod-btn mod-mute';
    mute.textContent = 'mute';
    mute.title = `Mute ${user.name} in this room`;
    box.appendChild(mute);
  }
  const recall = document.createElement('button');
  recall.type = 'button';
  recall.className = 'mod-btn mod-recall';
  recall.textContent = 'recall';
  recall.title = 'Remove this message for everyone';
  box.appendChild(recall);
  // First, so that the float sits at the right of the line's first row.
  li.prepend(box);
}

chatLog.addEventListener('click', async (e) => {
  const button = /** @type {HTMLElement} */ (e.target).closest?.('button.mod-btn');
  const li = /** @type {HTMLElement | null} */ (button?.closest('li'));
  if (!button || !li || !devMode) return;
  const btn = /** @type {HTMLButtonElement} */ (button);
  btn.disabled = true;
  try {
    if (btn.classList.contains('mod-recall') && li.dataset.id) {
      // The recall event comes back in the room's batch and removes the line everywhere.
      if (await devPost('recall the message', '/dev/recall', { id: li.dataset.id })) {
        modStatus.textContent = 'Message recalled';
      }
    } else if (btn.classList.contains('mod-mute') && li.dataset.user) {
      const name = li.querySelector('.who')?.textContent ?? li.dataset.user;
      await muteUser(li.dataset.user, name);
    }
  } finally {
    btn.disabled = false;
  }
});

/** @param {string} userId @param {string} name */
async function muteUser(userId, name) {
  const duration = /** @type {HTMLSelectElement} */ ($('mod-mute-duration')).value;
  /** @type {Record<string, string>} */
  const query = { user: userId };
  if (duration) query.duration_s = duration;
  if (!(await devPost(`mute ${name}`, '/dev/mute', query))) return;
  modStatus.textContent = duration ? `${name} is muted for ${human(Number(duration) * 1000)}` : `${name} is muted`;
  clearTimeout(mutedHere.get(userId)?.timer);
  const timer = duration ? window.setTimeout(() => forgetMute(userId), Number(duration) * 1000) : 0;
  mutedHere.set(userId, { name, timer });
  renderMuted();
}

/** @param {string} userId */
function forgetMute(userId) {
  clearTimeout(mutedHere.get(userId)?.timer);
  mutedHere.delete(userId);
  renderMuted();
}

function renderMuted() {
  const list = $('mod-muted');
  list.textContent = '';
  for (const [userId, { name }] of mutedHere) {
    const li = document.createElement('li');
    li.dataset.user = userId;
    const who = document.createElement('span');
    who.className = 'who';
    who.textContent = name;
    const unmute = document.createElement('button');
    unmute.type = 'button';
    unmute.className = 'mod-btn mod-unmute';
    unmute.textContent = 'unmute';
    unmute.addEventListener('click', async () => {
      unmute.disabled = true;
      const r = await fetch(`/dev/unmute?${new URLSearchParams({ room: ROOM, user: userId })}`, { method: 'POST' }).catch(
        () => null,
      );
      // 404: the mute had already ended; either way it is gone.
      if (r && (r.ok || r.status === 404)) {
        modStatus.classList.remove('bad');
        modStatus.textContent = `${name} can chat again`;
        forgetMute(userId);
      } else {
        modStatus.textContent = `Could not unmute ${name}${r ? ` (HTTP ${r.status})` : ''}`;
        modStatus.classList.add('bad');
        unmute.disabled = false;
      }
    });
    li.append(who, unmute);
    list.appendChild(li);
  }
  $('mod-muted-none').hidden = mutedHere.size > 0;
}

const chatToggle = /** @type {HTMLButtonElement} */ ($('mod-chat-toggle'));
const slowInput = /** @type {HTMLInputElement} */ ($('mod-slow'));

/** @param {{ chat?: string, slow_mode_s?: number } | null | undefined} settings */
function renderSettings(settings) {
  if (!settings) return;
  if (settings.chat === 'open' || settings.chat === 'closed') {
    chatToggle.dataset.chat = settings.chat;
    chatToggle.textContent = settings.chat === 'open' ? 'Close chat' : 'Open chat';
    $('mod-chat-state').textContent = settings.chat === 'open' ? 'Chat is open' : 'Chat is closed';
  }
  if (typeof settings.slow_mode_s === 'number' && document.activeElement !== slowInput) {
    slowInput.value = String(settings.slow_mode_s);
  }
}

chatToggle.addEventListener('click', async () => {
  const next = chatToggle.dataset.chat === 'closed' ? 'open' : 'closed';
  chatToggle.disabled = true;
  const r = await devPost(next === 'closed' ? 'close the chat' : 'open the chat', '/dev/settings', { chat: next });
  chatToggle.disabled = false;
  if (r) {
    renderSettings(r.body);
    modStatus.textContent = next === 'closed' ? 'Chat closed for viewers' : 'Chat open again';
  }
});

$('mod-slow-form').addEventListener('submit', async (e) => {
  e.preventDefault();
  const n = Math.max(0, Math.floor(Number(slowInput.value) || 0));
  const r = await devPost('set slow mode', '/dev/settings', { slow_mode_s: String(n) });
  if (r) {
    renderSettings(r.body);
    modStatus.textContent = n > 0 ? `Slow mode: one message per ${n} s` : 'Slow mode off';
  }
});

if (devMode) {
  renderMuted();
  // The room's current settings.
  fetch(`/dev/settings?${new URLSearchParams({ room: ROOM })}`, { cache: 'no-store' })
    .then((r) => (r.ok ? r.json() : null))
    .then(renderSettings)
    .catch(() => {});
}

window.addEventListener('resize', () => stage.pump());

try {
  await client.connect();
} catch {
  // Closed before the first hello (banned): already on screen.
}
if (client.status === 'open') {
  try {
    await client.join(ROOM, { history: 30 });
    notice('');
  } catch (e) {
    if (client.status !== 'banned') notice(`Could not join ${ROOM}: ${describe(e)}`, true);
  }
}
