// A small, self-contained MessagePack encoder/decoder (https://msgpack.org spec), enough
// for the danmaku wire protocol: nil, booleans, integers (up to 64 bits), float64,
// strings, binary, arrays and maps with string keys. No dependencies; works in browsers
// and Node.
//
// Decoding returns plain objects for maps, arrays, strings, numbers (64-bit integers
// beyond Number.MAX_SAFE_INTEGER as BigInt), `null` for nil, and Uint8Array for bin.
// Extension types decode to `{ type, data }`.

const textEncoder = new TextEncoder();
const textDecoder = new TextDecoder('utf-8', { fatal: true });

/**
 * Encodes a value as MessagePack.
 * @param {unknown} value null/undefined, boolean, number, bigint, string, Uint8Array,
 *   array, or plain object (keys are strings; `undefined` members are skipped, as
 *   JSON.stringify does).
 * @returns {Uint8Array}
 */
export function encode(value) {
  const w = new Writer();
  w.write(value, 0);
  return w.finish();
}

/**
 * Decodes one MessagePack value; throws on truncated input or trailing bytes.
 * @param {Uint8Array | ArrayBuffer | ArrayBufferView} bytes
 * @returns {any}
 */
export function decode(bytes) {
  const r = new Reader(toUint8Array(bytes));
  const value = r.read(0);
  if (r.pos !== r.buf.length) throw new Error(`msgpack: ${r.buf.length - r.pos} trailing bytes`);
  return value;
}

const MAX_DEPTH = 512;

/** @param {Uint8Array | ArrayBuffer | ArrayBufferView} b */
function toUint8Array(b) {
  // A Node Buffer is a Uint8Array subclass whose slices are views: use a plain view.
  if (b instanceof Uint8Array && b.constructor === Uint8Array) return b;
  if (b instanceof ArrayBuffer) return new Uint8Array(b);
  if (ArrayBuffer.isView(b)) return new Uint8Array(b.buffer, b.byteOffset, b.byteLength);
  throw new TypeError('msgpack: expected bytes');
}

class Writer {
  constructor() {
    this.buf = new Uint8Array(256);
    this.view = new DataView(this.buf.buffer);
    this.pos = 0;
  }

  /** @param {number} n */
  ensure(n) {
    if (this.pos + n <= this.buf.length) return;
    let size = this.buf.length * 2;
    while (size < this.pos + n) size *= 2;
    const next = new Uint8Array(size);
    next.set(this.buf.subarray(0, this.pos));
    this.buf = next;
    this.view = new DataView(next.buffer);
  }

  finish() {
    return this.buf.slice(0, this.pos);
  }

  /** @param {number} b */
  u8(b) {
    this.ensure(1);
    this.buf[this.pos++] = b;
  }

  /** @param {number} tag @param {number} v */
  u8tag(tag, v) {
    this.ensure(2);
    this.buf[this.pos++] = tag;
    this.buf[this.pos++] = v;
  }

  /** @param {number} tag @param {number} v */
  u16(tag, v) {
    this.ensure(3);
    this.buf[this.pos++] = tag;
    this.view.setUint16(this.pos, v);
    this.pos += 2;
  }

  /** @param {number} tag @param {number} v */
  u32(tag, v) {
    this.ensure(5);
    this.buf[this.pos++] = tag;
    this.view.setUint32(this.pos, v);
    this.pos += 4;
  }

  /** @param {unknown} v @param {number} depth @returns {void} */
  write(v, depth) {
    if (depth > MAX_DEPTH) throw new Error('msgpack: value nested too deeply');
    if (v === null || v === undefined) return this.u8(0xc0);
    switch (typeof v) {
      case 'boolean':
        return this.u8(v ? 0xc3 : 0xc2);
      case 'number':
        return Number.isInteger(v) && Number.isSafeInteger(v) ? this.int(v) : this.float(v);
      case 'bigint':
        return this.bigint(v);
      case 'string':
        return this.str(v);
      case 'object':
        if (v instanceof Uint8Array) return this.bin(v);
        if (ArrayBuffer.isView(v)) return this.bin(toUint8Array(v));
        if (v instanceof ArrayBuffer) return this.bin(new Uint8Array(v));
        if (Array.isArray(v)) {
          this.header(v.length, 0x90, 0xdc, 0xdd);
          for (const item of v) this.write(item, depth + 1);
          return;
        }
        if (v instanceof Map) {
          this.header(v.size, 0x80, 0xde, 0xdf);
          for (const [k, item] of v) {
            this.write(k, depth + 1);
            this.write(item, depth + 1);
          }
          return;
        }
        if (typeof (/** @type {any} */ (v).toJSON) === 'function') {
          return this.write(/** @type {any} */ (v).toJSON(), depth + 1);
        }
        {
          const entries = Object.entries(v).filter(
            ([, item]) => item !== undefined && typeof item !== 'function',
          );
          this.header(entries.length, 0x80, 0xde, 0xdf);
          for (const [k, item] of entries) {
            this.str(k);
            this.write(item, depth + 1);
          }
        }
        return;
      default:
        throw new TypeError(`msgpack: cannot encode a ${typeof v}`);
    }
  }

