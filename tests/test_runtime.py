"""Specification of runtime/ (Scorer and ``python -m runtime.score``): torch-free, equal to PyTorch, strict on input."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest
import torch

from fixtures import (N_TEST_IMAGES, ROOT, run_cli, tiny_checkpoint,  # noqa: F401
                      tiny_data, tiny_model_dir)
from imram_min.engineering.checkpoint import load_model
from imram_min.data import encode_captions_batch, load_captions
from runtime.score import DEFAULT_MODEL_DIR, main, top_k_captions, top_k_images
from runtime.scorer import Scorer

HAS_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()
TOL = 1e-5


@pytest.fixture(scope="module")
def scorer(tiny_model_dir):  # noqa: F811
    return Scorer(tiny_model_dir, device="cpu", threads=1)


@pytest.fixture(scope="module")
def test_split(tiny_data):  # noqa: F811
    """(path of test_ims.npy, path of test_caps.txt, features, captions) of the tiny data folder."""
    ims, caps = tiny_data / "test_ims.npy", tiny_data / "test_caps.txt"
    return ims, caps, np.load(ims), load_captions(tiny_data, "test")


def torch_sims(checkpoint, feats, captions) -> np.ndarray:
    """PyTorch similarities of features x captions, tokenised as training does."""
    model, vocab, _ = load_model(checkpoint)
    tokens, lengths = encode_captions_batch(captions, vocab)
    with torch.no_grad():
        return model(torch.from_numpy(np.asarray(feats, np.float32)), torch.from_numpy(tokens),
                     torch.from_numpy(lengths)).numpy()


# --------------------------------------------------------------------------- API
def test_default_model_dir_is_runs_default_model():
    assert DEFAULT_MODEL_DIR == os.path.join("runs", "default", "model")


def test_scorer_is_importable_from_runtime(tiny_model_dir):  # noqa: F811
    import runtime
    assert runtime.Scorer is Scorer


def test_scorer_score_equals_pytorch(scorer, tiny_checkpoint, test_split):  # noqa: F811
    _, _, feats, captions = test_split
    sims = scorer.score(feats, captions)
    assert sims.shape == (N_TEST_IMAGES, len(captions)) and sims.dtype == np.float32
    assert np.abs(sims - torch_sims(tiny_checkpoint, feats, captions)).max() <= TOL


def test_scorer_encoders_equal_pytorch(scorer, tiny_checkpoint, test_split):  # noqa: F811
    _, _, feats, captions = test_split
    model, vocab, _ = load_model(tiny_checkpoint)
    tokens, lengths = encode_captions_batch(captions, vocab)
    word_embs, lens = scorer.encode_captions(captions)
    with torch.no_grad():
        expected_w = model.encode_captions(torch.from_numpy(tokens), torch.from_numpy(lengths)).numpy()
        expected_r = model.encode_images(torch.from_numpy(feats)).numpy()
    assert (lens == lengths).all() and word_embs.shape == expected_w.shape
    assert np.abs(word_embs - expected_w).max() <= TOL
    assert np.abs(scorer.encode_images(feats) - expected_r).max() <= TOL


def test_scores_do_not_depend_on_the_shard_size(tiny_model_dir, scorer, test_split):  # noqa: F811
    _, _, feats, captions = test_split
    one = Scorer(tiny_model_dir, device="cpu", shard=1, threads=1).score(feats, captions)
    assert np.abs(one - scorer.score(feats, captions)).max() <= 1e-6


def test_scores_do_not_depend_on_the_image_group(tiny_model_dir, scorer, test_split, monkeypatch):  # noqa: F811
    _, _, feats, captions = test_split
    expected = scorer.score(feats, captions)
    monkeypatch.setattr("runtime.scorer.GROUP_BYTES", 1)  # one shard of images per group
    small = Scorer(tiny_model_dir, device="cpu", shard=3, threads=1)
    assert small.group_size(feats.shape[1], 3) == 3
    assert np.abs(small.score(feats, captions) - expected).max() <= 1e-6


def test_matcher_calls_side_by_side_give_the_same_scores(tiny_model_dir, scorer, test_split):  # noqa: F811
    _, _, feats, captions = test_split
    side_by_side = Scorer(tiny_model_dir, device="cpu", shard=2, threads=3)
    assert scorer.workers == 1 and side_by_side.workers == 3
    expected = Scorer(tiny_model_dir, device="cpu", shard=2, threads=1).score(feats, captions)
    assert np.abs(side_by_side.score(feats, captions) - expected).max() <= 1e-6


def test_progress_counts_every_matcher_call_once_in_order(tiny_model_dir, test_split):  # noqa: F811
    _, _, feats, captions = test_split
    calls = []
    Scorer(tiny_model_dir, device="cpu", shard=2, threads=3).score(feats, captions, progress=lambda d, t: calls.append((d, t)))
    total = calls[0][1]
    assert calls == [(i, total) for i in range(1, total + 1)]
    assert total == -(-len(captions) // 2) * (1 + -(-len(feats) // 2))


def test_a_failing_matcher_call_raises_from_score(tiny_model_dir, test_split):  # noqa: F811
    _, _, feats, captions = test_split
    scorer = Scorer(tiny_model_dir, device="cpu", shard=1, threads=2)
    calls = []

    def match(*args):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("matcher broke")
        return np.zeros((len(args[0]), len(args[2])), dtype=np.float32)
    scorer.match = match
    with pytest.raises(RuntimeError, match="matcher broke"):
        scorer.score(feats, captions)
    assert len(calls) < len(feats) * len(captions)  # the calls after it were dropped


def test_score_embeddings_equals_score(scorer, test_split):
    _, _, feats, captions = test_split
    word_embs, lengths = scorer.encode_captions(captions)
    got = scorer.score_embeddings(scorer.encode_images(feats), word_embs, lengths)
    assert np.abs(got - scorer.score(feats, captions)).max() <= 1e-6


@pytest.mark.parametrize("op", ["Cast", "MatMul"])
def test_one_node_models_are_the_onnx_packages_serialisation(op):
    from onnx import TensorProto, helper
    from runtime.engine import cast_model, matmul_model
    if op == "Cast":
        node = helper.make_node("Cast", ["x"], ["y"], to=TensorProto.FLOAT)
        inputs, ours = [("x", TensorProto.FLOAT16)], cast_model(TensorProto.FLOAT16, TensorProto.FLOAT)
    else:
        node = helper.make_node("MatMul", ["a", "b"], ["y"])
        inputs, ours = [("a", TensorProto.FLOAT), ("b", TensorProto.FLOAT)], matmul_model()
    graph = helper.make_graph([node], op.lower(), [helper.make_tensor_value_info(n, t, None) for n, t in inputs],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    assert ours == model.SerializeToString()


def test_engine_matmul_is_the_float32_product(scorer):
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(300, 24)), rng.normal(size=(24, 3))
    got = scorer.matmul(a[::2], b)  # float64 and not contiguous: made float32 C-contiguous first
    want = a[::2].astype(np.float32).astype(np.float64) @ b.astype(np.float32).astype(np.float64)
    assert got.dtype == np.float32 and got.shape == (150, 3)
    assert np.abs(got - want).max() <= 1e-5


def test_float16_is_made_float32_exactly(scorer):
    every_float16 = np.arange(1 << 16, dtype=np.uint16).view(np.float16).reshape(16, 64, 64)
    got = scorer.float32(every_float16[:, ::2])  # not contiguous
    want = every_float16[:, ::2].astype(np.float32)
    assert got.dtype == np.float32 and got.flags.c_contiguous
    number = ~np.isnan(want)  # every finite value, subnormals, +-0 and +-inf: bit for bit
    assert np.array_equal(got[number].view(np.uint32), want[number].view(np.uint32)) and np.isnan(got[~number]).all()
    assert scorer.float32(np.zeros((0, 3), np.float16)).shape == (0, 3)


def test_float16_rows_score_as_their_float32_values(scorer, test_split):
    _, _, feats, caps = test_split
    region_embs = scorer.encode_images(feats).astype(np.float16)
    word_embs, lengths = scorer.encode_captions(caps)
    want = scorer.score_embeddings(region_embs.astype(np.float32), word_embs, lengths)
    assert np.array_equal(scorer.score_embeddings(region_embs, word_embs, lengths), want)


def test_match_makes_the_projections_it_is_not_given(scorer, test_split):
    _, _, feats, captions = test_split
    region_embs, (word_embs, lengths) = scorer.encode_images(feats[:3]), scorer.encode_captions(captions[:4])
    given = scorer.match(region_embs, word_embs, lengths, scorer.project("region", region_embs),
                         scorer.project("word", word_embs))
    assert scorer.projected and np.abs(scorer.match(region_embs, word_embs, lengths) - given).max() == 0


def test_scorer_reads_format_1_model_dirs(tmp_path, tiny_checkpoint, scorer, test_split):  # noqa: F811
    """Format 1: a matcher of region_embs, word_embs, lengths and no projection graphs."""
    from export.onnx_export import export_checkpoint
    export_checkpoint(tiny_checkpoint, tmp_path / "m", matcher="plain", verify=False)
    manifest = json.loads((tmp_path / "m" / "manifest.json").read_text())
    (tmp_path / "m" / "manifest.json").write_text(json.dumps({**manifest, "format_version": 1}))
    old = Scorer(tmp_path / "m", device="cpu", threads=1)
    _, _, feats, captions = test_split
    assert not old.projected and old.project("region", feats) is None
    assert np.abs(old.score(feats, captions) - scorer.score(feats, captions)).max() <= TOL


def test_scorer_reads_a_memmap_a_shard_at_a_time(scorer, test_split):
    ims, _, feats, captions = test_split
    mm = np.load(ims, mmap_mode="r")
    assert np.abs(scorer.score(mm, captions) - scorer.score(feats, captions)).max() == 0


@pytest.mark.parametrize("rows_per_block", [1, 2, 1024])
def test_top_k_helpers_rank_by_score_then_index(rows_per_block, monkeypatch):
    monkeypatch.setattr("runtime.score.RANK_ROWS", rows_per_block)  # the running top-k across row blocks
    sims = np.array([[0.1, 0.5, 0.5, 0.2], [0.9, 0.0, 0.5, 0.2], [0.9, 0.3, 0.1, 0.2]], np.float32)
    rows = [(i, idx.tolist(), s.tolist()) for i, idx, s in top_k_captions(sims, 2)]
    assert [r[1] for r in rows] == [[1, 2], [0, 2], [0, 1]]
    assert np.array([r[2] for r in rows]).tolist() == sims[[[0, 0], [1, 1], [2, 2]], [[1, 2], [0, 2], [0, 1]]].tolist()
    idx, scores = top_k_images(sims, 2)
    assert idx.tolist() == [[1, 2], [0, 2], [0, 1], [0, 1]]
    assert scores.tolist() == np.take_along_axis(sims.T, idx, 1).tolist()
    assert top_k_images(sims, 9)[0].shape == (4, 3)


# --------------------------------------------------------------------------- CLI
def test_cli_writes_sims_and_prints_rankings_of_them(tiny_model_dir, test_split, tmp_path, capsys):  # noqa: F811
    ims, caps, feats, captions = test_split
    out = tmp_path / "sims.npy"
    code, stdout, err = run_cli(main, [ims, caps, "--model", tiny_model_dir, "--output", out, "--top-k", "3", "--json",
                                   "--device", "cpu"], capsys)
    assert code == 0
    sims = np.load(out)
    assert sims.dtype == np.float32 and sims.shape == (N_TEST_IMAGES, len(captions))
    lines = [json.loads(line) for line in stdout.splitlines()]
    assert len(lines) == N_TEST_IMAGES + len(captions)
    for row in lines[:N_TEST_IMAGES]:
        assert [t["caption"] for t in row["top"]] == np.argsort(-sims[row["image"]], kind="stable")[:3].tolist()
        assert row["top"][0]["text"] == captions[row["top"][0]["caption"]]
    for row in lines[N_TEST_IMAGES:]:
        assert [t["image"] for t in row["top"]] == np.argsort(-sims[:, row["caption"]], kind="stable")[:3].tolist()
    assert sorted(os.listdir(tmp_path)) == ["sims.npy"]  # no temporaries left


def test_cli_text_output_lists_top_k_per_image_and_per_caption(tiny_model_dir, test_split, capsys):  # noqa: F811
    ims, caps, _, captions = test_split
    code, stdout, _ = run_cli(main, [ims, caps, "--model", tiny_model_dir, "--top-k", "2", "--quiet"], capsys)
    assert code == 0
    lines = stdout.splitlines()
    assert sum(line.startswith("image ") for line in lines) == N_TEST_IMAGES
    assert sum(line.startswith("caption ") for line in lines) == len(captions)
    assert sum(line.startswith("  1. ") for line in lines) == N_TEST_IMAGES + len(captions)
    assert sum(line.startswith("  3. ") for line in lines) == 0


def test_cli_reads_captions_from_stdin_as_from_a_file(tiny_model_dir, test_split, tmp_path, capsys,  # noqa: F811
                                                      monkeypatch):
    import io
    ims, caps, _, _ = test_split
    args = ["--model", tiny_model_dir, "--top-k", "2", "--json", "--quiet", "--device", "cpu"]
    code, from_file, _ = run_cli(main, [ims, caps, *args], capsys)
    assert code == 0
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(caps.read_bytes())))
    code, from_stdin, _ = run_cli(main, [ims, "-", *args], capsys)
    assert code == 0 and from_stdin == from_file


def test_cli_scores_captions_with_unknown_words_and_names_them(tiny_model_dir, test_split, scorer, tmp_path,  # noqa: F811
                                                                capsys):
    ims, _, feats, captions = test_split
    unknown = [captions[0], captions[0] + " zzzqx", "zzzqx qqqzv zzzqx"]  # the last: <start> <unk> <unk> <unk> <end>
    (tmp_path / "caps.txt").write_text("\n".join(unknown) + "\n")
    code, out, err = run_cli(main, [ims, tmp_path / "caps.txt", "--model", tiny_model_dir, "--output",
                                    tmp_path / "sims.npy", "--top-k", "1", "--json", "--quiet"], capsys)
    assert code == 0
    assert err.splitlines() == [f"note: caption 1 ({unknown[1]!r}): the model's vocabulary lacks zzzqx; read as <unk>",
                                "note: caption 2 ('zzzqx qqqzv zzzqx'): the model's vocabulary lacks zzzqx, qqqzv; "
                                "read as <unk>"]
    rows = [json.loads(line) for line in out.splitlines()][N_TEST_IMAGES:]  # the captions' lines
    assert [row.get("unknown_words") for row in rows] == [None, ["zzzqx"], ["zzzqx", "qqqzv"]]
    np.testing.assert_allclose(np.load(tmp_path / "sims.npy"), scorer.score(feats, unknown), rtol=0, atol=1e-6)


def test_cli_device_auto_says_which_provider_on_stderr(tiny_model_dir, test_split, capsys):  # noqa: F811
    ims, caps, _, _ = test_split
    code, _, err = run_cli(main, [ims, caps, "--model", tiny_model_dir, "--top-k", "0"], capsys)
    assert code == 0
    provider = "CUDAExecutionProvider" if HAS_CUDA else "CPUExecutionProvider"
    assert err.splitlines()[0].startswith(f"device: {'cuda' if HAS_CUDA else 'cpu'} ({provider}")
    assert "scoring: 100%" in err  # the progress bar


def test_rankings_equal_those_of_evaluate_save_sims(tiny_checkpoint, tiny_data, tiny_model_dir, test_split,  # noqa: F811
                                                    tmp_path, capsys):
    evaluate_cli = pytest.importorskip("imram_min.evaluate.__main__")
    ims, caps, _, captions = test_split
    ref = tmp_path / "eval_sims.npy"
    evaluate_cli.main([os.fspath(tiny_checkpoint), "--data", os.fspath(tiny_data), "--split", "test",
                       "--save-sims", os.fspath(ref), "--device", "cpu"])
    capsys.readouterr()
    code, stdout, _ = run_cli(main, [ims, caps, "--model", tiny_model_dir, "--top-k", "5", "--json",
                                 "--output", tmp_path / "sims.npy"], capsys)
    assert code == 0
    expected = np.load(ref)
    assert np.abs(np.load(tmp_path / "sims.npy") - expected).max() <= TOL
    lines = [json.loads(line) for line in stdout.splitlines()]
    for row in lines[:N_TEST_IMAGES]:
        assert [t["caption"] for t in row["top"]] == np.argsort(-expected[row["image"]], kind="stable")[:5].tolist()
    for row in lines[N_TEST_IMAGES:]:
        assert [t["image"] for t in row["top"]] == np.argsort(-expected[:, row["caption"]], kind="stable")[:5].tolist()


def test_runtime_imports_only_numpy_onnxruntime_its_helpers_and_the_standard_library():
    """Non-negotiable 3, read from the source: every import in runtime/ is of the standard library,
    numpy, onnxruntime, PIL (pictures) or runtime itself (no nltk: runtime.text owns the tokeniser); faiss (the optional
    first stage) only inside runtime/faiss_stage.py's import_faiss."""
    import ast
    allowed = set(sys.stdlib_module_names) | {"numpy", "onnxruntime", "PIL", "runtime"}
    found = {}
    for path in sorted((ROOT / "runtime").glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        functions = {id(n): f.name for f in ast.walk(tree) if isinstance(f, ast.FunctionDef) for n in ast.walk(f)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in allowed:
                    found.setdefault(top, set()).add((path.name, functions.get(id(node))))
    assert found == {"faiss": {("faiss_stage.py", "import_faiss")}}


def test_runtime_runs_with_torch_unimportable(tiny_model_dir, test_split, tmp_path):  # noqa: F811
    ims, caps, feats, captions = test_split
    out = tmp_path / "sims.npy"
    code = ("import sys, runpy, importlib.abc\n"
            # as if torch were not installed. (Not sys.modules['torch'] = None: scipy, which nltk may
            # import, looks torch up in sys.modules and fails on a None there.)
            "class NoTorch(importlib.abc.MetaPathFinder):\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name == 'torch' or name.startswith('torch.'):\n"
            "            raise ImportError('torch is blocked in this test')\n"
            "sys.meta_path.insert(0, NoTorch())\n"
            "try:\n    import torch\nexcept ImportError:\n    pass\nelse:\n    raise SystemExit('torch not blocked')\n"
            "from runtime import Scorer\n"
            "import numpy as np\n"
            f"s = Scorer({os.fspath(tiny_model_dir)!r}, device='cpu').score(np.load({os.fspath(ims)!r}), ['a dog'])\n"
            "assert s.shape == (%d, 1)\n"
            "sys.argv = ['runtime.score', %r, %r, '--model', %r, '--output', %r]\n"
            "runpy.run_module('runtime.score', run_name='__main__', alter_sys=True)\n"
            % (N_TEST_IMAGES, os.fspath(ims), os.fspath(caps), os.fspath(tiny_model_dir), os.fspath(out)))
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert np.load(out).shape == (N_TEST_IMAGES, len(captions))


def test_device_cuda_without_cuda_is_a_clear_error(tiny_model_dir, test_split, tmp_path, capsys):  # noqa: F811
    if HAS_CUDA:
        pytest.skip("onnxruntime here offers CUDAExecutionProvider")
    ims, caps, _, _ = test_split
    code, stdout, err = run_cli(main, [ims, caps, "--model", tiny_model_dir, "--device", "cuda",
                                   "--output", tmp_path / "s.npy"], capsys)
    assert code == 2 and err.startswith("error: ") and "CUDAExecutionProvider" in err
    assert len(err.splitlines()) == 1 and not (tmp_path / "s.npy").exists()
