// End-to-end test of the demo page in a real (headless) Chromium: two viewers on the
// page served by the real gateway binary (dev tokens on): permessage-deflate negotiated
// and compressed batches read by the unchanged page, danmaku, gifts, red packets, a
// restart, recovery after a network blink, and moderation (recall, mute, closed chat,
// slow mode, filters, a ban) through the page's dev moderator panel; then a two-node
// cluster on a throwaway redis-server, one node killed and restarted mid-stream. Exits
// non-zero on failure and saves a screenshot to target/e2e/demo.png.
//
//   node web/e2e/demo.e2e.mjs            (after cargo build; Chromium at /usr/bin/chromium)
//   CHROMIUM=/path/to/chrome node web/e2e/demo.e2e.mjs

import assert from 'node:assert/strict';
import { mkdirSync } from 'node:fs';
import path from 'node:path';
import { chromium } from 'playwright-core';
import { Gateway, REPO, RedisServer, signToken, sleep } from '../support/gateway.mjs';

const ROOM = 'e2e-room';
const OUT = path.join(REPO, 'target', 'e2e');
const SCREENSHOT = path.join(OUT, 'demo.png');
const TOTAL_TIMEOUT_MS = 180_000;

/** @type {Array<[string, () => Promise<void>]>} */
const steps = [];
const step = (/** @type {string} */ name, /** @type {() => Promise<void>} */ fn) => steps.push([name, fn]);

const watchdog = setTimeout(() => {
  console.error(`e2e: timed out after ${TOTAL_TIMEOUT_MS / 1000} s`);
  process.exit(1);
}, TOTAL_TIMEOUT_MS);

const gw = await Gateway.start({ devTokens: true, heartbeatMs: 5000 });
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM ?? '/usr/bin/chromium',
  args: [
    '--no-sandbox',
    '--disable-gpu',
    '--disable-background-networking',
    '--disable-component-update',
    '--no-first-run',
    '--headless=new',
  ],
});
/** @type {string[]} */
const pageErrors = [];
/** @type {string[]} page console, printed on failure */
const consoleLines = [];

/** Opens the demo as `name` in its own browser context (own cookies/storage). */
async function openViewer(/** @type {string} */ name) {
  const context = await browser.newContext({ viewport: { width: 1280, height: 760 } });
  const page = await context.newPage();
  // What the gateway answered to Chromium's WebSocket handshake, seen through CDP.
  const cdp = await context.newCDPSession(page);
  await cdp.send('Network.enable');
  /** @type {Record<string, string>[]} */
  const handshakes = [];
  cdp.on('Network.webSocketHandshakeResponseReceived', (e) => handshakes.push(e.response.headers));
  /** @type {any} */ (page).handshakes = handshakes;
  page.on('pageerror', (e) => pageErrors.push(`${name}: ${e.message}`));
  page.on('console', (m) => consoleLines.push(`${name} ${m.type()}: ${m.text()}`));
  await page.goto(`${gw.httpUrl}/?room=${ROOM}&name=${name}`);
  await page.waitForSelector('#status[data-status="open"]');
  await page.waitForFunction(() => /** @type {any} */ (window).danmaku?.rooms.length === 1);
  // Record every status change, to see the reconnect later.
  await page.evaluate(() => {
    const w = /** @type {any} */ (window);
    w.statuses = [];
    w.danmaku.on('status', (/** @type {string} */ s) => w.statuses.push(s));
  });
  return page;
}

/** @type {import('playwright-core').Page} */
let alice;
/** @type {import('playwright-core').Page} */
let bob;

step('two viewers open the page, get dev tokens and see each other online', async () => {
  alice = await openViewer('Alice');
  bob = await openViewer('Bob');
  assert.equal(await alice.textContent('#me'), 'Alice');
  assert.equal(await bob.textContent('#me'), 'Bob');
  await alice.waitForFunction(() => document.querySelector('#online')?.textContent === '2');
  await bob.waitForFunction(() => document.querySelector('#online')?.textContent === '2');
  assert.equal((await bob.textContent('#status-text'))?.trim(), 'live');
  assert.equal(await bob.isVisible('#dev-redpacket'), true, 'dev button shown in dev mode');
  assert.equal(await bob.isVisible('#mod-panel'), true, 'moderator panel shown in dev mode');
});

