'use strict';
// node --test clients/node/test/ — the tokeniser (lib/tokenizer.js), the captions rules
// (lib/captions.js) and tokenize.js; no npm packages needed. The same tokens as runtime/text.py on
// >= 100,000 fuzz captions: tests/test_tokenizer.py and benchmarks/tokenizer_fuzz.py.

const assert = require('node:assert/strict');
const { spawnSync } = require('node:child_process');
const crypto = require('node:crypto');
const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');
const test = require('node:test');

const { Tokenizer, TokenizerError, load, loadRules } = require('../lib/tokenizer');
const { readCaptions, CaptionsError, firstBadUtf8 } = require('../lib/captions');

const RULES_FILE = path.join(__dirname, '..', '..', '..', 'runtime', 'tokenizer.json');
const TOKENIZE = path.join(__dirname, '..', 'tokenize.js');
const rules = loadRules(RULES_FILE);

function tmpDir() {
  return fs.mkdtempSync(path.join(os.tmpdir(), 'imram-tok-'));
}

function sha256(file) {
  return crypto.createHash('sha256').update(fs.readFileSync(file)).digest('hex');
}

/** A model folder with what tokenize.js reads: manifest.json, tokenizer.json, vocab.json. */
function modelDir(words = ['a', 'dog', '.'], manifestEdit = (m) => m) {
  const dir = tmpDir();
  fs.copyFileSync(RULES_FILE, path.join(dir, 'tokenizer.json'));
  const word2idx = { '<pad>': 0, '<start>': 1, '<end>': 2, '<unk>': 3 };
  words.forEach((w, i) => { word2idx[w] = i + 4; });
  fs.writeFileSync(path.join(dir, 'vocab.json'), JSON.stringify({ word2idx }));
  const manifest = {
    format: 'imram-min-onnx',
    format_version: 3,
    vocab: { file: 'vocab.json' },
    tokenizer: { file: 'tokenizer.json', rules_version: 1 },
    files: {
      'tokenizer.json': { sha256: sha256(path.join(dir, 'tokenizer.json')) },
      'vocab.json': { sha256: sha256(path.join(dir, 'vocab.json')) },
    },
  };
  fs.writeFileSync(path.join(dir, 'manifest.json'), JSON.stringify(manifestEdit(manifest)));
  return dir;
}

function captionsFile(bytes) {
  const file = path.join(tmpDir(), 'c.txt');
  fs.writeFileSync(file, bytes);
  return file;
}

// the same table as tests/test_tokenizer.py::test_rules_give_exact_tokens (checked there against nltk)
const EXACT = [
  ["A dog, running. I don't know.", ['a', 'dog', ',', 'running.', 'i', 'do', "n't", 'know', '.']],
  ["'tis the season, 'twas cold", ["'", 'tis', 'the', 'season', ',', "'", 'twas', 'cold']],
  ["he said 'stop'", ['he', 'said', "'", 'stop', "'"]],
  ['a man\u2014with a hat\u2013walks', ['a', 'man', '\u2014', 'with', 'a', 'hat', '\u2013', 'walks']],
  ["'leading apostrophe", ["'", 'leading', 'apostrophe']],
  ['"hi" ``x\'\'', ['``', 'hi', "''", '``', 'x', "''"]],
  ["gimme more'n d'ye wanna go cannot", ['gim', 'me', 'more', "'n", 'd', "'ye", 'wan', 'na', 'go', 'can', 'not']],
  ['x \u00abq\u00bb \u201cq\u201d \u2018q\u2019', ['x', '\u00ab', 'q', '\u00bb', '\u201c', 'q', '\u201d', '\u2018', 'q', '\u2019']],
  ['a,\n', ['a', ',']],
  ["\u039f\u0394\u039f\u03a3 \u0391'\u03a3'", ['\u03bf\u03b4\u03bf\u03c2', "\u03b1'\u03c2", "'"]],
  ['\u0130stanbul', ['i\u0307stanbul']],
  ['a\x1cb wanna\x1c', ['a', 'b', 'wan', 'na']],
];

test('tokenize gives the exact tokens of the pinned nltk', () => {
  for (const [caption, tokens] of EXACT) assert.deepEqual(rules.tokenize(caption), tokens, caption);
});

test('tokenize follows the rules\' Unicode 14, not this Node\'s', () => {
  assert.notEqual('\ua7cb'.toLowerCase(), '\ua7cb'); // Node's own tables (Unicode 16+) lower-case it
  assert.deepEqual(rules.tokenize('\ua7cb'), ['\ua7cb']);
  assert.deepEqual(rules.tokenize('cannot\u{1e4d0}'), ['can', 'not', '\u{1e4d0}']);
});

