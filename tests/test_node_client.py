"""The Node.js reference client (clients/node) against the Python runtime, on a tiny exported model.

  * ``node clients/node/score.js`` scores as ``python -m runtime.score`` does (max |diff| <= 1e-5,
    the same rankings) and prints exactly what runtime.score prints for its scores (text and
    JSON lines, awkward captions, Python's number formats);
  * every bad input is one ``error: ...`` line on stderr, exit status 2, nothing on stdout and no
    file written or changed; where runtime.score refuses the same input, the line is its line;
  * ``node clients/node/check.js`` passes the model folder's conformance vectors, stage by stage as
    ``python -m runtime.check`` does, and fails (exit 2) a folder whose vectors disagree;
  * the client's own tests (``node --test clients/node/test/``) pass against the tiny model
    (IMRAM_NODE_MODEL_DIR).

The client needs node and its npm packages (``npm ci --ignore-scripts`` in clients/node, which
scripts/test.sh runs); without them these tests are skipped, unless IMRAM_REQUIRE_NODE=1 (set by
scripts/test.sh), where they fail instead.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from fixtures import (IMG_DIM, ROOT, alter_array, optional_graphs_model_dir, run_cli, tiny_checkpoint,  # noqa: F401
                      tiny_data, tiny_model_dir)
from runtime.inputs import MAX_WORDS, read_captions
from runtime.score import main as score_main, print_rankings
from runtime.scorer import Scorer

NODE_DIR = ROOT / "clients" / "node"
HAVE_NODE = shutil.which("node") is not None and (NODE_DIR / "node_modules" / "onnxruntime-node").is_dir()
pytestmark = pytest.mark.skipif(not HAVE_NODE and os.environ.get("IMRAM_REQUIRE_NODE") != "1",
                                reason="node or clients/node/node_modules missing (npm ci --ignore-scripts in clients/node)")


def node(script: str, *args, **kwargs) -> subprocess.CompletedProcess:
    """``node clients/node/SCRIPT ARGS`` from the repository root (text out, 120 s at most)."""
    return subprocess.run(["node", str(NODE_DIR / script), *map(os.fspath, args)], cwd=ROOT, capture_output=True,
                           text=True, timeout=120, **kwargs)


def python_printed(sims: np.ndarray, captions: list[str], k: int, as_json: bool, model_dir) -> str:
    """What runtime.score prints for these scores of these captions with this model."""
    import io
    out = io.StringIO()
    unknown = Scorer(model_dir, device="cpu", threads=1).unknown_words(captions)
    print_rankings(sims, captions, k, as_json, out=out, unknown=unknown)
    return out.getvalue()


@pytest.fixture(scope="module")
def split(tiny_data):  # noqa: F811
    return tiny_data / "test_ims.npy", tiny_data / "test_caps.txt"


# --------------------------------------------------------------------------- scores and printing
@pytest.mark.parametrize("as_json", [False, True], ids=["text", "json"])
def test_scores_and_rankings_match_runtime_score(as_json, tiny_model_dir, split, tmp_path, capsys):  # noqa: F811
    feats, caps = split
    flags = ["--top-k", "3"] + (["--json"] if as_json else [])
    code, py_out, err = run_cli(score_main, [feats, caps, "--model", tiny_model_dir, "--output", tmp_path / "py.npy",
                                             "--quiet", *flags], capsys)
    assert code == 0, err
    result = node("score.js", tiny_model_dir, feats, caps, "--output", tmp_path / "node.npy", *flags)
    assert result.returncode == 0 and result.stderr == err, result.stderr  # notes of unknown words alike
    py_sims, node_sims = np.load(tmp_path / "py.npy"), np.load(tmp_path / "node.npy")
    assert node_sims.dtype == np.float32 and node_sims.shape == py_sims.shape == (6, 30)
    assert np.abs(node_sims - py_sims).max() <= 1e-5
    # the same rankings: each image's top captions and each caption's top images, by index
    if as_json:
        def tops(text):
            return [[m.get("caption", m.get("image")) for m in json.loads(line)["top"]] for line in text.splitlines()]
        assert tops(result.stdout) == tops(py_out)
    # and exactly what runtime.score prints for the client's scores
    assert result.stdout == python_printed(node_sims, read_captions(os.fspath(caps)), 3, as_json, tiny_model_dir)


@pytest.mark.parametrize("as_json", [False, True], ids=["text", "json"])
def test_awkward_captions_are_read_and_printed_as_runtime_score_does(as_json, tiny_model_dir, split, tmp_path):  # noqa: F811
    awkward = json.loads((ROOT / "export" / "awkward_captions.json").read_text(encoding="utf-8"))
    lines = [c for c in awkward if "\n" not in c and c.strip() and len(c.split()) <= MAX_WORDS]
    caps = tmp_path / "caps.txt"
    caps.write_bytes(("\ufeff" + "\n".join(lines) + "\n").encode())  # a BOM, as an editor may write
    flags = ["--top-k", "2", "--output", tmp_path / "sims.npy"] + (["--json"] if as_json else [])
    result = node("score.js", tiny_model_dir, split[0], caps, *flags)
    assert result.returncode == 0, result.stderr
    expected = python_printed(np.load(tmp_path / "sims.npy"), read_captions(os.fspath(caps)), 2, as_json, tiny_model_dir)
    assert result.stdout == expected


def test_an_existing_output_is_replaced_with_overwrite(tiny_model_dir, split, tmp_path):  # noqa: F811
    out = tmp_path / "sims.npy"
    out.write_text("old")
    result = node("score.js", tiny_model_dir, *split, "--output", out, "--overwrite", "--top-k", "0")
    assert result.returncode == 0, result.stderr
    assert np.load(out).shape == (6, 30) and sorted(p.name for p in tmp_path.iterdir()) == ["sims.npy"]


def test_numbers_are_formatted_as_python_formats_them():
    rng = np.random.default_rng(0)
    values = np.concatenate([
        rng.standard_normal(2000) * 10.0 ** rng.integers(-12, 22, 2000),  # every notation of repr
        np.arange(-300, 300) / 128,  # odd multiples of 1/128: ties at the 7th decimal, rounded to even
        [0.0, -0.0, 1e-4, 9.999999e-5, 1e16, 9.999999e15, 0.5, -0.5, 1e-45, 3.4028235e38, -1e-9, 123456.7]]
    ).astype(np.float32)
    script = ("const s = require('./clients/node/score.js'); const xs = JSON.parse(require('fs').readFileSync(0, 'utf8'));"
              "console.log(JSON.stringify([xs.map(s.fixed6), xs.map(s.pyFloat)]))")
    result = subprocess.run(["node", "-e", script], cwd=ROOT, input=json.dumps([float(x) for x in values]),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    fixed, reprs = json.loads(result.stdout)
    assert fixed == [f"{x:.6f}" for x in values]
    assert reprs == [repr(float(x)) for x in values]


# --------------------------------------------------------------------------- bad input
def _npy(folder: Path, name: str, array: np.ndarray, **kwargs) -> Path:
    np.save(folder / name, array, **kwargs)
    return folder / name


def _feats(n: int = 3) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((n, 4, IMG_DIM)).astype(np.float32)


def _altered(model: Path, name: str, edit) -> Path:
    """The model copy with ``name``'s bytes edited (the manifest's hash left as it was)."""
    path = model / name
    path.write_bytes(edit(path.read_bytes()))
    return model


# name: (make(folder, feats, caps, model) -> score.js's arguments (model, images, captions, flags), words the line holds,
#        whether runtime.score refuses the same input with the same line)
BAD = {
    "missing_model_folder": (lambda d, f, c, m: (d / "nope", f, c), ["nope", "no such model folder"], True),
    "model_file_altered": (lambda d, f, c, m: (_altered(m, "matcher.onnx", lambda b: b[:-1] + bytes([b[-1] ^ 1])), f, c),
                           ["matcher.onnx", "SHA-256", "changed or damaged"], True),
    "manifest_format_version_99": (lambda d, f, c, m: (_altered(m, "manifest.json", lambda b: json.dumps(
        {**json.loads(b), "format_version": 99}).encode()), f, c), ["manifest.json", "format version 99"], False),
    "missing_features": (lambda d, f, c, m: (m, d / "none.npy", c), ["none.npy", "no such file"], False),
    "features_not_npy": (lambda d, f, c, m: (m, (d / "x.npy").write_text("hello") and d / "x.npy", c),
                         ["x.npy", "not a .npy file"], True),
    "features_pickled": (lambda d, f, c, m: (m, _npy(d, "o.npy", np.array([{}, 1], dtype=object), allow_pickle=True), c),
                         ["o.npy", "pickled Python objects"], True),
    "features_fortran_order": (lambda d, f, c, m: (m, _npy(d, "f.npy", np.asfortranarray(_feats())), c),
                               ["f.npy", "Fortran order"], False),
    "features_2d": (lambda d, f, c, m: (m, _npy(d, "2d.npy", _feats()[0]), c), ["2d.npy", "expected shape"], True),
    "features_of_another_size": (lambda d, f, c, m: (m, _npy(d, "s.npy", _feats()[..., :5]), c),
                                 ["s.npy", "size 5", f"expects {IMG_DIM}"], True),
    "features_with_nan": (lambda d, f, c, m: (m, _npy(d, "n.npy", np.where(np.arange(3)[:, None, None] == 1, np.nan,
                                                                          _feats())), c), ["n.npy", "image 1", "NaN"], True),
    "features_of_3e38": (lambda d, f, c, m: (m, _npy(d, "b.npy", np.full((2, 4, IMG_DIM), 3e38, np.float32)), c),
                         ["b.npy", "image 0", "magnitude 3e+38", "overflow"], True),
    "missing_captions": (lambda d, f, c, m: (m, f, d / "none.txt"), ["none.txt", "no such file"], True),
    "blank_caption_line": (lambda d, f, c, m: (m, f, (d / "b.txt").write_text("w1 w2\n\nw3\n") and d / "b.txt"),
                           ["b.txt", "blank line 2"], True),
    "empty_captions": (lambda d, f, c, m: (m, f, (d / "e.txt").write_text("") or d / "e.txt"), ["e.txt", "no captions"],
                       True),
    "captions_not_utf8": (lambda d, f, c, m: (m, f, (d / "u.txt").write_bytes(b"w1\nw2 \xff\n") and d / "u.txt"),
                          ["u.txt", "line 2", "not UTF-8"], True),
    "caption_over_max_words": (lambda d, f, c, m: (m, f, (d / "l.txt").write_text("w1 " * (MAX_WORDS + 1)) and d / "l.txt"),
                               ["l.txt", "line 1", f"{MAX_WORDS + 1} words"], True),
    "output_is_the_features": (lambda d, f, c, m: (m, f, c, "--output", f), ["--output", "is the input", "feats.npy"],
                               True),
    "output_is_a_model_file": (lambda d, f, c, m: (m, f, c, "--output", m / "vocab.json"), ["is the input", "vocab.json"],
                               True),
    "output_in_a_missing_folder": (lambda d, f, c, m: (m, f, c, "--output", d / "no" / "s.npy"), ["does not exist"], True),
    "output_exists_without_overwrite": (lambda d, f, c, m: (m, f, c, "--output", (d / "old.npy").write_text("old") and
                                                            d / "old.npy"),
                                        ["--output", "old.npy", "already exists: add --overwrite to replace it"], True),
    "unknown_flag": (lambda d, f, c, m: (m, f, c, "--frobnicate"), ["unrecognized arguments", "--frobnicate"], False),
    "top_k_negative": (lambda d, f, c, m: (m, f, c, "--top-k", "-1"), ["--top-k must be >= 0, got -1"], False),
    "top_k_not_a_number": (lambda d, f, c, m: (m, f, c, "--top-k", "x"), ["--top-k", "invalid int value: 'x'"], False),
    "top_k_without_value": (lambda d, f, c, m: (m, f, c, "--top-k"), ["--top-k", "expected one argument"], False),
    "a_missing_argument": (lambda d, f, c, m: (m, f), ["required", "CAPTIONS.txt"], False),
}


def _snapshot(folder: Path) -> dict:
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_error_line_and_writes_nothing(case, tiny_model_dir, tmp_path, capsys):  # noqa: F811
    make, words, as_python = BAD[case]
    folder = tmp_path / "case"
    folder.mkdir()
    feats, caps = _npy(folder, "feats.npy", _feats()), folder / "caps.txt"
    caps.write_text("w1 w2 w3\nw4 w5\n")
    model = Path(shutil.copytree(tiny_model_dir, folder / "model"))
    args = list(make(folder, feats, caps, model))  # MODEL_DIR IMAGES CAPTIONS FLAGS
    if "--output" not in args:
        args[3:3] = ["--output", folder / "sims.npy"]
    before = _snapshot(folder)
    result = node("score.js", *args)
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert result.stdout == "" and result.stderr.startswith("error: ") and len(result.stderr.splitlines()) == 1, \
        result.stderr
    for word in words:
        assert word in result.stderr, (word, result.stderr)
    assert _snapshot(folder) == before and not (folder / "sims.npy").exists()  # nothing written, no temporaries
    if as_python:  # runtime.score refuses the same input with the same line
        code, _, err = run_cli(score_main, [args[1], args[2], "--model", args[0], "--quiet", *args[3:]], capsys)
        assert code == 2 and err == result.stderr


# --------------------------------------------------------------------------- conformance
def test_check_passes_every_stage_as_runtime_check_does(tiny_model_dir, capsys):  # noqa: F811
    from runtime.check import main as check_main
    result = node("check.js", tiny_model_dir)
    assert result.returncode == 0 and result.stderr == "", result.stdout + result.stderr
    code, py_out, _ = run_cli(check_main, [tiny_model_dir], capsys)
    assert code == 0
    lines, py_lines = result.stdout.splitlines(), py_out.splitlines()
    assert [line[:26] for line in lines[:-1]] == [line[:26] for line in py_lines[:-1]]  # labels and "ok", stage by stage
    assert lines[-1].startswith(f"ok: {tiny_model_dir} conforms (onnxruntime-node ")


def test_check_fails_a_stage_whose_vectors_disagree(tiny_model_dir, tmp_path):  # noqa: F811
    model = Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))
    alter_array(model, "sims", lambda a: a.__setitem__(0, a[0] + 1))  # one expected score off by 1, manifest re-hashed
    result = node("check.js", model)
    assert result.returncode == 2
    failed = [line for line in result.stdout.splitlines() if line[20:26].strip() == "FAIL"]
    assert len(failed) == 1 and failed[0].startswith("scores ") and "> " in failed[0]
    assert result.stderr.startswith("error: 1 of ") and "(scores)" in result.stderr and len(result.stderr.splitlines()) == 1


def test_check_refuses_a_folder_without_vectors_in_one_line(tiny_model_dir, tmp_path):  # noqa: F811
    model = Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))
    manifest = json.loads((model / "manifest.json").read_text())
    del manifest["conformance"]
    (model / "manifest.json").write_text(json.dumps(manifest))
    result = node("check.js", model)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith("error: ") and len(result.stderr.splitlines()) == 1
    assert "no conformance vectors" in result.stderr and "python -m export" in result.stderr


def test_check_runs_the_global_head_stages_and_skips_the_picture_stage(optional_graphs_model_dir, capsys):  # noqa: F811
    """A folder with the global head and the feature extractor: the head's stages pass as in runtime.check;
    the picture stage ("requires": "pictures") is printed as skipped and fails nothing."""
    from runtime.check import main as check_main
    result = node("check.js", optional_graphs_model_dir)
    assert result.returncode == 0 and result.stderr == "", result.stdout + result.stderr
    code, py_out, _ = run_cli(check_main, [optional_graphs_model_dir], capsys)
    assert code == 0
    lines, py_lines = result.stdout.splitlines(), py_out.splitlines()
    assert [line[:26] for line in lines[:-2]] == [line[:26] for line in py_lines[:-2]]  # every stage but the last
    assert [line[:20].strip() for line in lines[:-1]][6:8] == ["image global head", "text global head"]
    assert lines[-2] == "picture features    skipped (this client does not take pictures)"
    assert py_lines[-2].startswith("picture features    ok    max |diff| ")  # runtime.check never skips
    assert lines[-1].startswith(f"ok: {optional_graphs_model_dir} conforms (onnxruntime-node ")
    assert lines[-1].endswith("; skipped: picture features)")


@pytest.mark.parametrize("array, label", [("image_global", "image global head"), ("text_global", "text global head")])
def test_check_fails_exactly_a_global_head_stage_whose_vector_disagrees(optional_graphs_model_dir,  # noqa: F811
                                                                        tmp_path, array, label):
    model = Path(shutil.copytree(optional_graphs_model_dir, tmp_path / "model"))
    alter_array(model, array, lambda a: a.__setitem__(0, a[0] + np.float32(1e-2)))  # one value off by 1e-2, re-hashed
    result = node("check.js", model)
    assert result.returncode == 2
    failed = [line for line in result.stdout.splitlines() if line[20:26].strip() == "FAIL"]
    assert len(failed) == 1 and failed[0].startswith(f"{label} ") and "> " in failed[0], result.stdout
    assert result.stderr.startswith(f"error: 1 of 11 stages failed ({label}): ")
    assert len(result.stderr.splitlines()) == 1


# --------------------------------------------------------------------------- the client's own tests
def test_node_test_suite_passes(tiny_model_dir, optional_graphs_model_dir):  # noqa: F811
    files = sorted(map(str, (NODE_DIR / "test").glob("*.test.js")))
    result = subprocess.run(["node", "--test", *files], cwd=ROOT, capture_output=True, text=True,
                            timeout=300, env={**os.environ, "IMRAM_NODE_MODEL_DIR": os.fspath(tiny_model_dir),
                                              "IMRAM_NODE_OPTIONAL_MODEL_DIR": os.fspath(optional_graphs_model_dir)})
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "# fail 0" in result.stdout