step("a chat sent by one viewer scrolls across the other's stage", async () => {
  await alice.fill('#chat-input', 'Hello from Alice!');
  await alice.press('#chat-input', 'Enter');
  const el = bob.locator('#danmaku-layer .danmaku:not(.danmaku-measure)', { hasText: 'Hello from Alice!' });
  await el.waitFor({ state: 'attached', timeout: 5000 });
  const x0 = (await el.boundingBox())?.x ?? NaN;
  await sleep(300);
  const x1 = (await el.boundingBox())?.x ?? NaN;
  assert.ok(x1 < x0, `the comment moves left (${x0} → ${x1})`);
  await bob.locator('#chat-log li', { hasText: 'Hello from Alice!' }).waitFor();
  // The sender sees their own comment (from the batch), highlighted.
  await alice.locator('#danmaku-layer .danmaku.self', { hasText: 'Hello from Alice!' }).waitFor();
  assert.equal(await alice.inputValue('#chat-input'), '', 'input cleared after the ack');
});

step('Chromium negotiates permessage-deflate and the page reads compressed batches', async () => {
  for (const page of [alice, bob]) {
    const headers = /** @type {any} */ (page).handshakes[0] ?? {};
    const agreed = Object.entries(headers).find(([k]) => k.toLowerCase() === 'sec-websocket-extensions')?.[1];
    assert.equal(agreed, 'permessage-deflate; server_no_context_takeover; client_no_context_takeover');
  }
  const metric = async () => {
    const text = await (await fetch(`${gw.httpUrl}/metrics`)).text();
    const line = text.split('\n').find((l) => l.startsWith('danmaku_deliveries_deflated_total '));
    return Number(line?.split(' ')[1] ?? 0);
  };
  const before = await metric();
  // 200 characters: the batch is over compression.min_bytes, so it goes deflated.
  const long = `deflate ${'弹幕666哈哈awsl'.repeat(30)}`.slice(0, 190);
  await alice.fill('#chat-input', long);
  await alice.press('#chat-input', 'Enter');
  await bob.locator('#chat-log li', { hasText: long.slice(0, 40) }).waitFor({ timeout: 5000 });
  assert.ok((await metric()) > before, 'the batch went out deflated');
});

step('comments in one lane never overlap', async () => {
  const texts = ['first!', 'what a play', 'this stream is great, greetings from the office', 'lol', 'GG'];
  for (const [i, t] of texts.entries()) {
    await gw.api('POST', `/api/v1/rooms/${ROOM}/events`, {
      type: 'chat',
      user: { id: `fan-${i}`, name: `Fan ${i}` },
      text: t,
    });
  }
  await bob.waitForFunction(
    (n) => document.querySelectorAll('#danmaku-layer .danmaku:not(.danmaku-measure)').length >= n,
    texts.length,
  );
  for (let sample = 0; sample < 4; sample++) {
    const boxes = await bob.$$eval('#danmaku-layer .danmaku:not(.danmaku-measure)', (els) =>
      els.map((e) => {
        const r = e.getBoundingClientRect();
        return { lane: /** @type {HTMLElement} */ (e).dataset.lane, left: r.left, right: r.right, top: r.top };
      }),
    );
    const lanes = new Set(boxes.map((b) => b.lane));
    assert.ok(lanes.size >= 2, 'several lanes in use');
    for (const lane of lanes) {
      const row = boxes.filter((b) => b.lane === lane).sort((a, b) => a.left - b.left);
      for (let i = 1; i < row.length; i++) {
        assert.ok(row[i].left >= row[i - 1].right, `lane ${lane} overlaps: ${JSON.stringify(row)}`);
      }
    }
    await sleep(250);
  }
});

