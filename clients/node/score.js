#!/usr/bin/env node
'use strict';
// Score every image against every caption with an exported model folder: the Node.js reference
// client of `python -m runtime.score`, with its caption rules, output and errors.
//
//   node clients/node/score.js MODEL_DIR IMAGES.npy CAPTIONS.txt [--output SIMS.npy] [--overwrite] [--top-k K] [--json]
//
// IMAGES.npy: region features (n_img, n_region, img_dim), little-endian float16/32/64, C order.
// CAPTIONS.txt: UTF-8, one caption a line, no blank lines, at most 256 tokens a line (lib/captions.js).
// Writes the (n_img, n_cap) float32 similarities to --output (a temporary file renamed into place;
// an existing file is replaced only with --overwrite, refused before scoring otherwise, as
// runtime.score does), then prints each image's top-K captions and
// each caption's top-K images, as text or (--json) one JSON object a line, exactly as runtime.score
// prints them. Rank order: score descending, ties by index ascending.
// Bad input: one line "error: ..." on stderr, exit status 2, no file written.
const fs = require('node:fs');
const path = require('node:path');
const { loadModel, closeMatchers, ModelDirError } = require('./lib/model');
const { openNpy, writeNpy, npyHeader, NpyError } = require('./lib/npy');
const tokenizer = require('./lib/tokenizer');
const captions = require('./lib/captions');

const PROG = 'score.js';
const DEFAULT_TOP_K = 5;
const MAX_FEATURE = 1e12; // |region feature| at most (runtime/inputs.py): float32 arithmetic would overflow
const USAGE = `usage: node ${PROG} MODEL_DIR IMAGES.npy CAPTIONS.txt [--output SIMS.npy] [--overwrite] [--top-k K] [--json]`;

class UserError extends Error {}

// --------------------------------------------------------------------------- printing, as Python prints
/** A character as Python's repr writes it: itself when printable (str.isprintable: categories
 * Other (C*) and Separator (Z*) are not, the ASCII space is), else \t \n \r or \xNN \uNNNN \UNNNNNNNN. */
function escapeChar(c) {
  if (c === ' ' || !/[\p{C}\p{Z}]/u.test(c)) return c;
  const named = { '\t': '\\t', '\n': '\\n', '\r': '\\r' }[c];
  if (named) return named;
  const cp = c.codePointAt(0);
  const hex = cp.toString(16);
  return cp < 0x100 ? `\\x${hex.padStart(2, '0')}` : cp < 0x10000 ? `\\u${hex.padStart(4, '0')}` : `\\U${hex.padStart(8, '0')}`;
}

/** runtime.cli.printable: user text with its non-printable characters escaped (a caption cannot
 * drive the terminal). */
const printable = (text) => Array.from(text, escapeChar).join('');

/** Python's repr() of a string. */
function pyRepr(text) {
  const quote = text.includes("'") && !text.includes('"') ? '"' : "'";
  return quote + Array.from(text, (c) => (c === '\\' || c === quote ? `\\${c}` : escapeChar(c))).join('') + quote;
}

/** An error message on one line (runtime.cli.one_line): whitespace runs as one space, controls escaped. */
const PY_SPACE = /[\t\n\v\f\r\x1c-\x20\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]+/u; // str.split()'s
const oneLine = (message) => printable(String(message).split(PY_SPACE).filter(Boolean).join(' '));

/** Python's repr(float(x)): the shortest round-trip digits (as JavaScript's), fixed notation for
 * exponents -4..15, else d.ddde-XX. */
