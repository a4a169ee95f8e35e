'use strict';
// score.js and check.js: printing as runtime.score prints, rank order, flags; and, given a model
// folder in IMRAM_NODE_MODEL_DIR (tests/test_node_client.py sets one), end-to-end runs of both
// commands against the folder's conformance vectors.
const assert = require('node:assert/strict');
const { spawnSync } = require('node:child_process');
const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');
const test = require('node:test');
const { printable, oneLine, pyFloat, fixed6, jsonString, topK, rankingLines, parseArgs, UserError } = require('../score');

const ROOT = path.join(__dirname, '..');
const MODEL_DIR = process.env.IMRAM_NODE_MODEL_DIR;

test('control characters and separators print as Python escapes them; other text as it is', () => {
  assert.equal(printable('a dog \u00e9\u00e8 \ud83d\udc36 "x" \\ \u4e2d'), 'a dog \u00e9\u00e8 \ud83d\udc36 "x" \\ \u4e2d');
  assert.equal(printable('a\tb\nc\rd\x1b[2J\x07\x7f\x9b'), 'a\\tb\\nc\\rd\\x1b[2J\\x07\\x7f\\x9b');
  assert.equal(printable('\u00a0\u200b\u2028\ufeff\u{e0001}'), '\\xa0\\u200b\\u2028\\ufeff\\U000e0001');
  assert.equal(oneLine('bad\n  input\x1b'), 'bad input\\x1b');
});

test('numbers print as Python prints them: repr and .6f with ties to even', () => {
  assert.deepEqual([0, -0, 0.5, 1e-5, 0.0001, 1.5e16, 1e16, 123.0, -2.75e-7].map(pyFloat),
    ['0.0', '-0.0', '0.5', '1e-05', '0.0001', '1.5e+16', '1e+16', '123.0', '-2.75e-07']);
  assert.equal(pyFloat(Math.fround(0.1)), '0.10000000149011612');
  assert.deepEqual([1 / 128, 3 / 128, -1 / 128, -0, 2.5, 1e-9].map(fixed6),
    ['0.007812', '0.023438', '-0.007812', '-0.000000', '2.500000', '0.000000']);
});

test('JSON strings escape what runtime.score escapes: C0, DEL, C1, line separators', () => {
  assert.equal(jsonString('a "b" \\ \n \x1b \x7f \x9b \u2028 \u00e9'), '"a \\"b\\" \\\\ \\n \\u001b \\u007f \\u009b \\u2028 \u00e9"');
});

test('rank order: score descending, ties by lower index', () => {
  const scores = [0.5, 0.9, 0.5, -1, 0.9, 0.5];
  assert.deepEqual(topK(scores.length, 4, (i) => scores[i]), [1, 4, 0, 2]);
  assert.deepEqual(topK(2, 5, (i) => scores[i]), [1, 0]);
  const sims = Float32Array.from([0.25, 0.25, 1, 0.5, 0.75, 0.75]); // 2 images x 3 captions
  const json = [...rankingLines(sims, 2, ['a', 'b', 'c'], 2, true)].map((l) => JSON.parse(l));
  assert.deepEqual(json[0], { image: 0, top: [{ caption: 2, score: 1, text: 'c' }, { caption: 0, score: 0.25, text: 'a' }] });
  assert.deepEqual(json[2].top, [{ image: 1, score: 0.5 }, { image: 0, score: 0.25 }]);
  assert.deepEqual([...rankingLines(sims, 2, ['a', 'b', 'c'], 0, false)], []);
});

