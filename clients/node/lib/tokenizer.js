'use strict';
// The tokeniser of a model folder, read from MODEL_DIR/tokenizer.json: the same rules, the same
// tokens and ids as runtime/text.py (docs/tokenizer.md). Standard library only.
//
//   const tokenizer = require('./lib/tokenizer');
//   const rules = tokenizer.load(MODEL_DIR);          // or load(MODEL_DIR, manifest)
//   rules.tokenize('A dog.')                           // -> ['a', 'dog', '.']
//   rules.encode('A dog.', vocab.word2idx)             // -> [1, id('a'), id('dog'), id('.'), 2]
//
// A rules file is: a lower-case table (plus Unicode's final-sigma rule), character classes as code
// point ranges, ordered regex substitutions that name the classes as {:name:} inside [...], and the
// class of whitespace to split on. JavaScript reads the patterns with the 'u' flag (code points, as
// Python's re); each class is written out here as \u{...} ranges.

const crypto = require('node:crypto');
const fs = require('node:fs');
const path = require('node:path');

const RULES_FORMAT = 'imram-min-tokenizer';
const KNOWN_RULES_VERSIONS = [1]; // as runtime/text.py's KNOWN_RULES_VERSIONS
const MAX_CODE_POINT = 0x10ffff;
const START = 1;
const END = 2;
const UNK = 3;
const CLASS_REF = /\{:([a-z_]+):\}/g;

/** A tokenizer.json that is unreadable, malformed or of a rules version this client does not know. */
class TokenizerError extends Error {}

/** "0041-005A 005F" -> [[0x41, 0x5a], [0x5f, 0x5f]], sorted. */
function codePointRanges(spec, where) {
  if (typeof spec !== 'string') throw new TokenizerError(`${where}: expected a string of code point ranges`);
  const out = [];
  for (const item of spec.split(/[ \t\n\r]+/).filter(Boolean)) {
    const m = /^([0-9A-Fa-f]{1,6})(?:-([0-9A-Fa-f]{1,6}))?$/.exec(item);
    const a = m ? parseInt(m[1], 16) : NaN;
    const b = m ? parseInt(m[2] ?? m[1], 16) : NaN;
    if (!m || !(a <= b && b <= MAX_CODE_POINT)) throw new TokenizerError(`${where}: '${item}' is not a hex code point or range`);
    out.push([a, b]);
  }
  return out.sort((x, y) => x[0] - y[0]);
}

/** Whether code point `cp` is in the sorted ranges `spans` (binary search). */
function isIn(cp, spans) {
  let lo = 0;
  let hi = spans.length - 1;
  while (lo <= hi) {
    const mid = (lo + hi) >> 1;
    if (cp < spans[mid][0]) hi = mid - 1;
    else if (cp > spans[mid][1]) lo = mid + 1;
    else return true;
  }
  return false;
}

/** Code point ranges as the body of a JavaScript character class ('u' flag). */
function classBody(spans) {
  const ch = (cp) => `\\u{${cp.toString(16)}}`;
  return spans.map(([a, b]) => (a === b ? ch(a) : `${ch(a)}-${ch(b)}`)).join('');
}

/** A rules replacement ($N: group N, 0 the whole match; $$: a dollar sign) as a list of parts:
 * strings (literal) and numbers (group numbers). */
function templateParts(replace, where) {
  const parts = [];
  let literal = '';
  for (let i = 0; i < replace.length; i++) {
    if (replace[i] !== '$') {
      literal += replace[i];
      continue;
    }
    const next = replace[i + 1];
    if (next === '$') literal += '$';
    else if (next !== undefined && next >= '0' && next <= '9') {
      if (literal) parts.push(literal);
      literal = '';
      parts.push(Number(next));
    } else throw new TokenizerError(`${where}: '$' must be followed by a digit or '$' in ${JSON.stringify(replace)}`);
    i++;
  }
  if (literal) parts.push(literal);
  return parts;
}

