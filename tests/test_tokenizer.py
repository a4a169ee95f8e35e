"""The owned tokeniser (runtime/text.py, runtime/tokenizer.json, docs/tokenizer.md): it reproduces the
pinned nltk, the Node client's tokeniser gives the same tokens and ids, model folders carry the rules
and the runtime refuses rules it does not know, and the runtime needs no nltk.

The full runs (>= 100,000 fuzz captions against nltk and Node, every synthetic and emoji caption):
``python benchmarks/tokenizer_fuzz.py``; here a seeded sample of the same generator.
"""
from __future__ import annotations

import ast
import contextlib
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import unicodedata

import numpy as np
import pytest

from fixtures import ROOT, assert_error_line, run_cli, tiny_checkpoint, tiny_data, tiny_model_dir  # noqa: F401
from runtime.text import (KNOWN_RULES_VERSIONS, RULES_FILE, Tokenizer, TokenizerError, Vocabulary, _code_point_ranges,
                          tokenize)
from tokenizer_fuzz import KINDS, RULES_UNICODE, fuzz_cases, nltk_tokenize

NODE = shutil.which("node")
needs_node = pytest.mark.skipif(NODE is None, reason="node is not installed")
AWKWARD = json.loads((ROOT / "export" / "awkward_captions.json").read_text(encoding="utf-8"))
N_FUZZ = 4000  # against nltk here (~4 s); benchmarks/tokenizer_fuzz.py runs 100,000
N_FUZZ_NODE = 20000  # Python against Node (~8 s)


def rules() -> dict:
    return json.loads(open(RULES_FILE, encoding="utf-8").read())


# --------------------------------------------------------------------------- the rules reproduce nltk
def test_awkward_captions_are_many_and_tokenise_as_nltk():
    assert len(AWKWARD) >= 60
    assert [tokenize(c) for c in AWKWARD] == [nltk_tokenize(c) for c in AWKWARD]


@pytest.mark.parametrize("caption,tokens", [
    ("A dog, running. I don't know.", ["a", "dog", ",", "running.", "i", "do", "n't", "know", "."]),
    ("'tis the season, 'twas cold", ["'", "tis", "the", "season", ",", "'", "twas", "cold"]),
    ("he said 'stop'", ["he", "said", "'", "stop", "'"]),
    ("a man\u2014with a hat\u2013walks", ["a", "man", "\u2014", "with", "a", "hat", "\u2013", "walks"]),
    ("'leading apostrophe", ["'", "leading", "apostrophe"]),
    ('"hi" ``x\'\'', ["``", "hi", "''", "``", "x", "''"]),
    ("gimme more'n d'ye wanna go cannot", ["gim", "me", "more", "'n", "d", "'ye", "wan", "na", "go", "can", "not"]),
    ("x \u00abq\u00bb \u201cq\u201d \u2018q\u2019", ["x", "\u00ab", "q", "\u00bb", "\u201c", "q", "\u201d", "\u2018", "q", "\u2019"]),
    ("a,\n", ["a", ","]),  # Python's $ also matches before a final newline: spelled out in the rules
    ("\u039f\u0394\u039f\u03a3 \u0391'\u03a3'", ["\u03bf\u03b4\u03bf\u03c2", "\u03b1'\u03c2", "'"]),  # final sigma
    ("\u0130stanbul", ["i\u0307stanbul"]),  # full lower-case mapping (two code points)
    ("a\x1cb wanna\x1c", ["a", "b", "wan", "na"]),  # \x1c: whitespace to re and str.split, not to regex
])
def test_rules_give_exact_tokens(caption, tokens):
    assert tokenize(caption) == tokens == nltk_tokenize(caption)


def test_rules_give_nltk_tokens_on_every_synthetic_caption(tmp_path):
    from imram_min.data.synthetic import make_synthetic
    make_synthetic(tmp_path, img_dim=4)  # the default set's captions (img_dim changes only the features)
    captions = sorted({line for split in ("train", "dev", "test")
                       for line in (tmp_path / f"{split}_caps.txt").read_text(encoding="utf-8").splitlines()})
    assert len(captions) > 1000
    assert [tokenize(c) for c in captions] == [nltk_tokenize(c) for c in captions]


def test_rules_give_nltk_tokens_on_fuzz_captions_of_every_kind():
    cases = fuzz_cases(N_FUZZ, seed=2026)
    assert {kind for kind, _ in cases} >= set(KINDS) - {"random_any"}
    differ = [(kind, c) for kind, c in cases if tokenize(c) != nltk_tokenize(c)]
    assert differ == []