test('flags: values inline or after, and one line for each mistake', () => {
  const args = parseArgs(['m', 'i.npy', 'c.txt', '--top-k=2', '--json', '--output', 'o.npy']);
  assert.deepEqual([args.model, args.images, args.captions, args.topK, args.json, args.output, args.overwrite],
    ['m', 'i.npy', 'c.txt', 2, true, 'o.npy', false]);
  assert.equal(parseArgs(['m', 'i', 'c', '--output', 'o.npy', '--overwrite']).overwrite, true);
  for (const [argv, words] of [[['m', 'i'], 'required: CAPTIONS.txt'], [['m', 'i', 'c', '--top-k', '-3'], 'got -3'],
    [['m', 'i', 'c', '--top-k', '1.5'], "invalid int value: '1.5'"], [['m', 'i', 'c', '--nope'], 'unrecognized arguments: --nope'],
    [['m', 'i', 'c', 'd'], 'unrecognized arguments: d'], [['m', 'i', 'c', '--output'], 'expected one argument'],
    [['m', 'i', 'c', '--overwrite=yes'], "argument --overwrite: ignored explicit argument 'yes'"]]) {
    assert.throws(() => parseArgs(argv), (e) => e instanceof UserError && e.message.includes(words), words);
  }
});

// --------------------------------------------------------------------------- with a model folder
const node = (script, ...args) => spawnSync(process.execPath, [path.join(ROOT, script), ...args], { encoding: 'utf8' });

test('check.js passes the model folder\'s conformance vectors', { skip: !MODEL_DIR && 'IMRAM_NODE_MODEL_DIR not set' }, () => {
  const result = node('check.js', MODEL_DIR);
  assert.equal(result.status, 0, result.stdout + result.stderr);
  assert.match(result.stdout, /^tokens {14}ok {4}\d+\/\d+ captions exact$/m);
  assert.match(result.stdout, /^pipeline scores {5}ok {4}max \|diff\| \S+ <= \S+$/m);
});

test('score.js scores the conformance features and captions as the vectors expect', { skip: !MODEL_DIR && 'IMRAM_NODE_MODEL_DIR not set' }, () => {
  const { loadVectors } = require('../check');
  const { writeNpy, readNpy } = require('../lib/npy');
  const { doc, arrays } = loadVectors(MODEL_DIR, JSON.parse(fs.readFileSync(path.join(MODEL_DIR, 'manifest.json'), 'utf8')));
  const stage = doc.stages.find((s) => s.kind === 'pipeline');
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'score-test-'));
  try {
    const feats = arrays[stage.inputs.region_feats];
    writeNpy(path.join(dir, 'feats.npy'), feats.shape, feats.data);
    const texts = doc[stage.inputs.captions].map((j) => doc.captions[j].caption);
    fs.writeFileSync(path.join(dir, 'caps.txt'), `${texts.join('\n')}\n`);
    const result = node('score.js', MODEL_DIR, path.join(dir, 'feats.npy'), path.join(dir, 'caps.txt'),
      '--output', path.join(dir, 'sims.npy'), '--top-k', '1', '--json');
    assert.equal(result.status, 0, result.stderr);
    const sims = readNpy(path.join(dir, 'sims.npy'));
    const expected = arrays[stage.output];
    assert.deepEqual(sims.shape, expected.shape);
    sims.data.forEach((s, i) => assert.ok(Math.abs(s - expected.data[i]) <= stage.tolerance, `score ${i}: ${s} vs ${expected.data[i]}`));
    const lines = result.stdout.trim().split('\n').map((l) => JSON.parse(l));
    assert.equal(lines.length, feats.shape[0] + texts.length);
    assert.deepEqual(lines[feats.shape[0]].text, texts[0]);
    // a blank line: one error line, exit 2, the earlier output left as it was
    fs.writeFileSync(path.join(dir, 'caps.txt'), `${texts[0]}\n\n${texts[1]}\n`);
    const before = fs.readFileSync(path.join(dir, 'sims.npy'));
    const bad = node('score.js', MODEL_DIR, path.join(dir, 'feats.npy'), path.join(dir, 'caps.txt'),
      '--output', path.join(dir, 'sims.npy'), '--overwrite');
    assert.equal(bad.status, 2);
    assert.equal(bad.stdout, '');
    assert.match(bad.stderr, /^error: .*caps\.txt: blank line 2 \(one caption a line, no blank lines\)\n$/);
    assert.deepEqual(fs.readFileSync(path.join(dir, 'sims.npy')), before);
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});
