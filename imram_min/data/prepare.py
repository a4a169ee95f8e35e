"""Your own pictures + captions -> a data folder that train, export and the runtime take as it is.

    python -m imram_min.data prepare PICTURES CAPTIONS --out DIR [--dev N] [--test N] [--seed S]
                                     [--min-count N] [--size PX] [--grid N] [--device D] [--overwrite]

PICTURES: a folder of pictures (searched recursively, as ``imram_min.data.features`` does).
CAPTIONS: captions of those pictures, any number (>= 1) per picture, in one of two forms:

    TSV          path<TAB>caption                       one a line; a first line "path<TAB>caption" is a header
    JSON lines   {"path": "...", "caption": "..."}      one object a line (a .jsonl / .json file, or a first
                                                        line that starts with "{")

``path`` is relative to PICTURES. Blank lines are skipped. Every picture under PICTURES needs at
least one caption and every path must be a picture under PICTURES: anything else (a missing
picture, a picture without captions, a malformed line, a blank caption) is one ``error:`` line
naming it, exit status 2, and nothing is written.

The pictures are split by picture (a seeded shuffle; --dev and --test as counts, or fractions
of the pictures; dev >= 1: training picks its best epoch on dev), then DIR gets

    {split}_ims.npy      (n_img, grid*grid, 1280) EfficientNet-Lite0 grid features (imram_min.data.features)
    {split}_images.txt   the picture of each row, relative to DIR
    {split}_caps.txt     the captions, grouped by picture in row order (within a picture, in CAPTIONS' order)
    {split}_cap2img.txt  the row of each caption's picture, unless every picture of the split has 5
                         captions (or every one 1): the SCAN layout, read without a sidecar
    features.json        size, grid, network, normalisation (export --feature-extractor reads it)
    vocab.json           the words of the train captions seen >= --min-count times
    train_defaults.json  a training recipe for this many captions (``recipe``)
    prepare.json         what was done: inputs, seed, split sizes, min count

Nothing in DIR is replaced without --overwrite; the folder is built beside DIR and moved in
when complete, so a failed or interrupted prepare leaves DIR as it was.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np

from runtime import cli
from runtime.images import FEATURE_DIM, FEATURES_JSON, IMAGE_EXTENSIONS, ImageError, list_images

SPLITS = ("train", "dev", "test")
DEFAULT_DEV, DEFAULT_TEST = "0.1", "0.1"
SMALL_DATA_CAPTIONS = 10_000  # below this many train captions the default --min-count is 1, else SCAN's 4
MIN_TRAIN_PICTURES = 2  # the ranking loss needs a negative
PREPARE_JSON = "prepare.json"


def outputs_of(split: str) -> list[str]:
    return [f"{split}_ims.npy", f"{split}_images.txt", f"{split}_caps.txt", f"{split}_cap2img.txt"]


OUTPUTS = [name for split in SPLITS for name in outputs_of(split)] + \
    [FEATURES_JSON, "vocab.json", "train_defaults.json", PREPARE_JSON]


# --------------------------------------------------------------------------- reading the captions
@dataclass
class Captions:
    """CAPTIONS read: ``by_picture`` picture key (path relative to PICTURES, '/'-separated) ->
    its captions in file order; ``line_of`` key -> the first line naming it; ``form`` tsv / jsonl."""
    by_picture: dict[str, list[str]] = field(default_factory=dict)
    line_of: dict[str, int] = field(default_factory=dict)
    form: str = "tsv"

    @property
    def n_captions(self) -> int:
        return sum(map(len, self.by_picture.values()))


def picture_key(path: str) -> str:
    """A path as given in CAPTIONS -> the key it is matched by: normalised, '/'-separated."""
    return os.path.normpath(path.strip()).replace(os.sep, "/")


def read_captions(path: str) -> Captions:
    """CAPTIONS (TSV or JSON lines, see the module docstring) -> ``Captions``. cli.UserError naming
    the file and line for a malformed line or a blank caption."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            lines = f.read().splitlines()
    except UnicodeDecodeError as e:
        raise cli.UserError(f"{path}: captions must be UTF-8 text ({e})") from None
    first = next((line.strip() for line in lines if line.strip()), "")
    json_name = path.lower().endswith((".jsonl", ".ndjson", ".json"))
    result = Captions(form="jsonl" if first.startswith("{") or json_name else "tsv")
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}: line {number}"
        if result.form == "jsonl":
            try:
                record = json.loads(line)
            except ValueError as e:
                raise cli.UserError(f"{where}: not a JSON object ({e}); expected {{\"path\": ..., \"caption\": ...}} "
                                    "on each line") from None
            if not isinstance(record, dict) or not isinstance(record.get("path"), str) \
                    or not isinstance(record.get("caption"), str):
                raise cli.UserError(f"{where}: expected {{\"path\": \"...\", \"caption\": \"...\"}} (two strings), "
                                    f"got {cli.printable(line.strip()[:80])}")
            picture, caption = record["path"], record["caption"]
        else:
            if "\t" not in line:
                raise cli.UserError(f"{where}: expected path<TAB>caption, got no tab in "
                                    f"{cli.printable(line.strip()[:80])!r}")
            picture, caption = line.split("\t", 1)
            if number == 1 and (picture.strip().lower(), caption.strip().lower()) == ("path", "caption"):
                continue  # a header
        if not picture.strip():
            raise cli.UserError(f"{where}: the picture path is blank")
        caption = " ".join(caption.split())  # tabs, newlines (JSON), runs of spaces -> one space
        if not caption:
            raise cli.UserError(f"{where}: the caption of {cli.printable(picture.strip())} is blank")
        key = picture_key(picture)
        result.by_picture.setdefault(key, []).append(caption)
        result.line_of.setdefault(key, number)
    if not result.by_picture:
        raise cli.UserError(f"{path}: holds no captions")
    return result


