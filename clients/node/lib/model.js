'use strict';
// An exported model folder (written by `python -m export`) run with onnxruntime-node.
//
//   const model = await loadModel('runs/default/model');  // manifest checked, every file's SHA-256 verified
//   const sims = await model.score(feats, tokenLists);     // (n_img x n_cap) Float32Array, row-major
//
// The graphs, as runtime/engine.py calls them (every float tensor float32, every int tensor int64;
// "n_*" axes are dynamic, d = embed_size, P = the projection size, 4d in mode full):
//   image_encoder      region_feats (n_img, n_region, img_dim)            -> region_embs (n_img, n_region, d)
//   text_encoder       tokens (n_cap, n_word) padded with 0, lengths (n_cap) -> word_embs (n_cap, n_word, d)
//   region_projection  region_embs (n_img, n_region, d)                   -> region_proj (n_img, n_region, P)
//   word_projection    word_embs (n_cap, n_word, d)                       -> word_proj (n_cap, n_word, P)
//   matcher            region_embs, word_embs, lengths[, region_proj, word_proj] -> sims (n_img, n_cap)
//   image_global       region_embs (n_img, n_region, d)                   -> image_global (n_img, G)
//   text_global        word_embs (n_cap, n_word, d), lengths (n_cap)      -> text_global (n_cap, G)
// The projection graphs exist only when the matcher takes region_proj and word_proj (the fast
// matcher of a model that updates its memory); they are per-item parts of the matcher's work.
// The global head graphs (both or neither) are optional: a search index's first-stage vectors,
// l2-normalised (runtime/engine.py: first_stage_vectors). This client takes no pictures, so it
// never loads feature_extractor.onnx.
// A caption's tokens are [1 (<start>), word ids..., 2 (<end>)]; padding (0) never changes a score.
const crypto = require('node:crypto');
const fs = require('node:fs');
const path = require('node:path');
const os = require('node:os');
const { Worker } = require('node:worker_threads');
const ort = require('onnxruntime-node');

const FORMAT = 'imram-min-onnx';
const GRAPHS = ['image_encoder', 'text_encoder', 'matcher'];
const PROJECTIONS = ['region_projection', 'word_projection'];
const GLOBAL_GRAPHS = ['image_global', 'text_global']; // optional, both or neither
const PAIR_BUDGET = 1 << 22; // values in the largest per-pair tensor of one matcher call (as runtime/engine.py)
const MAX_SHARD = 256; // images = captions per matcher call, at most
const GROUP_BYTES = 256 << 20; // one image group's features + embeddings + projections, at most

class ModelDirError extends Error {}

function sha256File(file) {
  const hash = crypto.createHash('sha256');
  const fd = fs.openSync(file, 'r');
  try {
    const block = Buffer.alloc(1 << 20);
    for (let n; (n = fs.readSync(fd, block, 0, block.length, null)) > 0;) hash.update(block.subarray(0, n));
  } finally {
    fs.closeSync(fd);
  }
  return hash.digest('hex');
}

/**
 * MODEL_DIR/manifest.json, read and checked: its format and version, the graphs this client runs,
 * and the SHA-256 of every file it lists (a half-copied or edited folder is one ModelDirError).
 * supportedVersions: the manifest format versions this client reads.
 */