step('gift buttons count a combo; the other viewer sees the gift', async () => {
  for (let i = 0; i < 3; i++) await alice.click('.gift-btn[data-gift="rose"]');
  await alice.waitForSelector('#combo:not([hidden])');
  assert.equal(await alice.textContent('#combo-count'), '×3');
  assert.equal(await alice.textContent('.gift-btn[data-gift="rose"] .gift-badge'), '×3');
  const toast = bob.locator('.gift-toast', { hasText: 'Alice' });
  await toast.waitFor();
  await bob.waitForFunction(
    () => [...document.querySelectorAll('.gift-toast .count')].some((c) => c.textContent === '×3'),
  );
});

step('the dev button drops a red packet the viewers can grab', async () => {
  await alice.click('#dev-redpacket');
  for (const page of [alice, bob]) {
    await page.locator('#redpacket-banner:not([hidden])', { hasText: 'Demo sponsor' }).waitFor();
  }
  await alice.click('#rp-grab');
  await alice.waitForFunction(() => /You got \d+\.\d\d!/.test(document.querySelector('#rp-result')?.textContent ?? ''));
  assert.equal(await alice.isDisabled('#rp-grab'), true, 'one grab per packet');
});

step('a red packet created through the HTTP API is grabbed in the page', async () => {
  const packet = await gw.redpacket(ROOM, 1000, 10);
  for (const page of [alice, bob]) {
    await page.waitForSelector(`#redpacket-banner[data-packet="${packet}"]:not([hidden])`);
  }
  assert.match((await bob.textContent('#rp-title')) ?? '', /S sent a red packet: 10\.00/);
  await bob.click('#rp-grab');
  await bob.waitForFunction(() => /You got \d+\.\d\d!/.test(document.querySelector('#rp-result')?.textContent ?? ''));
  const shown = Number(/You got (\d+\.\d\d)!/.exec((await bob.textContent('#rp-result')) ?? '')?.[1]);
  const status = await gw.api('GET', `/api/v1/redpackets/${packet}`);
  assert.equal(status.body.grabbed, 1);
  assert.equal(Math.round(shown * 100), status.body.grabs[0].amount, 'the page shows the amount granted');
  await bob.waitForFunction(() => /1\/10 shares taken/.test(document.querySelector('#rp-progress')?.textContent ?? ''));
});

step('screenshot of a busy stage', async () => {
  const lines = [
    'Welcome to the stream!',
    'that red packet was fast',
    'hello from Lisbon',
    'turn the volume up',
    'first time here, love it',
    '+1',
    'what song is this?',
    'GG WP',
    'this gateway batches every 50 ms',
  ];
  for (const [i, t] of lines.entries()) {
    await gw.api('POST', `/api/v1/rooms/${ROOM}/events`, {
      type: 'chat',
      user: { id: `viewer-${i}`, name: `Viewer ${i}` },
      text: t,
    });
    await sleep(90);
  }
  await bob.fill('#chat-input', 'Bob here, grabbed a red packet!');
  await bob.press('#chat-input', 'Enter');
  for (let i = 0; i < 4; i++) await bob.click('.gift-btn[data-gift="heart"]');
  await alice.click('.gift-btn[data-gift="rose"]');
  await alice.click('.gift-btn[data-gift="rose"]');
  await sleep(900);
  mkdirSync(OUT, { recursive: true });
  await bob.screenshot({ path: SCREENSHOT });
});

