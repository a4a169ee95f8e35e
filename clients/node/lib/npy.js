'use strict';
// A small .npy reader and writer: what the client needs of NumPy's file format, and no more.
//
//   const feats = openNpy('feats.npy');        // {shape, dtype, rows(start, end) -> Float32Array}
//   writeNpy('sims.npy', [nImg, nCap], sims);  // float32, C order; temp file + rename
//
// Read: format versions 1.0, 2.0 and 3.0; little-endian float16, float32 or float64 ('<f2', '<f4',
// '<f8'), C order; the rows (first axis) a slice at a time, as float32, so a large gallery is never
// read whole (this machine's byte order is assumed little-endian, as x86 and ARM are). Anything else (pickled objects, Fortran order, big-endian, a truncated file) is an
// NpyError with one line naming the file. Written files have NumPy's own header, byte for byte.
const fs = require('node:fs');
const path = require('node:path');

const MAGIC = Buffer.from('\x93NUMPY', 'latin1');
const DTYPES = { '<f2': 2, '<f4': 4, '<f8': 8 }; // descr -> bytes per value

class NpyError extends Error {}

/** Parse the header of the .npy file at `file` (an open fd): {descr, fortran, shape, offset}. */
function readHeader(fd, file) {
  const start = Buffer.alloc(12);
  const got = fs.readSync(fd, start, 0, 12, 0);
  if (start.subarray(0, 2).toString('latin1') === 'PK') {
    throw new NpyError(`${file}: is an .npz archive, expected a single .npy array`);
  }
  if (got < 10 || !start.subarray(0, 6).equals(MAGIC)) {
    throw new NpyError(`${file}: not a .npy file (no NumPy header)`);
  }
  const major = start[6];
  if (![1, 2, 3].includes(major)) throw new NpyError(`${file}: .npy format version ${major} is not supported`);
  const lenBytes = major === 1 ? 2 : 4;
  const headerLen = major === 1 ? start.readUInt16LE(8) : start.readUInt32LE(8);
  if (headerLen > 1 << 20) throw new NpyError(`${file}: .npy header of ${headerLen} bytes is too long`);
  const header = Buffer.alloc(headerLen);
  if (fs.readSync(fd, header, 0, headerLen, 8 + lenBytes) !== headerLen) {
    throw new NpyError(`${file}: cannot read as a .npy array (the header is cut short)`);
  }
  const text = header.toString(major === 3 ? 'utf8' : 'latin1');
  // The header is a Python dict literal: {'descr': '<f4', 'fortran_order': False, 'shape': (3, 4), }
  const descr = /'descr':\s*'([^']*)'/.exec(text);
  const fortran = /'fortran_order':\s*(True|False)/.exec(text);
  const shape = /'shape':\s*\(([\d,\s]*)\)/.exec(text);
  if (!descr || !fortran || !shape) {
    if (/'descr':\s*\[/.test(text)) throw new NpyError(`${file}: holds a structured array; expected a plain float array`);
    throw new NpyError(`${file}: cannot read as a .npy array (unreadable header ${JSON.stringify(text.trim())})`);
  }
  return {
    descr: descr[1],
    fortran: fortran[1] === 'True',
    shape: shape[1].split(',').map((s) => s.trim()).filter((s) => s).map(Number),
    offset: 8 + lenBytes + headerLen,
  };
}

/** One float16 (its 16 bits) as a number. */
function halfToFloat(h) {
  const sign = h & 0x8000 ? -1 : 1;
  const exp = (h >> 10) & 0x1f;
  const frac = h & 0x3ff;
  if (exp === 0) return sign * frac * 2 ** -24; // zero and subnormals
  if (exp === 31) return frac ? NaN : sign * Infinity;
  return sign * (1 + frac / 1024) * 2 ** (exp - 15);
}

/**
 * Open a .npy array of floats for reading.
 * Returns {file, shape, dtype ('float16' | 'float32' | 'float64'), rows(start, end)}: rows() reads
 * rows [start, end) of the first axis as one Float32Array in C order (float64 rounded to float32).
 */
