"""Conformance vectors: what a correct runtime of a model folder must compute, written into the folder.

``python -m export`` calls ``write_conformance`` for every model folder it writes; ``python -m
runtime.check MODEL_DIR`` (and ``node clients/node/check.js MODEL_DIR``) check a runtime against
them. Two files, both listed in manifest.json with their SHA-256 (docs/deploy.md has the layout):

    conformance.json  format, the tokeniser and vocabulary the ids come from, CAPTIONS (>= 1,000:
                      every caption of export/awkward_captions.json, synthetic-style, emoji-style,
                      vocabulary-word and seeded fuzz strings) each with its tokens and ids, the
                      array index, and the STAGES in order, each with its tolerance
    conformance.bin   the arrays, little-endian, C order, each at an 8-byte aligned offset:
                      region_feats (N_IMG, N_REGION, img_dim) f32, seeded normal;
                      tokens (n_cap, n_word) i64 and lengths (n_cap,) i64 of EMBEDDING_LENGTHS captions;
                      region_embs (N_IMG, N_REGION, d), word_embs (n_cap, n_word, d) f32 (0 past each length);
                      region_proj / word_proj (.., P) f32 (only when the folder has the projection graphs;
                      word_proj past each length is the projection of the zero rows: the bias);
                      sims (N_IMG, n_cap) f32: the matcher on the stored embeddings (and projections);
                      pipeline_feats (PIPELINE_IMG, PIPELINE_REGION, img_dim) f32, seeded normal (another
                      number of regions);
                      pipeline_sims (PIPELINE_IMG, N_SCORE_CAPTIONS) f32: pipeline_feats against caption strings;
                      images (N_PICTURES, 3, size, size) f32: seeded uint8 pixels normalised as runtime.images
                      does, and picture_feats (N_PICTURES, grid*grid, 1280) f32 (only when the folder has
                      feature_extractor.onnx);
                      image_global (N_IMG, G), text_global (n_cap, G) f32: the global head on the stored
                      region_embs, word_embs + lengths (only when the folder has image_global.onnx and
                      text_global.onnx; ``add_global_head_vectors`` adds them once export.global_head has
                      added the graphs)

The expected floats are computed by PyTorch in float64 from the checkpoint's own modules (the
reference ``model.py``: packed GRU, ``model.similarity``; the global head's modules; the feature
extractor's network) and rounded to float32, each stage from
the float32 expected values of the stages before it, so a runtime's error is its own float32
rounding only and one wrong stage does not fail the others. Tokens come from the runtime's own
tokeniser (the folder's tokenizer.json when there is one), ids from the folder's vocabulary:
[<start>] + ids + [<end>], as training encodes a caption.

Tolerance of a float stage (an absolute bound on max |runtime - expected|, stored per stage):
REL_TOL[stage] * max(1, max |expected|). Why these numbers: docs/deploy.md, "Tolerances".

Format version: 1 while every stage is one a version-1 client knows; 2 when the file holds a stage
of an optional graph (global head, feature extractor) or a stage that "requires" a capability (a
client without it prints the stage as skipped; runtime.check never skips). A version-1 client would
misread those stages (a failure "the model folder has no feature_extractor graph" for a graph it
merely does not load), so it refuses the file instead; folders without those graphs stay version 1.
"""
from __future__ import annotations

import json
import math
import os
import random

import numpy as np
import torch

from runtime.text import END, START, UNK, Vocabulary

FORMAT = "imram-min-conformance"
FORMAT_VERSION = 2  # 2: stages of the optional graphs (global head, feature extractor) and "requires"
V1_GRAPHS = ("image_encoder", "text_encoder", "region_projection", "word_projection", "matcher")
JSON_FILE, DATA_FILE = "conformance.json", "conformance.bin"
FILES = (JSON_FILE, DATA_FILE)
TOKENIZER_FILE = "tokenizer.json"
AWKWARD_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "awkward_captions.json")
SEED = 2020
N_IMG, N_REGION = 3, 2  # the feature array: small (projections of 4d floats per region at d = 1,024)
PIPELINE_IMG, PIPELINE_REGION = 2, 4  # the end-to-end stage's features: another number of regions
EMBEDDING_LENGTHS = (6, 4)  # ids lengths (with <start>, <end>) of the captions whose embeddings are kept
N_SCORE_CAPTIONS = 10  # captions (strings) of the pipeline stage
N_PICTURES = 1  # preprocessed pictures of the feature extractor's stage (3 x 128 x 128 floats each at 128 px)
N_SYNTHETIC_SCENES = 60  # x 5 captions
N_VOCAB_CAPTIONS = 100
MIN_CAPTIONS = 1200  # fuzz strings fill the list up to this many captions
REL_TOL = {"region_embs": 1e-5, "word_embs": 1e-5, "region_proj": 1e-5, "word_proj": 1e-5,
           "sims": 2e-5, "pipeline": 2e-5, "image_global": 1e-5, "text_global": 1e-5, "picture_feats": 1e-4}