function readManifest(modelDir, supportedVersions) {
  if (!fs.existsSync(modelDir) || !fs.statSync(modelDir).isDirectory()) {
    throw new ModelDirError(`${modelDir}: no such model folder (make one with python -m export CKPT --out DIR)`);
  }
  const file = path.join(modelDir, 'manifest.json');
  let manifest;
  try {
    manifest = JSON.parse(fs.readFileSync(file, 'utf8'));
  } catch (e) {
    if (e.code === 'ENOENT') throw new ModelDirError(`${file}: missing; not a model folder written by python -m export CKPT --out DIR`);
    throw new ModelDirError(`${file}: cannot read the manifest (${e.message})`);
  }
  const bad = (what) => new ModelDirError(`${file}: ${what}`);
  if (!manifest || typeof manifest !== 'object' || manifest.format !== FORMAT) throw bad(`not an ${FORMAT} manifest`);
  if (!supportedVersions.includes(manifest.format_version)) {
    throw bad(`format version ${JSON.stringify(manifest.format_version)} is not supported (this client reads ` +
      `${supportedVersions.join(', ')}); re-export the checkpoint with python -m export CKPT --out DIR`);
  }
  const cfg = manifest.model_config || {};
  for (const key of ['img_dim', 'embed_size', 'vocab_size', 'n_steps']) {
    if (!Number.isInteger(cfg[key]) || cfg[key] < 1) throw bad(`model_config.${key} must be a positive integer, got ${JSON.stringify(cfg[key])}`);
  }
  const graphs = manifest.graphs || {};
  const files = manifest.files;
  if (!files || typeof files !== 'object' || !Object.keys(files).length) throw bad('files must be an object of file name: {sha256: ...}');
  const projected = ((graphs.matcher || {}).inputs || []).some((i) => i.name === 'region_proj');
  const globalHead = GLOBAL_GRAPHS.some((g) => g in graphs);
  for (const g of GRAPHS.concat(projected ? PROJECTIONS : [], globalHead ? GLOBAL_GRAPHS : [])) {
    if (!graphs[g] || typeof graphs[g].file !== 'string') throw bad(`graphs.${g}.file must be a file name`);
    if (!(graphs[g].file in files)) throw bad(`lists no hash for ${graphs[g].file}`);
  }
  for (const [name, info] of Object.entries(files)) {
    if (path.basename(name) !== name || name === '.' || name === '..') throw bad(`file name ${JSON.stringify(name)} is not a plain name`);
    if (!info || !/^[0-9a-f]{64}$/.test(info.sha256)) throw bad(`files.${name}.sha256 must be 64 hex digits`);
    const listed = path.join(modelDir, name);
    if (!fs.existsSync(listed) || !fs.statSync(listed).isFile()) throw new ModelDirError(`${listed}: missing from the model folder`);
    const digest = sha256File(listed);
    if (digest !== info.sha256) {
      throw new ModelDirError(`${listed}: SHA-256 ${digest.slice(0, 12)}... does not match the manifest ` +
        `(${info.sha256.slice(0, 12)}...); the file was changed or damaged`);
    }
  }
  return { manifest, projected, globalHead };
}

/** The shard size of runtime/engine.py's shard_size: images = captions per matcher call, so that its
 * largest per-pair tensor (max(n_region, n_word) * 2d, plus n_word^2) holds about PAIR_BUDGET values. */
function shardSize(nRegion, nWord, embedSize) {
  const perPair = Math.max(nRegion, nWord, 1) * 2 * embedSize + nWord * nWord;
  const side = Math.floor(Math.sqrt(Math.max(1, Math.floor(PAIR_BUDGET / perPair))));
  return Math.max(1, Math.min(side, MAX_SHARD));
}

/**
 * Matcher calls side by side: `size` worker threads (lib/matcher_worker.js), each with its own
 * single-threaded matcher session; run(feeds) resolves to the call's scores. close() waits for
 * the calls in flight, then ends the threads (never in the middle of ONNX Runtime's work).
 */
const openPools = new Set(); // closed by closeMatchers() on Ctrl-C / SIGTERM

class MatcherPool {
  constructor(file, size) {
    openPools.add(this);
    this.closed = false;
    this.idle = [];
    this.waiting = []; // [feeds, resolve, reject]
    this.calls = new Set(); // promises of the calls not yet settled
    this.workers = Array.from({ length: size }, () => {
      const worker = new Worker(path.join(__dirname, 'matcher_worker.js'), { workerData: { file } });
      worker.ready = new Promise((resolve, reject) => {
        worker.on('message', ({ ready, sims, error }) => {
          if (ready) return resolve();
          const [done, fail] = worker.call;
          this.idle.push(worker);
          this.dispatch();
          if (error === undefined) done(sims);
          else fail(new Error(error));
        });
        worker.on('error', (e) => (worker.call ? worker.call[1](e) : reject(e)));
      });
      this.idle.push(worker);
      return worker;
    });
  }

