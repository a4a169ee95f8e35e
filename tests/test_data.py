"""Specification of runtime.text (tokenisation, vocabulary) and imram_min.data (loading, synthetic set)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from imram_min.data import (DEFAULT_TRAIN_SETTINGS, DataError, PrecompDataset, captions_per_image, collate, encode_captions_batch,
                            grammar_tokens, load_captions, load_features, load_vocab, main, make_synthetic)
from runtime.text import SPECIAL_TOKENS, Vocabulary, VocabularyError, tokenize

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --------------------------------------------------------------------------- tokenisation
def test_tokenize_lowercases_and_splits_punctuation():
    assert tokenize("A Dog, running!") == ["a", "dog", ",", "running", "!"]


def test_tokenize_splits_contractions_like_treebank():
    assert tokenize("I don't know") == ["i", "do", "n't", "know"]


def test_tokenize_splits_final_period_but_not_inner_one():
    # the one documented difference from the original (no punkt sentence splitting)
    assert tokenize("A dog. A cat.") == ["a", "dog.", "a", "cat", "."]


def test_tokenize_needs_no_nltk_data(tmp_path):
    code = "from runtime.text import tokenize; print(tokenize('Hello, World.'))"
    env = dict(os.environ, NLTK_DATA=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "['hello', ',', 'world', '.']"


# --------------------------------------------------------------------------- vocabulary
def test_vocabulary_specials_have_ids_0_to_3():
    vocab = Vocabulary(["dog"])
    assert [vocab(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3]
    assert vocab("dog") == 4 and len(vocab) == 5


def test_encode_adds_start_end_and_maps_unknown_to_unk():
    vocab = Vocabulary(["a", "dog"])
    assert vocab.encode("A dog barks") == [1, 4, 5, 3, 2]


def test_decode_maps_ids_back_to_words():
    assert Vocabulary(["a", "dog"]).decode([1, 4, 5, 2]) == ["<start>", "a", "dog", "<end>"]


def test_encode_batch_pads_with_zero_and_returns_lengths():
    tokens, lengths = Vocabulary(["a", "dog"]).encode_batch(["a dog", "dog"])
    assert tokens == [[1, 4, 5, 2], [1, 5, 2, 0]] and lengths == [4, 3]


def test_build_keeps_words_seen_threshold_times_in_first_appearance_order():
    captions = ["cat dog", "dog cat", "dog bird", "Dog cat"]  # dog 4, cat 3, bird 1
    assert list(Vocabulary.build(captions, threshold=4).word2idx) == [*SPECIAL_TOKENS, "dog"]
    assert list(Vocabulary.build(captions, threshold=3).word2idx) == [*SPECIAL_TOKENS, "cat", "dog"]


def test_save_writes_scan_json_format(tmp_path):
    Vocabulary(["dog"]).save(tmp_path / "vocab.json")
    data = json.loads((tmp_path / "vocab.json").read_text())
    assert data == {"word2idx": {"<pad>": 0, "<start>": 1, "<end>": 2, "<unk>": 3, "dog": 4},
                    "idx2word": {"0": "<pad>", "1": "<start>", "2": "<end>", "3": "<unk>", "4": "dog"}, "idx": 5}


def test_save_then_load_round_trips(tmp_path):
    vocab = Vocabulary(["a", "dog", "café"])
    vocab.save(tmp_path / "vocab.json")
    loaded = Vocabulary.load(tmp_path / "vocab.json")
    assert loaded == vocab and loaded.idx2word == vocab.idx2word
    assert os.listdir(tmp_path) == ["vocab.json"]  # no temp file left behind


GOOD_VOCAB = {"word2idx": {"<pad>": 0, "<start>": 1, "<end>": 2, "<unk>": 3, "dog": 4},
              "idx2word": {"0": "<pad>", "1": "<start>", "2": "<end>", "3": "<unk>", "4": "dog"}, "idx": 5}


@pytest.mark.parametrize("broken", [
    "not json",
    {"word2idx": {"dog": 0}, "idx2word": {"0": "dog"}, "idx": 1},  # no specials
    {**GOOD_VOCAB, "idx2word": {**GOOD_VOCAB["idx2word"], "4": "cat"}},  # disagree
    {**GOOD_VOCAB, "word2idx": {**GOOD_VOCAB["word2idx"], "dog": 7}},  # ids not 0..n-1
    {"word2idx": GOOD_VOCAB["word2idx"]},  # no idx2word
    {**GOOD_VOCAB, "idx": 9},
], ids=["not-json", "no-specials", "disagree", "gap", "no-idx2word", "bad-idx"])
def test_load_rejects_malformed_vocabulary_naming_the_file(tmp_path, broken):
    path = tmp_path / "my_vocab.json"
    path.write_text(broken if isinstance(broken, str) else json.dumps(broken))
    with pytest.raises(VocabularyError, match="my_vocab.json"):
        Vocabulary.load(path)


def test_load_vocab_accepts_scan_file_name(tmp_path):
    (tmp_path / "f30k_precomp_vocab.json").write_text(json.dumps(GOOD_VOCAB))
    assert load_vocab(tmp_path)("dog") == 4


def test_load_vocab_missing_names_both_choices(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"vocab\.json.*_precomp_vocab\.json"):
        load_vocab(tmp_path)


# --------------------------------------------------------------------------- features and captions
def write_split(folder, split="train", n_img=2, n_region=3, img_dim=4, caps_per_image=5, name="ims"):
    feats = np.arange(n_img * n_region * img_dim, dtype=np.float32).reshape(n_img, n_region, img_dim)
    np.save(folder / f"{split}_{name}.npy", feats)
    (folder / f"{split}_caps.txt").write_text("".join(f"a dog {i}\n" for i in range(n_img * caps_per_image)))
    return feats


@pytest.mark.parametrize("name", ["ims", "feat"])
def test_load_features_accepts_both_names_as_readonly_memmap(tmp_path, name):
    feats = write_split(tmp_path, name=name)
    loaded = load_features(tmp_path, "train")
    assert isinstance(loaded, np.memmap) and not loaded.flags.writeable
    np.testing.assert_array_equal(loaded, feats)


def test_load_features_missing_names_both_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"dev_ims\.npy.*dev_feat\.npy"):
        load_features(tmp_path, "dev")


@pytest.mark.parametrize("array", [np.zeros((2, 4), np.float32), np.zeros((2, 3, 4), np.int64),
                                   np.array([{"a": 1}, None], dtype=object)], ids=["rank2", "int", "object"])
def test_load_features_rejects_bad_arrays_naming_the_file(tmp_path, array):
    np.save(tmp_path / "test_ims.npy", array, allow_pickle=True)
    with pytest.raises(DataError, match="test_ims.npy"):
        load_features(tmp_path, "test")


def test_load_captions_strips_whitespace_and_reads_utf8(tmp_path):
    (tmp_path / "dev_caps.txt").write_bytes("a dog  \r\nun café\n".encode("utf-8"))
    assert load_captions(tmp_path, "dev") == ["a dog", "un café"]


def test_load_captions_rejects_non_utf8_naming_the_file(tmp_path):
    (tmp_path / "dev_caps.txt").write_bytes(b"caf\xe9\n")
    with pytest.raises(DataError, match="dev_caps.txt"):
        load_captions(tmp_path, "dev")


@pytest.mark.parametrize("n_img, n_cap, expected", [(3, 15, 5), (3, 3, 1)])
def test_captions_per_image_is_5_or_1(n_img, n_cap, expected):
    assert captions_per_image(n_img, n_cap, "x_caps.txt") == expected


def test_captions_per_image_other_counts_name_file_and_counts():
    with pytest.raises(DataError, match=r"x_caps\.txt.*10 captions for 3 images"):
        captions_per_image(3, 10, "x_caps.txt")


# --------------------------------------------------------------------------- dataset and batches
def test_dataset_item_is_one_caption_with_its_image(tmp_path):
    feats = write_split(tmp_path)
    ds = PrecompDataset(tmp_path, "train", Vocabulary(["a", "dog"]))
    region_feats, token_ids, cap_id, img_id = ds[7]
    assert len(ds) == 10 and ds.caps_per_image == 5 and ds.n_images == 2
    assert region_feats.dtype == torch.float32 and torch.equal(region_feats, torch.from_numpy(feats[1]))
    assert token_ids.dtype == torch.int64 and token_ids.tolist() == [1, 4, 5, 3, 2]
    assert (cap_id, img_id) == (7, 1)


def test_dataset_max_captions_keeps_whole_first_images(tmp_path):
    write_split(tmp_path, n_img=3)
    ds = PrecompDataset(tmp_path, "train", Vocabulary(), max_captions=5)
    assert len(ds) == 5 and ds.n_images == 1 and ds.images.shape[0] == 1


def test_dataset_with_mismatched_captions_names_the_caption_file(tmp_path):
    write_split(tmp_path, n_img=2, caps_per_image=2)
    with pytest.raises(DataError, match=r"train_caps\.txt.*4 captions for 2 images"):
        PrecompDataset(tmp_path, "train", Vocabulary())


def test_collate_pads_tokens_with_zero_and_returns_lengths(tmp_path):
    feats = torch.zeros(3, 4)
    batch = [(feats, torch.tensor([1, 7, 2]), 0, 0), (feats + 1, torch.tensor([1, 2]), 6, 1)]
    region_feats, tokens, lengths, cap_ids, img_ids = collate(batch)
    assert region_feats.shape == (2, 3, 4)
    assert tokens.dtype == torch.int64 and tokens.tolist() == [[1, 7, 2], [1, 2, 0]]
    assert lengths.dtype == torch.int64 and lengths.tolist() == [3, 2]
    assert cap_ids.tolist() == [0, 6] and img_ids.tolist() == [0, 1]


def test_encode_captions_batch_gives_int64_arrays():
    tokens, lengths = encode_captions_batch(["a dog", "dog"], Vocabulary(["a", "dog"]))
    assert tokens.dtype == np.int64 and tokens.tolist() == [[1, 4, 5, 2], [1, 5, 2, 0]]
    assert lengths.dtype == np.int64 and lengths.tolist() == [4, 3]


# --------------------------------------------------------------------------- synthetic data set
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


def test_cli_writes_synthetic_folder(tmp_path):
    main(["--out", str(tmp_path / "d"), "--seed", "3", "--n-train", "5", "--n-dev", "1", "--n-test", "2",
          "--img-dim", "8"])
    assert load_features(tmp_path / "d", "test").shape == (2, 36, 8)
