// End-to-end test of the demo page in a real (headless) Chromium: two viewers on the
// page served by the real gateway binary (dev tokens on). Exits non-zero on failure and
// saves a screenshot to target/e2e/demo.png.
//
//   node web/e2e/demo.e2e.mjs            (after cargo build; Chromium at /usr/bin/chromium)
//   CHROMIUM=/path/to/chrome node web/e2e/demo.e2e.mjs

import assert from 'node:assert/strict';
import { mkdirSync } from 'node:fs';
import path from 'node:path';
import { chromium } from 'playwright-core';
import { Gateway, REPO, signToken, sleep } from '../support/gateway.mjs';

const ROOM = 'e2e-room';
const OUT = path.join(REPO, 'target', 'e2e');
const SCREENSHOT = path.join(OUT, 'demo.png');
const TOTAL_TIMEOUT_MS = 120_000;

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
  await alice.waitForFunction(() => document.querySelector('#online')?.textContent === '2');
  await alice.fill('#chat-input', 'Still here after the restart');
  await alice.press('#chat-input', 'Enter');
  await bob
    .locator('#danmaku-layer .danmaku:not(.danmaku-measure)', { hasText: 'Still here after the restart' })
    .waitFor({ state: 'attached', timeout: 5000 });
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