  run(feeds) {
    const call = new Promise((resolve, reject) => {
      if (this.closed) return reject(new Error('the matcher threads were stopped'));
      this.waiting.push([feeds, resolve, reject]);
      this.dispatch();
    });
    this.calls.add(call);
    const settle = () => this.calls.delete(call);
    call.then(settle, settle);
    return call;
  }

  dispatch() {
    while (this.idle.length && this.waiting.length) {
      const worker = this.idle.pop();
      const [feeds, ...call] = this.waiting.shift();
      worker.call = call;
      worker.postMessage(feeds);
    }
  }

  async close() {
    if (!this.closing) {
      this.closed = true;
      for (const [, , reject] of this.waiting.splice(0)) reject(new Error('the matcher threads were stopped'));
      this.closing = Promise.allSettled([...this.calls, ...this.workers.map((w) => w.ready)])
        .then(() => Promise.all(this.workers.map((w) => w.terminate())))
        .then(() => openPools.delete(this));
    }
    return this.closing;
  }
}

/** Stop every matcher thread once its call in flight is done (a thread ended in the middle of
 * ONNX Runtime's work aborts the process). */
const closeMatchers = () => Promise.all([...openPools].map((pool) => pool.close()));

const f32 = (data, dims) => new ort.Tensor('float32', data, dims);
const i64 = (values, dims) => new ort.Tensor('int64', BigInt64Array.from(values, BigInt), dims);

class Model {
  constructor(modelDir, manifest, projected, sessions) {
    this.modelDir = modelDir;
    this.pool = null; // matcher worker threads while score() runs
    this.manifest = manifest;
    this.projected = projected;
    this.sessions = sessions;
    this.imgDim = manifest.model_config.img_dim;
    this.embedSize = manifest.model_config.embed_size;
    this.hasGlobalHead = Boolean(sessions.image_global); // the global head graphs were loaded
    this.globalSize = this.hasGlobalHead ? manifest.graphs.image_global.outputs[0].shape.at(-1) : 0; // G
  }

  async run(graph, feeds) {
    const out = await this.sessions[graph].run(feeds);
    return out[this.sessions[graph].outputNames[0]];
  }

  /** region_feats (n, n_region, img_dim) Float32Array -> region_embs (n, n_region, d) Float32Array. */
  async encodeImages(feats, n, nRegion) {
    return (await this.run('image_encoder', { region_feats: f32(feats, [n, nRegion, this.imgDim]) })).data;
  }

  /** tokens: one array of ids per caption ([1, ..., 2]) -> word_embs (n_cap, n_word, d) Float32Array,
   * n_word the longest caption's length, zeros past each caption's length. */
  async encodeTokens(tokenLists) {
    const nWord = Math.max(...tokenLists.map((t) => t.length));
    const padded = tokenLists.flatMap((t) => t.concat(new Array(nWord - t.length).fill(0)));
    const out = await this.run('text_encoder', {
      tokens: i64(padded, [tokenLists.length, nWord]),
      lengths: i64(tokenLists.map((t) => t.length), [tokenLists.length]),
    });
    return out.data;
  }

  /** side 'region' (embs (n, n_region, d)) or 'word' (embs (n, n_word, d)) -> projections (n, n_item, P),
   * or null when the matcher takes none. */
  async project(side, embs, n, nItem) {
    if (!this.projected) return null;
    const name = side === 'region' ? 'region_embs' : 'word_embs';
    return (await this.run(`${side}_projection`, { [name]: f32(embs, [n, nItem, this.embedSize]) })).data;
  }

  /** The global head's vector of each image: region_embs (n, n_region, d) Float32Array -> (n, G)
   * Float32Array, l2-normalised (image_global.onnx; runtime/engine.py first_stage_vectors). */
  async imageGlobal(regionEmbs, n, nRegion) {
    this.requireGlobalHead();
    return (await this.run('image_global', { region_embs: f32(regionEmbs, [n, nRegion, this.embedSize]) })).data;
  }

  /** The global head's vector of each caption: word_embs (n, n_word, d) Float32Array (zeros past each
   * length) and lengths (one per caption) -> (n, G) Float32Array, l2-normalised (text_global.onnx). */
  async textGlobal(wordEmbs, lengths, nWord) {
    this.requireGlobalHead();
    return (await this.run('text_global', {
      word_embs: f32(wordEmbs, [lengths.length, nWord, this.embedSize]),
      lengths: i64(lengths, [lengths.length]),
    })).data;
  }

