#!/usr/bin/env node
'use strict';
// Check this client against the conformance vectors of a model folder: `python -m runtime.check`
// in Node.js. One line per stage; exit 0 when every stage passes, else 2.
//
//   node clients/node/check.js MODEL_DIR
//
// The vectors (conformance.json + conformance.bin, written by `python -m export`, layout in
// docs/deploy.md) hold captions with their tokens and ids, and seeded region features with the
// region and word embeddings, projections and scores a correct client computes, each with a
// tolerance. Each graph stage is fed the EXPECTED arrays of the stages before it, so one wrong stage
// does not fail the others; the pipeline stage scores the features against caption strings the way
// score.js does (tokeniser, vocabulary, encoders, projections, matcher, tiling). The global head's
// stages (image_global, text_global: a search index's first-stage vectors) run when the folder has
// those graphs. A stage that "requires" a capability this client lacks (CAPABILITIES) is printed as
// skipped and fails nothing: this client takes no pictures, so the feature extractor's stage
// ("requires": "pictures") is skipped.
const fs = require('node:fs');
const path = require('node:path');
const ort = require('onnxruntime-node');
const { loadModel, ModelDirError } = require('./lib/model');
const tokenizer = require('./lib/tokenizer');
const { printable, runCommand, UserError } = require('./score');

const FORMAT = 'imram-min-conformance';
const FORMAT_VERSIONS = [1, 2]; // 2: stages of the optional graphs, and "requires"
const LABEL_WIDTH = 20;
const CAPABILITIES = []; // what a stage's "requires" may name that this client can do ("pictures": it cannot)
const MISSING = { pictures: 'this client does not take pictures' }; // why a stage is skipped, by capability

/** conformance.json and its arrays ({name: {dtype, shape, data: Float32Array | BigInt64Array}}). */
function loadVectors(modelDir, manifest) {
  const entry = manifest.conformance;
  if (!entry) {
    throw new ModelDirError(`${modelDir}: has no conformance vectors (exported before they existed); re-export it ` +
      `with python -m export CKPT --out ${modelDir} --overwrite`);
  }
  const file = path.join(modelDir, entry.file);
  let doc;
  try {
    doc = JSON.parse(fs.readFileSync(file, 'utf8'));
  } catch (e) {
    throw new ModelDirError(`${file}: cannot read the conformance vectors (${e.message})`);
  }
  if (!doc || doc.format !== FORMAT) throw new ModelDirError(`${file}: not an ${FORMAT} file`);
  if (!FORMAT_VERSIONS.includes(doc.format_version)) {
    throw new ModelDirError(`${file}: format version ${JSON.stringify(doc.format_version)} is not supported ` +
      `(this client reads ${FORMAT_VERSIONS.join(', ')}); update it`);
  }
  const blob = fs.readFileSync(path.join(modelDir, entry.data));
  const arrays = {};
  for (const [name, spec] of Object.entries(doc.arrays || {})) {
    const count = spec.shape.reduce((a, b) => a * b, 1);
    const size = spec.dtype === 'int64' ? 8 : 4;
    if (spec.offset + count * size > blob.length) {
      throw new ModelDirError(`${path.join(modelDir, entry.data)}: array ${name} ends at byte ${spec.offset + count * size}, the file has ${blob.length}`);
    }
    const bytes = new Uint8Array(blob.subarray(spec.offset, spec.offset + count * size)).buffer; // a copy: aligned
    arrays[name] = { dtype: spec.dtype, shape: spec.shape, data: spec.dtype === 'int64' ? new BigInt64Array(bytes) : new Float32Array(bytes) };
  }
  return { doc, arrays };
}

/** Python's f"{x:.1e}": one decimal, an exponent of at least two digits. */
const sci = (x) => x.toExponential(1).replace(/e([+-])(\d)$/, 'e$10$2');

/** A float stage's line: same shape, all finite, max |got - expected| <= tolerance. */
function compare(stage, got, gotShape, expected) {
  const tol = stage.tolerance;
  if (JSON.stringify(gotShape) !== JSON.stringify(expected.shape)) {
    return [false, `shape ${JSON.stringify(gotShape).replace(/,/g, ', ')}, expected ${JSON.stringify(expected.shape).replace(/,/g, ', ')}`];
  }
  if (!got.every(Number.isFinite)) return [false, 'NaN or Inf in the output'];
  let diff = 0;
  got.forEach((v, i) => { diff = Math.max(diff, Math.abs(v - expected.data[i])); });
  return [diff <= tol, `max |diff| ${sci(diff)} ${diff <= tol ? '<=' : '>'} ${sci(tol)}`];
}

/** Tokens or ids of every caption, exactly. */
function compareLists(captions, got, key) {
  const wrong = captions.map((c, i) => i).filter((i) => JSON.stringify(got[i]) !== JSON.stringify(captions[i][key]));
  const n = captions.length;
  if (!wrong.length) return [true, `${n}/${n} captions exact`];
  const i = wrong[0];
  const show = (v) => printable(JSON.stringify(v)).slice(0, 120);
  return [false, `${wrong.length}/${n} captions differ; first: caption ${i} ${show(captions[i].caption)}: got ${show(got[i])}, expected ${show(captions[i][key])}`];
}