class Tokenizer {
  /** `rules`: the parsed tokenizer.json; `where`: its name in error messages. */
  constructor(rules, where = 'tokenizer rules') {
    const bad = (what) => new TokenizerError(`${where}: ${what}`);
    if (rules === null || typeof rules !== 'object' || rules.format !== RULES_FORMAT) {
      throw bad(`not tokeniser rules (expected a JSON object with "format": "${RULES_FORMAT}")`);
    }
    const version = rules.rules_version;
    if (!Number.isInteger(version)) throw bad(`rules_version must be an integer, got ${JSON.stringify(version)}`);
    if (!KNOWN_RULES_VERSIONS.includes(version)) {
      throw bad(`tokeniser rules version ${version} is not known to this client (it knows ${KNOWN_RULES_VERSIONS.join(', ')}): `
        + 'use an imram-min that knows it, or re-export the model with this one');
    }
    this.rulesVersion = version;
    let classes;
    let steps;
    try {
      classes = {};
      for (const [name, spec] of Object.entries(rules.classes)) classes[name] = codePointRanges(spec, `${where}: classes.${name}`);
      const lower = rules.lowercase;
      this.lowerMap = new Map();
      for (const [cp, low] of Object.entries(lower.map)) {
        this.lowerMap.set(parseInt(cp, 16), low.split(' ').map((x) => String.fromCodePoint(parseInt(x, 16))).join(''));
      }
      const sigma = lower.final_sigma;
      this.sigma = parseInt(sigma.char, 16);
      this.sigmaFinal = String.fromCodePoint(parseInt(sigma.final, 16));
      this.lowerMap.set(this.sigma, String.fromCodePoint(parseInt(sigma.other, 16)));
      this.caseIgnorable = codePointRanges(sigma.case_ignorable, `${where}: final_sigma.case_ignorable`);
      this.cased = codePointRanges(sigma.cased, `${where}: final_sigma.cased`);
      steps = Array.from(rules.steps);
    } catch (e) {
      if (e instanceof TokenizerError) throw e;
      throw bad(`malformed rules (${e.message})`);
    }
    const bodies = {};
    for (const [name, spans] of Object.entries(classes)) bodies[name] = classBody(spans);
    const expand = (pattern, what) => pattern.replace(CLASS_REF, (_, name) => {
      if (!Object.hasOwn(bodies, name)) throw bad(`${what} names the class '${name}', which classes does not define`);
      return bodies[name];
    });
    this.steps = steps.map((step, i) => {
      const what = `steps[${i}]`;
      if (step === null || typeof step !== 'object' || !['sub', 'pad'].includes(step.op)) {
        throw bad(`${what} must be an object with "op": "sub" or "pad"`);
      }
      if (step.op === 'pad') {
        if (typeof step.text !== 'string') throw bad(`${what}: "pad" needs a "text"`);
        return { pad: step.text };
      }
      if (typeof step.pattern !== 'string' || typeof step.replace !== 'string') {
        throw bad(`${what}: "sub" needs a "pattern" and a "replace"`);
      }
      let regex;
      try {
        regex = new RegExp(expand(step.pattern, what), 'gu');
      } catch (e) {
        if (e instanceof TokenizerError) throw e;
        throw bad(`${what}: pattern does not compile (${e.message})`);
      }
      const parts = templateParts(step.replace, `${where}: ${what}`);
      const groups = new RegExp(`${regex.source}|`, 'u').exec('').length - 1;
      if (parts.some((p) => typeof p === 'number' && p > groups)) {
        throw bad(`${what}: the replacement refers to a group the pattern does not have`);
      }
      // replace() calls this with (match, group 1, ..., group n, offset, string)
      const replacer = (...args) => parts.map((p) => (typeof p === 'number' ? args[p] ?? '' : p)).join('');
      return { regex, replacer };
    });
    if (typeof rules.split !== 'string' || !Object.hasOwn(bodies, rules.split)) {
      throw bad(`split must name a class, got ${JSON.stringify(rules.split)}`);
    }
    this.words = new RegExp(`[^${bodies[rules.split]}]+`, 'gu');
  }

  /** Whether the capital sigma at cps[i] is word-final (Unicode's Final_Sigma, as CPython): a
   * cased letter before it and none after it, case-ignorable characters skipped. */
  isFinal(cps, i) {
    let j = i - 1;
    while (j >= 0 && isIn(cps[j], this.caseIgnorable)) j--;
    if (j < 0 || !isIn(cps[j], this.cased)) return false;
    j = i + 1;
    while (j < cps.length && isIn(cps[j], this.caseIgnorable)) j++;
    return j === cps.length || !isIn(cps[j], this.cased);
  }

  /** `text` lower-cased by the rules (the table, then the final-sigma rule). Not String.toLowerCase:
   * that follows the Unicode version of this Node, the rules one fixed version. */
  lower(text) {
    const cps = Array.from(text, (c) => c.codePointAt(0));
    let out = '';
    for (let i = 0; i < cps.length; i++) {
      const cp = cps[i];
      if (cp === this.sigma && this.isFinal(cps, i)) out += this.sigmaFinal;
      else {
        const low = this.lowerMap.get(cp);
        out += low === undefined ? String.fromCodePoint(cp) : low;
      }
    }
    return out;
  }

