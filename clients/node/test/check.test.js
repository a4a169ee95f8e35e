'use strict';
// check.js on the stages of the optional graphs: the global head's (run through Model.imageGlobal /
// Model.textGlobal) and the feature extractor's ("requires": "pictures": this client takes no
// pictures, so the stage is printed as skipped and fails nothing). The folder tests need a model
// folder with both optional graphs in IMRAM_NODE_OPTIONAL_MODEL_DIR (tests/test_node_client.py sets one).
const assert = require('node:assert/strict');
const { spawnSync } = require('node:child_process');
const fs = require('node:fs');
const path = require('node:path');
const test = require('node:test');
const { loadVectors, runStage, stageLine } = require('../check');
const { loadModel } = require('../lib/model');

const ROOT = path.join(__dirname, '..');
const MODEL_DIR = process.env.IMRAM_NODE_OPTIONAL_MODEL_DIR;
const needsFolder = { skip: !MODEL_DIR && 'IMRAM_NODE_OPTIONAL_MODEL_DIR not set' };

const pictureStage = { name: 'picture_feats', label: 'picture features', kind: 'graph', graph: 'feature_extractor',
  inputs: { images: 'images' }, output: 'picture_feats', tolerance: 1e-4, requires: 'pictures' };

test('a stage that requires pictures is skipped, with the reason, by a client without them', async () => {
  const model = { sessions: {} }; // never called: the stage is skipped before anything runs
  assert.deepEqual(await runStage(model, pictureStage, { captions: [] }, {}, null, null),
    ['skipped', 'this client does not take pictures']);
  assert.equal(stageLine('picture features', 'skipped', 'this client does not take pictures'),
    'picture features    skipped (this client does not take pictures)\n');
  assert.deepEqual(await runStage(model, { ...pictureStage, requires: 'sound' }, { captions: [] }, {}, null, null),
    ['skipped', 'this client cannot sound']);
});

test('a client that takes pictures runs the stage (here: a folder without the graph fails it)', async () => {
  assert.deepEqual(await runStage({ sessions: {} }, pictureStage, { captions: [] }, {}, null, null, ['pictures']),
    ['FAIL', 'the model folder has no feature_extractor graph']);
});

test('the global head graphs give the stored vectors within each stage\'s tolerance', needsFolder, async () => {
  const model = await loadModel(MODEL_DIR);
  const { doc, arrays } = loadVectors(MODEL_DIR, model.manifest);
  assert.ok(model.hasGlobalHead);
  const stage = (name) => doc.stages.find((s) => s.name === name);
  const close = (got, name) => {
    const want = arrays[stage(name).output];
    assert.equal(got.length, want.data.length, name);
    got.forEach((v, i) => assert.ok(Math.abs(v - want.data[i]) <= stage(name).tolerance, `${name}[${i}]: ${v} vs ${want.data[i]}`));
  };
  const regions = arrays.region_embs;
  const images = await model.imageGlobal(regions.data, regions.shape[0], regions.shape[1]);
  assert.equal(images.length, regions.shape[0] * model.globalSize);
  close(images, 'image_global');
  const words = arrays.word_embs;
  close(await model.textGlobal(words.data, Array.from(arrays.lengths.data, Number), words.shape[1]), 'text_global');
});

test('check.js passes the global head stages and skips the picture stage', needsFolder, () => {
  const result = spawnSync(process.execPath, [path.join(ROOT, 'check.js'), MODEL_DIR], { encoding: 'utf8' });
  assert.equal(result.status, 0, result.stdout + result.stderr);
  assert.match(result.stdout, /^image global head {3}ok {4}max \|diff\| \S+ <= \S+$/m);
  assert.match(result.stdout, /^text global head {4}ok {4}max \|diff\| \S+ <= \S+$/m);
  assert.match(result.stdout, /^picture features {4}skipped \(this client does not take pictures\)$/m);
  assert.match(result.stdout, /; skipped: picture features\)\n$/);
  assert.equal(result.stderr, '');
  assert.ok(fs.existsSync(path.join(MODEL_DIR, 'feature_extractor.onnx')));
});
