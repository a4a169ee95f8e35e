'use strict';
// A captions file read with runtime.score's rules (runtime/inputs.py: open_caption_file,
// caption_lines, check_caption_lines), with the same error texts:
//   UTF-8 (a BOM at the start is allowed), one caption a line (lines end at \n only), each stripped
//   of whitespace (Python's str.strip: the characters of str.isspace), no blank lines, at most
//   MAX_WORDS (256) words a line and MAX_WORDS tokens (the model folder's tokeniser) a line.
// "-" reads standard input. Errors are CaptionsError, whose message is the line after "error: ".

const fs = require('node:fs');

const MAX_WORDS = 256; // runtime/inputs.py MAX_WORDS
const STDIN = '-';
const STDIN_NAME = 'standard input';

/** A captions file that cannot be scored: the message says which file and line. */
class CaptionsError extends Error {}

// Python's str.isspace(): what str.strip() removes.
const PY_SPACE = '\\t\\n\\u000b\\f\\r\\u001c-\\u0020\\u0085\\u00a0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000';
const STRIP = new RegExp(`^[${PY_SPACE}]+|[${PY_SPACE}]+$`, 'gu');
// bytes.split() with no separator: runs of ASCII whitespace (space, \t, \n, \v, \f, \r)
const ASCII_SPACE = new Set([0x20, 0x09, 0x0a, 0x0b, 0x0c, 0x0d]);

// strerror texts Python prints for the usual errno codes ("cannot read (Permission denied)")
const STRERROR = {
  EACCES: 'Permission denied', EPERM: 'Operation not permitted', EIO: 'Input/output error',
  ELOOP: 'Too many levels of symbolic links', ENAMETOOLONG: 'File name too long', ENOTDIR: 'Not a directory',
  EMFILE: 'Too many open files', ENFILE: 'Too many open files in system', ENXIO: 'No such device or address',
  EAGAIN: 'Resource temporarily unavailable', EINVAL: 'Invalid argument',
};

/** Python's `"{a}, {b}, ... ({n} in all)"` of runtime.inputs.list_some. */
function listSome(items, n = 10) {
  const shown = items.slice(0, n).join(', ');
  return items.length <= n ? shown : `${shown}, ... (${items.length} in all)`;
}

/** The offset of the first byte of `bytes` that starts an ill-formed UTF-8 sequence (where Python's
 * decoder reports its UnicodeDecodeError), or -1 when all of it is UTF-8. */
function firstBadUtf8(bytes) {
  let i = 0;
  while (i < bytes.length) {
    const b = bytes[i];
    if (b < 0x80) { i++; continue; }
    let n;
    let lo = 0x80;
    let hi = 0xbf;
    if (b >= 0xc2 && b <= 0xdf) n = 1;
    else if (b >= 0xe0 && b <= 0xef) {
      n = 2;
      if (b === 0xe0) lo = 0xa0;
      if (b === 0xed) hi = 0x9f; // no surrogates
    } else if (b >= 0xf0 && b <= 0xf4) {
      n = 3;
      if (b === 0xf0) lo = 0x90;
      if (b === 0xf4) hi = 0x8f;
    } else return i;
    for (let k = 1; k <= n; k++) {
      const c = bytes[i + k];
      const low = k === 1 ? lo : 0x80;
      const high = k === 1 ? hi : 0xbf;
      if (c === undefined || c < low || c > high) return i;
    }
    i += n + 1;
  }
  return -1;
}

/** Count of bytes.split(maxsplit=limit) fields: runs of non-ASCII-whitespace bytes, the last one
 * taking the rest once `limit` splits are made (as Python: at most limit + 1). */
function countWords(bytes, limit = Infinity) {
  let count = 0;
  let inWord = false;
  for (const b of bytes) {
    if (ASCII_SPACE.has(b)) inWord = false;
    else if (!inWord) {
      inWord = true;
      count++;
      if (count > limit) return count;
    }
  }
  return count;
}

function readBytes(path) {
  if (path === STDIN) {
    try {
      return [fs.readFileSync(0), STDIN_NAME];
    } catch (e) {
      throw new CaptionsError(`${STDIN_NAME}: cannot read (${STRERROR[e.code] || e.message})`);
    }
  }
  try {
    return [fs.readFileSync(path), path];
  } catch (e) {
    if (e.code === 'ENOENT') throw new CaptionsError(`${path}: no such file`);
    if (e.code === 'EISDIR') throw new CaptionsError(`${path}: is a folder, expected a text file of captions`);
    throw new CaptionsError(`${path}: cannot read (${STRERROR[e.code] || e.message})`);
  }
}

/** The captions of `path` ("-": standard input) as runtime.score reads them. `tokenizer`: the model
 * folder's (lib/tokenizer.js), for the MAX_WORDS tokens limit. CaptionsError otherwise. */
function readCaptions(path, tokenizer) {
  const [data, name] = readBytes(path);
  const lines = [];
  let start = 0;
  for (let i = 0; i <= data.length; i++) {
    if (i === data.length || data[i] === 0x0a) {
      if (i < data.length || i > start) lines.push(data.subarray(start, i)); // a final \n starts no line
      start = i + 1;
    }
  }
  const captions = [];
  lines.forEach((line, index) => {
    const number = index + 1;
    let raw = line;
    if (number === 1 && raw[0] === 0xef && raw[1] === 0xbb && raw[2] === 0xbf) raw = raw.subarray(3);
    const bad = firstBadUtf8(raw);
    if (bad >= 0) {
      throw new CaptionsError(`${name}: line ${number} is not UTF-8 text (byte ${bad + 1}: b'\\x${raw[bad].toString(16).padStart(2, '0')}')`);
    }
    const caption = raw.toString('utf8').replace(STRIP, '');
    const words = countWords(raw, MAX_WORDS);
    // a token is at least one character: a caption of at most MAX_WORDS characters needs no tokenising
    let tokens = 0;
    if (words <= MAX_WORDS && [...caption].length > MAX_WORDS) tokens = tokenizer.tokenize(caption).length;
    if (words > MAX_WORDS || tokens > MAX_WORDS) {
      const n = words > MAX_WORDS ? `${countWords(raw)} words` : `${tokens} words (tokens)`;
      throw new CaptionsError(`${name}: line ${number} has ${n}; captions may have at most ${MAX_WORDS} (MAX_WORDS)`);
    }
    captions.push(caption);
  });
  if (captions.length === 0) {
    throw new CaptionsError(`${name}: no captions (the ${name === STDIN_NAME ? 'input' : 'file'} is empty)`);
  }
  const blank = [];
  captions.forEach((c, i) => { if (!c) blank.push(i + 1); });
  if (blank.length) {
    throw new CaptionsError(`${name}: blank line${blank.length > 1 ? 's' : ''} ${listSome(blank)} (one caption a line, no blank lines)`);
  }
  return captions;
}

module.exports = { readCaptions, CaptionsError, MAX_WORDS, firstBadUtf8, countWords };
