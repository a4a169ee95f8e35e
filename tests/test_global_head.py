"""Specification of the first-stage global head (imram_min.search.global_head, export.global_head and its
use by runtime.index / runtime.search and imram_min.search.shortlist): small inputs, one behaviour each."""
from __future__ import annotations

import contextlib
import io
import os
import shutil

import numpy as np
import pytest
import torch

from fixtures import N_TEST_IMAGES, run_cli, tiny_checkpoint, tiny_data, tiny_model_dir  # noqa: F401

TOL = 1e-5
SMALL = dict(hidden=16, out_size=8)


@pytest.fixture(scope="module")
def model(tiny_checkpoint):  # noqa: F811
    from imram_min.engineering.checkpoint import load_model
    return load_model(tiny_checkpoint)[0]


@pytest.fixture(scope="module")
def train_embs(model, tiny_data):  # noqa: F811
    from imram_min.data import PrecompDataset, load_vocab
    from imram_min.evaluate import encode_split
    dataset = PrecompDataset(tiny_data, "train", load_vocab(tiny_data))
    return (*encode_split(model, dataset), dataset.caps_per_image)


@pytest.fixture(scope="module")
def head(model, train_embs):
    from imram_min.search.global_head import train_head
    torch.manual_seed(0)
    return train_head(model, *train_embs, epochs=3, batch=4, distill=1.0, progress=False, **SMALL)


@pytest.fixture(scope="module")
def head_model_dir(tmp_path_factory, tiny_model_dir, head):  # noqa: F811
    """A copy of the tiny model dir with the head's graphs added."""
    from export.global_head import add_global_head
    out = tmp_path_factory.mktemp("head_export") / "model"
    shutil.copytree(tiny_model_dir, out)
    add_global_head(out, head[0])
    return out


def test_training_lowers_the_loss_and_leaves_the_model_alone(model, train_embs):
    from imram_min.search.global_head import train_head
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _, history = train_head(model, *train_embs, epochs=8, batch=4, distill=1.0, progress=False, **SMALL)
    assert history[-1] < history[0]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_onnx_graphs_equal_the_pytorch_head(head, head_model_dir):
    from export.global_head import example
    from runtime.engine import Engine
    engine = Engine(head_model_dir, device="cpu", threads=1)
    assert engine.has_global_head and engine.global_size == SMALL["out_size"]
    regions, words, lengths = example(head[0].config["embed_size"], seed=5, n_img=3, n_region=9, n_cap=6, n_word=7)
    with torch.no_grad():
        want_img, want_cap = head[0].image(regions).numpy(), head[0].text(words, lengths).numpy()
    np.testing.assert_allclose(engine.first_stage_vectors(regions.numpy()), want_img, atol=TOL, rtol=0)
    np.testing.assert_allclose(engine.first_stage_vectors(words.numpy(), lengths.numpy()), want_cap, atol=TOL, rtol=0)


def test_matcher_scores_are_untouched(tiny_model_dir, head_model_dir, tiny_data):  # noqa: F811
    from runtime.scorer import Scorer
    feats, caps = np.load(tiny_data / "test_ims.npy"), (tiny_data / "test_caps.txt").read_text().splitlines()
    plain = Scorer(tiny_model_dir, device="cpu", threads=1).score(feats, caps)
    assert np.array_equal(Scorer(head_model_dir, device="cpu", threads=1).score(feats, caps), plain)