LABELS = {"tokens": "tokens", "ids": "ids", "region_embs": "region embeddings", "word_embs": "word embeddings",
          "region_proj": "region projections", "word_proj": "word projections", "sims": "scores",
          "pipeline": "pipeline scores", "image_global": "image global head", "text_global": "text global head",
          "picture_feats": "picture features"}
GLOBAL_ARRAYS = ("image_global", "text_global")  # the global head's stages (and arrays): graph = array name
PICTURES = "pictures"  # a stage's "requires": only clients that take pictures run it

# --------------------------------------------------------------------------- captions
EMOJI_RECORDS = [  # emoji-style records (as imram_min.data.emoji.join_emoji makes them) for emoji_captions
    {"hexcode": "1F44D", "label": "thumbs up", "name": "thumbs up sign", "short_names": ["+1", "thumbsup"],
     "tags": ["+1", "hand", "thumb", "up"], "tone": ""},
    {"hexcode": "1F44D-1F3FF", "label": "thumbs up: dark skin tone", "name": "thumbs up sign",
     "short_names": ["+1", "thumbsup"], "tags": ["+1", "hand", "thumb", "up"], "tone": "dark skin tone"},
    {"hexcode": "1F600", "label": "grinning face", "name": "grinning face", "short_names": ["grinning"],
     "tags": ["face", "grin", "happy", "smile"], "tone": ""},
    {"hexcode": "1F602", "label": "face with tears of joy", "name": "face with tears of joy",
     "short_names": ["joy"], "tags": ["face", "joy", "laugh", "tear"], "tone": ""},
    {"hexcode": "1F468-200D-1F4BB", "label": "man technologist", "name": "man technologist",
     "short_names": ["male-technologist"], "tags": ["coder", "developer", "inventor", "software"], "tone": ""},
    {"hexcode": "1F469-1F3FD-200D-1F680", "label": "woman astronaut: medium skin tone", "name": "woman astronaut",
     "short_names": ["female-astronaut"], "tags": ["astronaut", "rocket", "woman"], "tone": "medium skin tone"},
    {"hexcode": "1F1EB-1F1F7", "label": "flag: France", "name": "regional indicator symbol letters fr",
     "short_names": ["fr", "flag-fr"], "tags": ["flag", "france"], "tone": ""},
    {"hexcode": "2764-FE0F", "label": "red heart", "name": "heavy black heart", "short_names": ["heart"],
     "tags": ["heart", "love"], "tone": ""},
    {"hexcode": "1F9D1-200D-1F91D-200D-1F9D1", "label": "people holding hands", "name": "people holding hands",
     "short_names": ["people_holding_hands"], "tags": ["couple", "hand", "hold", "holding hands", "person"],
     "tone": ""},
    {"hexcode": "1F3F3-FE0F-200D-1F308", "label": "rainbow flag", "name": "rainbow flag",
     "short_names": ["rainbow-flag"], "tags": ["bisexual", "gay", "lgbt", "pride", "rainbow"], "tone": ""},
    {"hexcode": "0023-FE0F-20E3", "label": "keycap: #", "name": "hash key", "short_names": ["hash"],
     "tags": ["keycap"], "tone": ""},
    {"hexcode": "1F37A", "label": "beer mug", "name": "beer mug", "short_names": ["beer"],
     "tags": ["bar", "beer", "drink", "mug"], "tone": ""},
    {"hexcode": "1F6B4-200D-2640-FE0F", "label": "woman biking", "name": "woman bicyclist",
     "short_names": ["woman-biking"], "tags": ["bicycle", "biking", "cyclist", "woman"], "tone": ""},
    {"hexcode": "1F44B-1F3FB", "label": "waving hand: light skin tone", "name": "waving hand sign",
     "short_names": ["wave"], "tags": ["hand", "wave", "waving"], "tone": "light skin tone"},
    {"hexcode": "1F47D", "label": "alien", "name": "extraterrestrial alien", "short_names": ["alien"],
     "tags": ["creature", "extraterrestrial", "face", "fantasy", "ufo"], "tone": ""},
    {"hexcode": "1F9D0", "label": "face with monocle", "name": "face with monocle",
     "short_names": ["face_with_monocle"],
     "tags": ["face", "monocle", "stuffy"], "tone": ""},
    {"hexcode": "1F96F", "label": "bagel", "name": "bagel", "short_names": ["bagel"],
     "tags": ["bakery", "breakfast", "schmear"], "tone": ""},
    {"hexcode": "1F3C3-1F3FE-200D-2642-FE0F", "label": "man running: medium-dark skin tone", "name": "man running",
     "short_names": ["man-running"], "tags": ["man", "marathon", "racing", "running"],
     "tone": "medium-dark skin tone"},
    {"hexcode": "1F431", "label": "cat face", "name": "cat face", "short_names": ["cat"],
     "tags": ["cat", "face", "pet"],
     "tone": ""},
    {"hexcode": "1F4AF", "label": "hundred points", "name": "hundred points symbol", "short_names": ["100"],
     "tags": ["100", "full", "hundred", "score"], "tone": ""},
]
EMOJI_CHARACTERS = ["\U0001F44D", "\U0001F44D\U0001F3FF", "\U0001F600", "\U0001F602", "\U0001F468\u200d\U0001F4BB",
                    "\U0001F1EB\U0001F1F7", "\u2764\ufe0f", "\U0001F3F3\ufe0f\u200d\U0001F308", "#\ufe0f\u20e3",
                    "\U0001F37A", "\U0001F44B\U0001F3FB", "\U0001F47D", "\U0001F431", "\U0001F4AF"]