def test_rules_are_frozen_at_unicode_14_where_the_engines_move_on():
    """By design the rules do not follow the running Python's or Node's Unicode tables (docs/tokenizer.md):
    U+1E4D0 (Unicode 15) is no word character for the re-engine rules, so 'cannot' still splits;
    U+A7CB (Unicode 16) has no lower-case mapping in Unicode 14, so it stays."""
    assert tokenize("cannot\U0001e4d0") == ["can", "not", "\U0001e4d0"]
    assert tokenize("\ua7cb") == ["\ua7cb"]


@pytest.mark.skipif(unicodedata.unidata_version != RULES_UNICODE,
                    reason=f"the classes were computed under Unicode {RULES_UNICODE}")
def test_classes_and_lower_case_table_are_what_the_engines_read():
    """Exhaustive: every code point, each class against the engine nltk runs that pattern on."""
    import re

    import regex
    everything = "".join(map(chr, range(0x110000)))
    tk = Tokenizer.builtin()

    def points(spec):
        return [cp for a, b in _code_point_ranges(spec, "test") for cp in range(a, b + 1)]

    classes = rules()["classes"]
    for name, pattern in [("word_regex", regex.compile(r"\w")), ("space_regex", regex.compile(r"\s")),
                          ("digit_regex", regex.compile(r"\d")), ("word_re", re.compile(r"\w")),
                          ("space_re", re.compile(r"\s"))]:
        assert points(classes[name]) == [ord(m.group()) for m in pattern.finditer(everything)], name
    assert points(classes["space_re"]) == [cp for cp in range(0x110000) if chr(cp).isspace()]
    for cp in range(0x110000):
        if cp != 0x3A3:
            assert everything[cp].translate(tk._lower) == everything[cp].lower(), hex(cp)


@pytest.mark.slow
def test_the_full_comparison_finds_no_difference(tmp_path):
    """benchmarks/tokenizer_fuzz.py: 100,000 fuzz captions, the awkward, synthetic and emoji captions
    (npm tarballs fetched), rules against nltk and Node against Python, tokens and ids (3-6 min)."""
    from imram_min.data.emoji import default_cache_dir
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "tokenizer_fuzz.py"), "--n", "100000",
                           "--fetch-emoji", "--npm-cache", default_cache_dir()], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.rstrip().endswith("all agree"), done.stdout + done.stderr
    assert "fuzz: 100000 captions" in done.stdout and "emoji: " in done.stdout and "node not run" not in done.stdout


# --------------------------------------------------------------------------- the rules file
def test_rules_file_uses_the_portable_subset_only():
    """No \\w \\s \\d \\b (each engine's own Unicode tables), no $ (Python, Java and .NET also match it
    before a final newline), no lookbehind, no inline flags, no '.'; classes only as {:name:}."""
    import re
    for step in rules()["steps"]:
        if step["op"] != "sub":
            continue
        pattern = re.sub(r"\\.", "", step["pattern"])  # escapes removed: what is left is syntax
        assert not re.search(r"\\[wWsSdDbB]", step["pattern"].replace("\\\\", "")), step
        assert "$" not in re.sub(r"\[[^\]]*\]", "", pattern), step  # a $ outside a class
        assert "(?<" not in pattern and "(?i" not in pattern and "(?s" not in pattern, step
        assert "." not in re.sub(r"\[[^\]]*\]", "", pattern), step
        assert set(re.findall(r"\{:([a-z_]+):\}", pattern)) <= set(rules()["classes"]), step