def test_index_stores_the_head_vectors_and_exhaustive_equals_runtime_score(tmp_path, head_model_dir, tiny_data):
    from runtime import indexdir
    from runtime.index import build
    from runtime.scorer import Scorer
    from runtime.search import Index
    feats, caps = np.load(tiny_data / "test_ims.npy"), (tiny_data / "test_caps.txt").read_text().splitlines()
    manifest = build(tmp_path / "idx", feats, head_model_dir, device="cpu", threads=1)
    assert "global head" in manifest["first_stage"]
    scorer = Scorer(head_model_dir, device="cpu", threads=1)
    stored = np.load(indexdir.part_file(os.fspath(tmp_path / "idx"), manifest["parts"][0]["name"], "global.npy"))
    np.testing.assert_allclose(stored, scorer.first_stage_vectors(scorer.encode_images(feats)), atol=TOL, rtol=0)
    assert stored.shape == (N_TEST_IMAGES, SMALL["out_size"])
    index = Index(tmp_path / "idx", device="cpu", threads=1)
    sims = scorer.score(feats, caps)
    rows, scores = index.search(caps, top_k=N_TEST_IMAGES, exhaustive=True)
    np.testing.assert_allclose(scores, np.take_along_axis(sims.T, rows, 1), atol=TOL, rtol=0)
    np.testing.assert_allclose(scores, -np.sort(-sims.T, 1), atol=TOL, rtol=0)
    rows_s, scores_s = index.search(caps, top_k=3, shortlist=N_TEST_IMAGES)  # shortlist = all: exact
    np.testing.assert_allclose(scores_s, -np.sort(-sims.T, 1)[:, :3], atol=TOL, rtol=0)


def test_cli_writes_a_head_that_evaluate_and_export_take(tmp_path, tiny_checkpoint, tiny_data, capsys):  # noqa: F811
    from export.__main__ import main as export_main
    from imram_min.evaluate.__main__ import main as evaluate_main
    from imram_min.search.global_head import load_head
    from imram_min.search.global_head import main as head_main
    out = tmp_path / "head.pt"
    result = head_main([os.fspath(tiny_checkpoint), "--data", os.fspath(tiny_data), "--out", os.fspath(out),
                        "--epochs", "2", "--hidden", "16", "--out-size", "8"])
    assert result["out"] == os.fspath(out) and load_head(out).config["out_size"] == 8
    result = evaluate_main([os.fspath(tiny_checkpoint), "--data", os.fspath(tiny_data), "--device", "cpu",
                            "--shortlist", "100%", "--global-head", os.fspath(out)])
    assert result["first_stage_vectors"] == "global head"
    assert result["shortlists"][0]["i2t"] == result["exhaustive"]["i2t"]  # the whole split: exact
    with contextlib.redirect_stdout(io.StringIO()):
        assert export_main([os.fspath(tiny_checkpoint), "--out", os.fspath(tmp_path / "m"),
                            "--global-head", os.fspath(out)]) == 0
    assert os.path.isfile(tmp_path / "m" / "image_global.onnx")


def test_bad_head_file_is_one_error_line(tmp_path, tiny_checkpoint, tiny_data, capsys):  # noqa: F811
    from imram_min.evaluate.__main__ import main as evaluate_main
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a head")
    code, out, err = run_cli(evaluate_main, [tiny_checkpoint, "--data", tiny_data, "--device", "cpu",
                                             "--shortlist", "10%", "--global-head", bad], capsys)
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: ") and "bad.pt" in err


@pytest.mark.parametrize("case", ["no data folder", "not a checkpoint"])
def test_cli_bad_input_is_one_error_line(case, tmp_path, tiny_checkpoint, tiny_data, capsys):  # noqa: F811
    from imram_min.search.global_head import main as head_main
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    ckpt, data = (tiny_checkpoint, tmp_path / "nowhere") if case == "no data folder" else (bad, tiny_data)
    code, out, err = run_cli(head_main, [ckpt, "--data", data, "--out", tmp_path / "h.pt"], capsys)
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: ")
    assert not (tmp_path / "h.pt").exists()


def test_manifest_with_one_global_graph_is_refused(tmp_path, head_model_dir):
    import json
    from runtime.modeldir import ModelDirError, load_manifest
    out = tmp_path / "model"
    shutil.copytree(head_model_dir, out)
    manifest = json.loads((out / "manifest.json").read_text())
    del manifest["graphs"]["text_global"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelDirError, match="text_global"):
        load_manifest(out)


