// Test support: runs the real gateway binary as a child process with a temp config
// (free port, temp data dir, known secrets), mints HS256 client tokens, calls the HTTP
// API; runs a throwaway redis-server for cluster cases. Used by the Node tests
// (web/test/) and the browser e2e (web/e2e/).

import { spawn } from 'node:child_process';
import { createHmac } from 'node:crypto';
import { existsSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import WebSocket from 'ws';

export const SECRET = 'web-test-secret';
export const API_TOKEN = 'web-test-api-token';
export const REPO = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');

/** The gateway binary: $DANMAKU_GATEWAY_BIN, else the debug build cargo made. */
export function gatewayBinary() {
  if (process.env.DANMAKU_GATEWAY_BIN) return process.env.DANMAKU_GATEWAY_BIN;
  const target = process.env.CARGO_TARGET_DIR
    ? path.resolve(REPO, process.env.CARGO_TARGET_DIR)
    : path.join(REPO, 'target');
  return path.join(target, 'debug', 'danmaku-gateway');
}

/**
 * A client JWT (HS256; claims sub, name, exp), as the login service would mint it.
 * @param {string} sub @param {string} [name] @param {{ secret?: string, expInS?: number }} [opts]
 */
export function signToken(sub, name = sub, opts = {}) {
  const b64 = (/** @type {object} */ o) => Buffer.from(JSON.stringify(o)).toString('base64url');
  const head = b64({ alg: 'HS256', typ: 'JWT' });
  const body = b64({ sub, name, exp: Math.floor(Date.now() / 1000) + (opts.expInS ?? 3600) });
  const sig = createHmac('sha256', opts.secret ?? SECRET)
    .update(`${head}.${body}`)
    .digest('base64url');
  return `${head}.${body}.${sig}`;
}

/** A TCP port free right now on 127.0.0.1. */
export function freePort() {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.on('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const { port } = /** @type {net.AddressInfo} */ (srv.address());
      srv.close(() => resolve(port));
    });
  });
}

export const sleep = (/** @type {number} */ ms) => new Promise((r) => setTimeout(r, ms));

/**
 * Polls `pred` until it returns a truthy value (returned) or `timeoutMs` passes (throws).
 * @template T @param {() => T | Promise<T>} pred @param {string} what @param {number} [timeoutMs]
 * @returns {Promise<T>}
 */
export async function waitFor(pred, what, timeoutMs = 5000) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const v = await pred();
    if (v) return v;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await sleep(20);
  }
}

/**
 * @typedef {object} GatewayOptions
 * @property {boolean} [devTokens=false] `[web] dev_tokens`
 * @property {number} [heartbeatMs=1000] `server.heartbeat_ms`
 * @property {string} [extraToml] appended to the generated config
 * @property {string} [nodeId='web-test'] `server.node_id` (distinct per node of a cluster)
 * @property {Record<string, string>} [env] extra environment for the process, e.g.
 *   `GATEWAY_BACKPLANE=redis` and `GATEWAY_REDIS__URL` for a cluster node (other
 *   `GATEWAY_*` variables of this process are never passed on)
 */

export class Gateway {
  /** @param {GatewayOptions} [opts] */
  static async start(opts = {}) {
    const gw = new Gateway(opts, await freePort());
    await gw.spawn();
    return gw;
  }

  /** @param {GatewayOptions} opts @param {number} port */
  constructor(opts, port) {
    this.port = port;
    /** @type {Record<string, string>} */
    this.env = opts.env ?? {};
    this.dir = mkdtempSync(path.join(os.tmpdir(), 'danmaku-web-test-'));
    this.configPath = path.join(this.dir, 'config.toml');
    /** @type {import('node:child_process').ChildProcess | null} */
    this.child = null;
    this.log = '';
    writeFileSync(
      this.configPath,
      `# written by web/support/gateway.mjs
[server]
listen = "127.0.0.1:${port}"
node_id = ${JSON.stringify(opts.nodeId ?? 'web-test')}
shards = 2
heartbeat_ms = ${opts.heartbeatMs ?? 1000}
drain_s = 1

[auth]
secret = "${SECRET}"
allow_anonymous = true

[api]
token = "${API_TOKEN}"

[room]
batch_ms = 20
presence_ms = 100

[data]
dir = ${JSON.stringify(path.join(this.dir, 'data'))}

[web]
dev_tokens = ${opts.devTokens ? 'true' : 'false'}
${opts.extraToml ?? ''}
`,
    );
  }

  get httpUrl() {
    return `http://127.0.0.1:${this.port}`;
  }

  get wsUrl() {
    return `ws://127.0.0.1:${this.port}/ws`;
  }