def test_tokenizer_refuses_an_unknown_rules_version_in_one_line(tmp_path):
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps({**rules(), "rules_version": max(KNOWN_RULES_VERSIONS) + 1}))
    with pytest.raises(TokenizerError) as e:
        Tokenizer.load(path)
    assert str(e.value).startswith(f"{path}: tokeniser rules version {max(KNOWN_RULES_VERSIONS) + 1} is not known")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("edit,words", [
    (lambda r: r.update(format="other"), ["not tokeniser rules"]),
    (lambda r: r.update(rules_version="1"), ["rules_version must be an integer"]),
    (lambda r: r["steps"].append({"op": "sub", "pattern": "[{:nothing:}]", "replace": "x"}), ["class 'nothing'"]),
    (lambda r: r["steps"].append({"op": "sub", "pattern": "(a", "replace": "x"}), ["does not compile"]),
    (lambda r: r["steps"].append({"op": "sub", "pattern": "(a)", "replace": "$2"}), ["group the pattern does not have"]),
    (lambda r: r["steps"].append({"op": "sub", "pattern": "a", "replace": "$x"}), ["'$' must be followed"]),
    (lambda r: r["classes"].update(word_re="ZZZZ"), ["classes.word_re", "'ZZZZ'"]),
    (lambda r: r.pop("lowercase"), ["malformed rules"]),
    (lambda r: r.update(split="nothing"), ["split must name a class"]),
])
def test_tokenizer_refuses_malformed_rules(tmp_path, edit, words):
    data = rules()
    edit(data)
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(data))
    with pytest.raises(TokenizerError) as e:
        Tokenizer.load(path)
    for word in words:
        assert word in str(e.value)


def test_nothing_outside_the_tests_imports_nltk():
    """Training, the vocabulary builder, export and the runtime use the one tokeniser (runtime.text)."""
    found = []
    for folder in ("imram_min", "export", "runtime"):
        for path in sorted((ROOT / folder).glob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module or ""] if isinstance(node, ast.ImportFrom) else []
                found += [(path.name, n) for n in names if n.split(".")[0] in ("nltk", "regex")]
    assert found == []


# --------------------------------------------------------------------------- checkpoints and model folders
def test_checkpoint_records_the_rules_version(tiny_checkpoint):  # noqa: F811
    from imram_min.engineering.checkpoint import load_checkpoint
    assert load_checkpoint(tiny_checkpoint)["tokenizer"] == {"rules_version": Tokenizer.builtin().rules_version}


def test_export_refuses_a_checkpoint_trained_with_other_rules(tiny_checkpoint, tmp_path):  # noqa: F811
    import torch

    from export.onnx_export import ExportSettingsError, export_checkpoint
    from imram_min.engineering.checkpoint import load_checkpoint
    ckpt = load_checkpoint(tiny_checkpoint)
    ckpt["tokenizer"] = {"rules_version": 99}
    torch.save(ckpt, tmp_path / "other.pt")
    with pytest.raises(ExportSettingsError, match="trained with tokeniser rules version 99"):
        export_checkpoint(tmp_path / "other.pt", tmp_path / "m", verify=False)
    assert not (tmp_path / "m").exists()


def test_model_folder_holds_the_rules_and_the_manifest_their_version(tiny_model_dir):  # noqa: F811
    manifest = json.loads((tiny_model_dir / "manifest.json").read_text())
    assert manifest["format_version"] == 3
    assert manifest["tokenizer"] == {"file": "tokenizer.json", "rules_version": 1}
    data = (tiny_model_dir / "tokenizer.json").read_bytes()
    assert data == open(RULES_FILE, "rb").read()
    assert manifest["files"]["tokenizer.json"]["sha256"] == hashlib.sha256(data).hexdigest()


def copy_model_dir(src, dst):
    shutil.copytree(src, dst)
    return dst, json.loads((dst / "manifest.json").read_text())


def write_manifest(folder, manifest):
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2))


def rehash(folder, manifest, name):
    manifest["files"][name]["sha256"] = hashlib.sha256((folder / name).read_bytes()).hexdigest()
    manifest["files"][name]["bytes"] = (folder / name).stat().st_size


def score_args(tiny_data, folder, tmp_path):  # noqa: F811
    return [tiny_data / "test_ims.npy", tiny_data / "test_caps.txt", "--model", folder, "--output", tmp_path / "s.npy"]


def test_runtime_refuses_a_manifest_with_unknown_rules_in_one_line(tiny_model_dir, tiny_data, tmp_path, capsys):  # noqa: F811
    from runtime.score import main
    folder, manifest = copy_model_dir(tiny_model_dir, tmp_path / "m")
    manifest["tokenizer"]["rules_version"] = 2
    write_manifest(folder, manifest)
    code, out, err = run_cli(main, score_args(tiny_data, folder, tmp_path), capsys)
    assert_error_line(code, out, err, ["manifest.json", "tokeniser rules version 2 is not known", "re-export"])
    assert not (tmp_path / "s.npy").exists()


