"""The built-in data set: a synthetic world of scenes, written in the precomp layout of ``imram_min.data``.

    python -m imram_min.data synthetic --out DIR [--overwrite] [--seed 0 --n-train 1000 --n-dev 200 --n-test 500 ...]

Each "image" is a scene of 2-4 objects (category, colour, size) in the cells of a 3 x 3 grid; its
regions are feature vectors that a fixed random renderer makes from a hidden description of each
region; five captions per image come from a small grammar with synonyms and spatial relations.
About 40% of the images come in *twin* pairs with the attributes swapped between objects: hard
negatives that only word-region alignment tells apart. ``README_TEXT`` is the full design; it is
written into every folder made. Deterministic from the seed; a CPU trains IMRAM on it in minutes.

Not real pictures: it teaches what IMRAM is for and says nothing about photographs.
"""
from __future__ import annotations

import json
import os
import sys
import time

import numpy as np

from imram_min.data import SPLITS
from runtime import atomic, cli
from runtime.text import Vocabulary

# --------------------------------------------------------------------------- writing
def _write_json(path: str, obj) -> None:
    """JSON; a list is written one item a line (readable, and fast: no indent)."""
    if isinstance(obj, list):
        atomic.write_text(path, "[\n" + ",\n".join(json.dumps(item) for item in obj) + "\n]\n")
    else:
        atomic.write_json(path, obj, indent=1)


# --------------------------------------------------------------------------- the synthetic world
# Objects with their caption nouns (synonyms), colours, sizes with their adjectives (the
# medium size is never named), and spatial relations with their phrasings.
CATEGORIES = {
    "dog": ("dog", "puppy"), "cat": ("cat", "kitten"), "car": ("car", "automobile"),
    "ball": ("ball",), "cup": ("cup", "mug"), "chair": ("chair",), "bird": ("bird",),
    "tree": ("tree",), "book": ("book",), "lamp": ("lamp",), "boat": ("boat", "ship"),
    "hat": ("hat", "cap"),
}
COLOURS = ("red", "blue", "green", "yellow", "black", "white", "orange", "purple")
SIZES = {"small": ("small", "little"), "medium": (), "large": ("large", "big")}
N_STUFF = 4  # kinds of background region (grass, wall, ...); never named in captions
RELATIONS = {  # "A <phrase> B"
    "left": ("left of", "to the left of", "on the left of"),
    "right": ("right of", "to the right of", "on the right of"),
    "above": ("above", "over", "on top of"),
    "below": ("below", "under", "beneath"),
    "next": ("next to", "beside", "near"),
}
RELATIONS_TO_IT = {  # "B and A <phrase>": A relative to B, B referred to as it
    "left": ("to its left", "on its left"), "right": ("to its right", "on its right"),
    "above": ("above it", "over it"), "below": ("below it", "under it"),
    "next": ("next to it", "beside it"),
}
GRID = 3  # objects sit in distinct cells of a GRID x GRID layout
NOISE_DIM = 8
LATENT_DIM = len(CATEGORIES) + len(COLOURS) + len(SIZES) + N_STUFF + 2 + NOISE_DIM
RENDERER_SEED = 2020  # the renderer is part of the world: the same for every dataset seed
RENDERER_HIDDEN = 256

CATEGORY_NAMES, SIZE_NAMES = tuple(CATEGORIES), tuple(SIZES)
CATEGORY_IDS = {c: i for i, c in enumerate(CATEGORY_NAMES)}
COLOUR_IDS = {c: i for i, c in enumerate(COLOURS)}
SIZE_IDS = {s: i for i, s in enumerate(SIZE_NAMES)}

DEFAULT_TRAIN_SETTINGS = {"embed_size": 64, "word_dim": 64, "batch_size": 32, "num_epochs": 4, "lr": 1e-3,
                          "lr_update": 3, "warmup_epochs": 1}


def pick(rng: np.random.Generator, options):
    """One of ``options`` uniformly (rng.choice is slow on small tuples of strings)."""
    return options[int(rng.integers(len(options)))]