# --------------------------------------------------------------------------- the default path: run.sh's order
@pytest.fixture(scope="module")
def run_with_head(tmp_path_factory, tiny_checkpoint, tiny_data):  # noqa: F811
    """A run folder holding a copy of the tiny checkpoint and the head the command wrote beside it
    (no --out: RUN/global_head.pt)."""
    from imram_min.search.global_head import main as head_main
    run = tmp_path_factory.mktemp("run_with_head")
    shutil.copy(tiny_checkpoint, run / "best.pt")
    with contextlib.redirect_stdout(io.StringIO()):
        result = head_main([os.fspath(run / "best.pt"), "--data", os.fspath(tiny_data), "--epochs", "1",
                            "--hidden", "16", "--out-size", "8"])
    assert result["out"] == os.fspath(run / "global_head.pt")
    return run


def export_cli(args, capsys):
    from export.__main__ import main as export_main
    return run_cli(export_main, args, capsys)


def test_export_includes_the_head_beside_the_checkpoint_and_index_uses_it(tmp_path, run_with_head, tiny_data,
                                                                         capsys):  # noqa: F811
    from runtime.index import build
    code, out, err = export_cli([run_with_head / "best.pt", "--out", tmp_path / "m"], capsys)
    assert code == 0 and err == ""
    assert f"global head {run_with_head / 'global_head.pt'}, 8 values" in out
    manifest = json_file(tmp_path / "m" / "manifest.json")
    assert manifest["global_head"]["file"] == "global_head.pt" and manifest["global_head"]["out_size"] == 8
    assert {"image_global", "text_global"} <= set(manifest["graphs"])
    index = build(tmp_path / "idx", np.load(tiny_data / "test_ims.npy"), tmp_path / "m", device="cpu", threads=1)
    assert index["first_stage"] == "the model's global head (image_global / text_global), 8 values"


def test_no_global_head_leaves_it_out(tmp_path, run_with_head, tiny_data, capsys):  # noqa: F811
    from runtime.index import build
    code, out, err = export_cli([run_with_head / "best.pt", "--out", tmp_path / "m", "--no-global-head"], capsys)
    assert code == 0 and err == "" and "no global head (--no-global-head)" in out
    manifest = json_file(tmp_path / "m" / "manifest.json")
    assert "global_head" not in manifest and "image_global" not in manifest["graphs"]
    assert not (tmp_path / "m" / "image_global.onnx").exists()
    index = build(tmp_path / "idx", np.load(tiny_data / "test_ims.npy"), tmp_path / "m", device="cpu", threads=1)
    assert index["first_stage"] == "mean of the item's embeddings, l2-normalised"


def test_export_without_a_head_beside_the_checkpoint_says_so(tmp_path, tiny_checkpoint, capsys):  # noqa: F811
    shutil.copy(tiny_checkpoint, tmp_path / "best.pt")
    code, out, err = export_cli([tmp_path / "best.pt", "--out", tmp_path / "m"], capsys)
    assert code == 0 and err == ""
    assert f"no global head (no {tmp_path / 'global_head.pt'} beside the checkpoint)" in out
    assert "global_head" not in json_file(tmp_path / "m" / "manifest.json")


def test_a_head_of_another_checkpoint_beside_it_is_left_out_with_a_warning(tmp_path, run_with_head,
                                                                          head, capsys):  # noqa: F811
    from imram_min.search.global_head import save_head
    shutil.copy(run_with_head / "best.pt", tmp_path / "best.pt")
    save_head(head[0], tmp_path / "global_head.pt", {"checkpoint_sha256": "0" * 64})
    code, out, err = export_cli([tmp_path / "best.pt", "--out", tmp_path / "m"], capsys)
    assert code == 0 and "no global head" in out
    assert err.startswith("warning: ") and err.count("\n") == 1
    assert f"{tmp_path / 'global_head.pt'} was distilled from a checkpoint other than" in err
    assert "global_head" not in json_file(tmp_path / "m" / "manifest.json")


def test_global_head_and_no_global_head_together_is_one_error_line(tmp_path, run_with_head, capsys):
    code, out, err = export_cli([run_with_head / "best.pt", "--out", tmp_path / "m", "--no-global-head",
                                 "--global-head", run_with_head / "global_head.pt"], capsys)
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: ") and "--no-global-head" in err
    assert not (tmp_path / "m").exists()