def match_pictures(pictures_dir: str, captions: Captions, captions_path: str) -> list[str]:
    """The pictures under PICTURES (sorted) -> their keys; each has captions and each captioned
    path is one of them, else cli.UserError naming the first offender (and how many more)."""
    try:
        found = list_images([pictures_dir])
    except (FileNotFoundError, ImageError) as e:
        raise cli.UserError(str(e)) from None
    keys = [os.path.relpath(p, pictures_dir).replace(os.sep, "/") for p in found]
    on_disk = set(keys)
    missing = [k for k in captions.by_picture if k not in on_disk]
    if missing:
        first = missing[0]
        full = os.path.join(pictures_dir, first)
        why = f"is not a picture file ({', '.join(IMAGE_EXTENSIONS)})" if os.path.isfile(full) \
            else "does not exist"
        more = f" ({len(missing) - 1} more captioned paths are missing)" if len(missing) > 1 else ""
        raise cli.UserError(f"{captions_path}: line {captions.line_of[first]}: {full} {why}{more}; paths are relative "
                            f"to {pictures_dir}")
    uncaptioned = [k for k in keys if k not in captions.by_picture]
    if uncaptioned:
        more = f" ({len(uncaptioned) - 1} more pictures have none)" if len(uncaptioned) > 1 else ""
        raise cli.UserError(f"{os.path.join(pictures_dir, uncaptioned[0])} has no caption in {captions_path}{more}: "
                            "give every picture at least one, or move it out of the folder")
    return keys


# --------------------------------------------------------------------------- splits, vocabulary, recipe
def split_size(text: str, n: int, flag: str) -> int:
    """--dev / --test: a count ("5") or a fraction of the ``n`` pictures ("0.1", rounded, >= 1 when > 0)."""
    try:
        value = float(text)
    except ValueError:
        raise cli.UserError(f"{flag} must be a count of pictures (5) or a fraction of them (0.1), got {text!r}") \
            from None
    if not value >= 0 or value != value or value == float("inf"):
        raise cli.UserError(f"{flag} must be >= 0, got {text}")
    is_fraction = "." in text or "e" in text.lower()
    if is_fraction:
        if value >= 1:
            raise cli.UserError(f"{flag} {text}: a fraction must be below 1 (or give a whole count)")
        return max(1, round(value * n)) if value > 0 else 0
    return int(value)