def random_scene(rng: np.random.Generator) -> list[dict]:
    """2-4 objects with distinct categories, distinct colours, a size each and distinct grid cells."""
    n_obj = int(rng.integers(2, 5))
    categories = rng.choice(len(CATEGORIES), n_obj, replace=False)
    colours = rng.choice(len(COLOURS), n_obj, replace=False)
    sizes = rng.integers(0, len(SIZES), n_obj)
    cells = rng.choice(GRID * GRID, n_obj, replace=False)
    return [{"category": CATEGORY_NAMES[c], "colour": COLOURS[k], "size": SIZE_NAMES[s],
             "cell": [int(x % GRID), int(x // GRID)]}  # [column, row], row 0 at the top
            for c, k, s, x in zip(categories, colours, sizes, cells)]


def twin_scene(scene: list[dict]) -> list[dict]:
    """The hard negative: same objects in the same places, colours and sizes passed on to the next object.

    Colours are distinct within a scene, so every object changes colour: "a red dog left of a
    blue ball" becomes "a blue dog left of a red ball". The words and the bag of regions'
    ingredients are the same; only which attribute goes with which object differs.
    """
    n = len(scene)
    return [dict(obj, colour=scene[(i + 1) % n]["colour"], size=scene[(i + 1) % n]["size"]) for i, obj in enumerate(scene)]


def relation(a: dict, b: dict, rng: np.random.Generator) -> str:
    """Where object a is relative to b: the dominant axis, or sometimes "next" for neighbours."""
    dx = a["cell"][0] - b["cell"][0]
    dy = a["cell"][1] - b["cell"][1]  # rows grow downwards
    if max(abs(dx), abs(dy)) == 1 and rng.random() < 0.25:
        return "next"
    if abs(dx) >= abs(dy):
        return "left" if dx < 0 else "right"
    return "above" if dy < 0 else "below"


def noun_phrase(obj: dict, rng: np.random.Generator) -> str:
    """e.g. "a small red puppy", "the red dog", "a cup that is blue", "an orange cap"."""
    noun = pick(rng, CATEGORIES[obj["category"]])
    size = [pick(rng, SIZES[obj["size"]])] if SIZES[obj["size"]] and rng.random() < 0.5 else []
    if rng.random() < 0.1:  # colour after the noun: binding must reach past the noun
        words, tail = size + [noun], ["that", "is", obj["colour"]]
    else:
        words, tail = size + ([obj["colour"]] if rng.random() < 0.9 else []) + [noun], []
    article = "the" if rng.random() < 0.15 else ("an" if words[0][0] in "aeiou" else "a")
    return " ".join([article] + words + tail)


def scene_caption(scene: list[dict], rng: np.random.Generator) -> str:
    """One caption naming 1-3 of the scene's objects, with relations between them."""
    u = rng.random()
    k = min(len(scene), 1 if u < 0.2 else 2 if u < 0.7 else 3)  # 1, 2, 3 objects: 20%, 50%, 30%
    a, b, c = [scene[i] for i in rng.permutation(len(scene))[:k]] + [None] * (3 - k)
    A, B, C = (noun_phrase(o, rng) if o is not None else None for o in (a, b, c))
    if k == 1:
        template = pick(rng, ["{A}", "there is {A}", "a picture of {A}", "an image with {A}",
                               "{A} in the picture", "we can see {A}"])
        text = template.format(A=A)
    elif k == 2:
        rel = relation(a, b, rng)
        text = pick(rng, ["{A} {r} {B}", "{A} is {r} {B}", "there is {A} {r} {B}", "{B} and {A} {it}",
                           "there is {B} and {A} {it}", "{B} with {A} {it}", "{A} and {B}"]).format(
            A=A, B=B, r=pick(rng, RELATIONS[rel]), it=pick(rng, RELATIONS_TO_IT[rel]))
    else:
        rel_ab, rel_cb = relation(a, b, rng), relation(c, b, rng)
        text = pick(rng, ["{A} {r} {B} and {C}", "{A} , {B} and {C}", "there are {A} , {B} and {C}",
                           "{A} {r} {B} with {C} {c_it}", "{B} with {A} {a_it} and {C} {c_it}"]).format(
            A=A, B=B, C=C, r=pick(rng, RELATIONS[rel_ab]), a_it=pick(rng, RELATIONS_TO_IT[rel_ab]),
            c_it=pick(rng, RELATIONS_TO_IT[rel_cb]))
    if rng.random() < 0.3:
        text = text[0].upper() + text[1:]
    if rng.random() < 0.3:
        text += " ." if rng.random() < 0.5 else "."
    return text


def grammar_tokens(caption: str) -> list[str]:
    """``runtime.text.tokenize`` for the grammar's captions, 100x faster.

    They are space-separated words, commas and an optional final period, on which nltk's
    tokenizer only lower-cases and splits off that period (a test holds the two together).
    """
    return caption.lower().replace(".", " .").split()


def scene_captions(scene: list[dict], rng: np.random.Generator, n: int = 5) -> list[str]:
    """``n`` captions of a scene, distinct where a few tries allow."""
    captions = []
    for _ in range(n):
        caption = scene_caption(scene, rng)
        for _retry in range(10):
            if caption not in captions:
                break
            caption = scene_caption(scene, rng)
        captions.append(caption)
    return captions


def scene_latents(scene: list[dict], rng: np.random.Generator, n_region: int, views_per_object: int,
                  noise: float) -> np.ndarray:
    """The hidden description of each region of a scene: (n_region, LATENT_DIM) float32, shuffled.

    Layout: category one-hot | colour one-hot | size one-hot | stuff one-hot | x, y | noise.
    Each object gives ``views_per_object`` regions: one full view, the others partial views
    (crops, occlusions) with weakened category/colour/size evidence. The other regions are
    clutter: a background kind with a faint random colour, somewhere in the image.
    """
    n_cat, n_col, n_size = len(CATEGORIES), len(COLOURS), len(SIZES)
    o_col, o_size = n_cat, n_cat + n_col
    o_stuff = o_size + n_size
    o_xy = o_stuff + N_STUFF
    o_noise = o_xy + 2
    z = np.zeros((n_region, LATENT_DIM), dtype=np.float32)
    # object regions: rows 0 .. n_obj * views - 1, object by object
    n_obj_rows = len(scene) * views_per_object
    rows = np.arange(n_obj_rows)
    obj_of_row = rows // views_per_object
    strength = rng.uniform(0.4, 1.0, (n_obj_rows, 3))
    strength[rows % views_per_object == 0] = 1.0  # the first view of each object is a full view
    category = np.array([CATEGORY_IDS[o["category"]] for o in scene])[obj_of_row]
    colour = np.array([COLOUR_IDS[o["colour"]] for o in scene])[obj_of_row]
    size = np.array([SIZE_IDS[o["size"]] for o in scene])[obj_of_row]
    cell = np.array([o["cell"] for o in scene], dtype=np.float32)[obj_of_row]
    z[rows, category] = strength[:, 0]
    z[rows, o_col + colour] = strength[:, 1]
    z[rows, o_size + size] = strength[:, 2]
    z[rows, o_xy:o_xy + 2] = cell / (GRID - 1) * 2 - 1 + rng.normal(0, 0.15, (n_obj_rows, 2))
    # clutter regions: the rest
    rows = np.arange(n_obj_rows, n_region)
    z[rows, o_stuff + rng.integers(0, N_STUFF, len(rows))] = rng.uniform(0.5, 1.0, len(rows))
    z[rows, o_col + rng.integers(0, n_col, len(rows))] = rng.uniform(0.0, 0.5, len(rows))
    z[rows, o_xy:o_xy + 2] = rng.uniform(-1, 1, (len(rows), 2))
    z[:, o_noise:] = rng.normal(0, noise, (n_region, NOISE_DIM))
    return z[rng.permutation(n_region)]


def make_renderer(img_dim: int):
    """The fixed random "CNN": latent (n, LATENT_DIM) -> features (n, img_dim) float32.

    A 2-layer MLP, tanh then ReLU (so features are non-negative, like pooled CNN features),
    with weights from RENDERER_SEED: the same world whatever the dataset seed.
    """
    rng = np.random.default_rng(RENDERER_SEED)
    w1 = rng.normal(0, 1.0, (LATENT_DIM, RENDERER_HIDDEN)).astype(np.float32)
    b1 = rng.normal(0, 0.5, RENDERER_HIDDEN).astype(np.float32)
    w2 = rng.normal(0, 1.0 / np.sqrt(RENDERER_HIDDEN), (RENDERER_HIDDEN, img_dim)).astype(np.float32)
    b2 = rng.normal(0, 0.1, img_dim).astype(np.float32)

    def render(latents: np.ndarray) -> np.ndarray:
        return np.maximum(np.tanh(latents.astype(np.float32) @ w1 + b1) @ w2 + b2, 0)

    return render


def make_split(n_images: int, rng: np.random.Generator, render, n_region: int = 36, views_per_object: int = 3,
               twin_fraction: float = 0.4, noise: float = 0.5):
    """Scenes, features (n_images, n_region, img_dim) float32 and 5 captions per image.

    A twin (``twin_scene``) follows its original scene directly, in the same split, so that
    about ``twin_fraction`` of the images belong to a twin pair. Returns (scenes, features,
    captions) with scenes as dicts {"objects": [...], "twin": index of the twin or None}.
    """
    p_twin = twin_fraction / (2 - twin_fraction)  # a pair holds 2 images: f = 2p / (1 + p)
    scenes = []
    while len(scenes) < n_images:
        objects = random_scene(rng)
        scenes.append({"objects": objects, "twin": None})
        if len(scenes) < n_images and rng.random() < p_twin:
            scenes[-1]["twin"] = len(scenes)
            scenes.append({"objects": twin_scene(objects), "twin": len(scenes) - 1})
    latents = np.stack([scene_latents(s["objects"], rng, n_region, views_per_object, noise) for s in scenes])
    features = render(latents.reshape(-1, LATENT_DIM)).reshape(n_images, n_region, -1)
    captions = [c for s in scenes for c in scene_captions(s["objects"], rng)]
    return scenes, features, captions


README_TEXT = """\
SYNTHETIC DATA made by imram_min.data.synthetic.make_synthetic (seed {seed}). Not real images.

Each "image" is a scene of 2-4 objects (12 categories, 8 colours, 3 sizes) in distinct
cells of a 3x3 grid. Its {n_region} regions are float32 feature vectors of size {img_dim}
made by a fixed random renderer (a 2-layer MLP, tanh then ReLU, weights from a constant seed)
applied to a hidden description of each region: category, colour and size one-hots, position
and noise (scale {noise}). Each object gives {views} regions (a full view and partial views
with weaker evidence); the other regions are background clutter with faint random colours.

Captions (5 per image, in image order) come from a small grammar with synonyms
(dog/puppy, big/large, left of/to the left of, ...) and free word order, naming 1-3 of
the objects with spatial relations (left, right, above, below, next to).

Hard negatives: about {twin_pct}% of the images come in twin pairs, adjacent in the same split:
the same objects in the same places with colours and sizes swapped between objects
("a red dog left of a blue ball" vs "a blue dog left of a red ball"). Telling twins apart
needs binding each colour to its object, what word-region alignment does and a mean-pooled
embedding finds hard. {{split}}_scenes.json lists each scene and its twin.

Files: {{train,dev,test}}_ims.npy, {{split}}_caps.txt, {{split}}_scenes.json, vocab.json (from the
train captions, words seen >= 4 times), train_defaults.json (suggested training settings).
Images: train {n_train}, dev {n_dev}, test {n_test}. Each split is drawn from its own stream
of the seed, so changing one split's size leaves the others unchanged.
"""


def make_synthetic(out_dir: str | os.PathLike, seed: int = 0, n_train: int = 1000, n_dev: int = 200, n_test: int = 500,
                   img_dim: int = 256, n_region: int = 36, views_per_object: int = 3, twin_fraction: float = 0.4,
                   noise: float = 0.5, train_defaults: dict | None = None) -> dict:
    """Write the synthetic data folder (see README_TEXT for the design). Deterministic from ``seed``.

    img_dim=256 (not the usual 2048) keeps the image encoder and the files small for CPU
    training. ``train_defaults`` overrides or adds keys of DEFAULT_TRAIN_SETTINGS written to
    train_defaults.json. Returns a summary dict: images per split, vocabulary size, seconds.
    """
    t0 = time.perf_counter()
    max_object_regions = 4 * views_per_object
    if n_region < max_object_regions:
        raise ValueError(f"n_region={n_region} is too few for 4 objects x {views_per_object} views")
    if not 0 <= twin_fraction <= 1:
        raise ValueError(f"twin_fraction must be in [0, 1], got {twin_fraction}")
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    render = make_renderer(img_dim)
    sizes = {"train": n_train, "dev": n_dev, "test": n_test}
    train_captions = None
    for split_index, split in enumerate(SPLITS):
        rng = np.random.default_rng([seed, split_index])
        scenes, features, captions = make_split(sizes[split], rng, render, n_region, views_per_object,
                                                twin_fraction, noise)
        atomic.save_npy(os.path.join(out_dir, f"{split}_ims.npy"), features)
        atomic.write_text(os.path.join(out_dir, f"{split}_caps.txt"), "".join(c + "\n" for c in captions))
        _write_json(os.path.join(out_dir, f"{split}_scenes.json"), scenes)
        if split == "train":
            train_captions = captions
    vocab = Vocabulary.from_token_lists(map(grammar_tokens, train_captions), threshold=4)
    vocab.save(os.path.join(out_dir, "vocab.json"))
    _write_json(os.path.join(out_dir, "train_defaults.json"), {**DEFAULT_TRAIN_SETTINGS, **(train_defaults or {})})
    atomic.write_text(os.path.join(out_dir, "README.txt"), README_TEXT.format(
        seed=seed, n_region=n_region, img_dim=img_dim, noise=noise, views=views_per_object,
        twin_pct=round(100 * twin_fraction), n_train=n_train, n_dev=n_dev, n_test=n_test))
    return {"n_images": sizes, "vocab_size": len(vocab), "seconds": round(time.perf_counter() - t0, 2)}


# the files make_synthetic writes into its folder: the command refuses a folder holding one of them
# unless --overwrite is given
OUTPUTS = [f"{split}_{kind}" for split in SPLITS for kind in ("ims.npy", "caps.txt", "scenes.json")] + \
    ["vocab.json", "train_defaults.json", "README.txt"]


def build_parser() -> cli.ArgumentParser:
    p = cli.ArgumentParser(prog="python -m imram_min.data synthetic",
                           description="Write the built-in synthetic data folder (features, captions, vocab.json).")
    add_arguments(p)
    return p


SETTINGS = (  # flag, type, default, help: the knobs of make_synthetic
    ("--seed", int, 0, "(0)"),
    ("--n-train", int, 1000, "training images, 5 captions each (1000)"),
    ("--n-dev", int, 200, "(200)"),
    ("--n-test", int, 500, "(500)"),
    ("--img-dim", int, 256, "size of a region feature (256)"),
    ("--twin-fraction", float, 0.4, "share of images in hard-negative twin pairs (0.4)"),
    ("--noise", float, 0.5, "scale of the per-region latent noise (0.5)"),
)


def add_arguments(p) -> None:
    """The flags of the synthetic data command (also ``python -m imram_min.data synthetic``)."""
    p.add_argument("--out", required=True, help="folder to write")
    p.add_argument("--overwrite", action="store_true", help="replace the synthetic data files already in --out")
    for flag, kind, default, text in SETTINGS:
        p.add_argument(flag, type=kind, default=default, help=text)


def write_from_args(args) -> int:
    """Check the parsed flags (cli.UserError on a bad one), then write the folder."""
    for flag in ("n_train", "n_dev", "n_test", "img_dim"):
        cli.check_count(getattr(args, flag), "--" + flag.replace("_", "-"))
    if not 0 <= args.twin_fraction <= 1:
        raise cli.UserError(f"--twin-fraction must be in [0, 1], got {args.twin_fraction}")
    if not args.noise >= 0:
        raise cli.UserError(f"--noise must be >= 0, got {args.noise}")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise cli.UserError(f"--out {args.out} is a file; give a folder")
    cli.check_output_folder(args.out, "--out", overwrite=args.overwrite, outputs=OUTPUTS)
    summary = make_synthetic(args.out, seed=args.seed, n_train=args.n_train, n_dev=args.n_dev, n_test=args.n_test,
                             img_dim=args.img_dim, twin_fraction=args.twin_fraction, noise=args.noise)
    print(f"wrote synthetic data to {args.out}: {summary}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli.run(lambda a: write_from_args(build_parser().parse_args(a)), argv)


if __name__ == "__main__":
    sys.exit(main())