  requireGlobalHead() {
    if (!this.hasGlobalHead) {
      throw new ModelDirError(`${this.modelDir}: has no global head graphs (image_global.onnx, text_global.onnx)`);
    }
  }

  /** One matcher call: nImg images (region_embs, region_proj) x the captions of `lengths` (word_embs,
   * word_proj, padded to nWord) -> sims (nImg, n_cap) Float32Array. Keep it small: its memory is
   * nImg * n_cap * max(n_region, n_word) * 2d values. */
  async match(regionEmbs, regionProj, nImg, nRegion, wordEmbs, wordProj, lengths, nWord) {
    const nCap = lengths.length;
    const feeds = {
      region_embs: f32(regionEmbs, [nImg, nRegion, this.embedSize]),
      word_embs: f32(wordEmbs, [nCap, nWord, this.embedSize]),
      lengths: i64(lengths, [nCap]),
    };
    if (this.projected) {
      feeds.region_proj = f32(regionProj, [nImg, nRegion, regionProj.length / (nImg * nRegion)]);
      feeds.word_proj = f32(wordProj, [nCap, nWord, wordProj.length / (nCap * nWord)]);
    }
    if (!this.pool) return (await this.run('matcher', feeds)).data;
    const plain = {}; // to a worker: each array copied out of the larger one it may be a view of
    for (const [name, t] of Object.entries(feeds)) plain[name] = { type: t.type, data: t.data.slice(), dims: t.dims };
    return this.pool.run(plain);
  }

  /**
   * Every image against every caption: features (an openNpy array, (n_img, n_region, img_dim)) x
   * tokenLists (one [1, ids..., 2] per caption) -> sims (n_img * n_cap) Float32Array, row-major.
   * Tiled as runtime.score tiles (tiling is optional: it changes nothing but memory and speed):
   * captions sorted by length (longest first) into shards of `step`, each padded to its own
   * longest and encoded once; images read a group at a time, encoded and projected, and every
   * group x caption shard scored in matcher calls of `step` images x `step` captions, run side by
   * side on one worker thread per CPU (each call on one thread, as runtime/scorer.py runs them;
   * the scores are those of calls on the main thread, bit for bit) while the next caption shard is
   * projected. check(block, firstImage, captionIndices) is called on each call's scores (e.g. to
   * refuse NaN), then progress(calls done, calls in all).
   */
  async score(features, tokenLists, check = () => {}, progress = () => {}) {
    const cpus = os.availableParallelism ? os.availableParallelism() : os.cpus().length;
    if (cpus > 1) this.pool = new MatcherPool(path.join(this.modelDir, this.manifest.graphs.matcher.file), cpus);
    try {
      return await this.scoreTiles(features, tokenLists, check, progress);
    } finally {
      if (this.pool) await this.pool.close();
      this.pool = null;
    }
  }