def split_pictures(keys: list[str], n_dev: int, n_test: int, seed: int) -> dict[str, list[str]]:
    """A seeded shuffle of the pictures: the first n_test are test, the next n_dev dev, the rest
    train; within a split in sorted order."""
    order = np.random.default_rng(seed).permutation(len(keys))
    parts = {"test": order[:n_test], "dev": order[n_test:n_test + n_dev], "train": order[n_test + n_dev:]}
    return {split: sorted(keys[i] for i in parts[split]) for split in SPLITS}


def default_min_count(n_train_captions: int) -> int:
    """1 for small data (every word of a few hundred captions counts; at SCAN's 4 a 50-picture set
    loses "coffee" and "cup"), SCAN's 4 from SMALL_DATA_CAPTIONS train captions on."""
    return 1 if n_train_captions < SMALL_DATA_CAPTIONS else 4


def recipe(n_train_captions: int) -> dict:
    """train_defaults.json for this many train captions. A small model (d = 256, word embeddings
    300), a batch of about an eighth of the captions (16..128) so that an epoch is several steps,
    lr 1e-3 (x 0.1 for the last third), one warm-up epoch on all negatives, and epochs for ~100
    steps (10..30 epochs). Measured on the 50-picture example (scripts/make_example_pictures.py,
    30 train / 5 dev / 15 test pictures, 91 train captions; /work/notes/prepare.md): dev recall
    peaks within 5-10 epochs and then falls (over-fitting), and lr 1e-3 for 15 epochs gave test
    rsum 468 against 441 for lr 5e-4 (15 or 30 epochs) and 439 for lr 2e-4 x 67 epochs, in a
    quarter of the time. Above a few hundred captions the rule is an extrapolation, not measured."""
    batch = int(min(128, max(16, n_train_captions // 8)))
    steps_per_epoch = max(1, -(-n_train_captions // batch))
    epochs = int(min(30, max(10, -(-100 // steps_per_epoch))))
    return {"embed_size": 256, "word_dim": 300, "batch_size": batch, "num_epochs": epochs, "lr": 1e-3,
            "lr_update": max(1, (2 * epochs) // 3), "warmup_epochs": 1}


# --------------------------------------------------------------------------- writing
def write_text(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def write_json(path: str, obj) -> None:
    write_text(path, json.dumps(obj, indent=1) + "\n")


def write_split(folder: str, split: str, keys: list[str], captions: Captions, pictures_dir: str) -> dict:
    """{split}_images.txt, {split}_caps.txt and, unless the layout is SCAN's (5 or 1 per picture
    throughout), {split}_cap2img.txt into ``folder``. Returns the split's counts."""
    from runtime.images import write_path_list

    write_path_list(os.path.join(folder, f"{split}_images.txt"), [os.path.join(pictures_dir, k) for k in keys])
    lines, rows = [], []
    for row, key in enumerate(keys):
        lines += captions.by_picture[key]
        rows += [row] * len(captions.by_picture[key])
    write_text(os.path.join(folder, f"{split}_caps.txt"), "".join(c + "\n" for c in lines))
    per_picture = {len(captions.by_picture[k]) for k in keys}
    sidecar = per_picture not in ({5}, {1})
    if sidecar:
        write_text(os.path.join(folder, f"{split}_cap2img.txt"), "".join(f"{r}\n" for r in rows))
    return {"pictures": len(keys), "captions": len(lines), "cap2img": sidecar}


def move_into_place(tmp: str, out: str, written: list[str]) -> None:
    """The finished folder ``tmp`` becomes ``out``: renamed when ``out`` does not exist, else each
    file replaces its old version and the outputs of an earlier prepare not written now go (a stale
    cap2img.txt would misread the new captions); other files of ``out`` are left alone."""
    if not os.path.exists(out):
        os.rename(tmp, out)
        return
    for name in written:
        os.replace(os.path.join(tmp, name), os.path.join(out, name))
    for name in OUTPUTS:
        if name not in written and os.path.lexists(os.path.join(out, name)):
            os.remove(os.path.join(out, name))
    os.rmdir(tmp)


def prepare(pictures_dir: str, captions_path: str, out: str, n_dev: str = DEFAULT_DEV, n_test: str = DEFAULT_TEST,
            seed: int = 0, min_count: int | None = None, size: int | None = None, grid: int | None = None,
            device: str = "cpu", batch_size: int = 32, overwrite: bool = False) -> dict:
    """Make the data folder ``out`` (see the module docstring); returns the summary written to
    prepare.json. Every check (cli.UserError) comes before the features are extracted."""
    from imram_min.data import features
    from imram_min.engineering import checks
    from runtime.images import write_feature_spec
    from runtime.text import Vocabulary

    size = features.DEFAULT_SIZE if size is None else size
    grid = features.DEFAULT_GRID if grid is None else grid
    cli.check_count(size, "--size", 32, features.MAX_SIZE)
    cli.check_count(grid, "--grid", 1, features.MAX_GRID)
    cli.check_count(batch_size, "--batch-size", 1, features.MAX_BATCH)
    cli.check_count(seed, "--seed", 0, 2 ** 32 - 1)
    if min_count is not None:
        cli.check_count(min_count, "--min-count", 1)
    if not os.path.isdir(pictures_dir):
        raise cli.UserError(f"{pictures_dir}: no such folder (PICTURES is a folder of pictures)")
    if not os.path.isfile(captions_path):
        raise cli.UserError(f"{captions_path}: no such file (CAPTIONS is a TSV or JSON lines file)")
    cli.check_output_folder(out, "--out", overwrite=overwrite, outputs=OUTPUTS)
    cli.check_outputs_distinct([("--out", os.path.join(out, name)) for name in OUTPUTS], [captions_path])
    torch_device = checks.device(device)

    captions = read_captions(captions_path)
    keys = match_pictures(pictures_dir, captions, captions_path)
    dev, test = split_size(n_dev, len(keys), "--dev"), split_size(n_test, len(keys), "--test")
    if dev < 1:
        raise cli.UserError(f"--dev must leave at least 1 picture for the dev split (training picks its best epoch "
                            f"on it), got {n_dev}")
    if len(keys) - dev - test < MIN_TRAIN_PICTURES:
        raise cli.UserError(f"--dev {n_dev} and --test {n_test} take {dev + test} of the {len(keys)} pictures: at "
                            f"least {MIN_TRAIN_PICTURES} must be left to train on")
    splits = split_pictures(keys, dev, test, seed)
    splits = {s: k for s, k in splits.items() if k}  # --test 0: no test split
    paths = [os.path.join(pictures_dir, k) for k in keys]
    try:
        features.check_images(paths)
        features.weights_path()  # the weights package is there (ImportError otherwise)
    except (ImageError, ImportError) as e:
        raise cli.UserError(str(e)) from None
    train_captions = [c for k in splits["train"] for c in captions.by_picture[k]]
    chosen_min_count = default_min_count(len(train_captions)) if min_count is None else min_count

    out_abs = os.path.abspath(out)
    parent = os.path.dirname(out_abs)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="." + os.path.basename(out_abs) + ".tmp-", dir=parent)
    t0 = time.perf_counter()
    try:
        from tqdm import tqdm

        model = features.EfficientNetLite0.pretrained().to(torch_device)
        counts = {}
        with tqdm(total=len(keys), unit="img", desc=f"features {size}px grid {grid}", file=sys.stderr) as bar:
            for split, split_keys in splits.items():
                feats = np.lib.format.open_memmap(os.path.join(tmp, f"{split}_ims.npy"), mode="w+", dtype=np.float32,
                                                  shape=(len(split_keys), grid * grid, FEATURE_DIM))
                features.extract_features([os.path.join(pictures_dir, k) for k in split_keys], grid, size,
                                          torch_device, batch_size, model=model, out=feats, bar=bar)
                feats.flush()
                del feats
                counts[split] = write_split(tmp, split, split_keys, captions, pictures_dir)
        feature_seconds = time.perf_counter() - t0
        write_feature_spec(os.path.join(tmp, FEATURES_JSON), size, grid)
        vocab = Vocabulary.build(train_captions, threshold=chosen_min_count)
        vocab.save(os.path.join(tmp, "vocab.json"))
        train_recipe = recipe(len(train_captions))
        write_json(os.path.join(tmp, "train_defaults.json"), train_recipe)
        summary = {"pictures": os.path.abspath(pictures_dir), "captions": os.path.abspath(captions_path),
                   "captions_form": captions.form, "seed": seed, "splits": counts, "min_count": chosen_min_count,
                   "min_count_from": "--min-count" if min_count is not None else "default for this many captions",
                   "vocab_size": len(vocab), "size": size, "grid": grid, "train_defaults": train_recipe,
                   "feature_seconds": round(feature_seconds, 1)}
        write_json(os.path.join(tmp, PREPARE_JSON), summary)
        umask = os.umask(0)
        os.umask(umask)
        for name in os.listdir(tmp):  # mkdtemp made a private folder; its files get the usual permissions
            os.chmod(os.path.join(tmp, name), 0o666 & ~umask)
        os.chmod(tmp, 0o777 & ~umask)
        move_into_place(tmp, out_abs, sorted(os.listdir(tmp)))
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
    return summary


def add_arguments(p) -> None:
    """The flags of ``python -m imram_min.data prepare``."""
    from imram_min.data import features

    p.add_argument("pictures", metavar="PICTURES", help="folder of pictures (searched recursively)")
    p.add_argument("captions", metavar="CAPTIONS",
                   help="path<TAB>caption lines (TSV) or {\"path\": ..., \"caption\": ...} lines (JSON lines); paths "
                        "relative to PICTURES, any number of captions per picture")
    p.add_argument("--out", required=True, metavar="DIR", help="data folder to write")
    p.add_argument("--dev", default=DEFAULT_DEV, help=f"dev pictures: a count or a fraction (default {DEFAULT_DEV}; "
                                                      "at least 1)")
    p.add_argument("--test", default=DEFAULT_TEST, help=f"test pictures: a count or a fraction (default "
                                                        f"{DEFAULT_TEST}; 0: no test split)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split (0)")
    p.add_argument("--min-count", dest="min_count", type=int, default=None,
                   help="words seen at least this often in the train captions enter the vocabulary (default: 1 below "
                        f"{SMALL_DATA_CAPTIONS:,} train captions, else 4 as SCAN)")
    p.add_argument("--size", type=int, default=features.DEFAULT_SIZE,
                   help=f"picture side for the features, px (default {features.DEFAULT_SIZE})")
    p.add_argument("--grid", type=int, default=features.DEFAULT_GRID,
                   help=f"N x N regions per picture (default {features.DEFAULT_GRID})")
    p.add_argument("--batch-size", dest="batch_size", type=int, default=32, help="pictures per batch (32)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default cpu)")
    p.add_argument("--overwrite", action="store_true", help="replace the data files already in DIR")


def run_from_args(args) -> int:
    """``python -m imram_min.data prepare``: prepare, then say what was made and what comes next."""
    summary = prepare(args.pictures, args.captions, args.out, args.dev, args.test, args.seed, args.min_count,
                      args.size, args.grid, args.device, args.batch_size, args.overwrite)
    splits = ", ".join(f"{split} {c['pictures']} pictures / {c['captions']} captions"
                       + (f" (+ {split}_cap2img.txt)" if c["cap2img"] else "")
                       for split, c in summary["splits"].items())
    print(f"wrote {args.out}: {splits}; features {summary['size']} px grid {summary['grid']} "
          f"({summary['feature_seconds']} s)")
    n = summary["min_count"]
    source = "--min-count" if args.min_count is not None else "the default for this many captions; --min-count"
    print(f"vocabulary: {summary['vocab_size']} words (words of the train captions seen >= {n} time{'s' * (n > 1)}: "
          f"{source} to change)")
    r = summary["train_defaults"]
    print(f"train_defaults.json: d {r['embed_size']}, batch {r['batch_size']}, {r['num_epochs']} epochs, lr {r['lr']} "
          f"(flags of imram_min.train override it); next: python -m imram_min.train --data {args.out} --out RUN_DIR")
    return 0