  /** Caption -> tokens (lower-cased words and punctuation), as runtime.text's Tokenizer.tokenize. */
  tokenize(caption) {
    let text = this.lower(caption);
    for (const step of this.steps) {
      text = step.pad !== undefined ? step.pad + text + step.pad : text.replace(step.regex, step.replacer);
    }
    return text.match(this.words) || [];
  }

  /** Caption -> [<start>=1, ids..., <end>=2], unknown words <unk>=3, as runtime.text's Vocabulary.encode.
   * `vocab`: the vocabulary's word2idx (a plain object as in vocab.json, or a Map). */
  encode(caption, vocab) {
    const id = vocab instanceof Map
      ? (w) => (vocab.has(w) ? vocab.get(w) : UNK)
      : (w) => (Object.hasOwn(vocab, w) ? vocab[w] : UNK);
    return [START, ...this.tokenize(caption).map(id), END];
  }
}

/** Read a tokenizer.json. TokenizerError naming the file. */
function loadRules(file) {
  let rules;
  try {
    rules = JSON.parse(fs.readFileSync(file, 'utf8'));
  } catch (e) {
    if (e.code === 'ENOENT') throw new TokenizerError(`${file}: no such file`);
    throw new TokenizerError(`${file}: cannot read the tokeniser rules (${e.message})`);
  }
  return new Tokenizer(rules, file);
}

function sha256(file) {
  return crypto.createHash('sha256').update(fs.readFileSync(file)).digest('hex');
}

/** The tokeniser of a model folder: MODEL_DIR/tokenizer.json as its manifest names it (read from
 * MODEL_DIR/manifest.json unless given), its SHA-256 and rules version checked against the manifest.
 * A folder without one (format 2, from before the tokeniser was owned) is refused: re-export it. */
function load(modelDir, manifest) {
  const manifestFile = path.join(modelDir, 'manifest.json');
  if (manifest === undefined) {
    try {
      manifest = JSON.parse(fs.readFileSync(manifestFile, 'utf8'));
    } catch (e) {
      if (e.code === 'ENOENT') throw new TokenizerError(`${manifestFile}: missing; not a model folder written by python -m export`);
      throw new TokenizerError(`${manifestFile}: cannot read the manifest (${e.message})`);
    }
  }
  const entry = manifest && manifest.tokenizer;
  if (!entry) {
    throw new TokenizerError(`${manifestFile}: the model folder has no tokenizer.json (format ${manifest && manifest.format_version}, `
      + 'from before the tokeniser rules were part of a model folder): re-export it with python -m export');
  }
  if (typeof entry.file !== 'string' || path.basename(entry.file) !== entry.file || !Number.isInteger(entry.rules_version)) {
    throw new TokenizerError(`${manifestFile}: tokenizer must be {"file": file name, "rules_version": integer}`);
  }
  if (!KNOWN_RULES_VERSIONS.includes(entry.rules_version)) {
    throw new TokenizerError(`${manifestFile}: tokeniser rules version ${entry.rules_version} is not known to this client `
      + `(it knows ${KNOWN_RULES_VERSIONS.join(', ')}): use an imram-min that knows it, or re-export the model with this one`);
  }
  const file = path.join(modelDir, entry.file);
  const listed = manifest.files && Object.hasOwn(manifest.files, entry.file) ? manifest.files[entry.file].sha256 : undefined;
  if (typeof listed !== 'string') throw new TokenizerError(`${manifestFile}: lists no hash for ${entry.file}`);
  let digest;
  try {
    digest = sha256(file);
  } catch (e) {
    if (e.code === 'ENOENT') throw new TokenizerError(`${file}: missing from the model folder`);
    throw new TokenizerError(`${file}: cannot read (${e.message})`);
  }
  if (digest !== listed) {
    throw new TokenizerError(`${file}: SHA-256 ${digest.slice(0, 12)}... does not match the manifest (${listed.slice(0, 12)}...); `
      + 'the file was changed or damaged');
  }
  const tokenizer = loadRules(file);
  if (tokenizer.rulesVersion !== entry.rules_version) {
    throw new TokenizerError(`${file}: rules version ${tokenizer.rulesVersion}, the manifest says ${entry.rules_version}`);
  }
  return tokenizer;
}

module.exports = { Tokenizer, TokenizerError, load, loadRules, KNOWN_RULES_VERSIONS, START, END, UNK };