function pyFloat(x) {
  if (x === 0) return Object.is(x, -0) ? '-0.0' : '0.0';
  const [mantissa, e = '0'] = String(Math.abs(x)).split('e');
  const [int, frac = ''] = mantissa.split('.');
  let digits = int + frac;
  let point = int.length + Number(e); // the decimal point's position in `digits`
  const zeros = digits.length - digits.replace(/^0+/, '').length;
  digits = digits.slice(zeros).replace(/0+$/, '');
  point -= zeros;
  const exp = point - 1;
  const sign = x < 0 ? '-' : '';
  if (exp < -4 || exp >= 16) {
    const m = digits.length > 1 ? `${digits[0]}.${digits.slice(1)}` : digits;
    return `${sign}${m}e${exp < 0 ? '-' : '+'}${String(Math.abs(exp)).padStart(2, '0')}`;
  }
  if (point <= 0) return `${sign}0.${'0'.repeat(-point)}${digits}`;
  if (point >= digits.length) return `${sign}${digits}${'0'.repeat(point - digits.length)}.0`;
  return `${sign}${digits.slice(0, point)}.${digits.slice(point)}`;
}

/** Python's f"{x:.6f}": correctly rounded, a tie to even (toFixed breaks ties upwards). A float is
 * exactly halfway at the 7th decimal only when it is an odd multiple of 1/128. */
function fixed6(x) {
  if (Object.is(x, -0)) return '-0.000000';
  const t = Math.abs(x) * 128;
  if (Number.isInteger(t) && t % 2 === 1) {
    const k = Math.floor(Math.abs(x) * 1e6); // exact: x * 1e6 is k + 0.5
    const n = k % 2 === 0 ? k : k + 1;
    return `${x < 0 ? '-' : ''}${Math.floor(n / 1e6)}.${String(n % 1e6).padStart(6, '0')}`;
  }
  if (Math.abs(x) >= 1e21) return `${BigInt(x)}.000000`; // an integer; toFixed would write 1e+21
  return x.toFixed(6);
}

/** A JSON string as runtime.score writes it: json.dumps(ensure_ascii=False), then every C1 control,
 * DEL and line separator escaped too. */
const jsonString = (s) => JSON.stringify(s).replace(/[\x7f-\x9f\u2028\u2029]/g, (c) => `\\u${c.charCodeAt(0).toString(16).padStart(4, '0')}`);

/** The top-k of `count` items by score(i): best first, ties by lower index. */
function topK(count, k, score) {
  const order = Array.from({ length: count }, (_, i) => i);
  order.sort((a, b) => score(b) - score(a) || a - b);
  return order.slice(0, Math.min(k, count));
}

/** Each image's top-k captions, then each caption's top-k images, as runtime.score prints them.
 * unknown: {caption index: its words the vocabulary lacks} ("unknown_words" in its JSON line). */
function* rankingLines(sims, nImg, texts, k, asJson, unknown = {}) {
  const nCap = texts.length;
  if (k <= 0) return;
  for (let i = 0; i < nImg; i++) {
    const top = topK(nCap, k, (j) => sims[i * nCap + j]);
    if (asJson) {
      const items = top.map((j) => `{"caption": ${j}, "score": ${pyFloat(sims[i * nCap + j])}, "text": ${jsonString(texts[j])}}`);
      yield `{"image": ${i}, "top": [${items.join(', ')}]}\n`;
    } else {
      yield `image ${i}: top ${top.length} captions\n`;
      yield* top.map((j, r) => `  ${r + 1}. caption ${j} (${fixed6(sims[i * nCap + j])}): ${printable(texts[j])}\n`);
    }
  }
  for (let j = 0; j < nCap; j++) {
    const top = topK(nImg, k, (i) => sims[i * nCap + j]);
    if (asJson) {
      const items = top.map((i) => `{"image": ${i}, "score": ${pyFloat(sims[i * nCap + j])}}`);
      const extra = Object.hasOwn(unknown, j) ? `, "unknown_words": [${unknown[j].map(jsonString).join(', ')}]` : '';
      yield `{"caption": ${j}, "text": ${jsonString(texts[j])}, "top": [${items.join(', ')}]${extra}}\n`;
    } else {
      yield `caption ${j}: ${printable(texts[j])}\n`;
      yield* top.map((i, r) => `  ${r + 1}. image ${i} (${fixed6(sims[i * nCap + j])})\n`);
    }
  }
}

