#!/usr/bin/env node
'use strict';
// Print each caption's token ids, as a model folder's tokeniser and vocabulary make them:
//
//   node clients/node/tokenize.js MODEL_DIR CAPTIONS.txt [--tokens]
//
// One JSON array a line, one line per caption: [<start>=1, word ids..., <end>=2], <unk>=3 for a word
// not in the vocabulary; with --tokens the words themselves. The same bytes as
// `python -m runtime.tokenize MODEL_DIR CAPTIONS.txt`. CAPTIONS.txt ("-": standard input) is read
// with runtime.score's rules (lib/captions.js). Bad input: one "error: ..." line, exit status 2.
// Standard library only (no npm packages needed).

const crypto = require('node:crypto');
const fs = require('node:fs');
const path = require('node:path');
const tokenizer = require('./lib/tokenizer');
const captions = require('./lib/captions');

const USAGE = 'usage: node clients/node/tokenize.js MODEL_DIR CAPTIONS.txt [--tokens]';

class UserError extends Error {}

/** MODEL_DIR/vocab.json's word2idx as a Map, its SHA-256 checked against the manifest. */
function loadVocab(modelDir, manifest) {
  const name = manifest.vocab && manifest.vocab.file;
  const file = path.join(modelDir, String(name));
  const listed = manifest.files && Object.hasOwn(manifest.files, name) ? manifest.files[name].sha256 : undefined;
  let bytes;
  try {
    bytes = fs.readFileSync(file);
  } catch (e) {
    throw new UserError(`${file}: ${e.code === 'ENOENT' ? 'missing from the model folder' : `cannot read (${e.message})`}`);
  }
  const digest = crypto.createHash('sha256').update(bytes).digest('hex');
  if (digest !== listed) throw new UserError(`${file}: SHA-256 ${digest.slice(0, 12)}... does not match the manifest; the file was changed or damaged`);
  const word2idx = JSON.parse(bytes.toString('utf8')).word2idx;
  return new Map(Object.entries(word2idx));
}

function parseArgs(argv) {
  const positional = [];
  let tokens = false;
  for (const arg of argv) {
    if (arg === '--tokens') tokens = true;
    else if (arg === '-h' || arg === '--help') {
      process.stdout.write(`${USAGE}\n`);
      process.exit(0);
    } else if (arg.startsWith('--')) throw new UserError(`unrecognized arguments: ${arg}`);
    else positional.push(arg);
  }
  if (positional.length !== 2) throw new UserError(`${USAGE.replace('usage: ', '')}: expected MODEL_DIR and CAPTIONS.txt`);
  return { modelDir: positional[0], captionsFile: positional[1], tokens };
}

function main(argv) {
  const args = parseArgs(argv);
  const manifestFile = path.join(args.modelDir, 'manifest.json');
  if (!fs.existsSync(args.modelDir) || !fs.statSync(args.modelDir).isDirectory()) {
    throw new UserError(`${args.modelDir}: no such model folder (make one with python -m export CKPT --out DIR)`);
  }
  let manifest;
  try {
    manifest = JSON.parse(fs.readFileSync(manifestFile, 'utf8'));
  } catch (e) {
    throw new UserError(e.code === 'ENOENT' ? `${manifestFile}: missing; not a model folder written by python -m export`
      : `${manifestFile}: cannot read the manifest (${e.message})`);
  }
  const rules = tokenizer.load(args.modelDir, manifest); // the model folder first, then the captions
  const vocab = loadVocab(args.modelDir, manifest);
  const texts = captions.readCaptions(args.captionsFile, rules);
  const rows = texts.map((t) => JSON.stringify(args.tokens ? rules.tokenize(t) : rules.encode(t, vocab)));
  process.stdout.on('error', (e) => { if (e.code === 'EPIPE') process.exit(1); else throw e; }); // | head
  process.stdout.write(rows.map((r) => `${r}\n`).join(''));
}

if (require.main === module) {
  try {
    main(process.argv.slice(2));
  } catch (e) {
    if (e instanceof UserError || e instanceof tokenizer.TokenizerError || e instanceof captions.CaptionsError) {
      process.stderr.write(`error: ${e.message.replace(/\s*\n\s*/g, ' ')}\n`);
      process.exitCode = 2;
    } else throw e;
  }
}

module.exports = { main };