step('after the gateway restarts, the page reconnects and gets live comments again', async () => {
  await gw.restart(); // SIGTERM: drain (close 1001), exit; then a new process on the same port
  await bob.waitForFunction(() => /** @type {any} */ (window).statuses.includes('reconnecting'));
  await bob.waitForSelector('#status[data-status="open"]', { timeout: 15000 });
  await alice.waitForSelector('#status[data-status="open"]', { timeout: 15000 });
  await bob.waitForFunction(() => /** @type {any} */ (window).danmaku.rooms.includes('e2e-room'));
  // A restarted single node has lost its recovery log: never "nothing missed" here.
  const note = bob.locator('#reconnect-notice:not([hidden])');
  await note.waitFor({ timeout: 5000 });
  assert.equal(await note.getAttribute('data-recovered'), 'false');
  assert.equal(await note.textContent(), 'Reconnected, some messages may have been missed');
  await alice.waitForFunction(() => document.querySelector('#online')?.textContent === '2');
  await alice.fill('#chat-input', 'Still here after the restart');
  await alice.press('#chat-input', 'Enter');
  await bob
    .locator('#danmaku-layer .danmaku:not(.danmaku-measure)', { hasText: 'Still here after the restart' })
    .waitFor({ state: 'attached', timeout: 5000 });
});

/**
 * Gifts through the API, one per (distinct) user so that no two merge in a window;
 * returns their event ids. @param {Gateway} node @param {string} room @param {string} tag
 * @param {number} n
 */
async function postGifts(node, room, tag, n) {
  /** @type {Array<{ id: string, name: string, count: number }>} */
  const sent = [];
  for (let i = 1; i <= n; i++) {
    const name = `${tag} ${i}`;
    const r = await node.api('POST', `/api/v1/rooms/${room}/events`, {
      type: 'gift',
      user: { id: `${tag.toLowerCase().replace(/\W+/g, '-')}-${i}`, name },
      gift: i % 2 ? 'rose' : 'heart',
      count: i,
    });
    assert.equal(r.status, 202, JSON.stringify(r.body));
    sent.push({ id: r.body.id, name, count: i });
  }
  return sent;
}

/**
 * How many chat-log lines of `page` show each gift (by event id).
 * @param {import('playwright-core').Page} page @param {Array<{ id: string }>} gifts
 */
const giftLines = (page, gifts) =>
  page.evaluate(
    (ids) => ids.map((id) => document.querySelectorAll(`#chat-log li[data-id="${CSS.escape(id)}"]`).length),
    gifts.map((g) => g.id),
  );

step('a network blink: gifts posted meanwhile show once each, "nothing missed"', async () => {
  if (!(await gw.answersRecovered())) {
    console.log('# skip - network blink recovery: this gateway binary has no `since` support (rebuild it)');
    return;
  }
  // The restart step's notice ("some messages may have been missed") may still be up:
  // the one this step waits for must be the blink's own.
  await bob.locator('#reconnect-notice').waitFor({ state: 'hidden', timeout: 15000 });
  const context = bob.context();
  // Offline first, so that the reconnect fails until we are back: a gap of our choosing.
  await context.setOffline(true);
  try {
    await bob.evaluate(() => /** @type {any} */ (window).danmaku.reconnect());
    await bob.waitForFunction(() => /** @type {any} */ (window).danmaku.status !== 'open');
    const gifts = await postGifts(gw, ROOM, 'Gap Fan', 3);
    await sleep(300); // past a batch window: broadcast to those still there
    assert.deepEqual(await giftLines(bob, gifts), [0, 0, 0], 'nothing reached the page during the gap');
    assert.notEqual(await bob.evaluate(() => /** @type {any} */ (window).danmaku.status), 'open', 'still offline');
    await context.setOffline(false); // the 'online' event: the client retries at once

    const note = bob.locator('#reconnect-notice:not([hidden])');
    await note.waitFor({ timeout: 15000 });
    assert.equal(await note.getAttribute('data-recovered'), 'true');
    assert.equal(await note.textContent(), 'Reconnected, nothing missed');
    await sleep(300); // any duplicate would have come by now
    assert.deepEqual(await giftLines(bob, gifts), [1, 1, 1], 'every gap gift exactly once');
    for (const g of gifts) {
      // Rendered like live gifts: a toast with the count, a plain (not history) log line.
      await bob.locator('.gift-toast', { hasText: g.name }).filter({ hasText: `×${g.count}` }).waitFor();
      assert.equal(await bob.locator(`#chat-log li.history[data-id="${g.id}"]`).count(), 0);
    }
    // The notice is brief.
    await bob.locator('#reconnect-notice').waitFor({ state: 'hidden', timeout: 8000 });
  } finally {
    await context.setOffline(false);
  }
});

