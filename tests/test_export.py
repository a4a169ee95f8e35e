"""Specification of export/: the ONNX graphs equal the PyTorch model, and the model dir is well-formed."""
from __future__ import annotations

import json
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from fixtures import (IMG_DIM, lengths_1_to_40, random_feats, random_tokens, tiny_checkpoint, tiny_data,  # noqa: F401
                      tiny_model, tiny_model_dir, tiny_vocab)
from export.conformance import FILES as CONFORMANCE_FILES
from export.graphs import OnnxFastMatcher, TextEncoderGraph, onnx_memory_weights, onnx_update
from export.onnx_export import DEFAULT_OPSET, FILES, MANIFEST_FILE, PROJECTION_FILES, check_graph, export_model, sha256_file
from imram_min import fast
from imram_min.model import IMRAM, IMRAMConfig
from imram_min.engineering.checkpoint import load_model

TOL = 1e-5  # ONNX Runtime CPU vs PyTorch, float32
CUDA_TOL = 1e-4
HAS_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()


def session(path, provider="CPUExecutionProvider"):
    options = {"use_tf32": "0"} if provider == "CUDAExecutionProvider" else {}  # exact float32, as runtime.Scorer
    return ort.InferenceSession(os.fspath(path), providers=[(provider, options)])


def run(sess, **feeds):
    return sess.run(None, {k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in feeds.items()})[0]


ALL_FILES = {**FILES, **PROJECTION_FILES}  # the tiny model is full, K = 3, fast matcher: all five graphs


def run_matcher(folder, region_embs, word_embs, lengths, provider="CPUExecutionProvider"):
    """matcher.onnx of ``folder`` on these embeddings, fed the projection graphs' outputs where it takes them."""
    feeds = {"region_embs": region_embs, "word_embs": word_embs, "lengths": lengths}
    if os.path.exists(os.path.join(folder, PROJECTION_FILES["region_projection"])):
        feeds["region_proj"] = run(session(os.path.join(folder, PROJECTION_FILES["region_projection"]), provider),
                                   region_embs=region_embs)
        feeds["word_proj"] = run(session(os.path.join(folder, PROJECTION_FILES["word_projection"]), provider),
                                 word_embs=word_embs)
    return run(session(os.path.join(folder, FILES["matcher"]), provider), **feeds)


def max_diff(a, b) -> float:
    a = a.numpy() if isinstance(a, torch.Tensor) else a
    b = b.numpy() if isinstance(b, torch.Tensor) else b
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max())


def embedded_batch(model, n_img, n_region, lengths, n_word=None, seed=0):
    """(region_embs, word_embs, lengths) from the PyTorch encoders."""
    tokens, lengths = random_tokens(lengths, model.cfg.vocab_size, n_word, seed=seed)
    with torch.no_grad():
        return (model.encode_images(random_feats(n_img, n_region, model.cfg.img_dim, seed=seed)),
                model.encode_captions(tokens, lengths), lengths)


# Ragged batches of sizes other than the export example's (2 images x 3 regions, 4 captions x 5 words).
MATCH_BATCHES = {
    "ragged": (3, 7, [1, 40, 9, 2, 17, 33]),
    "one_image_one_caption": (1, 36, [12]),
    "one_image": (1, 5, [3, 1, 26]),
    "one_caption": (4, 11, [1]),
    "lengths_1_to_40": (2, 36, lengths_1_to_40()),
}


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):  # noqa: F811
    model, vocab, _ = load_model(tiny_checkpoint)
    return model


# --------------------------------------------------------------------------- the export-friendly text encoder
@pytest.mark.parametrize("overrides", [{}, {"num_layers": 2}, {"bi_gru": False}, {"bi_gru": False, "num_layers": 2},
                                       {"no_txtnorm": True}], ids=["bi", "bi-2layers", "uni", "uni-2layers", "nonorm"])
def test_text_encoder_graph_module_equals_packed_text_encoder(overrides):
    model = tiny_model(**overrides)
    tokens, lengths = random_tokens(lengths_1_to_40(), model.cfg.vocab_size, n_word=43)
    with torch.no_grad():
        expected = model.encode_captions(tokens, lengths)
        got = TextEncoderGraph(model.txt_enc).eval()(tokens, lengths)
    assert max_diff(got, expected) <= 1e-6
    assert (got[torch.arange(43)[None, :] >= lengths[:, None]] == 0).all()  # exact zeros on padding


# --------------------------------------------------------------------------- the model dir
def test_export_writes_five_graphs_the_vocabulary_and_the_manifest(tiny_model_dir):  # noqa: F811
    assert sorted(os.listdir(tiny_model_dir)) == sorted([*ALL_FILES.values(), "vocab.json", "tokenizer.json",
                                                         MANIFEST_FILE, *CONFORMANCE_FILES])


