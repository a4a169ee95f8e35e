"""imram_min.evaluate: ranks and metrics on hand-made scores, folds, the CLI outputs."""
import json
import os

import numpy as np
import pytest
import torch

from imram_min import evaluate
from imram_min.engineering import tiling
from imram_min.evaluate.__main__ import main as evaluate_main
from imram_min.engineering.checkpoint import save_checkpoint
from imram_min.data import PrecompDataset
from imram_min.model import IMRAM, IMRAMConfig
from runtime.text import Vocabulary

WORDS = ["a", "red", "blue", "green", "dog", "cat", "ball", "big", "small", "on", "the", "left"]

# cpi = 1. i2t ranks [0, 2, 0, 3]; t2i ranks [0, 1, 2, 1] (ties with the ground truth at [3, 0] and [1, 3]).
SIMS_1 = np.array([[0.9, 0.1, 0.2, 0.3],
                   [0.5, 0.4, 0.6, 0.1],
                   [0.1, 0.2, 0.3, 0.0],
                   [0.9, 0.8, 0.7, 0.1]], dtype=np.float32)
# cpi = 5, 2 images. Image 0: best ground truth 0.5, beaten by 0.6 and 0.7 -> rank 2; image 1: 0.8 beaten by 0.9 -> 1.
SIMS_5 = np.array([[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.0, 0.0, 0.0],
                   [0.9, 0.0, 0.0, 0.0, 0.0, 0.1, 0.2, 0.3, 0.4, 0.8]], dtype=np.float32)