def test_runtime_refuses_a_tokenizer_json_with_unknown_rules_in_one_line(tiny_model_dir, tiny_data, tmp_path, capsys):  # noqa: F811
    from runtime.score import main
    folder, manifest = copy_model_dir(tiny_model_dir, tmp_path / "m")
    (folder / "tokenizer.json").write_text(json.dumps({**rules(), "rules_version": 2}))
    rehash(folder, manifest, "tokenizer.json")
    write_manifest(folder, manifest)
    code, out, err = run_cli(main, score_args(tiny_data, folder, tmp_path), capsys)
    assert_error_line(code, out, err, ["tokenizer.json", "tokeniser rules version 2 is not known"])


def test_runtime_refuses_a_changed_tokenizer_json(tiny_model_dir, tiny_data, tmp_path, capsys):  # noqa: F811
    from runtime.score import main
    folder, _ = copy_model_dir(tiny_model_dir, tmp_path / "m")
    (folder / "tokenizer.json").write_text(json.dumps(rules()))  # same rules, other bytes: not the exported file
    code, out, err = run_cli(main, score_args(tiny_data, folder, tmp_path), capsys)
    assert_error_line(code, out, err, ["tokenizer.json", "does not match the manifest"])


def format_2_folder(tiny_model_dir, folder):  # noqa: F811
    """tiny_model_dir as the exporter wrote it before the tokeniser was owned: format 2, no tokenizer.json."""
    folder, manifest = copy_model_dir(tiny_model_dir, folder)
    (folder / "tokenizer.json").unlink()
    del manifest["tokenizer"], manifest["files"]["tokenizer.json"]
    manifest["format_version"] = 2
    write_manifest(folder, manifest)
    return folder


def test_a_format_2_folder_is_read_with_the_built_in_rules(tiny_model_dir, tiny_data, tmp_path, capsys):  # noqa: F811
    from runtime.score import main
    old = format_2_folder(tiny_model_dir, tmp_path / "old")
    assert run_cli(main, score_args(tiny_data, old, tmp_path), capsys)[0] == 0
    os.replace(tmp_path / "s.npy", tmp_path / "old.npy")
    assert run_cli(main, score_args(tiny_data, tiny_model_dir, tmp_path), capsys)[0] == 0
    assert np.array_equal(np.load(tmp_path / "old.npy"), np.load(tmp_path / "s.npy"))