/** Sends a chat from `page` through its form. @param {import('playwright-core').Page} page @param {string} text */
async function say(page, text) {
  await page.fill('#chat-input', text);
  await page.press('#chat-input', 'Enter');
}

/** The chat log lines of `page`, as text. @param {import('playwright-core').Page} page */
const logTexts = (page) => page.$$eval('#chat-log li', (els) => els.map((e) => e.textContent ?? ''));

/**
 * Proves `text` never reached `page`: `marker`, sent by Alice after the refusal, is shown
 * there, and the room's events arrive in order, so a broadcast `text` would be shown too.
 * @param {import('playwright-core').Page} page @param {string} text @param {string} marker
 */
async function neverShown(page, text, marker) {
  await say(alice, marker);
  await page.locator('#chat-log li', { hasText: marker }).waitFor();
  assert.ok(!(await logTexts(page)).some((t) => t.includes(text)), `"${text}" was broadcast`);
  const flying = await page.$$eval('#danmaku-layer .danmaku', (els) => els.map((e) => e.textContent ?? ''));
  assert.ok(!flying.some((t) => t.includes(text)), `"${text}" flies on the stage`);
}

/** Bob's user id (a dev token's `dev-…`). */
const bobId = () => bob.evaluate(() => /** @type {string} */ (/** @type {any} */ (window).danmaku.user.id));

step('recall: the moderator takes a chat back; it leaves both stages and chat lists', async () => {
  await say(alice, 'Oops, wrong window');
  const atBob = bob.locator('#chat-log li', { hasText: 'Oops, wrong window' });
  await atBob.waitFor();
  const id = await atBob.getAttribute('data-id');
  assert.ok(id, 'the chat line carries its event id');
  for (const page of [alice, bob]) {
    await page.locator(`#chat-log li[data-id="${id}"]`).waitFor();
    await page.locator(`#danmaku-layer .danmaku[data-id="${id}"]`).waitFor({ state: 'attached' });
  }
  await alice.click(`#chat-log li[data-id="${id}"] .mod-recall`);
  for (const page of [alice, bob]) {
    await page.waitForFunction((id) => !document.querySelector(`[data-id="${id}"]`), id, { timeout: 5000 });
    assert.ok(!(await logTexts(page)).some((t) => t.includes('Oops, wrong window')));
    await page.locator('#chat-log li.recalled').waitFor();
  }
  assert.match((await alice.textContent('#mod-status')) ?? '', /recalled/);
  // A late joiner's history has no trace of it (the room dropped it; a recall whose
  // target is gone is ignored by the page).
  const carol = await openViewer('Carol');
  try {
    await carol.locator('#chat-log li', { hasText: 'Still here after the restart' }).waitFor();
    assert.ok(!(await logTexts(carol)).some((t) => t.includes('Oops, wrong window')));
  } finally {
    await carol.context().close();
  }
});

step('mute from the chat list: the muted viewer is told, nobody gets the chat; unmute', async () => {
  const bid = await bobId();
  await say(bob, 'Bob says hi');
  const line = alice.locator(`#chat-log li[data-user="${bid}"]`, { hasText: 'Bob says hi' });
  await line.waitFor();
  assert.equal(await alice.locator('#chat-log li.self .mod-mute').count(), 0, 'no mute button on your own lines');
  await line.locator('.mod-mute').click();
  await alice.locator(`#mod-muted li[data-user="${bid}"]`, { hasText: 'Bob' }).waitFor();

  await say(bob, 'Can anyone hear me?');
  await bob.waitForSelector('#notice[data-code="muted"]');
  assert.equal(await bob.textContent('#notice'), 'You are muted in this room');
  assert.equal(await bob.inputValue('#chat-input'), 'Can anyone hear me?', 'the text stays for later');
  await neverShown(alice, 'Can anyone hear me?', 'marker after the mute');
  await neverShown(bob, 'Can anyone hear me?', 'marker after the mute, again');

  await alice.click(`#mod-muted li[data-user="${bid}"] .mod-unmute`);
  await alice.waitForFunction(() => document.querySelectorAll('#mod-muted li').length === 0);
  await bob.press('#chat-input', 'Enter');
  await alice.locator('#chat-log li', { hasText: 'Can anyone hear me?' }).waitFor();
  assert.equal(await bob.textContent('#notice'), '', 'the notice clears on the next ack');
});