FUZZ_PIECES = {  # what fuzz strings are made of, by class; each string draws from a few classes
    "ascii": list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ") + ["dog", "Cat", "RED", "ball", "on", "the"],
    "digits": list("0123456789") + ["3.14", "1,000", "10%", "$5", "2nd", "1/2", "-7", "+1", "1e5", "v2.0"],
    "space": [" ", " ", " ", "  ", "\t", "\u00a0", "\u2003", "\u3000", "\u2009", "\u200b"],
    "quotes": ["'", '"', "`", "``", "''", "\u00b4", "\u2018", "\u2019", "\u201c", "\u201d", "\u00ab", "\u00bb",
               "\u201e", "\u2039", "\u203a"],
    "contractions": ["n't", "'s", "'ll", "'re", "'ve", "'m", "'d", "can't", "won't", "cannot", "gonna", "wanna",
                     "gotta", "'tis", "'twas", "d'ye", "lemme", "more'n", "y'all", "o'clock", "rock'n'roll"],
    "dashes": ["-", "--", "---", "\u2010", "\u2011", "\u2012", "\u2013", "\u2014", "\u2015", "\u2212", "_"],
    "punct": list(".,;:!?()[]{}<>&%$#@*/\\|^~+=") + ["...", "\u2026", "?!", "..", "e.g.", "U.S.", "a.m.",
                                                     "http://x.org/a?b=1", "a@b.com", "#tag", "@user"],
    "unicode": ["\u00e9", "caf\u00e9", "\u00df", "stra\u00dfe", "\u00f1", "\u03a9", "\u03c3\u03bf\u03c6\u03af\u03b1",
                "\u0416\u0443\u043a", "\u4e2d\u6587", "\u65e5\u672c\u8a9e",
                "\u0627\u0644\u0639\u0631\u0628\u064a\u0629",
                "\u0939\u093f\u0928\u094d\u0926\u0940", "\ufb01", "\u0130", "\u1e9e", "\u03a3", "\u00c5", "\u2160",
                "\u00bd", "\u00b2", "\u0661\u0662", "\uff21\uff22", "\u1100\u1161", "\U0001d400", "\u2126"],
    "combining": ["\u0301", "\u0308", "\u0327", "\u20dd", "\u0300\u0301", "e\u0301", "n\u0303", "\u093f", "\u05b4"],
    "emoji": EMOJI_CHARACTERS + ["\U0001F468\u200d\U0001F469\u200d\U0001F467", "\u263a", "\u2600\ufe0f",
                                 "\U0001F3FD", "\u200d", "\ufe0f"],
    "control": ["\x00", "\x07", "\x1b", "\x1b[31m", "\r", "\n", "\r\n", "\x0b", "\x0c", "\x1c", "\x1f", "\x7f",
                "\x85", "\u2028", "\u2029", "\ufeff", "\u200e", "\u202e"],
}