@pytest.mark.parametrize("form,mode,n_steps", [("plain", "full", 3), ("fast", "full", 1), ("fast", "mean", 1)])
def test_no_projection_graphs_where_the_matcher_needs_none(tmp_path, form, mode, n_steps):
    manifest = export_model(tiny_model(vocab_size=40, mode=mode, n_steps=n_steps), tiny_vocab(), tmp_path,
                            matcher=form, verify=False)
    assert sorted(manifest["graphs"]) == sorted(FILES)
    assert [i["name"] for i in manifest["graphs"]["matcher"]["inputs"]] == ["region_embs", "word_embs", "lengths"]


@pytest.mark.parametrize("mode,size", [("full", 4), ("text", 2), ("image", 2)])
def test_projection_graphs_give_2d_per_direction(tmp_path, mode, size):
    model = tiny_model(vocab_size=40, mode=mode, n_steps=2)
    manifest = export_model(model, tiny_vocab(), tmp_path, verify=False)
    d = model.cfg.embed_size
    assert manifest["graphs"]["region_projection"]["outputs"][0]["shape"] == ["n_img", "n_region", size * d]
    assert manifest["graphs"]["word_projection"]["outputs"][0]["shape"] == ["n_cap", "n_word", size * d]
    assert [i["name"] for i in manifest["graphs"]["matcher"]["inputs"]] == [
        "region_embs", "word_embs", "lengths", "region_proj", "word_proj"]


@pytest.mark.parametrize("graph", list(ALL_FILES))
def test_graph_passes_onnx_full_check(tiny_model_dir, graph):  # noqa: F811
    onnx.checker.check_model(onnx.load(os.fspath(tiny_model_dir / ALL_FILES[graph])), full_check=True)


def test_manifest_sha256_matches_every_file(tiny_model_dir):  # noqa: F811
    manifest = json.loads((tiny_model_dir / MANIFEST_FILE).read_text())
    assert sorted(manifest["files"]) == sorted([*ALL_FILES.values(), "vocab.json", "tokenizer.json", *CONFORMANCE_FILES])
    for name, info in manifest["files"].items():
        assert info["sha256"] == sha256_file(tiny_model_dir / name)
        assert info["bytes"] == os.path.getsize(tiny_model_dir / name)


def test_manifest_describes_graphs_config_and_versions(tiny_model_dir, tiny):  # noqa: F811
    manifest = json.loads((tiny_model_dir / MANIFEST_FILE).read_text())
    assert manifest["format"] == "imram-min-onnx" and manifest["format_version"] == 3
    assert manifest["model_config"] == tiny.cfg.to_dict()
    assert manifest["opset"] == DEFAULT_OPSET
    assert set(manifest["versions"]) >= {"torch", "onnx"}
    assert manifest["graphs"]["matcher"]["outputs"] == [{"name": "sims", "dtype": "float32", "shape": ["n_img", "n_cap"]}]
    for name, spec in manifest["graphs"].items():
        path = tiny_model_dir / spec["file"]
        check_graph(os.fspath(path), spec)  # names, dtypes and (symbolic) shapes as declared
        assert [o.version for o in onnx.load(os.fspath(path)).opset_import if o.domain in ("", "ai.onnx")] == [
            DEFAULT_OPSET]


def test_vocab_json_is_the_checkpoint_vocabulary_in_scan_format(tiny_model_dir, tiny_checkpoint):  # noqa: F811
    from runtime.text import Vocabulary
    _, vocab, _ = load_model(tiny_checkpoint)
    data = json.loads((tiny_model_dir / "vocab.json").read_text())
    assert set(data) == {"word2idx", "idx2word", "idx"} and data["idx"] == len(vocab)
    assert Vocabulary.load(tiny_model_dir / "vocab.json") == vocab


def test_reexport_into_the_same_folder_replaces_files_and_leaves_no_temporaries(tmp_path):
    model, vocab = tiny_model(vocab_size=len(tiny_vocab())), tiny_vocab()
    out = tmp_path / "model"
    export_model(model, vocab, out, verify=False)
    (out / "notes.txt").write_text("mine")
    model2 = tiny_model(seed=5, vocab_size=len(vocab))
    manifest = export_model(model2, vocab, out, verify=False)
    assert sorted(os.listdir(tmp_path)) == ["model"]
    assert (out / "notes.txt").read_text() == "mine"
    for name, info in manifest["files"].items():
        assert sha256_file(out / name) == info["sha256"]
    assert json.loads((out / MANIFEST_FILE).read_text())["files"] == manifest["files"]


