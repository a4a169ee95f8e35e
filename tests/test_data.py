"""Specification of runtime.text (tokenisation, vocabulary) and imram_min.data (loading, the vocab command)."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from imram_min import train
from imram_min.data import (DataError, PrecompDataset, captions_per_image, collate, encode_captions_batch, load_captions,
                            load_features, load_vocab)
from imram_min.data.__main__ import main
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


def test_load_vocab_missing_names_both_choices_and_the_command_that_makes_one(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"vocab\.json.*_precomp_vocab\.json.*python -m imram_min.data vocab"):
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


# --------------------------------------------------------------------------- python -m imram_min.data vocab DIR
CAPTIONS = ["A dog, a cat.", "dog cat", "the dog", "Dog cat bird", "a cat"]  # dog 4, cat 4, a 2, bird 1, "." 1


def test_vocab_command_keeps_words_seen_4_times_after_the_specials(tmp_path):
    (tmp_path / "train_caps.txt").write_text("\n".join(CAPTIONS) + "\n")
    assert main(["vocab", str(tmp_path)]) == 0
    assert list(load_vocab(tmp_path).word2idx) == [*SPECIAL_TOKENS, "dog", "cat"]


def test_vocab_command_equals_the_vocabulary_build_of_the_train_captions(tmp_path):
    captions = [f"w{i % 7} w{i % 3} , x{i % 11}" for i in range(60)]
    (tmp_path / "train_caps.txt").write_text("\n".join(captions) + "\n")
    main(["vocab", str(tmp_path)])
    assert load_vocab(tmp_path) == Vocabulary.build(captions, threshold=4)


def test_vocab_command_replaces_a_vocabulary_only_with_overwrite_leaving_no_temporary_file(tmp_path, capsys):
    (tmp_path / "train_caps.txt").write_text("\n".join(CAPTIONS) + "\n")
    (tmp_path / "vocab.json").write_text("old")
    assert main(["vocab", str(tmp_path)]) == 2
    assert capsys.readouterr().err == (f"error: the vocabulary {tmp_path / 'vocab.json'} already exists: add "
                                       "--overwrite to replace it\n")
    assert (tmp_path / "vocab.json").read_text() == "old"
    assert main(["vocab", str(tmp_path), "--overwrite"]) == 0
    assert sorted(os.listdir(tmp_path)) == ["train_caps.txt", "vocab.json"]
    assert len(load_vocab(tmp_path)) == 6


def test_vocab_command_min_count_sets_the_threshold(tmp_path, capsys):
    (tmp_path / "train_caps.txt").write_text("\n".join(CAPTIONS) + "\n")
    assert main(["vocab", str(tmp_path), "--min-count", "2"]) == 0
    assert list(load_vocab(tmp_path).word2idx) == [*SPECIAL_TOKENS, "a", "dog", "cat"]
    assert "seen >= 2 times" in capsys.readouterr().out
    assert main(["vocab", str(tmp_path), "--min-count", "0", "--overwrite"]) == 2
    assert capsys.readouterr().err == "error: --min-count must be >= 1, got 0\n"


@pytest.mark.parametrize("caps, message", [
    (None, r"No such file or directory: .*train_caps\.txt"),
    (b"caf\xe9\n", r"train_caps\.txt: captions must be UTF-8"),
    (b"\n\n", r"train_caps\.txt: holds no captions"),
], ids=["missing", "not-utf8", "empty"])
def test_vocab_command_refuses_unusable_train_captions_in_one_line(tmp_path, capsys, caps, message):
    if caps is not None:
        (tmp_path / "train_caps.txt").write_bytes(caps)
    assert main(["vocab", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and re.search(message, err), err
    assert not (tmp_path / "vocab.json").exists()


def test_vocab_command_refuses_a_missing_folder_in_one_line(tmp_path, capsys):
    assert main(["vocab", str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'nowhere'}: no such folder\n"


def test_train_without_a_vocabulary_names_the_command_in_one_line(tmp_path, capsys):
    write_split(tmp_path)
    with pytest.raises(SystemExit) as stop:
        train.main(["--data", str(tmp_path), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1
    assert err.startswith("error: no vocabulary") and f"python -m imram_min.data vocab {tmp_path}" in err
    assert not (tmp_path / "run").exists()