  async scoreTiles(features, tokenLists, check, progress) {
    const [nImg, nRegion] = features.shape;
    const nCap = tokenLists.length;
    const d = this.embedSize;
    const step = shardSize(nRegion, Math.max(...tokenLists.map((t) => t.length)), d);
    const order = tokenLists.map((t, j) => j).sort((a, b) => tokenLists[b].length - tokenLists[a].length || a - b);
    const shards = [];
    for (let s = 0; s < nCap; s += step) {
      const idx = order.slice(s, s + step);
      const lists = idx.map((j) => tokenLists[j]);
      shards.push({ idx, lengths: lists.map((t) => t.length), nWord: lists[0].length, embs: await this.encodeTokens(lists) });
    }
    const perImage = 4 * nRegion * (this.imgDim + d + (this.projected ? 4 * d : 0));
    const group = Math.max(step, Math.floor(Math.min(1024, Math.floor(GROUP_BYTES / perImage)) / step) * step);
    const sims = new Float32Array(nImg * nCap);
    const total = shards.length * (Math.floor(nImg / group) * Math.ceil(group / step) + Math.ceil((nImg % group) / step));
    let done = 0;
    for (let g = 0; g < nImg; g += group) {
      const n = Math.min(group, nImg - g);
      const embs = new Float32Array(n * nRegion * d);
      for (let i = 0; i < n; i += step) { // encode `step` images at a time
        const m = Math.min(step, n - i);
        embs.set(await this.encodeImages(features.rows(g + i, g + i + m), m, nRegion), i * nRegion * d);
      }
      const proj = await this.project('region', embs, n, nRegion);
      const P = proj ? proj.length / (n * nRegion) : 0;
      const collect = async ({ shard, calls }) => { // a shard's calls, as they finish, into sims
        for (const [i, call] of calls) {
          const block = await call;
          check(block, g + i, shard.idx);
          for (let r = 0; r < block.length / shard.idx.length; r++) {
            shard.idx.forEach((j, c) => { sims[(g + i + r) * nCap + j] = block[r * shard.idx.length + c]; });
          }
          progress(++done, total);
        }
      };
      let running = null; // the previous shard's calls: the next shard is projected while they run
      for (const shard of shards) {
        const wordProj = await this.project('word', shard.embs, shard.idx.length, shard.nWord);
        const calls = [];
        for (let i = 0; i < n; i += step) {
          const m = Math.min(step, n - i);
          const rows = (a, size) => a && a.subarray(i * nRegion * size, (i + m) * nRegion * size);
          const call = this.match(rows(embs, d), rows(proj, P), m, nRegion, shard.embs, wordProj, shard.lengths, shard.nWord);
          call.catch(() => {}); // a failure is seen where it is awaited; later ones are not left unhandled
          calls.push([i, call]);
        }
        if (running) await collect(running);
        running = { shard, calls };
      }
      await collect(running);
    }
    return sims;
  }
}

/**
 * Load a model folder: manifest checked and every file verified (readManifest), then one ONNX
 * Runtime session per graph on the CPU. The matcher runs on one thread (as runtime/engine.py runs
 * each matcher call; idle threads spinning for work only burn the time of the busy one), the other
 * graphs on ONNX Runtime's default threads, which sleep when idle.
 */
async function loadModel(modelDir, { supportedVersions = [3] } = {}) {
  const { manifest, projected, globalHead } = readManifest(modelDir, supportedVersions);
  const sessions = {};
  for (const g of GRAPHS.concat(projected ? PROJECTIONS : [], globalHead ? GLOBAL_GRAPHS : [])) {
    const spec = manifest.graphs[g];
    const file = path.join(modelDir, spec.file);
    const threads = g === 'matcher' ? { intraOpNumThreads: 1 } : { extra: { session: { intra_op: { allow_spinning: '0' } } } };
    try {
      sessions[g] = await ort.InferenceSession.create(file, { executionProviders: ['cpu'], logSeverityLevel: 4, ...threads });
    } catch (e) {
      throw new ModelDirError(`${file}: ONNX Runtime cannot load it (${String(e.message).split('\n')[0]})`);
    }
    const names = (spec.inputs || []).map((i) => i.name);
    if (JSON.stringify(names) !== JSON.stringify(sessions[g].inputNames)) {
      throw new ModelDirError(`${file}: inputs ${JSON.stringify(sessions[g].inputNames)} differ from the manifest's`);
    }
  }
  const cfg = manifest.model_config; // the manifest's sizes are the graphs' own
  const sizes = [['img_dim', sessions.image_encoder.inputMetadata[0]], ['embed_size', sessions.text_encoder.outputMetadata[0]]];
  for (const [key, meta] of sizes) {
    if (meta.shape.at(-1) !== cfg[key]) {
      throw new ModelDirError(`${path.join(modelDir, 'manifest.json')}: model_config.${key} ${cfg[key]} differs from ` +
        `${manifest.graphs[key === 'img_dim' ? 'image_encoder' : 'text_encoder'].file}'s ${meta.shape.at(-1)}`);
    }
  }
  return new Model(modelDir, manifest, projected, sessions);
}

module.exports = { loadModel, readManifest, shardSize, closeMatchers, ModelDirError, Model };