step('a timed mute says when it ends', async () => {
  const bid = await bobId();
  await alice.selectOption('#mod-mute-duration', '60');
  await alice.locator(`#chat-log li[data-user="${bid}"] .mod-mute`).last().click();
  await alice.locator(`#mod-muted li[data-user="${bid}"]`).waitFor();
  await say(bob, 'still muted?');
  await bob.waitForSelector('#notice[data-code="muted"]');
  assert.match((await bob.textContent('#notice')) ?? '', /muted in this room: you can chat again in (5\d\.\d s|1 min)$/);
  await alice.click(`#mod-muted li[data-user="${bid}"] .mod-unmute`);
  await alice.waitForFunction(() => document.querySelectorAll('#mod-muted li').length === 0);
  await alice.selectOption('#mod-mute-duration', '');
});

step('room settings from the panel: closed chat and slow mode refuse with a notice', async () => {
  await alice.click('#mod-chat-toggle');
  await alice.waitForSelector('#mod-chat-toggle[data-chat="closed"]');
  assert.equal(await alice.textContent('#mod-chat-toggle'), 'Open chat');
  await say(bob, 'is the chat closed?');
  // The previous step's mute notice may still be up (same code): wait for the new text.
  await bob
    .waitForFunction(() => document.querySelector('#notice')?.textContent === 'The chat is closed in this room for now', null, { timeout: 5000 })
    .catch(() => {});
  assert.equal(await bob.textContent('#notice'), 'The chat is closed in this room for now');
  await alice.click('#mod-chat-toggle');
  await alice.waitForSelector('#mod-chat-toggle[data-chat="open"]');

  await alice.fill('#mod-slow', '30');
  await alice.press('#mod-slow', 'Enter');
  await alice.waitForFunction(() => document.querySelector('#mod-status')?.textContent === 'Slow mode: one message per 30 s');
  await say(bob, 'slow one');
  await alice.locator('#chat-log li', { hasText: 'slow one' }).waitFor();
  await say(bob, 'slow two');
  await bob.waitForSelector('#notice[data-code="rate_limited"]');
  assert.match((await bob.textContent('#notice')) ?? '', /^Slow mode is on: you can send again in \d+\.\d s$/);
  await alice.fill('#mod-slow', '0');
  await alice.press('#mod-slow', 'Enter');
  await alice.waitForFunction(() => document.querySelector('#mod-status')?.textContent === 'Slow mode off');
  await bob.press('#chat-input', 'Enter');
  await alice.locator('#chat-log li', { hasText: 'slow two' }).waitFor();
});

step('word filters: a blocked word is refused and never shown; a masked one is starred', async () => {
  const set = await gw.api('PUT', '/api/v1/filters', { block: ['spoiler'], mask: ['darn'] });
  assert.equal(set.status, 200, JSON.stringify(set.body));
  try {
    await say(bob, 'huge SPOILER ahead');
    await bob.waitForSelector('#notice[data-code="filtered"]');
    assert.match((await bob.textContent('#notice')) ?? '', /blocked word/);
    await neverShown(alice, 'SPOILER', 'marker after the filter');
    await say(bob, 'darn it');
    await alice.locator('#chat-log li', { hasText: '**** it' }).waitFor();
  } finally {
    await gw.api('PUT', '/api/v1/filters', { block: [], mask: [] });
  }
});