  /** Array/map header: fix form below 16, then 16- and 32-bit lengths. */
  header(/** @type {number} */ n, /** @type {number} */ fix, /** @type {number} */ t16, /** @type {number} */ t32) {
    if (n < 16) this.u8(fix | n);
    else if (n <= 0xffff) this.u16(t16, n);
    else this.u32(t32, n);
  }

  /** @param {number} n a safe integer */
  int(n) {
    if (n >= 0) {
      if (n < 0x80) return this.u8(n);
      if (n <= 0xff) return this.u8tag(0xcc, n);
      if (n <= 0xffff) return this.u16(0xcd, n);
      if (n <= 0xffffffff) return this.u32(0xce, n);
      this.ensure(9);
      this.buf[this.pos++] = 0xcf;
      this.view.setBigUint64(this.pos, BigInt(n));
      this.pos += 8;
      return;
    }
    if (n >= -32) return this.u8(n & 0xff);
    if (n >= -0x80) return this.u8tag(0xd0, n & 0xff);
    if (n >= -0x8000) {
      this.ensure(3);
      this.buf[this.pos++] = 0xd1;
      this.view.setInt16(this.pos, n);
      this.pos += 2;
      return;
    }
    if (n >= -0x80000000) {
      this.ensure(5);
      this.buf[this.pos++] = 0xd2;
      this.view.setInt32(this.pos, n);
      this.pos += 4;
      return;
    }
    this.ensure(9);
    this.buf[this.pos++] = 0xd3;
    this.view.setBigInt64(this.pos, BigInt(n));
    this.pos += 8;
  }

  /** @param {bigint} n */
  bigint(n) {
    if (n >= BigInt(Number.MIN_SAFE_INTEGER) && n <= BigInt(Number.MAX_SAFE_INTEGER)) {
      return this.int(Number(n));
    }
    this.ensure(9);
    if (n >= 0n) {
      if (n > 0xffffffffffffffffn) throw new RangeError('msgpack: integer above 2^64-1');
      this.buf[this.pos++] = 0xcf;
      this.view.setBigUint64(this.pos, n);
    } else {
      if (n < -0x8000000000000000n) throw new RangeError('msgpack: integer below -2^63');
      this.buf[this.pos++] = 0xd3;
      this.view.setBigInt64(this.pos, n);
    }
    this.pos += 8;
  }

  /** @param {number} f */
  float(f) {
    this.ensure(9);
    this.buf[this.pos++] = 0xcb;
    this.view.setFloat64(this.pos, f);
    this.pos += 8;
  }

  /** @param {string} s */
  str(s) {
    const bytes = textEncoder.encode(s);
    const n = bytes.length;
    if (n < 32) this.u8(0xa0 | n);
    else if (n <= 0xff) this.u8tag(0xd9, n);
    else if (n <= 0xffff) this.u16(0xda, n);
    else this.u32(0xdb, n);
    this.raw(bytes);
  }

  /** @param {Uint8Array} bytes */
  bin(bytes) {
    const n = bytes.length;
    if (n <= 0xff) this.u8tag(0xc4, n);
    else if (n <= 0xffff) this.u16(0xc5, n);
    else this.u32(0xc6, n);
    this.raw(bytes);
  }

  /** @param {Uint8Array} bytes */
  raw(bytes) {
    this.ensure(bytes.length);
    this.buf.set(bytes, this.pos);
    this.pos += bytes.length;
  }
}

class Reader {
  /** @param {Uint8Array} buf */
  constructor(buf) {
    this.buf = buf;
    this.view = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
    this.pos = 0;
  }

  /** @param {number} n */
  need(n) {
    if (this.pos + n > this.buf.length) throw new Error('msgpack: unexpected end of input');
  }