def test_opset_option_sets_the_graphs_opset(tmp_path):
    manifest = export_model(tiny_model(vocab_size=40), tiny_vocab(), tmp_path / "m", opset=18, verify=False)
    assert manifest["opset"] == 18
    for file in ALL_FILES.values():
        graph = onnx.load(os.fspath(tmp_path / "m" / file))
        assert [o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")] == [18]


def test_export_cli_bad_checkpoint_is_one_error_line_exit_2(tmp_path, capsys):
    from export.__main__ import main
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    code = main([os.fspath(bad), "--out", os.fspath(tmp_path / "m")])
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ")
    assert not (tmp_path / "m").exists()


def test_export_cli_refuses_to_replace_a_model_dir_without_overwrite(tiny_checkpoint, tmp_path, capsys):  # noqa: F811
    from export.__main__ import main
    out = tmp_path / "m"
    out.mkdir()
    (out / MANIFEST_FILE).write_text("{}")
    (out / "notes.txt").write_text("mine")
    code = main([os.fspath(tiny_checkpoint), "--out", os.fspath(out), "--no-verify"])
    stdout, err = capsys.readouterr()
    assert code == 2 and stdout == "" and len(err.splitlines()) == 1, err
    assert err.startswith(f"error: --out {out} already holds {MANIFEST_FILE}") and "--overwrite" in err
    assert sorted(os.listdir(tmp_path)) == ["m"] and sorted(os.listdir(out)) == [MANIFEST_FILE, "notes.txt"]
    assert (out / MANIFEST_FILE).read_text() == "{}"
    assert main([os.fspath(tiny_checkpoint), "--out", os.fspath(out), "--no-verify", "--overwrite"]) == 0
    assert json.loads((out / MANIFEST_FILE).read_text())["files"] and (out / "notes.txt").read_text() == "mine"


# --------------------------------------------------------------------------- ONNX Runtime vs PyTorch
def test_image_encoder_parity_ragged_and_single(tiny_model_dir, tiny):  # noqa: F811
    sess = session(tiny_model_dir / FILES["image_encoder"])
    for n_img, n_region in [(5, 36), (1, 1), (1, 36), (9, 7)]:
        feats = random_feats(n_img, n_region, IMG_DIM, seed=n_img)
        with torch.no_grad():
            expected = tiny.encode_images(feats)
        assert max_diff(run(sess, region_feats=feats), expected) <= TOL


@pytest.mark.parametrize("lengths,n_word", [(lengths_1_to_40(), 40), (lengths_1_to_40(1)[:7], 45), ([1], 1),
                                            ([40], 40), ([1, 1, 1], 3)],
                         ids=["1_to_40", "extra_padding", "one_word", "one_caption_40", "all_one_word"])
def test_text_encoder_parity_every_length(tiny_model_dir, tiny, lengths, n_word):  # noqa: F811
    sess = session(tiny_model_dir / FILES["text_encoder"])
    tokens, lengths = random_tokens(lengths, tiny.cfg.vocab_size, n_word, seed=len(lengths))
    with torch.no_grad():
        expected = tiny.encode_captions(tokens, lengths)
    got = run(sess, tokens=tokens, lengths=lengths)
    assert np.isfinite(got).all()
    assert max_diff(got, expected) <= TOL
    assert (got[(torch.arange(n_word)[None, :] >= lengths[:, None]).numpy()] == 0).all()


MODES_K = [(m, k) for m in ("full", "text", "image") for k in (1, 2, 3)] + [("mean", 1)]


@pytest.mark.parametrize("mode,n_steps", MODES_K, ids=[f"{m}-K{k}" for m, k in MODES_K])
def test_matcher_parity_ragged_batches(tmp_path, mode, n_steps):
    model = tiny_model(seed=n_steps, vocab_size=40, mode=mode, n_steps=n_steps)
    export_model(model, tiny_vocab(), tmp_path, verify=False)
    for name, (n_img, n_region, lengths) in MATCH_BATCHES.items():
        r, w, lens = embedded_batch(model, n_img, n_region, lengths, seed=n_img + len(lengths))
        with torch.no_grad():
            expected = model.similarity(r, w, lens)
        got = run_matcher(tmp_path, r, w, lens)
        assert got.shape == (n_img, len(lengths)) and got.dtype == np.float32, name
        assert max_diff(got, expected) <= TOL, name


def test_matcher_masks_padding_exactly(tiny_model_dir, tiny):  # noqa: F811
    """Garbage past each length and extra padding columns change nothing."""
    r, w, lens = embedded_batch(tiny, 3, 9, [1, 6, 2, 13])
    clean = run_matcher(tiny_model_dir, r, w, lens)
    wide = torch.randn(4, 20, w.shape[2])  # 7 extra columns, and random values in every padded slot
    keep = torch.arange(20)[None, :] < lens[:, None]
    wide[:, :13][keep[:, :13]] = w[keep[:, :13]]
    noisy = run_matcher(tiny_model_dir, r, wide, lens)
    assert np.isfinite(noisy).all()
    assert max_diff(noisy, clean) <= 1e-6


@pytest.mark.parametrize("form", ["plain", "fast"])
def test_matcher_forms_parity(tmp_path, form):
    pytest.importorskip("imram_min.fast")
    model = tiny_model(seed=7, vocab_size=40, n_steps=3)
    manifest = export_model(model, tiny_vocab(), tmp_path, matcher=form, verify=False)
    assert manifest["matcher"]["form"] == form
    for name, (n_img, n_region, lengths) in MATCH_BATCHES.items():
        r, w, lens = embedded_batch(model, n_img, n_region, lengths, seed=3)
        with torch.no_grad():
            expected = model.similarity(r, w, lens)
        assert max_diff(run_matcher(tmp_path, r, w, lens), expected) <= TOL, name


@pytest.mark.skipif(not HAS_CUDA, reason="onnxruntime here offers no CUDAExecutionProvider (CPU-only build or no GPU)")
def test_cuda_provider_parity_with_pytorch_cpu(tiny_model_dir, tiny):  # noqa: F811
    feats = random_feats(4, 36, IMG_DIM, seed=2)
    tokens, lengths = random_tokens(lengths_1_to_40()[:9], tiny.cfg.vocab_size)
    with torch.no_grad():
        r, w = tiny.encode_images(feats), tiny.encode_captions(tokens, lengths)
        sims = tiny.similarity(r, w, lengths)
    sessions = {g: session(tiny_model_dir / f, "CUDAExecutionProvider") for g, f in ALL_FILES.items()}
    assert all(s.get_providers()[0] == "CUDAExecutionProvider" for s in sessions.values())
    assert max_diff(run(sessions["image_encoder"], region_feats=feats), r) <= CUDA_TOL
    assert max_diff(run(sessions["text_encoder"], tokens=tokens, lengths=lengths), w) <= CUDA_TOL
    assert max_diff(run_matcher(tiny_model_dir, r, w, lengths, "CUDAExecutionProvider"), sims) <= CUDA_TOL


# --------------------------------------------------------------------------- the ONNX Runtime form of the fast matcher
@pytest.mark.parametrize("step", [0, 1])
def test_onnx_form_update_equals_the_pytorch_form_in_float64(step):
    torch.manual_seed(0)
    model = IMRAM(IMRAMConfig(vocab_size=10, img_dim=6, word_dim=5, embed_size=8, mode="text", n_steps=3)).double()
    w_q, w_c, b = fast.mdu_weights(model.text_mdu)
    g = torch.Generator().manual_seed(1)
    query, v = torch.randn(4, 3, 8, generator=g, dtype=torch.float64), torch.randn(2, 5, 8, generator=g, dtype=torch.float64)
    memory = query if step == 0 else torch.randn(2, 4, 3, 8, generator=g, dtype=torch.float64)
    attention = torch.randn(2, 4, 3, 5, generator=g, dtype=torch.float64).softmax(-1)
    parts = (query @ w_q.T, v @ w_c.T + b)
    with torch.no_grad():
        expected = fast.gated_update(memory, attention, step, w_q, *parts)
        got = onnx_update(memory, attention, step, onnx_memory_weights(w_q), *parts)
    assert max_diff(got, expected) <= 1e-12


@pytest.mark.parametrize("mode", ["full", "text", "image", "mean"])
def test_onnx_form_matcher_equals_the_model_in_float64(mode):
    torch.manual_seed(0)
    model = IMRAM(IMRAMConfig(vocab_size=10, img_dim=6, word_dim=5, embed_size=8, mode=mode, n_steps=3)).double().eval()
    g = torch.Generator().manual_seed(2)
    lengths = torch.tensor([3, 1, 5, 2])
    region_embs = torch.randn(3, 4, 8, generator=g, dtype=torch.float64)
    word_embs = torch.randn(4, 5, 8, generator=g, dtype=torch.float64) * (torch.arange(5) < lengths[:, None])[..., None]
    with torch.no_grad():
        assert max_diff(OnnxFastMatcher(model)(region_embs, word_embs, lengths),
                        model.similarity(region_embs, word_embs, lengths)) <= 1e-12