function openNpy(file) {
  let fd;
  try {
    if (fs.statSync(file).isDirectory()) throw new NpyError(`${file}: is a folder, expected a .npy file of region features`);
    fd = fs.openSync(file, 'r');
  } catch (e) {
    if (e instanceof NpyError) throw e;
    throw new NpyError(e.code === 'ENOENT' ? `${file}: no such file` : `${file}: cannot read (${e.code})`);
  }
  try {
    const { descr, fortran, shape, offset } = readHeader(fd, file);
    if (descr.includes('O')) throw new NpyError(`${file}: holds pickled Python objects; expected a plain float array`);
    if (fortran) throw new NpyError(`${file}: is in Fortran order; save it in C order (numpy.ascontiguousarray)`);
    if (/^>/.test(descr) && descr.length > 2) {
      throw new NpyError(`${file}: is big-endian (${descr}); save it little-endian (array.astype('<f4'))`);
    }
    const size = DTYPES[descr];
    if (!size) throw new NpyError(`${file}: expected float features, got dtype ${descr}`);
    const perRow = shape.slice(1).reduce((a, b) => a * b, 1);
    const total = shape.length ? shape[0] * perRow : 1;
    const bytes = fs.fstatSync(fd).size;
    if (bytes < offset + total * size) {
      throw new NpyError(`${file}: cannot read as a .npy array (${bytes} bytes, its header promises ${offset + total * size})`);
    }
    const dtype = { 2: 'float16', 4: 'float32', 8: 'float64' }[size];
    const rows = (begin, end) => {
      const n = (Math.min(end, shape[0]) - begin) * perRow;
      const raw = Buffer.alloc(n * size);
      fs.readSync(fd, raw, 0, raw.length, offset + begin * perRow * size);
      if (size === 4) return new Float32Array(raw.buffer, raw.byteOffset, n); // Buffer.alloc: aligned, not pooled
      if (size === 8) return Float32Array.from(new Float64Array(raw.buffer, raw.byteOffset, n));
      return Float32Array.from(new Uint16Array(raw.buffer, raw.byteOffset, n), halfToFloat);
    };
    return { file, shape, dtype, rows, close: () => fs.closeSync(fd) };
  } catch (e) {
    fs.closeSync(fd);
    throw e;
  }
}

/** Read a whole .npy array of floats: {shape, dtype, data: Float32Array}. */
function readNpy(file) {
  const array = openNpy(file);
  try {
    return { shape: array.shape, dtype: array.dtype, data: array.rows(0, array.shape.length ? array.shape[0] : 1) };
  } finally {
    array.close();
  }
}

/** NumPy's .npy header (format 1.0) for a little-endian float32 C-order array of `shape`. */
function npyHeader(shape) {
  const tuple = shape.length === 1 ? `(${shape[0]},)` : `(${shape.join(', ')})`;
  let dict = `{'descr': '<f4', 'fortran_order': False, 'shape': ${tuple}, }`;
  dict += ' '.repeat(shape.length ? 21 - String(shape[0]).length : 0); // numpy's room to grow the first axis
  const pad = 64 - ((10 + dict.length + 1) % 64);
  const header = dict + ' '.repeat(pad % 64) + '\n';
  const prefix = Buffer.alloc(10);
  MAGIC.copy(prefix);
  prefix[6] = 1;
  prefix.writeUInt16LE(header.length, 8);
  return Buffer.concat([prefix, Buffer.from(header, 'latin1')]);
}

/**
 * Write a float32 array (`data`, C order, of `shape`) to `file` as .npy: to a temporary file next to
 * it, renamed into place when complete, so a reader never sees half of it. On any failure the
 * temporary file is removed and the error is thrown (ENOSPC and the like as they come).
 */
function writeNpy(file, shape, data) {
  const tmp = path.join(path.dirname(path.resolve(file)), `.${path.basename(file)}.${process.pid}.tmp`);
  const body = Buffer.from(data.buffer, data.byteOffset, data.byteLength);
  let done = false;
  try {
    const fd = fs.openSync(tmp, 'wx', 0o644);
    try {
      for (const part of [npyHeader(shape), body]) {
        for (let at = 0; at < part.length;) at += fs.writeSync(fd, part, at, part.length - at);
      }
      fs.fsyncSync(fd);
    } finally {
      fs.closeSync(fd);
    }
    fs.renameSync(tmp, file);
    done = true;
  } finally {
    if (!done) fs.rmSync(tmp, { force: true });
  }
}

module.exports = { NpyError, openNpy, readNpy, writeNpy, npyHeader, halfToFloat };