  u8() {
    this.need(1);
    return this.buf[this.pos++];
  }

  u16() {
    this.need(2);
    const v = this.view.getUint16(this.pos);
    this.pos += 2;
    return v;
  }

  u32() {
    this.need(4);
    const v = this.view.getUint32(this.pos);
    this.pos += 4;
    return v;
  }

  /** @param {number} n */
  bytes(n) {
    this.need(n);
    const b = this.buf.subarray(this.pos, this.pos + n);
    this.pos += n;
    return b;
  }

  /** @param {number} n */
  str(n) {
    return textDecoder.decode(this.bytes(n));
  }

  /** @param {bigint} v */
  static big(v) {
    return v >= BigInt(Number.MIN_SAFE_INTEGER) && v <= BigInt(Number.MAX_SAFE_INTEGER)
      ? Number(v)
      : v;
  }

  /** @param {number} n @param {number} depth */
  array(n, depth) {
    const out = new Array(n);
    for (let i = 0; i < n; i++) out[i] = this.read(depth + 1);
    return out;
  }

  /** @param {number} n @param {number} depth */
  map(n, depth) {
    /** @type {Record<string, any>} */
    const out = {};
    for (let i = 0; i < n; i++) {
      const k = this.read(depth + 1);
      const key = typeof k === 'string' ? k : String(k);
      const v = this.read(depth + 1);
      // Own data property even for "__proto__", so decoded input cannot touch prototypes.
      Object.defineProperty(out, key, { value: v, enumerable: true, writable: true, configurable: true });
    }
    return out;
  }

  /** @param {number} n */
  ext(n) {
    this.need(1);
    const type = this.view.getInt8(this.pos++);
    return { type, data: this.bytes(n) };
  }

  /** @param {number} depth @returns {any} */
  read(depth) {
    if (depth > MAX_DEPTH) throw new Error('msgpack: value nested too deeply');
    const t = this.u8();
    if (t < 0x80) return t;
    if (t < 0x90) return this.map(t & 0x0f, depth);
    if (t < 0xa0) return this.array(t & 0x0f, depth);
    if (t < 0xc0) return this.str(t & 0x1f);
    if (t >= 0xe0) return t - 0x100;
    let v;
    switch (t) {
      case 0xc0:
        return null;
      case 0xc2:
        return false;
      case 0xc3:
        return true;
      case 0xc4:
        return this.bytes(this.u8()).slice();
      case 0xc5:
        return this.bytes(this.u16()).slice();
      case 0xc6:
        return this.bytes(this.u32()).slice();
      case 0xc7:
        return this.ext(this.u8());
      case 0xc8:
        return this.ext(this.u16());
      case 0xc9:
        return this.ext(this.u32());
      case 0xca:
        this.need(4);
        v = this.view.getFloat32(this.pos);
        this.pos += 4;
        return v;
      case 0xcb:
        this.need(8);
        v = this.view.getFloat64(this.pos);
        this.pos += 8;
        return v;
      case 0xcc:
        return this.u8();
      case 0xcd:
        return this.u16();
      case 0xce:
        return this.u32();
      case 0xcf:
        this.need(8);
        v = this.view.getBigUint64(this.pos);
        this.pos += 8;
        return Reader.big(v);
      case 0xd0:
        this.need(1);
        return this.view.getInt8(this.pos++);
      case 0xd1:
        this.need(2);
        v = this.view.getInt16(this.pos);
        this.pos += 2;
        return v;
      case 0xd2:
        this.need(4);
        v = this.view.getInt32(this.pos);
        this.pos += 4;
        return v;
      case 0xd3:
        this.need(8);
        v = this.view.getBigInt64(this.pos);
        this.pos += 8;
        return Reader.big(v);
      case 0xd4:
        return this.ext(1);
      case 0xd5:
        return this.ext(2);
      case 0xd6:
        return this.ext(4);
      case 0xd7:
        return this.ext(8);
      case 0xd8:
        return this.ext(16);
      case 0xd9:
        return this.str(this.u8());
      case 0xda:
        return this.str(this.u16());
      case 0xdb:
        return this.str(this.u32());
      case 0xdc:
        return this.array(this.u16(), depth);
      case 0xdd:
        return this.array(this.u32(), depth);
      case 0xde:
        return this.map(this.u16(), depth);
      case 0xdf:
        return this.map(this.u32(), depth);
      default:
        throw new Error(`msgpack: unknown type byte 0x${t.toString(16)}`);
    }
  }
}