/** One graph stage through the model's own methods (those score.js uses): [got data, got shape]. */
async function runGraph(model, stage, arrays) {
  const input = (name) => arrays[stage.inputs[name]];
  const d = model.embedSize;
  switch (stage.graph) {
    case 'image_encoder': {
      const [n, nRegion] = input('region_feats').shape;
      return [await model.encodeImages(input('region_feats').data, n, nRegion), [n, nRegion, d]];
    }
    case 'text_encoder': {
      const [n, nWord] = input('tokens').shape;
      const lengths = Array.from(input('lengths').data, Number);
      const lists = lengths.map((len, k) => Array.from(input('tokens').data.subarray(k * nWord, k * nWord + len), Number));
      const out = await model.encodeTokens(lists);
      return [out, [n, out.length / (n * d), d]];
    }
    case 'region_projection':
    case 'word_projection': {
      const side = stage.graph.split('_')[0];
      const [n, nItem] = input(`${side}_embs`).shape;
      const out = await model.project(side, input(`${side}_embs`).data, n, nItem);
      return [out, [n, nItem, out.length / (n * nItem)]];
    }
    case 'matcher': {
      const [nImg, nRegion] = input('region_embs').shape;
      const [nCap, nWord] = input('word_embs').shape;
      const proj = (name) => (stage.inputs[name] ? input(name).data : null);
      const out = await model.match(input('region_embs').data, proj('region_proj'), nImg, nRegion, input('word_embs').data,
        proj('word_proj'), Array.from(input('lengths').data, Number), nWord);
      return [out, [nImg, nCap]];
    }
    case 'image_global': {
      const [n, nRegion] = input('region_embs').shape;
      const out = await model.imageGlobal(input('region_embs').data, n, nRegion);
      return [out, [n, out.length / n]];
    }
    case 'text_global': {
      const [n, nWord] = input('word_embs').shape;
      const out = await model.textGlobal(input('word_embs').data, Array.from(input('lengths').data, Number), nWord);
      return [out, [n, out.length / n]];
    }
    default:
      throw new ModelDirError(`stage ${stage.name}: graph ${JSON.stringify(stage.graph)} is unknown to this client; update it`);
  }
}

async function main(argv) {
  if (argv.length !== 1 || argv[0].startsWith('-')) {
    if (argv[0] === '-h' || argv[0] === '--help') return void process.stdout.write('usage: node check.js MODEL_DIR\n');
    throw new UserError(`check.js: expected one argument, MODEL_DIR (got ${argv.length ? argv.join(' ') : 'none'})`);
  }
  const modelDir = argv[0];
  const model = await loadModel(modelDir);
  const { doc, arrays } = loadVectors(modelDir, model.manifest);
  const rules = tokenizer.load(modelDir, model.manifest);
  const vocab = JSON.parse(fs.readFileSync(path.join(modelDir, model.manifest.vocab.file), 'utf8')).word2idx;
  const results = [];
  for (const stage of doc.stages) {
    const [status, detail] = await runStage(model, stage, doc, arrays, rules, vocab);
    results.push({ label: stage.label, status });
    process.stdout.write(stageLine(stage.label, status, detail));
  }
  const failed = results.filter((r) => r.status === 'FAIL').map((r) => r.label);
  if (failed.length) {
    process.stderr.write(`error: ${failed.length} of ${results.length} stages failed (${failed.join(', ')}): this client ` +
      `does not compute what ${modelDir} expects\n`);
    process.exitCode = 2;
    return;
  }
  const skipped = results.filter((r) => r.status === 'skipped').map((r) => r.label);
  const note = skipped.length ? `; skipped: ${skipped.join(', ')}` : '';
  process.stdout.write(`ok: ${modelDir} conforms (onnxruntime-node ${ort.env.versions.node}, cpu${note})\n`);
}

/** A stage's printed line: label, status (ok, FAIL, skipped), detail. */
function stageLine(label, status, detail) {
  return status === 'skipped' ? `${label.padEnd(LABEL_WIDTH)}skipped (${detail})\n`
    : `${label.padEnd(LABEL_WIDTH)}${status.padEnd(6)}${detail}\n`;
}

/**
 * One stage of conformance.json run by `model` (a lib/model.js Model, or anything with its methods):
 * ['ok' | 'FAIL', detail] or, for a stage that requires a capability not in `capabilities`,
 * ['skipped', why]. rules: the tokeniser (lib/tokenizer.js), vocab: word2idx.
 */
async function runStage(model, stage, doc, arrays, rules, vocab, capabilities = CAPABILITIES) {
  if (stage.requires !== undefined && !capabilities.includes(stage.requires)) {
    return ['skipped', MISSING[stage.requires] || `this client cannot ${stage.requires}`];
  }
  const captions = doc.captions;
  let result;
  if (stage.kind === 'tokens') {
    result = compareLists(captions, captions.map((c) => rules.tokenize(c.caption)), 'tokens');
  } else if (stage.kind === 'ids') {
    result = compareLists(captions, captions.map((c) => rules.encode(c.caption, vocab)), 'ids');
  } else if (stage.kind === 'graph') {
    result = model.sessions[stage.graph] ? compare(stage, ...(await runGraph(model, stage, arrays)), arrays[stage.output])
      : [false, `the model folder has no ${stage.graph} graph`];
  } else { // pipeline: caption strings x region features, all pairs, as score.js scores them
    const feats = arrays[stage.inputs.region_feats];
    const perImage = feats.shape[1] * feats.shape[2];
    const features = { shape: feats.shape, rows: (a, b) => feats.data.subarray(a * perImage, b * perImage) };
    const lists = doc[stage.inputs.captions].map((j) => rules.encode(captions[j].caption, vocab));
    result = compare(stage, await model.score(features, lists), [feats.shape[0], lists.length], arrays[stage.output]);
  }
  return [result[0] ? 'ok' : 'FAIL', result[1]];
}

if (require.main === module) runCommand(main, process.argv.slice(2));

module.exports = { loadVectors, compare, compareLists, runStage, stageLine, main };