step('ban: the banned viewer is told and the page stops; a banned ?token= page does not retry', async () => {
  const bid = await bobId();
  const ban = await gw.api('PUT', `/api/v1/bans/${bid}`, { reason: 'e2e' });
  assert.equal(ban.status, 204, JSON.stringify(ban.body));
  await bob.waitForSelector('#status[data-status="banned"]', { timeout: 5000 });
  await bob.waitForSelector('#banned-overlay:not([hidden])');
  assert.equal(await bob.textContent('#notice'), 'You have been banned');
  assert.equal(await bob.isDisabled('#chat-input'), true);
  await alice.waitForFunction(() => document.querySelector('#online')?.textContent === '1');
  const n = await bob.evaluate(() => /** @type {any} */ (window).statuses.length);
  await sleep(1500);
  const after = await bob.evaluate((n) => /** @type {any} */ (window).statuses.slice(n), n);
  assert.deepEqual(after, [], 'no reconnect after 4030');

  // The same user opening the page again with a token: the handshake is refused (403),
  // which the browser hides; the page asks /ws over HTTP, learns why, and stops.
  const context = await browser.newContext({ viewport: { width: 1280, height: 760 } });
  try {
    const page = await context.newPage();
    page.on('pageerror', (e) => pageErrors.push(`banned: ${e.message}`));
    await page.goto(`${gw.httpUrl}/?room=${ROOM}&token=${signToken(bid, 'Bob')}`);
    await page.waitForSelector('#banned-overlay:not([hidden])', { timeout: 10000 });
    assert.equal(await page.textContent('#status-text'), 'banned');
    const status = await page.evaluate(() => /** @type {any} */ (window).danmaku.status);
    assert.equal(status, 'closed', 'the client was stopped');
  } finally {
    await context.close();
    await gw.api('DELETE', `/api/v1/bans/${bid}`);
  }
});

step('without dev tokens: anonymous and read-only, or signed in with ?token=', async () => {
  const plain = await Gateway.start();
  try {
    const context = await browser.newContext({ viewport: { width: 1280, height: 760 } });
    const page = await context.newPage();
    page.on('pageerror', (e) => pageErrors.push(`anonymous: ${e.message}`));
    await page.goto(`${plain.httpUrl}/?room=${ROOM}`);
    await page.waitForSelector('#status[data-status="open"]');
    assert.match((await page.textContent('#me')) ?? '', /anonymous/);
    assert.equal(await page.isDisabled('#chat-input'), true);
    assert.equal(await page.isDisabled('.gift-btn[data-gift="rose"]'), true);
    assert.equal(await page.isVisible('#dev-redpacket'), false, 'no dev button');
    assert.equal(await page.isVisible('#mod-panel'), false, 'no moderator panel');
    await page.waitForFunction(() => /** @type {any} */ (window).danmaku?.rooms.length === 1);
    await plain.api('POST', `/api/v1/rooms/${ROOM}/events`, {
      type: 'chat',
      user: { id: 'host', name: 'Host' },
      text: 'anonymous viewers see this',
    });
    await page
      .locator('#danmaku-layer .danmaku:not(.danmaku-measure)', { hasText: 'anonymous viewers see this' })
      .waitFor({ state: 'attached' });

    await page.goto(`${plain.httpUrl}/?room=${ROOM}&token=${signToken('carol', 'Carol')}`);
    await page.waitForSelector('#status[data-status="open"]');
    assert.equal(await page.textContent('#me'), 'Carol');
    assert.equal(await page.isDisabled('#chat-input'), false);
    await context.close();
  } finally {
    await plain.dispose();
  }
});

