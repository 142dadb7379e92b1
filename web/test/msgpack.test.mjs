import assert from 'node:assert/strict';
import { test } from 'node:test';
import { decode, encode } from '../msgpack.js';

const hex = (/** @type {Uint8Array} */ b) => Buffer.from(b).toString('hex');

test('encodes with the smallest forms of the spec', () => {
  assert.equal(hex(encode(null)), 'c0');
  assert.equal(hex(encode(true)), 'c3');
  assert.equal(hex(encode(false)), 'c2');
  assert.equal(hex(encode(0)), '00');
  assert.equal(hex(encode(127)), '7f');
  assert.equal(hex(encode(128)), 'cc80');
  assert.equal(hex(encode(65535)), 'cdffff');
  assert.equal(hex(encode(65536)), 'ce00010000');
  assert.equal(hex(encode(2 ** 32)), 'cf0000000100000000');
  assert.equal(hex(encode(-1)), 'ff');
  assert.equal(hex(encode(-32)), 'e0');
  assert.equal(hex(encode(-33)), 'd0df');
  assert.equal(hex(encode(-129)), 'd1ff7f');
  assert.equal(hex(encode(-40000)), 'd2ffff63c0');
  assert.equal(hex(encode(1.5)), 'cb3ff8000000000000');
  assert.equal(hex(encode('')), 'a0');
  assert.equal(hex(encode('a'.repeat(31))).slice(0, 2), 'bf');
  assert.equal(hex(encode('a'.repeat(32))).slice(0, 4), 'd920');
  assert.equal(hex(encode('a'.repeat(256))).slice(0, 6), 'da0100');
  assert.equal(hex(encode([1, 2])), '920102');
  assert.equal(hex(encode({ op: 'ping' })), '81a26f70a470696e67');
  assert.equal(hex(encode(new Uint8Array([1, 2]))), 'c4020102');
  // undefined members are skipped, as JSON.stringify does
  assert.equal(hex(encode({ a: 1, b: undefined })), '81a16101');
});

test('round-trips every type', () => {
  const values = [
    null,
    true,
    false,
    0,
    1,
    -1,
    255,
    256,
    -128,
    -32769,
    2 ** 31,
    -(2 ** 31) - 1,
    Number.MAX_SAFE_INTEGER,
    Number.MIN_SAFE_INTEGER,
    0.1,
    -1e300,
    '',
    'héllo 弹幕 🎉',
    'x'.repeat(70000),
    [],
    [1, [2, [3, { a: null }]]],
    {},
    { op: 'batch', room: 'r', events: [{ id: 'n-1', ts: 1_700_000_000_000, type: 'chat', text: 'hi' }] },
    Object.fromEntries(Array.from({ length: 20 }, (_, i) => [`k${i}`, i])),
    Array.from({ length: 70000 }, (_, i) => i % 3),
  ];
  for (const v of values) assert.deepEqual(decode(encode(v)), v);
  assert.deepEqual(decode(encode(new Uint8Array([0, 255]))), new Uint8Array([0, 255]));
});

test('64-bit integers beyond 2^53 decode as BigInt', () => {
  assert.equal(decode(encode(2n ** 63n)), 2n ** 63n);
  assert.equal(decode(encode(-(2n ** 63n))), -(2n ** 63n));
  assert.equal(decode(encode(5n)), 5);
  assert.throws(() => encode(2n ** 64n), RangeError);
});

test('decodes what rmp-serde sends: float32, ext, str8, maps 16', () => {
  assert.equal(decode(Buffer.from('ca3fc00000', 'hex')), 1.5);
  assert.deepEqual(decode(Buffer.from('d40102', 'hex')), { type: 1, data: new Uint8Array([2]) });
  assert.equal(decode(Buffer.from('d903616263', 'hex')), 'abc');
  assert.deepEqual(decode(Buffer.from('de0001a16101', 'hex')), { a: 1 });
  // An ArrayBuffer (what a browser WebSocket gives) works too.
  assert.deepEqual(decode(new Uint8Array([0x91, 0x01]).buffer), [1]);
});

test('refuses truncated input, trailing bytes and unknown types', () => {
  assert.throws(() => decode(Buffer.from('cd01', 'hex')), /unexpected end/);
  assert.throws(() => decode(Buffer.from('0101', 'hex')), /trailing/);
  assert.throws(() => decode(Buffer.from('c1', 'hex')), /unknown type/);
  assert.throws(() => decode(Buffer.from('a3ffff', 'hex')));
});

test('a "__proto__" key stays a plain data property', () => {
  const v = decode(encode(JSON.parse('{"__proto__": {"polluted": 1}}')));
  assert.equal(/** @type {any} */ ({}).polluted, undefined);
  assert.deepEqual(Object.keys(v), ['__proto__']);
});
