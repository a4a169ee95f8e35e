"""Specification of imram_min.data.synthetic: the built-in data set and its command."""
import json
import os

import numpy as np
import pytest

from imram_min.data import PrecompDataset, load_captions, load_features, load_vocab
from imram_min.data.__main__ import main as data_main
from imram_min.data.synthetic import DEFAULT_TRAIN_SETTINGS, grammar_tokens, main, make_synthetic
from runtime.text import Vocabulary, tokenize


SMALL = dict(n_train=30, n_dev=4, n_test=10)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    folder = tmp_path_factory.mktemp("synthetic")
    make_synthetic(folder, seed=0, **SMALL)
    return folder


def folder_bytes(folder):
    return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder))}


def test_synthetic_writes_the_data_folder_layout(synthetic):
    assert sorted(os.listdir(synthetic)) == sorted(
        [f"{s}_{kind}" for s in ("train", "dev", "test") for kind in ("ims.npy", "caps.txt", "scenes.json")]
        + ["vocab.json", "train_defaults.json", "README.txt"])
    assert "SYNTHETIC" in (synthetic / "README.txt").read_text()


def test_synthetic_is_deterministic_for_a_seed(synthetic, tmp_path):
    make_synthetic(tmp_path, seed=0, **SMALL)
    assert folder_bytes(tmp_path) == folder_bytes(synthetic)


def test_synthetic_differs_for_another_seed(synthetic, tmp_path):
    make_synthetic(tmp_path, seed=1, **SMALL)
    assert (tmp_path / "train_ims.npy").read_bytes() != (synthetic / "train_ims.npy").read_bytes()
    assert load_captions(tmp_path, "train") != load_captions(synthetic, "train")


def test_synthetic_split_is_unchanged_by_other_split_sizes(synthetic, tmp_path):
    make_synthetic(tmp_path, seed=0, **{**SMALL, "n_train": 12})
    assert (tmp_path / "test_ims.npy").read_bytes() == (synthetic / "test_ims.npy").read_bytes()


@pytest.mark.parametrize("split, n_img", [("train", 30), ("dev", 4), ("test", 10)])
def test_synthetic_split_shapes(synthetic, split, n_img):
    feats = load_features(synthetic, split)
    assert feats.shape == (n_img, 36, 256) and feats.dtype == np.float32
    assert len(load_captions(synthetic, split)) == 5 * n_img


def test_synthetic_dataset_loads_with_its_vocabulary(synthetic):
    ds = PrecompDataset(synthetic, "test", load_vocab(synthetic))
    assert len(ds) == 50 and ds.caps_per_image == 5
    assert ds[0][0].shape == (36, 256)


def test_synthetic_vocab_is_nltk_build_of_train_captions(synthetic):
    captions = load_captions(synthetic, "train")
    assert all(grammar_tokens(c) == tokenize(c) for c in captions)
    assert load_vocab(synthetic) == Vocabulary.build(captions, threshold=4)


def test_synthetic_has_hard_negative_twins(synthetic):
    scenes = json.loads((synthetic / "train_scenes.json").read_text())
    pairs = [(i, s["twin"]) for i, s in enumerate(scenes) if s["twin"] is not None and s["twin"] > i]
    assert pairs, "no twin pairs"
    for i, j in pairs:
        a, b = scenes[i]["objects"], scenes[j]["objects"]
        assert scenes[j]["twin"] == i
        assert [(o["category"], o["cell"]) for o in a] == [(o["category"], o["cell"]) for o in b]
        assert sorted(o["colour"] for o in a) == sorted(o["colour"] for o in b)
        assert all(x["colour"] != y["colour"] for x, y in zip(a, b))


def test_synthetic_train_defaults_can_be_overridden(tmp_path):
    make_synthetic(tmp_path, n_train=5, n_dev=1, n_test=1, train_defaults={"num_epochs": 2})
    defaults = json.loads((tmp_path / "train_defaults.json").read_text())
    assert defaults == {**DEFAULT_TRAIN_SETTINGS, "num_epochs": 2}


def test_command_writes_the_folder(tmp_path):
    assert main(["--out", str(tmp_path / "d"), "--seed", "3", "--n-train", "5", "--n-dev", "1", "--n-test", "2",
                 "--img-dim", "8"]) == 0
    assert load_features(tmp_path / "d", "test").shape == (2, 36, 8)


def test_data_synthetic_command_writes_the_synthetic_folder(tmp_path):
    args = ["--out", str(tmp_path / "d"), "--n-train", "5", "--n-dev", "1", "--n-test", "2", "--img-dim", "8"]
    assert data_main(["synthetic", *args]) == 0
    assert load_features(tmp_path / "d", "dev").shape == (1, 36, 8)


@pytest.mark.parametrize("flags, message", [
    (["--twin-fraction", "2"], "error: --twin-fraction must be in [0, 1], got 2.0\n"),
    (["--n-train", "0"], "error: --n-train must be >= 1, got 0\n"),
    (["--img-dim", "x"], "error: python -m imram_min.data synthetic: argument --img-dim: invalid int value: 'x'\n"),
], ids=["twin-fraction", "n-train", "not-a-number"])
def test_command_refuses_a_bad_flag_in_one_line_writing_nothing(tmp_path, capsys, flags, message):
    try:
        status = main(["--out", str(tmp_path / "d"), *flags])
    except SystemExit as stop:  # argparse's own checks exit from inside
        status = stop.code
    assert status == 2 and capsys.readouterr().err == message
    assert not (tmp_path / "d").exists()