step('cluster: a node killed and restarted mid-stream; the page gets the gap from Redis, once', async () => {
  /** @type {RedisServer} */
  let redis;
  try {
    redis = await RedisServer.start();
  } catch (e) {
    if (/** @type {any} */ (e).code === 'ENOENT') {
      console.log('# skip - cluster recovery: redis-server is not installed');
      return;
    }
    throw e;
  }
  const room = 'e2e-cluster';
  const env = { GATEWAY_BACKPLANE: 'redis', GATEWAY_REDIS__URL: redis.url };
  /** @type {Gateway | null} */
  let a = null;
  /** @type {Gateway | null} */
  let b = null;
  /** @type {import('playwright-core').BrowserContext | null} */
  let context = null;
  try {
    a = await Gateway.start({ nodeId: 'e2e-a', env: { ...env, GATEWAY_SERVER__NODE_ID: 'e2e-a' } });
    b = await Gateway.start({ nodeId: 'e2e-b', env: { ...env, GATEWAY_SERVER__NODE_ID: 'e2e-b' } });
    context = await browser.newContext({ viewport: { width: 1280, height: 760 } });
    const page = await context.newPage();
    page.on('pageerror', (e) => pageErrors.push(`cluster: ${e.message}`));
    page.on('console', (m) => consoleLines.push(`cluster ${m.type()}: ${m.text()}`));
    await page.goto(`${a.httpUrl}/?room=${room}`);
    await page.waitForSelector('#status[data-status="open"]');
    await page.waitForFunction(() => /** @type {any} */ (window).danmaku?.rooms.length === 1);
    assert.equal(await page.evaluate(() => /** @type {any} */ (window).danmaku.hello.node), 'e2e-a');

    // The stream: gifts through node B reach the page on node A.
    const before = await postGifts(b, room, 'Early Fan', 2);
    await page.waitForFunction(
      (id) => !!document.querySelector(`#chat-log li[data-id="${CSS.escape(id)}"]`),
      before[1].id,
    );
    // Node A dies (no drain, no close frame); gifts keep coming through B meanwhile.
    await a.stop('SIGKILL');
    await page.waitForFunction(() => /** @type {any} */ (window).danmaku.status !== 'open');
    const gap = await postGifts(b, room, 'Gap Fan', 3);
    await sleep(200);
    assert.deepEqual(await giftLines(page, gap), [0, 0, 0], 'nothing reached the page during the gap');
    await a.spawn(); // the same node id, port and data dir
    await page.waitForSelector('#status[data-status="open"]', { timeout: 20000 });
    const note = page.locator('#reconnect-notice:not([hidden])');
    await note.waitFor({ timeout: 10000 });
    await sleep(300); // any duplicate would have come by now
    const lines = await giftLines(page, [...before, ...gap]);
    assert.ok(lines.every((n) => n <= 1), `no gift twice: ${lines}`);
    assert.equal(await note.getAttribute('data-recovered'), 'true', 'the restarted node recovers from the cluster log');
    assert.equal(await note.textContent(), 'Reconnected, nothing missed');
    assert.deepEqual(lines, [1, 1, 1, 1, 1], 'every gift exactly once, the gap too');
    for (const g of gap) {
      await page.locator('.gift-toast', { hasText: g.name }).filter({ hasText: `×${g.count}` }).waitFor();
    }
  } finally {
    await context?.close().catch(() => {});
    await a?.dispose();
    await b?.dispose();
    await redis.dispose();
  }
});

let passed = 0;
let failed = 0;
try {
  for (const [name, fn] of steps) {
    const t0 = Date.now();
    try {
      await fn();
      passed++;
      console.log(`ok - ${name} (${Date.now() - t0} ms)`);
    } catch (e) {
      failed++;
      console.log(`not ok - ${name}\n${/** @type {Error} */ (e).stack ?? e}`);
      break; // later steps build on earlier ones
    }
  }
  if (pageErrors.length) {
    failed++;
    console.log(`not ok - uncaught errors in the page:\n  ${pageErrors.join('\n  ')}`);
  }
} finally {
  await browser.close().catch(() => {});
  if (failed) {
    console.log(`--- browser console ---\n${consoleLines.slice(-50).join('\n')}`);
    console.log(`--- gateway log (tail) ---\n${gw.log.slice(-4000)}`);
  }
  await gw.dispose();
  clearTimeout(watchdog);
}
console.log(`screenshot: ${path.relative(process.cwd(), SCREENSHOT)}`);
console.log(`e2e: ${passed} passed, ${failed} failed`);
process.exit(failed ? 1 : 0);