  /** Starts the process and waits for /healthz. */
  async spawn() {
    const bin = gatewayBinary();
    if (!existsSync(bin)) throw new Error(`gateway binary ${bin} not found: run cargo build first`);
    // GATEWAY_* variables would override the config: keep the child hermetic.
    const env = Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith('GATEWAY_')));
    const child = spawn(bin, ['--config', this.configPath], {
      cwd: this.dir,
      env: { ...env, ...this.env, RUST_LOG: process.env.DANMAKU_TEST_LOG ?? 'warn', NO_COLOR: '1' },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    this.child = child;
    const keep = (/** @type {Buffer} */ b) => {
      this.log = (this.log + b.toString()).slice(-20000);
      if (process.env.DANMAKU_TEST_LOG) process.stderr.write(b);
    };
    child.stdout?.on('data', keep);
    child.stderr?.on('data', keep);
    /** @type {number | null} */
    let exited = null;
    child.once('exit', (code) => {
      exited = code ?? -1;
    });
    const deadline = Date.now() + 15000;
    for (;;) {
      if (exited !== null) throw new Error(`gateway exited with ${exited} at start:\n${this.log}`);
      try {
        const r = await fetch(`${this.httpUrl}/healthz`);
        if (r.ok) return;
      } catch {
        /* not listening yet */
      }
      if (Date.now() > deadline) {
        child.kill('SIGKILL');
        throw new Error(`gateway did not become healthy:\n${this.log}`);
      }
      await sleep(25);
    }
  }

  /**
   * Stops the process: SIGTERM starts the graceful drain (clients get close 1001).
   * @param {NodeJS.Signals} [signal]
   */
  async stop(signal = 'SIGTERM') {
    const child = this.child;
    if (!child || child.exitCode !== null || child.signalCode !== null) return;
    const exited = new Promise((r) => child.once('exit', r));
    child.kill(signal);
    const timer = setTimeout(() => child.kill('SIGKILL'), 15000);
    await exited;
    clearTimeout(timer);
    this.child = null;
  }

  /** Stops (drain) and starts again on the same port and data dir. */
  async restart() {
    await this.stop();
    await this.spawn();
  }

  /** Stops and removes the temp dir. */
  async dispose() {
    await this.stop('SIGKILL');
    rmSync(this.dir, { recursive: true, force: true });
  }

  /**
   * Calls the backend HTTP API with the API token.
   * @param {string} method @param {string} urlPath @param {unknown} [body]
   * @returns {Promise<{ status: number, body: any }>}
   */
  async api(method, urlPath, body) {
    const r = await fetch(`${this.httpUrl}${urlPath}`, {
      method,
      headers: { authorization: `Bearer ${API_TOKEN}`, 'content-type': 'application/json' },
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    const text = await r.text();
    let parsed;
    try {
      parsed = JSON.parse(text);
    } catch {
      parsed = text;
    }
    return { status: r.status, body: parsed };
  }

  /**
   * Whether this gateway does recovery on reconnect (protocol v1.1): a `join` naming
   * `since` is answered with `recovered` (true or false). Asked over a raw socket as an
   * anonymous viewer.
   * @returns {Promise<boolean>}
   */
  async answersRecovered() {
    const ws = new WebSocket(this.wsUrl);
    try {
      /** @type {any} */
      const joined = await new Promise((resolve, reject) => {
        const timer = setTimeout(() => reject(new Error('no joined in time')), 5000);
        ws.on('error', reject);
        ws.on('message', (data) => {
          const f = JSON.parse(data.toString());
          if (f.op === 'hello') ws.send(JSON.stringify({ op: 'join', room: 'probe-since', since: 'probe-1', ref: 1 }));
          else if (f.ref === 1) {
            clearTimeout(timer);
            resolve(f);
          }
        });
      });
      return joined.op === 'joined' && typeof joined.recovered === 'boolean';
    } finally {
      ws.terminate();
    }
  }

  /** Creates a red packet through the API; returns its id. */
  async redpacket(room, total = 100, shares = 2) {
    const r = await this.api('POST', `/api/v1/rooms/${room}/redpackets`, {
      total,
      shares,
      sender: { id: 's', name: 'S' },
    });
    if (r.status !== 201) throw new Error(`redpacket: ${r.status} ${JSON.stringify(r.body)}`);
    return /** @type {string} */ (r.body.packet);
  }
}

/** A throwaway `redis-server` on a free port (no persistence), for cluster cases. */
export class RedisServer {
  /**
   * Starts one; rejects with `code: 'ENOENT'` when redis-server is not installed.
   * @returns {Promise<RedisServer>}
   */
  static async start() {
    const r = new RedisServer(await freePort());
    await r.spawn();
    return r;
  }

  /** @param {number} port */
  constructor(port) {
    this.port = port;
    this.dir = mkdtempSync(path.join(os.tmpdir(), 'danmaku-web-redis-'));
    /** @type {import('node:child_process').ChildProcess | null} */
    this.child = null;
  }

  get url() {
    return `redis://127.0.0.1:${this.port}`;
  }

  async spawn() {
    const child = spawn(
      'redis-server',
      ['--port', String(this.port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no', '--dir', this.dir],
      { stdio: 'ignore' },
    );
    this.child = child;
    /** @type {Error | null} */
    let failed = null;
    child.once('error', (e) => {
      failed = e;
    });
    const deadline = Date.now() + 10000;
    for (;;) {
      if (failed) throw failed;
      const up = await new Promise((resolve) => {
        const s = net.connect(this.port, '127.0.0.1');
        s.once('connect', () => {
          s.destroy();
          resolve(true);
        });
        s.once('error', () => resolve(false));
      });
      if (up) return;
      if (Date.now() > deadline) {
        child.kill('SIGKILL');
        throw new Error('redis-server did not start');
      }
      await sleep(20);
    }
  }

  /** Kills it and removes its dir. */
  async dispose() {
    const child = this.child;
    this.child = null;
    if (child && child.exitCode === null && child.signalCode === null) {
      const exited = new Promise((r) => child.once('exit', r));
      child.kill('SIGKILL');
      await exited;
    }
    rmSync(this.dir, { recursive: true, force: true });
  }
}
