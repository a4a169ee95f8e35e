"""The owned tokeniser against the pinned nltk and the Node client, at scale.

    python benchmarks/tokenizer_fuzz.py [--n 100000] [--seed 1] [--no-node] [--npm-cache DIR] [--fetch-emoji]

Tokenises with runtime.text (the rules of runtime/tokenizer.json), with the pinned nltk's
``word_tokenize(caption.lower(), preserve_line=True)`` and with clients/node/lib/tokenizer.js (one
node process over all captions), and compares tokens and ids (a vocabulary of the words nltk gives
the first half of the captions, so most ids are not <unk>). Caption sets: --n fuzz captions of
tests/tokenizer_fuzz.py (seeded; per kind), export/awkward_captions.json, every caption of the
built-in synthetic set (made at img_dim 4: the captions of ``python -m imram_min.data synthetic``), and
every emoji caption (imram_min.data.emoji, from the npm tarballs in --npm-cache, by default its cache
folder; with --fetch-emoji fetched there with npm first, else skipped when they are not there).
Prints per set and kind: captions, how many differ
(Python vs nltk, Node vs Python), seconds. Exit status 1 if any differ.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

from runtime.text import RULES_FILE, Vocabulary, tokenize  # noqa: E402
from tokenizer_fuzz import fuzz_cases, nltk_tokenize  # noqa: E402

NODE_SCRIPT = """
const t = require(process.argv[1]).loadRules(process.argv[2]);
const fs = require('fs');
const { captions, vocab } = JSON.parse(fs.readFileSync(process.argv[3], 'utf8'));
const word2idx = new Map(Object.entries(vocab));
const start = process.hrtime.bigint();
const tokens = captions.map((c) => t.tokenize(c));
const ids = captions.map((c) => t.encode(c, word2idx));
const seconds = Number(process.hrtime.bigint() - start) / 1e9;
fs.writeFileSync(process.argv[4], JSON.stringify({ tokens, ids, seconds }));
"""


def synthetic_captions() -> list[str]:
    from imram_min.data.synthetic import make_synthetic
    with tempfile.TemporaryDirectory() as folder:
        make_synthetic(folder, img_dim=4)
        return [line for split in ("train", "dev", "test")
                for line in open(os.path.join(folder, f"{split}_caps.txt"), encoding="utf-8").read().splitlines()]


def emoji_captions(cache: str, fetch: bool = False) -> list[str] | None:
    from imram_min.data.emoji import (PACKAGES, emoji_captions as captions_of, fetch_package, join_emoji, read_json_member,
                                 tarball_name)
    paths = {spec: fetch_package(spec, cache) if fetch else os.path.join(cache, tarball_name(spec)) for spec in PACKAGES}
    if not all(os.path.exists(p) for p in paths.values()):
        return None
    google, emojibase = paths["emoji-datasource-google@16.0.0"], paths["emojibase-data@17.0.0"]
    with tarfile.open(emojibase) as tar:
        base = read_json_member(tar, "package/en/data.json", emojibase)
    with tarfile.open(google) as tar:
        records = join_emoji(read_json_member(tar, "package/emoji.json", google), base)
    return [c for r in records for c in captions_of(r, 0)]


def run_node(captions: list[str], vocab: Vocabulary) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        src, out = os.path.join(folder, "in.json"), os.path.join(folder, "out.json")
        with open(src, "w", encoding="utf-8") as f:
            json.dump({"captions": captions, "vocab": vocab.word2idx}, f)
        subprocess.run(["node", "-e", NODE_SCRIPT, os.path.join(ROOT, "clients", "node", "lib", "tokenizer.js"),
                        RULES_FILE, src, out], check=True)
        with open(out, encoding="utf-8") as f:
            return json.load(f)


def compare(name: str, kinds: list[str], captions: list[str], node: bool, examples: int = 3) -> int:
    t0 = time.perf_counter()
    ours = [tokenize(c) for c in captions]
    t_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    oracle = [nltk_tokenize(c) for c in captions]
    t_nltk = time.perf_counter() - t0
    vocab = Vocabulary.from_token_lists(oracle[: len(oracle) // 2], threshold=1)
    ids = [vocab.encode(c) for c in captions]
    oracle_ids = [[1] + [vocab(w) for w in words] + [2] for words in oracle]
    nodes = run_node(captions, vocab) if node else None
    rows = collections.defaultdict(lambda: [0, 0, 0])  # kind -> captions, Python != nltk, Node != Python
    shown = 0
    for i, (kind, caption) in enumerate(zip(kinds, captions)):
        row = rows[kind]
        row[0] += 1
        if ours[i] != oracle[i] or ids[i] != oracle_ids[i]:
            row[1] += 1
            if shown < examples:
                shown += 1
                print(f"  differs from nltk ({kind}): {caption!r}\n    rules {ours[i]}\n    nltk  {oracle[i]}")
        if nodes is not None and (nodes["tokens"][i] != ours[i] or nodes["ids"][i] != ids[i]):
            row[2] += 1
            if shown < examples:
                shown += 1
                print(f"  Node differs ({kind}): {caption!r}\n    node   {nodes['tokens'][i]}\n    python {ours[i]}")
    node_note = f", node {nodes['seconds']:.1f} s" if nodes else ", node not run"
    print(f"{name}: {len(captions)} captions; python rules {t_ours:.1f} s, nltk {t_nltk:.1f} s{node_note}")
    print(f"  {'kind':<14} {'captions':>9} {'python!=nltk':>13} {'node!=python':>13}")
    for kind, (n, bad_nltk, bad_node) in sorted(rows.items()):
        print(f"  {kind:<14} {n:>9} {bad_nltk:>13} {bad_node if nodes else '-':>13}")
    total = [sum(r[k] for r in rows.values()) for k in range(3)]
    print(f"  {'all':<14} {total[0]:>9} {total[1]:>13} {total[2] if nodes else '-':>13}")
    return total[1] + total[2]


def main(argv=None) -> int:
    from imram_min.data.emoji import default_cache_dir
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=100_000, help="fuzz captions (default: %(default)s)")
    p.add_argument("--seed", type=int, default=1, help="fuzz seed (default: %(default)s)")
    p.add_argument("--no-node", action="store_true", help="do not run the Node tokeniser")
    p.add_argument("--npm-cache", default=default_cache_dir(), help="folder of the emoji npm tarballs")
    p.add_argument("--fetch-emoji", action="store_true", help="fetch the emoji npm tarballs (npm pack) if missing")
    args = p.parse_args(argv)
    node = not args.no_node and shutil.which("node") is not None
    import nltk
    import regex
    print(f"nltk {nltk.__version__}, regex {regex.__version__}, Python {sys.version.split()[0]}; "
          f"rules {RULES_FILE}")
    bad = 0
    cases = fuzz_cases(args.n, seed=args.seed)
    bad += compare("fuzz", [k for k, _ in cases], [c for _, c in cases], node)
    with open(os.path.join(ROOT, "export", "awkward_captions.json"), encoding="utf-8") as f:
        awkward = json.load(f)
    bad += compare("awkward", ["awkward"] * len(awkward), awkward, node)
    synthetic = synthetic_captions()
    bad += compare("synthetic", ["synthetic"] * len(synthetic), synthetic, node)
    emoji = emoji_captions(args.npm_cache, args.fetch_emoji)
    if emoji is None:
        print(f"emoji: skipped (no npm tarballs in {args.npm_cache}; python -m imram_min.data emoji fetches them)")
    else:
        bad += compare("emoji", ["emoji"] * len(emoji), emoji, node)
    print("all agree" if bad == 0 else f"{bad} differ")
    return 0 if bad == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