def awkward_captions(path: str = AWKWARD_FILE) -> list[str]:
    """The captions of export/awkward_captions.json (a JSON list of strings); [] when it is missing."""
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as f:
        captions = json.load(f)
    if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
        raise ValueError(f"{path}: expected a JSON list of strings")
    return captions


def synthetic_captions(seed: int = SEED, n_scenes: int = N_SYNTHETIC_SCENES) -> list[str]:
    """5 captions of each of ``n_scenes`` random scenes of imram_min.data.synthetic (its grammar)."""
    from imram_min.data.synthetic import random_scene, scene_captions
    rng = np.random.default_rng(seed)
    return [c for _ in range(n_scenes) for c in scene_captions(random_scene(rng), rng)]


def emoji_style_captions(seed: int = SEED) -> list[str]:
    """imram_min.data.emoji's captions of EMOJI_RECORDS, plus the same texts with the emoji itself in them."""
    from imram_min.data.emoji import emoji_captions
    rng = random.Random(seed)
    out = []
    for record in EMOJI_RECORDS:
        for caption in dict.fromkeys(emoji_captions(record, seed)):
            out.append(caption)
    for i, emoji in enumerate(EMOJI_CHARACTERS):
        text = out[rng.randrange(len(out))]
        out.append([f"{emoji} {text}", f"{text} {emoji}", f"{text}{emoji}!", f"{emoji}{emoji}"][i % 4])
    return out


def vocabulary_captions(vocab: Vocabulary, seed: int = SEED, n: int = N_VOCAB_CAPTIONS) -> list[str]:
    """``n`` strings of 3-10 words of the vocabulary (some capitalised, some with punctuation), so the
    ids of known words are exercised whatever the training data."""
    words = [vocab.idx2word[i] for i in range(4, len(vocab))]
    if not words:
        return []
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        picked = [rng.choice(words) for _ in range(rng.randint(3, 10))]
        if rng.random() < 0.3:
            picked[0] = picked[0].capitalize()
        text = " ".join(picked)
        out.append(text + rng.choice(["", "", ".", " .", "!", " ,"]))
    return out


def fuzz_strings(n: int, seed: int = SEED, words: list[str] | None = None) -> list[str]:
    """``n`` seeded random strings of 1-12 pieces of 2-4 FUZZ_PIECES classes (and vocabulary
    ``words``), pieces joined by nothing or a space: quotes, contractions, dashes, digits, Unicode
    letters, combining marks, emoji, control characters next to letters and to each other."""
    rng = random.Random(seed)
    classes = sorted(FUZZ_PIECES)
    out = []
    for _ in range(n):
        chosen = rng.sample(classes, rng.randint(2, 4))
        pools = [FUZZ_PIECES[c] for c in chosen] + ([words] if words and rng.random() < 0.5 else [])
        parts = []
        for _ in range(rng.randint(1, 12)):
            parts.append(rng.choice(rng.choice(pools)))
            parts.append(rng.choice(["", " ", " ", " "]))
        out.append("".join(parts))
    return out


def conformance_captions(vocab: Vocabulary, seed: int = SEED) -> list[tuple[str, str]]:
    """(source, caption) pairs, distinct captions, at least MIN_CAPTIONS: every awkward caption, then
    synthetic-style, emoji-style, vocabulary-word captions, then fuzz strings."""
    out, seen = [], set()

    def add(source, captions):
        for caption in captions:
            if caption not in seen:
                seen.add(caption)
                out.append((source, caption))
    add("awkward", awkward_captions())
    add("synthetic", synthetic_captions(seed))
    add("emoji", emoji_style_captions(seed))
    add("vocab", vocabulary_captions(vocab, seed))
    words = [vocab.idx2word[i] for i in range(4, min(len(vocab), 200))]
    add("fuzz", fuzz_strings(max(0, MIN_CAPTIONS - len(out)) + 50, seed, words))
    return out


