'use strict';
// lib/npy.js: what it reads, what it writes, and what it refuses (one NpyError naming the file).
const assert = require('node:assert/strict');
const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');
const test = require('node:test');
const { openNpy, readNpy, writeNpy, npyHeader, halfToFloat, NpyError } = require('../lib/npy');

const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'npy-test-'));
test.after(() => fs.rmSync(dir, { recursive: true, force: true }));

/** A .npy file (format 1.0) with header dict `dict` and body `body`, as NumPy lays it out. */
function npyFile(name, dict, body = Buffer.alloc(0)) {
  const header = dict + ' '.repeat(64 - ((10 + dict.length + 1) % 64)) + '\n';
  const prefix = Buffer.from([0x93, ...Buffer.from('NUMPY'), 1, 0, 0, 0]);
  prefix.writeUInt16LE(header.length, 8);
  fs.writeFileSync(path.join(dir, name), Buffer.concat([prefix, Buffer.from(header, 'latin1'), body]));
  return path.join(dir, name);
}

test('a float32 array written is read back exactly, header as NumPy writes it', () => {
  const data = Float32Array.from({ length: 24 }, (_, i) => (i - 7) / 3);
  const file = path.join(dir, 'a.npy');
  writeNpy(file, [2, 3, 4], data);
  const back = readNpy(file);
  assert.deepEqual(back.shape, [2, 3, 4]);
  assert.equal(back.dtype, 'float32');
  assert.deepEqual(back.data, data);
  const header = npyHeader([2, 3, 4]).toString('latin1');
  assert.equal(header.length % 64, 0);
  assert.ok(header.startsWith("\x93NUMPY\x01\x00v\x00{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3, 4), }"));
  assert.deepEqual(fs.readdirSync(dir).filter((f) => f.startsWith('.')), []); // no temporary file left
});

test('rows(start, end) reads a slice of the first axis only', () => {
  const file = path.join(dir, 'rows.npy');
  writeNpy(file, [5, 2], Float32Array.from({ length: 10 }, (_, i) => i));
  const array = openNpy(file);
  assert.deepEqual(Array.from(array.rows(1, 3)), [2, 3, 4, 5]);
  assert.deepEqual(Array.from(array.rows(4, 99)), [8, 9]);
  array.close();
});

test('float64 and float16 arrays are read as float32', () => {
  const f8 = Buffer.alloc(16);
  f8.writeDoubleLE(1 / 3, 0);
  f8.writeDoubleLE(-2.5, 8);
  const a = readNpy(npyFile('f8.npy', "{'descr': '<f8', 'fortran_order': False, 'shape': (2,), }", f8));
  assert.equal(a.dtype, 'float64');
  assert.deepEqual(Array.from(a.data), [Math.fround(1 / 3), -2.5]);
  const f2 = Buffer.alloc(8);
  [0x3c00, 0xc000, 0x0001, 0x7bff].forEach((h, i) => f2.writeUInt16LE(h, 2 * i)); // 1, -2, smallest subnormal, 65504
  const b = readNpy(npyFile('f2.npy', "{'descr': '<f2', 'fortran_order': False, 'shape': (4,), }", f2));
  assert.deepEqual(Array.from(b.data), [1, -2, 2 ** -24, 65504]);
  assert.ok(Number.isNaN(halfToFloat(0x7e00)) && halfToFloat(0xfc00) === -Infinity);
});

const refusals = {
  'pickled objects': ["{'descr': '|O', 'fortran_order': False, 'shape': (2,), }", 'pickled Python objects'],
  'Fortran order': ["{'descr': '<f4', 'fortran_order': True, 'shape': (2, 2), }", 'Fortran order'],
  'big-endian floats': ["{'descr': '>f4', 'fortran_order': False, 'shape': (2,), }", 'big-endian'],
  'integers': ["{'descr': '<i8', 'fortran_order': False, 'shape': (2,), }", 'expected float features, got dtype <i8'],
  'a structured array': ["{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (2,), }", 'structured array'],
  'a body cut short': ["{'descr': '<f4', 'fortran_order': False, 'shape': (1000,), }", 'header promises'],
};
for (const [what, [dict, words]] of Object.entries(refusals)) {
  test(`refuses ${what} in one line naming the file`, () => {
    const file = npyFile('bad.npy', dict, Buffer.alloc(8));
    assert.throws(() => readNpy(file), (e) => e instanceof NpyError && e.message.startsWith(file) &&
      e.message.includes(words) && !e.message.includes('\n'));
  });
}

test('refuses a missing file, a folder, an .npz and a file without the NumPy magic', () => {
  const cases = [[path.join(dir, 'none.npy'), 'no such file'], [dir, 'is a folder'],
    [(fs.writeFileSync(path.join(dir, 'z.npz'), 'PK\x03\x04rest'), path.join(dir, 'z.npz')), '.npz archive'],
    [(fs.writeFileSync(path.join(dir, 't.npy'), 'hello world'), path.join(dir, 't.npy')), 'no NumPy header']];
  for (const [file, words] of cases) {
    assert.throws(() => openNpy(file), (e) => e instanceof NpyError && e.message.includes(words), words);
  }
});
