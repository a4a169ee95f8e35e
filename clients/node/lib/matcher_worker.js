'use strict';
// One matcher session on a thread of its own (lib/model.js starts one per CPU, so that matcher calls
// run side by side, each on one thread, as runtime/scorer.py runs them): a call's inputs in, its
// scores out. workerData.file: matcher.onnx.
const { parentPort, workerData } = require('node:worker_threads');
const ort = require('onnxruntime-node');

const ready = ort.InferenceSession.create(workerData.file, { executionProviders: ['cpu'], logSeverityLevel: 4, intraOpNumThreads: 1 });
ready.then(() => parentPort.postMessage({ ready: true }), (e) => { throw e; });

parentPort.on('message', async (feeds) => { // {input name: {type, data, dims}}
  try {
    const session = await ready;
    const tensors = {};
    for (const [name, { type, data, dims }] of Object.entries(feeds)) tensors[name] = new ort.Tensor(type, data, dims);
    const sims = (await session.run(tensors))[session.outputNames[0]].data;
    parentPort.postMessage({ sims }, [sims.buffer]);
  } catch (e) {
    parentPort.postMessage({ error: String(e.message) });
  }
});