/** {caption index: its words the vocabulary lacks, in order, each once} for the captions that have
 * any (runtime.scorer's unknown_words): they are read as <unk> (3), as in training. */
function unknownWords(texts, tokenLists, rules, vocab) {
  const unknown = {};
  tokenLists.forEach((ids, j) => {
    if (ids.includes(3)) unknown[j] = [...new Set(rules.tokenize(texts[j]).filter((w) => !Object.hasOwn(vocab, w) || vocab[w] === 3))];
  });
  return unknown;
}

/** runtime.score's "note:" line on stderr for each caption with unknown words. */
function noteUnknownWords(unknown, texts) {
  for (const [j, words] of Object.entries(unknown)) {
    const chars = Array.from(texts[j]);
    const text = chars.length <= 60 ? texts[j] : `${chars.slice(0, 57).join('')}...`;
    process.stderr.write(`${printable(`note: caption ${j} (${pyRepr(text)}): the model's vocabulary lacks ${words.join(', ')}; read as <unk>`)}\n`);
  }
}

// --------------------------------------------------------------------------- arguments and checks
function parseArgs(argv) {
  const args = { positional: [], output: null, overwrite: false, topK: DEFAULT_TOP_K, json: false };
  for (let a = 0; a < argv.length; a++) {
    const [flag, inline] = argv[a].startsWith('--') ? argv[a].split(/=(.*)/s) : [argv[a]];
    const value = () => {
      if (inline !== undefined) return inline;
      if (a + 1 >= argv.length || /^-[^\d]/.test(argv[a + 1])) throw new UserError(`${PROG}: argument ${flag}: expected one argument`);
      return argv[++a];
    };
    if (flag === '-h' || flag === '--help') return { help: true };
    if (flag === '--json') {
      if (inline !== undefined) throw new UserError(`${PROG}: argument --json: ignored explicit argument '${inline}'`);
      args.json = true;
    } else if (flag === '--overwrite') {
      if (inline !== undefined) throw new UserError(`${PROG}: argument --overwrite: ignored explicit argument '${inline}'`);
      args.overwrite = true;
    } else if (flag === '--output') {
      args.output = value();
    } else if (flag === '--top-k') {
      const text = value();
      if (!/^\s*[+-]?\d+\s*$/.test(text)) throw new UserError(`${PROG}: argument --top-k: invalid int value: '${text}'`);
      args.topK = Number(text);
      if (args.topK < 0) throw new UserError(`${PROG}: --top-k must be >= 0, got ${args.topK}`);
    } else if (flag.startsWith('-') && flag !== '-') {
      throw new UserError(`${PROG}: unrecognized arguments: ${argv[a]}`);
    } else {
      args.positional.push(argv[a]);
    }
  }
  if (args.positional.length !== 3) {
    throw new UserError(args.positional.length < 3
      ? `${PROG}: the following arguments are required: ${['MODEL_DIR', 'IMAGES.npy', 'CAPTIONS.txt'].slice(args.positional.length).join(', ')}`
      : `${PROG}: unrecognized arguments: ${args.positional.slice(3).join(' ')}`);
  }
  [args.model, args.images, args.captions] = args.positional;
  return args;
}

const shapeText = (shape) => (shape.length === 1 ? `(${shape[0]},)` : `(${shape.join(', ')})`);

/** The region features checked as runtime/inputs.py checks them: (n_img, n_region, img_dim), at
 * least one image and one region, finite and within MAX_FEATURE (read a chunk of images at a time). */
function checkFeatures(feats, imgDim) {
  const { file, shape } = feats;
  if (shape.length !== 3) {
    throw new UserError(`${file}: expected shape (n_img, n_region, ${imgDim}), got ${shapeText(shape)} (${shape.length} dimensions)`);
  }
  const [nImg, nRegion, dim] = shape;
  if (dim !== imgDim) throw new UserError(`${file}: features have size ${dim}, the model expects ${imgDim} (shape ${shapeText(shape)})`);
  if (nImg === 0) throw new UserError(`${file}: no images (shape ${shapeText(shape)})`);
  if (nRegion === 0) throw new UserError(`${file}: no regions per image (shape ${shapeText(shape)})`);
  const step = Math.max(1, Math.floor((64 << 20) / (nRegion * dim * 4)));
  const as32 = feats.dtype === 'float32' ? '' : ' (as float32)';
  for (let i = 0; i < nImg; i += step) {
    const chunk = feats.rows(i, i + step);
    for (let v = 0; v < chunk.length; v++) {
      const x = Math.abs(chunk[v]);
      if (x <= MAX_FEATURE) continue;
      const image = i + Math.floor(v / (nRegion * dim));
      if (!Number.isFinite(x)) throw new UserError(`${file}: image ${image} has NaN or Inf features${as32}`);
      const big = chunk.subarray((image - i) * nRegion * dim, (image - i + 1) * nRegion * dim).reduce((m, y) => Math.max(m, Math.abs(y)), 0);
      throw new UserError(`${file}: image ${image} has a feature of magnitude ${big.toPrecision(3).replace(/\.?0+(e|$)/, '$1')}, ` +
        `over 1e+12 (float32 arithmetic would overflow)`);
    }
  }
}

function sameFile(a, b) {
  try {
    const [x, y] = [fs.statSync(a), fs.statSync(b)];
    return x.dev === y.dev && x.ino === y.ino;
  } catch {
    return path.resolve(a) === path.resolve(b);
  }
}

/** Refuse, before any scoring, an --output that is one of `inputs` (or a link to one), a folder,
 * in a missing or unwritable folder, or (without --overwrite) one that exists: runtime.cli's
 * check_output_file and refuse_replacing, word for word. */
function checkOutput(out, inputs, overwrite) {
  for (const src of inputs) {
    if (fs.existsSync(src) && fs.existsSync(out) && sameFile(out, src)) {
      throw new UserError(`--output ${out} is the input ${src}: refusing to overwrite an input`);
    }
  }
  if (fs.existsSync(out) && fs.statSync(out).isDirectory()) throw new UserError(`--output ${out} is a folder; give a file name`);
  const folder = path.dirname(path.resolve(out));
  if (!fs.existsSync(folder) || !fs.statSync(folder).isDirectory()) throw new UserError(`--output ${out}: the folder ${folder} does not exist`);
  try {
    fs.accessSync(folder, fs.constants.W_OK);
  } catch {
    throw new UserError(`--output ${out}: the folder ${folder} is not writable`);
  }
  let exists = true;
  try {
    fs.lstatSync(out);
  } catch {
    exists = false;
  }
  if (!overwrite && exists) throw new UserError(`--output ${out} already exists: add --overwrite to replace it`);
}

/** A progress line on stderr, redrawn in place, when stderr is a terminal (nothing otherwise). */
let barOpen = false;
function progressBar(label) {
  const start = Date.now();
  let last = 0;
  return (done, total) => {
    if (!process.stderr.isTTY || (Date.now() - last < 100 && done < total)) return;
    last = Date.now();
    const seconds = Math.round((last - start) / 1000);
    process.stderr.write(`\r${label}: ${String(Math.floor((100 * done) / total)).padStart(3)}% ${done}/${total} blocks [${seconds} s]${done === total ? '\n' : ''}`);
    barOpen = done < total;
  };
}

// --------------------------------------------------------------------------- main
async function main(argv) {
  const args = parseArgs(argv);
  if (args.help) {
    process.stdout.write(`${USAGE}\n`);
    return;
  }
  const feats = openNpy(args.images);
  const model = await loadModel(args.model);
  const rules = tokenizer.load(args.model, model.manifest);
  const texts = captions.readCaptions(args.captions, rules);
  if (args.output) {
    const modelFiles = fs.readdirSync(args.model).map((f) => path.join(args.model, f));
    checkOutput(args.output, [args.images, args.captions, ...modelFiles], args.overwrite);
  }
  checkFeatures(feats, model.imgDim);
  const vocab = JSON.parse(fs.readFileSync(path.join(args.model, model.manifest.vocab.file), 'utf8')).word2idx;
  const tokenLists = texts.map((t) => rules.encode(t, vocab));
  const sims = await model.score(feats, tokenLists, (block, first, idx) => {
    const bad = block.findIndex((s) => !Number.isFinite(s));
    if (bad >= 0) {
      const value = Number.isNaN(block[bad]) ? 'nan' : block[bad] > 0 ? 'inf' : '-inf';
      throw new UserError(`the score of image ${first + Math.floor(bad / idx.length)} and caption ${idx[bad % idx.length]} ` +
        `is ${value} (features of too large a magnitude, or a broken model); no scores were kept`);
    }
  }, progressBar('scoring'));
  feats.close();
  const unknown = unknownWords(texts, tokenLists, rules, vocab);
  if (args.output) {
    try {
      writeNpy(args.output, [feats.shape[0], texts.length], sims);
    } catch (e) {
      if (e.code === 'ENOSPC' || e.code === 'EDQUOT' || e.code === 'EFBIG') {
        throw new UserError(`--output ${args.output}: no space left for its ${(npyHeader([feats.shape[0], texts.length]).length + sims.byteLength).toLocaleString('en-US')} bytes ` +
          `(${e.code}); nothing was written`);
      }
      throw e;
    }
  }
  noteUnknownWords(unknown, texts);
  let buffer = '';
  for (const line of rankingLines(sims, feats.shape[0], texts, args.topK, args.json, unknown)) {
    buffer += line;
    if (buffer.length > 1 << 16) {
      process.stdout.write(buffer);
      buffer = '';
    }
  }
  process.stdout.write(buffer);
}

/**
 * Run a command's main(argv). A user error (bad input, a model folder or file that cannot be used,
 * a full disk) ends it with one "error: ..." line on stderr and exit status 2; anything else is a
 * bug and shows its stack trace. A closed stdout (| head) stops it quietly with status 1.
 */
function runCommand(mainFn, argv) {
  const userErrors = [UserError, NpyError, ModelDirError, captions.CaptionsError, tokenizer.TokenizerError];
  process.stdout.on('error', (e) => {
    if (e.code !== 'EPIPE') throw e;
    process.exit(1);
  });
  // Ctrl-C, SIGTERM, SIGHUP: one line and runtime.cli's exit status, once the matcher threads
  // are stopped (the output is written and renamed in one synchronous step: no temporary file is left)
  let stopping = false;
  const stop = (line, status) => {
    if (stopping) return;
    stopping = true;
    process.stderr.write(`${barOpen ? '\n' : ''}${line}\n`);
    closeMatchers().finally(() => process.exit(status));
  };
  process.on('SIGINT', () => stop('error: interrupted', 130));
  process.on('SIGTERM', () => stop('error: stopped by signal SIGTERM', 143));
  process.on('SIGHUP', () => stop('error: stopped by signal SIGHUP', 129));
  mainFn(argv).catch((e) => {
    if (stopping) return;
    let message = e.message;
    if (e.code === 'ENOSPC' || e.code === 'EDQUOT') {
      message = `no space left on the device${e.path ? ` writing ${e.path}` : ''}; nothing was written`;
    } else if (!userErrors.some((cls) => e instanceof cls) && !(e.path && ['ENOENT', 'EACCES', 'EISDIR', 'ENOTDIR', 'EROFS', 'EPERM'].includes(e.code))) {
      throw e;
    }
    process.stderr.write(`${barOpen ? '\n' : ''}error: ${oneLine(message)}\n`);
    process.exitCode = 2;
  });
}

if (require.main === module) runCommand(main, process.argv.slice(2));

module.exports = { printable, pyRepr, oneLine, pyFloat, fixed6, jsonString, topK, rankingLines, parseArgs, main, runCommand, UserError };