def make_data(folder, n_img=10, caps_per_image=5, img_dim=12, n_region=3, seed=0):
    """A tiny data folder with a test split; returns (folder, vocab)."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    np.save(os.path.join(folder, "test_ims.npy"), rng.random((n_img, n_region, img_dim), dtype=np.float32))
    caps = [" ".join(rng.choice(WORDS, rng.integers(2, 7))) for _ in range(caps_per_image * n_img)]
    with open(os.path.join(folder, "test_caps.txt"), "w") as f:
        f.write("\n".join(caps) + "\n")
    vocab = Vocabulary(WORDS)
    vocab.save(os.path.join(folder, "vocab.json"))
    return str(folder), vocab


def make_checkpoint(path, vocab, mode="full"):
    torch.manual_seed(0)
    model = IMRAM(IMRAMConfig(vocab_size=len(vocab), img_dim=12, word_dim=8, embed_size=8, mode=mode))
    save_checkpoint(path, model, vocab)
    return model.eval()


def test_i2t_and_t2i_ranks_and_metrics_one_caption_per_image():
    np.testing.assert_array_equal(evaluate.i2t_ranks(SIMS_1, 1), [0, 2, 0, 3])
    np.testing.assert_array_equal(evaluate.t2i_ranks(SIMS_1, 1), [0, 1, 2, 1])
    assert evaluate.i2t(SIMS_1, 1) == pytest.approx((50.0, 100.0, 100.0, 2.0, 2.25))
    assert evaluate.t2i(SIMS_1, 1) == pytest.approx((25.0, 100.0, 100.0, 2.0, 2.0))
    assert evaluate.metrics_from_sims(SIMS_1, 1)["rsum"] == pytest.approx(475.0)


def test_i2t_uses_the_best_ranked_of_five_ground_truth_captions():
    metrics, ranks = evaluate.i2t(SIMS_5, 5, return_ranks=True)
    np.testing.assert_array_equal(ranks, [2, 1])
    assert metrics == pytest.approx((0.0, 100.0, 100.0, 2.0, 2.5))
    np.testing.assert_array_equal(evaluate.t2i_ranks(SIMS_5, 5), [1, 0, 0, 0, 0, 1, 1, 0, 0, 0])
    assert evaluate.t2i(SIMS_5, 5) == pytest.approx((70.0, 100.0, 100.0, 1.0, 1.3))


def test_ties_with_the_ground_truth_count_in_its_favour():
    sims = np.full((3, 15), 0.5, dtype=np.float32)
    assert evaluate.i2t_ranks(sims, 5).tolist() == [0, 0, 0]
    assert evaluate.t2i_ranks(sims, 5).tolist() == [0] * 15
    sims[0, 7] = 0.6  # strictly higher than image 0's ground truth: now it counts
    assert evaluate.i2t_ranks(sims, 5).tolist() == [1, 0, 0]
    assert evaluate.t2i_ranks(sims, 5)[7] == 1


def test_sims_of_the_wrong_shape_or_with_nan_are_refused():
    with pytest.raises(ValueError, match="shape"):
        evaluate.i2t(SIMS_1, 5)
    bad = SIMS_1.copy()
    bad[1, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        evaluate.t2i(bad, 1)


def test_fold5_cuts_images_and_their_captions_into_five_equal_folds():
    folds = evaluate.fold_slices(10, 5)
    assert [(im.start, im.stop, ca.start, ca.stop) for im, ca in folds] == \
        [(0, 2, 0, 10), (2, 4, 10, 20), (4, 6, 20, 30), (6, 8, 30, 40), (8, 10, 40, 50)]
    with pytest.raises(ValueError):
        evaluate.fold_slices(12, 5)


def test_fold5_evaluation_is_the_mean_of_per_fold_evaluations(tmp_path):
    data, vocab = make_data(tmp_path / "data", n_img=10)
    model = make_checkpoint(tmp_path / "m.pt", vocab)
    dataset = PrecompDataset(data, "test", vocab)
    full = evaluate.evaluate_split(model, dataset, fold5=True, return_sims=True)
    blocks = evaluate.evaluate_split(model, dataset, fold5=True)  # scores only within folds
    per_fold = [evaluate.metrics_from_sims(full["sims"][im, ca], 5) for im, ca in evaluate.fold_slices(10, 5)]
    assert full["rsum"] == pytest.approx(np.mean([f["rsum"] for f in per_fold]))
    assert full["i2t"] == pytest.approx(np.mean([f["i2t"] for f in per_fold], 0).tolist())
    assert blocks["t2i"] == pytest.approx(full["t2i"]) and len(blocks["folds"]) == 5
    assert blocks["folds"][0]["n_images"] == 2 and blocks["folds"][0]["n_captions"] == 10


def test_similarity_matrix_in_blocks_equals_scoring_all_pairs_at_once(tmp_path):
    data, vocab = make_data(tmp_path / "data", n_img=5)
    model = make_checkpoint(tmp_path / "m.pt", vocab)
    dataset = PrecompDataset(data, "test", vocab)
    region_embs, word_embs, lengths = evaluate.encode_split(model, dataset, batch_size=3)
    assert region_embs.shape == (5, 3, 8) and word_embs.shape == (25, int(lengths.max()), 8)
    sims = tiling.similarity_matrix(model, region_embs, word_embs, lengths)
    with torch.no_grad():
        direct = model.similarity(model.encode_images(torch.from_numpy(np.array(dataset.images))), word_embs, lengths)
    np.testing.assert_allclose(sims, direct.numpy(), rtol=1e-5, atol=1e-6)


def test_cli_writes_json_and_float32_sims(tmp_path, capsys):
    data, vocab = make_data(tmp_path / "data", n_img=5)
    make_checkpoint(tmp_path / "m.pt", vocab)
    out_json, out_sims = tmp_path / "r.json", tmp_path / "sims.npy"
    evaluate_main([str(tmp_path / "m.pt"), "--data", data, "--split", "test", "--json", str(out_json),
                   "--save-sims", str(out_sims), "--device", "cpu", "--batch-size", "2"])
    result = json.load(open(out_json))
    assert {"i2t", "t2i", "rsum", "split", "n_images", "n_captions"} <= set(result)
    assert len(result["i2t"]) == len(result["t2i"]) == 5 and result["split"] == "test"
    sims = np.load(out_sims, allow_pickle=False)
    assert sims.shape == (5, 25) and sims.dtype == np.float32
    assert result["rsum"] == pytest.approx(evaluate.metrics_from_sims(sims, 5)["rsum"])
    assert "image->text" in capsys.readouterr().out


def test_one_caption_per_image_is_evaluated_as_such(tmp_path):
    data, vocab = make_data(tmp_path / "data", n_img=6, caps_per_image=1)
    make_checkpoint(tmp_path / "m.pt", vocab, mode="text")
    result = evaluate_main([str(tmp_path / "m.pt"), "--data", data, "--device", "cpu"])
    assert result["n_images"] == result["n_captions"] == 6 and result["caps_per_image"] == 1


def test_non_finite_features_are_refused_naming_file_and_row(tmp_path, capsys):
    data, vocab = make_data(tmp_path / "data", n_img=5)
    make_checkpoint(tmp_path / "m.pt", vocab)
    feats = np.load(os.path.join(data, "test_ims.npy"))
    feats[3, 0, 0] = np.nan
    np.save(os.path.join(data, "test_ims.npy"), feats)
    with pytest.raises(SystemExit) as e:
        evaluate_main([str(tmp_path / "m.pt"), "--data", data, "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "test_ims.npy: image 3 has NaN or Inf features" in err[0]