def load_tokenizer(folder: str):
    """(tokenize function, {"file", "rules_version"}) of the runtime's tokeniser: the rules of
    FOLDER/tokenizer.json when it exists (runtime.text.Tokenizer), else runtime.text.tokenize."""
    path = os.path.join(folder, TOKENIZER_FILE)
    try:
        from runtime.text import Tokenizer
    except ImportError:
        Tokenizer = None
    if Tokenizer is not None and os.path.isfile(path):
        tokenizer = Tokenizer.load(path)
        return tokenizer.tokenize, {"file": TOKENIZER_FILE, "rules_version": tokenizer.rules_version}
    from runtime.text import tokenize
    return tokenize, {"file": None, "rules_version": None}


def file_safe(caption: str) -> bool:
    """A caption that is a line of a captions file as it is: printable, no surrounding whitespace."""
    return bool(caption) and caption == caption.strip() and caption.isprintable()


def pick_embedding_captions(entries: list[dict]) -> list[int]:
    """Indices of captions whose ids have the EMBEDDING_LENGTHS lengths (nearest where none has it
    exactly), most known words first, synthetic ones preferred; all distinct."""
    chosen = []
    for target in EMBEDDING_LENGTHS:
        def key(i):
            e = entries[i]
            return (abs(len(e["ids"]) - target), e["source"] != "synthetic", sum(t == UNK for t in e["ids"]), i)
        chosen.append(min((i for i in range(len(entries)) if i not in chosen and file_safe(entries[i]["caption"])),
                          key=key))
    return chosen


def pick_score_captions(entries: list[dict], n: int = N_SCORE_CAPTIONS) -> list[int]:
    """Indices of ``n`` file-safe captions of every source, of varied lengths (1 to ~15 words)."""
    by_source = {}
    for i, e in enumerate(entries):
        if file_safe(e["caption"]) and 3 <= len(e["ids"]) <= 18:
            by_source.setdefault(e["source"], []).append(i)
    chosen, k = [], 0
    while len(chosen) < n and any(by_source.values()):
        for source in sorted(by_source):
            pool = by_source[source]
            if pool and len(chosen) < n:
                chosen.append(pool.pop((k * 7) % len(pool)))
        k += 1
    return chosen


# --------------------------------------------------------------------------- arrays
def tolerance(stage: str, expected: np.ndarray) -> float:
    """REL_TOL[stage] * max(1, max |expected|), as a float rounded up to 2 significant digits."""
    scale = max(1.0, float(np.abs(expected).max()) if expected.size else 1.0)
    tol = REL_TOL[stage] * scale
    exponent = math.floor(math.log10(tol)) - 1
    return float(f"{math.ceil(round(tol / 10 ** exponent, 6))}e{exponent}")