def test_the_command_does_not_replace_a_head_without_overwrite(run_with_head, tiny_data, capsys):  # noqa: F811
    from imram_min.search.global_head import main as head_main
    path = run_with_head / "global_head.pt"
    before = path.read_bytes()
    args = [run_with_head / "best.pt", "--data", tiny_data, "--epochs", "1", "--hidden", "16", "--out-size", "8",
            "--seed", "1"]
    code, out, err = run_cli(head_main, args, capsys)
    assert code == 2 and err.startswith(f"error: --out {path} already exists") and err.count("\n") == 1
    assert "--overwrite" in err
    assert path.read_bytes() == before
    result, out, err = run_cli(head_main, args + ["--overwrite"], capsys)
    assert result["out"] == os.fspath(path) and "error" not in err and path.read_bytes() != before


# --------------------------------------------------------------------------- evaluate --shortlist: export's rule
def evaluate_cli(args, capsys):
    from imram_min.evaluate.__main__ import main as evaluate_main
    return run_cli(evaluate_main, [*args, "--device", "cpu", "--shortlist", "50%"], capsys)


def said_lines(err: str) -> list[str]:
    """The note:, warning: and error: lines of a command's stderr (not its progress bars)."""
    return [line for line in err.splitlines() if line.startswith(("note: ", "warning: ", "error: "))]


def test_evaluate_shortlist_ranks_by_the_head_beside_the_checkpoint(run_with_head, tiny_data, capsys):  # noqa: F811
    from imram_min.data import PrecompDataset
    from imram_min.engineering.checkpoint import load_model
    from imram_min.evaluate import encode_split, metrics_from_sims
    from imram_min.search.global_head import head_vectors, load_head
    result, out, err = evaluate_cli([run_with_head / "best.pt", "--data", tiny_data], capsys)
    path = os.fspath(run_with_head / "global_head.pt")
    assert result["first_stage_vectors"] == "global head" and result["global_head"] == path
    assert f"first stage: global head {path}" in out and said_lines(err) == []
    model, vocab, _ = load_model(run_with_head / "best.pt")
    img, cap = head_vectors(load_head(path), *encode_split(model, PrecompDataset(tiny_data, "test", vocab)))
    want = metrics_from_sims((img @ cap.T).numpy(), 5)
    assert {k: result["first_stage"][k] for k in want} == want


def test_evaluate_leaves_out_a_head_of_another_checkpoint_with_one_note(tmp_path, run_with_head, head, tiny_data,
                                                                        capsys):  # noqa: F811
    from imram_min.search.global_head import save_head
    shutil.copy(run_with_head / "best.pt", tmp_path / "best.pt")
    save_head(head[0], tmp_path / "global_head.pt", {"checkpoint_sha256": "0" * 64})
    result, out, err = evaluate_cli([tmp_path / "best.pt", "--data", tiny_data], capsys)
    assert result["first_stage_vectors"] == "mean embeddings" and result["global_head"] is None
    (note,) = said_lines(err)
    assert note.startswith(f"note: {tmp_path / 'global_head.pt'} was distilled from a checkpoint other than")
    assert "left out (the first stage is the mean embeddings)" in note and "first stage: mean embeddings" in out


def test_evaluate_no_global_head_ranks_by_the_mean_embeddings(run_with_head, tiny_data, capsys):  # noqa: F811
    result, out, err = evaluate_cli([run_with_head / "best.pt", "--data", tiny_data, "--no-global-head"], capsys)
    assert result["first_stage_vectors"] == "mean embeddings" and result["global_head"] is None
    assert said_lines(err) == []


def test_evaluate_global_head_and_no_global_head_together_is_one_error_line(tmp_path, run_with_head, tiny_data,
                                                                            capsys):  # noqa: F811
    code, out, err = evaluate_cli([run_with_head / "best.pt", "--data", tiny_data, "--json", tmp_path / "r.json",
                                   "--global-head", run_with_head / "global_head.pt", "--no-global-head"], capsys)
    assert code == 2 and out == "" and err == "error: --global-head and --no-global-head: give one of them\n"
    assert not (tmp_path / "r.json").exists()


def json_file(path):
    import json
    with open(path, encoding="utf-8") as f:
        return json.load(f)