test('encode is [<start>, ids..., <end>] with <unk> for unknown words, prototype names included', () => {
  const vocab = { '<pad>': 0, '<start>': 1, '<end>': 2, '<unk>': 3, a: 4, dog: 5, '.': 6 };
  assert.deepEqual(rules.encode('A dog barks.', vocab), [1, 4, 5, 3, 6, 2]);
  assert.deepEqual(rules.encode('constructor __proto__ toString', vocab), [1, 3, 3, 3, 2]);
  assert.deepEqual(rules.encode('a dog', new Map(Object.entries(vocab))), [1, 4, 5, 2]);
});

test('rules of an unknown version are refused in one line', () => {
  const data = JSON.parse(fs.readFileSync(RULES_FILE, 'utf8'));
  assert.throws(() => new Tokenizer({ ...data, rules_version: 2 }, 'x.json'),
    (e) => e instanceof TokenizerError && e.message.startsWith('x.json: tokeniser rules version 2 is not known') && !e.message.includes('\n'));
  assert.throws(() => new Tokenizer({ ...data, split: 'nothing' }, 'x.json'), /split must name a class/);
  assert.throws(() => new Tokenizer({ ...data, steps: [{ op: 'sub', pattern: '(a', replace: '' }] }, 'x.json'), /does not compile/);
});

test('load reads a model folder\'s rules and checks them against its manifest', () => {
  assert.deepEqual(load(modelDir()).tokenize('A dog.'), ['a', 'dog', '.']);
  const changed = modelDir();
  fs.appendFileSync(path.join(changed, 'tokenizer.json'), ' ');
  assert.throws(() => load(changed), /tokenizer\.json: SHA-256 .* does not match the manifest/);
  const unknown = modelDir(undefined, (m) => ({ ...m, tokenizer: { file: 'tokenizer.json', rules_version: 7 } }));
  assert.throws(() => load(unknown), /manifest\.json: tokeniser rules version 7 is not known/);
  const old = modelDir(undefined, (m) => ({ ...m, format_version: 2, tokenizer: undefined }));
  assert.throws(() => load(old), /no tokenizer\.json \(format 2.*re-export it with python -m export/);
});

test('readCaptions strips each line and allows a BOM and CRLF', () => {
  const file = captionsFile(Buffer.from('\ufeff A dog \r\n\u3000a cat\u00a0\n', 'utf8'));
  assert.deepEqual(readCaptions(file, rules), ['A dog', 'a cat']);
});

test('readCaptions refuses what runtime.score refuses, with its words', () => {
  const cases = [
    [Buffer.from(''), ': no captions (the file is empty)'],
    [Buffer.from('a\n\n \nb\n\t\n'), ': blank lines 2, 3, 5 (one caption a line, no blank lines)'],
    [Buffer.from('a\nb \xe2\x82\n', 'latin1'), ": line 2 is not UTF-8 text (byte 3: b'\\xe2')"],
    [Buffer.from('w '.repeat(300)), ': line 1 has 300 words; captions may have at most 256 (MAX_WORDS)'],
    [Buffer.from('w,'.repeat(200)), ': line 1 has 400 words (tokens); captions may have at most 256 (MAX_WORDS)'],
  ];
  for (const [bytes, message] of cases) {
    const file = captionsFile(bytes);
    assert.throws(() => readCaptions(file, rules), (e) => e instanceof CaptionsError && e.message === file + message);
  }
  assert.throws(() => readCaptions('/no/such/file.txt', rules), { message: '/no/such/file.txt: no such file' });
  const dir = tmpDir();
  assert.throws(() => readCaptions(dir, rules), { message: `${dir}: is a folder, expected a text file of captions` });
});

test('firstBadUtf8 finds where Python\'s decoder reports the error', () => {
  const at = (hex) => firstBadUtf8(Buffer.from(hex, 'hex'));
  assert.equal(at('61c3a9'), -1); // a é
  assert.equal(at('f09f9880'), -1); // 😀
  assert.equal(at('61c080'), 1); // overlong
  assert.equal(at('eda080'), 0); // a surrogate
  assert.equal(at('f4908080'), 0); // above U+10FFFF
  assert.equal(at('6180'), 1); // a lone continuation byte
  assert.equal(at('61e282'), 1); // cut short
});

test('tokenize.js prints one JSON array of ids per caption, and one error line otherwise', () => {
  const dir = modelDir();
  const ok = spawnSync(process.execPath, [TOKENIZE, dir, captionsFile('A dog.\nthe dog\n')], { encoding: 'utf8' });
  assert.equal(ok.status, 0, ok.stderr);
  assert.equal(ok.stdout, '[1,4,5,6,2]\n[1,3,5,2]\n');
  const words = spawnSync(process.execPath, [TOKENIZE, dir, captionsFile('A dog.\n'), '--tokens'], { encoding: 'utf8' });
  assert.equal(words.stdout, '["a","dog","."]\n');
  const bad = spawnSync(process.execPath, [TOKENIZE, dir, captionsFile('a\n\n')], { encoding: 'utf8' });
  assert.equal(bad.status, 2);
  assert.equal(bad.stdout, '');
  assert.match(bad.stderr, /^error: .*c\.txt: blank line 2 \(one caption a line, no blank lines\)\n$/);
});