def pad_ids(id_lists: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Id lists -> tokens (n, n_word) int64 padded with <pad>=0, lengths (n,) int64."""
    lengths = np.array([len(ids) for ids in id_lists], dtype=np.int64)
    tokens = np.zeros((len(id_lists), int(lengths.max())), dtype=np.int64)
    for row, ids in zip(tokens, id_lists):
        row[:len(ids)] = ids
    return tokens, lengths


def reference_arrays(model, entries: list[dict], embedding_captions: list[int], score_captions: list[int],
                     projections: bool, seed: int = SEED) -> dict:
    """The arrays of conformance.bin as float32 / int64 numpy arrays (see the module docstring), the
    floats from a float64 copy of ``model``, each stage fed the float32 arrays of the stages before."""
    from .graphs import ProjectionGraph

    model64 = _float64_copy(model)
    cfg = model64.cfg
    rng = np.random.default_rng(seed)
    region_feats = rng.standard_normal((N_IMG, N_REGION, cfg.img_dim)).astype(np.float32)
    tokens, lengths = pad_ids([entries[i]["ids"] for i in embedding_captions])

    def f64(a):
        return torch.from_numpy(np.asarray(a, dtype=np.float64))

    def f32(t):
        return t.detach().numpy().astype(np.float32)

    pipeline_feats = rng.standard_normal((PIPELINE_IMG, PIPELINE_REGION, cfg.img_dim)).astype(np.float32)
    arrays = {"region_feats": region_feats, "pipeline_feats": pipeline_feats, "tokens": tokens, "lengths": lengths}
    with torch.no_grad():
        arrays["region_embs"] = f32(model64.encode_images(f64(region_feats)))
        word_embs = model64.encode_captions(torch.from_numpy(tokens), torch.from_numpy(lengths))
        valid = np.arange(tokens.shape[1])[None, :] < lengths[:, None]
        arrays["word_embs"] = np.where(valid[..., None], f32(word_embs), np.float32(0))
        region_embs, word_embs = f64(arrays["region_embs"]), f64(arrays["word_embs"])
        if projections:
            arrays["region_proj"] = f32(ProjectionGraph(model64, "region")(region_embs))
            arrays["word_proj"] = f32(ProjectionGraph(model64, "word")(word_embs))  # the bias past each length
        arrays["sims"] = f32(model64.similarity(region_embs, word_embs, torch.from_numpy(lengths)))
        score_tokens, score_lengths = pad_ids([entries[i]["ids"] for i in score_captions])
        pipeline_words = model64.encode_captions(torch.from_numpy(score_tokens), torch.from_numpy(score_lengths))
        arrays["pipeline_sims"] = f32(model64.similarity(model64.encode_images(f64(pipeline_feats)), pipeline_words,
                                                         torch.from_numpy(score_lengths)))
    return arrays


def global_head_arrays(head, arrays: dict) -> dict:
    """{"image_global": (N_IMG, G), "text_global": (n_cap, G)} float32: a float64 copy of the global
    head (imram_min.search.global_head.GlobalHead) on the stored float32 region_embs, word_embs and
    lengths of ``arrays`` (what image_global.onnx and text_global.onnx are fed)."""
    head64 = _float64_copy(head)
    with torch.no_grad():
        image = head64.image(torch.from_numpy(arrays["region_embs"].astype(np.float64)))
        text = head64.text(torch.from_numpy(arrays["word_embs"].astype(np.float64)),
                           torch.from_numpy(np.asarray(arrays["lengths"], dtype=np.int64)))
    return {"image_global": image.numpy().astype(np.float32), "text_global": text.numpy().astype(np.float32)}


def picture_arrays(extractor, seed: int = SEED) -> dict:
    """{"images": (N_PICTURES, 3, size, size), "picture_feats": (N_PICTURES, grid*grid, 1280)} float32:
    seeded uint8 pixels (size x size, RGB) normalised by runtime.images.normalize (the feature
    extractor's input, as runtime.images.preprocess makes it), and a float64 copy of ``extractor``
    (imram_min.data.features.GridFeatureExtractor) on them."""
    from runtime.images import normalize
    rng = np.random.default_rng([seed, 1])  # its own stream: the other arrays do not depend on it
    pixels = rng.integers(0, 256, (N_PICTURES, extractor.size, extractor.size, 3), dtype=np.uint8)
    images = normalize(pixels)
    with torch.no_grad():
        feats = _float64_copy(extractor)(torch.from_numpy(images.astype(np.float64)))
    return {"images": images, "picture_feats": feats.numpy().astype(np.float32)}


def _float64_copy(model):
    """A float64 copy of ``model`` in eval mode on the CPU (the model itself is left as it is)."""
    import copy
    return copy.deepcopy(model).cpu().double().eval()


def pack_arrays(arrays: dict) -> tuple[bytes, dict]:
    """(conformance.bin bytes, {name: {"dtype", "shape", "offset"}}): little-endian, C order, each
    array at an 8-byte aligned offset."""
    blob, index = bytearray(), {}
    for name, array in arrays.items():
        dtype = {np.dtype(np.float32): "<f4", np.dtype(np.int64): "<i8"}[array.dtype]
        blob += b"\0" * (-len(blob) % 8)
        index[name] = {"dtype": str(array.dtype), "shape": list(array.shape), "offset": len(blob)}
        blob += np.ascontiguousarray(array, dtype=dtype).tobytes()
    return bytes(blob), index


def stages(arrays: dict, graphs: dict) -> list[dict]:
    """The STAGES of conformance.json in order (see docs/deploy.md), each float stage with its tolerance;
    graphs: the folder's graph signatures, as in the manifest (the matcher's inputs name its stage's)."""
    matcher_inputs = [i["name"] for i in graphs["matcher"]["inputs"]]
    def graph_stage(name, graph, inputs):
        return {"name": name, "label": LABELS[name], "kind": "graph", "graph": graph, "inputs": inputs,
                "output": name, "tolerance": tolerance(name, arrays[name])}
    out = [{"name": "tokens", "label": LABELS["tokens"], "kind": "tokens"},
           {"name": "ids", "label": LABELS["ids"], "kind": "ids"},
           graph_stage("region_embs", "image_encoder", {"region_feats": "region_feats"}),
           graph_stage("word_embs", "text_encoder", {"tokens": "tokens", "lengths": "lengths"})]
    if "region_projection" in graphs:
        out.append(graph_stage("region_proj", "region_projection", {"region_embs": "region_embs"}))
        out.append(graph_stage("word_proj", "word_projection", {"word_embs": "word_embs"}))
    if "image_global" in graphs and all(name in arrays for name in GLOBAL_ARRAYS):
        out.append(graph_stage("image_global", "image_global", {"region_embs": "region_embs"}))
        out.append(graph_stage("text_global", "text_global", {"word_embs": "word_embs", "lengths": "lengths"}))
    out.append(graph_stage("sims", "matcher", {name: name for name in matcher_inputs}))
    out.append({"name": "pipeline", "label": LABELS["pipeline"], "kind": "pipeline",
                "inputs": {"region_feats": "pipeline_feats", "captions": "score_captions"},
                "output": "pipeline_sims", "tolerance": tolerance("pipeline", arrays["pipeline_sims"])})
    if "feature_extractor" in graphs and "picture_feats" in arrays:
        out.append({**graph_stage("picture_feats", "feature_extractor", {"images": "images"}), "requires": PICTURES})
    return out


def document_version(stage_list: list[dict]) -> int:
    """1 when every stage is one a version-1 client knows, else FORMAT_VERSION (module docstring)."""
    known = all("requires" not in s and (s["kind"] != "graph" or s["graph"] in V1_GRAPHS) for s in stage_list)
    return 1 if known else FORMAT_VERSION


def write_conformance(model, vocab: Vocabulary, folder: str, signatures: dict, seed: int = SEED,
                      feature_extractor=None) -> list[str]:
    """Write conformance.json and conformance.bin into ``folder`` (a model folder being written: its
    tokenizer.json, if any, already there); ``signatures``: the graphs' signatures as in the manifest.
    feature_extractor: the module of the folder's feature_extractor.onnx (its stage is added when the
    signatures list that graph; the global head's stages are added afterwards, by
    ``add_global_head_vectors``). Returns the file names written."""
    tokenize, tokenizer_info = load_tokenizer(folder)
    entries = []
    for source, caption in conformance_captions(vocab, seed):
        tokens = tokenize(caption)
        entries.append({"caption": caption, "source": source, "tokens": tokens,
                        "ids": [START] + [vocab(t) for t in tokens] + [END]})
    embedding_captions, score_captions = pick_embedding_captions(entries), pick_score_captions(entries)
    projections = "region_projection" in signatures
    arrays = reference_arrays(model, entries, embedding_captions, score_captions, projections, seed)
    if feature_extractor is not None and "feature_extractor" in signatures:
        arrays.update(picture_arrays(feature_extractor, seed))
    stage_list = stages(arrays, signatures)
    blob, index = pack_arrays(arrays)
    document = {
        "format": FORMAT, "format_version": document_version(stage_list), "data": DATA_FILE,
        "tokenizer": tokenizer_info, "vocab": "vocab.json",
        "reference": f"PyTorch {torch.__version__} float64 on the CPU (model.py), rounded to float32; each stage "
                     f"from the float32 expected arrays of the stages before it",
        "captions": entries, "arrays": index,
        "embedding_captions": embedding_captions, "score_captions": score_captions,
        "stages": stage_list,
    }
    with open(os.path.join(folder, DATA_FILE), "wb") as f:
        f.write(blob)
    with open(os.path.join(folder, JSON_FILE), "w", encoding="utf-8") as f:
        f.write(dumps_document(document))
    return [JSON_FILE, DATA_FILE]


def _escape_unprintable(text: str) -> str:
    """JSON text with every non-printable character but the space written as a \\u escape (valid
    JSON: outside strings JSON text is printable ASCII), so the file shows no control, line-break
    or invisible characters, and line-based tools see one caption a line."""
    def escape(ch):
        code = ord(ch)
        if code < 0x10000:
            return f"\\u{code:04x}"
        code -= 0x10000
        return f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}"
    return "\n".join(line if line.isprintable() else "".join(c if c.isprintable() else escape(c) for c in line)
                     for line in text.split("\n"))


def dumps_document(document: dict) -> str:
    """conformance.json's text: one top-level key a line, one caption (and one stage) a line."""
    def compact(value):
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    lines = []
    for key, value in document.items():
        if key in ("captions", "stages"):
            lines.append(f"{compact(key)}:[\n" + ",\n".join(compact(v) for v in value) + "\n]")
        else:
            lines.append(f"{compact(key)}:{compact(value)}")
    return _escape_unprintable("{\n" + ",\n".join(lines) + "\n}\n")


def onnxruntime_version() -> str | None:
    """The installed onnxruntime's version (None when it is not installed)."""
    try:
        import onnxruntime
    except ImportError:
        return None
    return onnxruntime.__version__


def manifest_entry(folder: str | None = None) -> dict:
    """manifest.json's "conformance" entry before verification ("verified": None); its format_version
    that of FOLDER/conformance.json (written by ``write_conformance``), FORMAT_VERSION without one."""
    version = FORMAT_VERSION
    if folder is not None:
        with open(os.path.join(folder, JSON_FILE), encoding="utf-8") as f:
            version = json.load(f)["format_version"]
    return {"file": JSON_FILE, "data": DATA_FILE, "format_version": version, "verified": None}


def add_global_head_vectors(model_dir: str, head, verify: bool = True) -> dict:
    """Add the global head's stages to the conformance vectors of MODEL_DIR, a model folder to which
    export.global_head.add_global_head has just added image_global.onnx and text_global.onnx of
    ``head``; returns the new manifest. The expected vectors are ``global_head_arrays`` of the stored
    region_embs, word_embs and lengths; a head's stages already there are replaced. conformance.json
    and conformance.bin are replaced (runtime.atomic), then the manifest with their SHA-256; with
    ``verify``, runtime.check is run on the folder and its record stored (ValueError naming the
    failed stages when the runtime does not reproduce the vectors)."""
    from runtime import atomic
    from runtime.check import load_vectors
    from runtime.modeldir import MANIFEST_FILE, sha256_file
    manifest_path = os.path.join(model_dir, MANIFEST_FILE)
    with open(manifest_path, encoding="utf-8") as f:
        manifest = json.load(f)
    if not all(g in manifest["graphs"] for g in GLOBAL_ARRAYS):
        raise ValueError(f"{model_dir}: has no global head graphs ({', '.join(GLOBAL_ARRAYS)}) to add vectors of")
    document, arrays = load_vectors(model_dir, manifest)
    arrays = {name: array for name, array in arrays.items() if name not in GLOBAL_ARRAYS}
    arrays.update(global_head_arrays(head, arrays))
    document["stages"] = stages(arrays, manifest["graphs"])
    document["format_version"] = document_version(document["stages"])
    blob, document["arrays"] = pack_arrays(arrays)
    atomic.write_bytes(os.path.join(model_dir, DATA_FILE), blob)
    atomic.write_text(os.path.join(model_dir, JSON_FILE), dumps_document(document))
    for name in FILES:
        path = os.path.join(model_dir, name)
        manifest["files"][name] = {"sha256": sha256_file(path), "bytes": os.path.getsize(path)}
    manifest["conformance"] = manifest_entry(model_dir)
    atomic.write_json(manifest_path, manifest)
    if verify:
        manifest["conformance"]["verified"] = verify_conformance(model_dir)
        atomic.write_json(manifest_path, manifest)
    return manifest


def verify_conformance(folder: str) -> dict:
    """Run ``runtime.check`` on the model folder ``folder`` (manifest written) with ONNX Runtime's
    CPU provider; the manifest's "verified" record {"onnxruntime", "provider", "max_abs_diff"}.
    ValueError naming the failed stages when the runtime does not reproduce the vectors."""
    from runtime.check import check_model_dir
    engine, results = check_model_dir(folder, device="cpu")
    failed = [f"{r.label}: {r.detail}" for r in results if not r.ok]
    if failed:
        raise ValueError(f"the runtime fails the conformance vectors: {'; '.join(failed)}")
    return {"onnxruntime": onnxruntime_version(), "provider": engine.provider,
            "max_abs_diff": {r.name: r.max_abs_diff for r in results if r.max_abs_diff is not None}}