def test_runtime_score_runs_without_nltk(tiny_model_dir, tiny_data, tmp_path):  # noqa: F811
    """runtime.score in a process where nltk and regex cannot be imported (a meta-path blocker in a
    sitecustomize on PYTHONPATH), on the tiny model folder: the same scores as in-process."""
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(
        "import sys, importlib.abc\n"
        "class NoNltk(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('nltk', 'regex'):\n"
        "            raise ImportError(name + ' is blocked in this test')\n"
        "sys.meta_path.insert(0, NoNltk())\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(blocker), str(ROOT)]))
    probe = subprocess.run([sys.executable, "-c", "import nltk"], env=env, capture_output=True, text=True)
    assert probe.returncode != 0 and "blocked in this test" in probe.stderr
    out = tmp_path / "sims.npy"
    done = subprocess.run([sys.executable, "-m", "runtime.score", str(tiny_data / "test_ims.npy"),
                           str(tiny_data / "test_caps.txt"), "--model", str(tiny_model_dir), "--output", str(out),
                           "--top-k", "0", "--device", "cpu"], env=env, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    from runtime.scorer import Scorer
    captions = (tiny_data / "test_caps.txt").read_text(encoding="utf-8").splitlines()
    expected = Scorer(tiny_model_dir, device="cpu", threads=1).score(np.load(tiny_data / "test_ims.npy"), captions)
    assert np.abs(np.load(out) - expected).max() <= 1e-6


# --------------------------------------------------------------------------- python -m runtime.tokenize
def write_captions(path, captions):
    path.write_text("".join(c + "\n" for c in captions), encoding="utf-8")
    return path


def tokenize_main(args, capsys):
    from runtime.tokenize import main
    return run_cli(main, args, capsys)


def test_runtime_tokenize_prints_the_ids_of_each_caption(tiny_model_dir, tmp_path, capsys):  # noqa: F811
    captions = ["A dog runs.", "a \u201cquoted\u201d caf\u00e9"]
    code, out, err = tokenize_main([tiny_model_dir, write_captions(tmp_path / "c.txt", captions)], capsys)
    vocab = Vocabulary.load(tiny_model_dir / "vocab.json")
    assert code == 0 and err == ""
    assert out == "".join(json.dumps(vocab.encode(c), separators=(",", ":")) + "\n" for c in captions)
    code, out, _ = tokenize_main([tiny_model_dir, tmp_path / "c.txt", "--tokens"], capsys)
    assert out == '["a","dog","runs","."]\n["a","\u201c","quoted","\u201d","caf\u00e9"]\n'


@pytest.mark.parametrize("content,words", [
    (b"", ["no captions (the file is empty)"]),
    (b"a dog\n\n", ["blank line 2"]),
    (b"a dog\n\xff\n", ["line 2 is not UTF-8 text (byte 1: b'\\xff')"]),
    (b"w " * 257 + b"\n", ["line 1 has 257 words"]),
    (b"w," * 200 + b"\n", ["line 1 has 400 words (tokens)"]),
])
def test_runtime_tokenize_refuses_bad_captions_in_one_line(tiny_model_dir, tmp_path, capsys, content, words):  # noqa: F811
    (tmp_path / "c.txt").write_bytes(content)
    assert_error_line(*tokenize_main([tiny_model_dir, tmp_path / "c.txt"], capsys), words)


# --------------------------------------------------------------------------- Node agrees
NODE_TOKENIZE = ("const t = require(process.argv[1]).loadRules(process.argv[2]);"
                 "const fs = require('fs');"
                 "const lines = JSON.parse(fs.readFileSync(process.argv[3], 'utf8'));"
                 "fs.writeFileSync(process.argv[4], JSON.stringify(lines.map((c) => t.tokenize(c))));")


@needs_node
def test_node_tokenizer_gives_the_python_tokens_on_fuzz_and_awkward_captions(tmp_path):
    captions = [c for _, c in fuzz_cases(N_FUZZ_NODE, seed=7)] + AWKWARD
    (tmp_path / "in.json").write_text(json.dumps(captions))
    subprocess.run([NODE, "-e", NODE_TOKENIZE, str(ROOT / "clients" / "node" / "lib" / "tokenizer.js"),
                    RULES_FILE, str(tmp_path / "in.json"), str(tmp_path / "out.json")], check=True)
    node = json.loads((tmp_path / "out.json").read_text())
    differ = [c for c, tokens in zip(captions, node) if tokens != tokenize(c)]
    assert len(node) == len(captions) and differ == []


@needs_node
def test_node_and_python_tokenize_commands_print_the_same_bytes(tiny_model_dir, tmp_path):  # noqa: F811
    captions = write_captions(tmp_path / "c.txt", [c.replace("\n", " ") for c in AWKWARD if c.strip()])
    python = subprocess.run([sys.executable, "-m", "runtime.tokenize", str(tiny_model_dir), str(captions)],
                            cwd=ROOT, capture_output=True, check=True)
    node = subprocess.run([NODE, str(ROOT / "clients" / "node" / "tokenize.js"), str(tiny_model_dir), str(captions)],
                          capture_output=True, check=True)
    assert python.stdout == node.stdout and python.stdout.count(b"\n") == len(AWKWARD)


@needs_node
@pytest.mark.parametrize("content", [b"a dog\n\n\n", b"ok\n\xe2\x82\n", b"w," * 200, b"\xef\xbb\xbf \t\n"])
def test_node_and_python_tokenize_commands_refuse_bad_captions_alike(tiny_model_dir, tmp_path, content):  # noqa: F811
    (tmp_path / "c.txt").write_bytes(content)
    args = [str(tiny_model_dir), str(tmp_path / "c.txt")]
    python = subprocess.run([sys.executable, "-m", "runtime.tokenize", *args], cwd=ROOT, capture_output=True, text=True)
    node = subprocess.run([NODE, str(ROOT / "clients" / "node" / "tokenize.js"), *args], capture_output=True, text=True)
    assert (python.returncode, python.stdout, python.stderr) == (node.returncode, node.stdout, node.stderr)
    assert python.returncode == 2 and python.stderr.startswith("error: ") and python.stderr.count("\n") == 1


@needs_node
def test_node_refuses_a_format_2_folder_saying_re_export(tiny_model_dir, tmp_path):  # noqa: F811
    old = format_2_folder(tiny_model_dir, tmp_path / "old")
    captions = write_captions(tmp_path / "c.txt", ["a dog"])
    node = subprocess.run([NODE, str(ROOT / "clients" / "node" / "tokenize.js"), str(old), str(captions)],
                          capture_output=True, text=True)
    assert node.returncode == 2 and node.stdout == ""
    assert node.stderr.startswith("error: ") and "re-export it with python -m export" in node.stderr
