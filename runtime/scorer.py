"""Score images against captions with an exported model dir: numpy + ONNX Runtime, no torch.

    from runtime import Scorer
    scorer = Scorer("runs/default/model")               # device="auto": CUDA if offered, else CPU
    sims = scorer.score(region_feats, ["a dog on a sofa", ...])   # (n_img, n_cap) float32

    sims = scorer.score(["cat.jpg", "cup.png"], captions)        # image files: needs feature_extractor.onnx

A model dir is what ``python -m export`` writes: image_encoder.onnx, text_encoder.onnx,
matcher.onnx, vocab.json and manifest.json; with the fast matcher (the default) of a model that
updates its memory also region_projection.onnx and word_projection.onnx, which make the per-item
parts of the memory updates once per image / caption for the matcher; and with
``--feature-extractor`` feature_extractor.onnx plus the preprocessing in the manifest. Loading it
checks the manifest's format and the SHA-256 of every file it lists, so a half-copied or edited
model dir is refused.

Image files (``score`` given a list of paths, ``image_features``, ``encode_image_files``) are
decoded with Pillow and preprocessed with numpy by runtime.images exactly as
``imram_min.features`` does for training (size and normalisation from the manifest), a batch of
``image_batch`` at a time, and turned into grid features by feature_extractor.onnx.

Bounded memory (``score``): captions are tokenised exactly as in training (runtime.text),
sorted by length and cut into shards of ``shard`` captions, each padded only to its own longest
caption and encoded once; images are read a group at a time (a np.memmap streams from disk;
a group's features, embeddings and projections stay within GROUP_BYTES), encoded and projected,
and scored against every caption shard (projected once per group) in matcher calls of ``shard``
images x ``shard`` captions. The largest tensor of one matcher call is about
shard^2 * max(n_region, n_word) * 2d values; the default shard keeps that near PAIR_BUDGET
values. On the CPU the matcher calls run side by side on ``workers`` threads, each call
single-threaded (one call per core beats every call split across the cores: ~10% on 2 cores),
while the main thread projects the next caption shard. Padding never changes a score (the
matcher masks it exactly), so the result does not depend on the shard size beyond float rounding.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence

import numpy as np
import onnxruntime as ort

from .images import ImageError, check_feature_spec, load_and_preprocess
from .text import Vocabulary, VocabularyError

DEFAULT_MODEL_DIR = os.path.join("runs", "default", "model")  # where the README's main command puts it
FORMAT = "imram-min-onnx"
SUPPORTED_FORMAT_VERSIONS = (1, 2)  # 2 adds the projection graphs of the fast matcher
MANIFEST_FILE = "manifest.json"
GRAPHS = ("image_encoder", "text_encoder", "matcher")
PROJECTIONS = ("region_projection", "word_projection")  # when the matcher takes region_proj, word_proj
FEATURE_EXTRACTOR = "feature_extractor"  # optional: pictures -> region features
IMAGE_BATCH = 16  # pictures decoded and run through the feature extractor at a time
DEVICES = ("auto", "cpu", "cuda")
CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"
PAIR_BUDGET = 1 << 22  # values in the largest per-pair tensor of one matcher call (16 MB in float32:
#                        small calls keep the matcher's tensors in cache; 7 x 7 pairs at d = 1024)
CUDA_PAIR_BUDGET = 1 << 27  # the same on CUDA: bigger calls, or the GPU idles between small ones
MAX_SHARD = 256  # images / captions per shard, at most
GROUP_BYTES = 256 << 20  # an image group's features + embeddings + projections, at most (float32)
MAX_GROUP = 1024  # images per group, at most
CHECK_BYTES = 64 << 20  # features read per chunk by the NaN/Inf scan


class ModelDirError(ValueError):
    """A model dir that is missing, incomplete or altered (the message names the file)."""


class InputError(ValueError):
    """Region features or captions that cannot be scored (the message says which and where)."""


class DeviceError(ValueError):
    """The requested device is not available in this onnxruntime."""


# --------------------------------------------------------------------------- model dir
def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_manifest(model_dir: str | os.PathLike, verify: bool = True) -> dict:
    """Read MODEL_DIR/manifest.json, check its format and (``verify``) every listed file's SHA-256."""
    model_dir = os.fspath(model_dir)
    if not os.path.isdir(model_dir):
        raise ModelDirError(f"{model_dir}: no such model folder (make one with python -m export CKPT --out DIR)")
    path = os.path.join(model_dir, MANIFEST_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except FileNotFoundError:
        raise ModelDirError(f"{path}: missing; not a model folder written by python -m export") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelDirError(f"{path}: cannot read the manifest ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ModelDirError(f"{path}: not an {FORMAT} manifest")
    if manifest.get("format_version") not in SUPPORTED_FORMAT_VERSIONS:
        raise ModelDirError(f"{path}: format version {manifest.get('format_version')!r} is not supported "
                            f"(this runtime reads {SUPPORTED_FORMAT_VERSIONS})")
    try:
        files = manifest["files"]
        graphs = GRAPHS + (PROJECTIONS if takes_projections(manifest) else ())
        needed = [manifest["graphs"][g]["file"] for g in graphs] + [manifest["vocab"]["file"]]
        cfg = manifest["model_config"]
        cfg["img_dim"], cfg["embed_size"], cfg["mode"], cfg["n_steps"]
    except (KeyError, TypeError) as e:
        raise ModelDirError(f"{path}: incomplete manifest (no {e})") from None
    extractor = manifest["graphs"].get(FEATURE_EXTRACTOR) if isinstance(manifest["graphs"], dict) else None
    if extractor is not None:
        try:
            needed.append(extractor["file"])
            size, grid = check_feature_spec(manifest.get("preprocessing"), f"{path}: preprocessing")
            in_shape, out_shape = extractor["inputs"][0]["shape"], extractor["outputs"][0]["shape"]
        except (KeyError, TypeError, IndexError) as e:
            raise ModelDirError(f"{path}: incomplete feature_extractor entry (no {e})") from None
        except ValueError as e:
            raise ModelDirError(str(e)) from None
        if in_shape[1:] != [3, size, size] or out_shape[1:] != [grid * grid, cfg["img_dim"]]:
            raise ModelDirError(f"{path}: feature extractor {in_shape} -> {out_shape} does not fit the "
                                f"preprocessing (size {size}, grid {grid}) and img_dim {cfg['img_dim']}")
    for name in needed:
        if name not in files:
            raise ModelDirError(f"{path}: lists no hash for {name}")
    for name, info in files.items():
        file = os.path.join(model_dir, name)
        if os.path.basename(name) != name:
            raise ModelDirError(f"{path}: file name {name!r} is not a plain name")
        if not os.path.isfile(file):
            raise ModelDirError(f"{file}: missing from the model folder")
        if verify:
            try:
                digest = sha256_file(file)
            except OSError as e:
                raise ModelDirError(f"{file}: cannot read ({e.strerror})") from None
            if digest != info.get("sha256"):
                raise ModelDirError(f"{file}: SHA-256 {digest[:12]}... does not match the manifest "
                                    f"({str(info.get('sha256'))[:12]}...); the file was changed or damaged")
    return manifest


def takes_projections(manifest: dict) -> bool:
    """Whether the manifest's matcher takes region_proj and word_proj (made by the projection graphs)."""
    return "region_proj" in [i["name"] for i in manifest["graphs"]["matcher"]["inputs"]]


def resolve_providers(device: str = "auto", tf32: bool = False) -> list:
    """ONNX Runtime providers for "auto" (CUDA when onnxruntime offers it, else CPU), "cpu" or "cuda".

    CUDA runs in exact float32 unless ``tf32``: ONNX Runtime's CUDA provider otherwise lets its
    matrix products use TF32 (10-bit mantissa inputs), which moves scores by ~1e-4."""
    if device not in DEVICES:
        raise DeviceError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
    available = ort.get_available_providers()
    if device == "cuda" and CUDA not in available:
        raise DeviceError(f"device cuda: this onnxruntime has no {CUDA} (it offers {', '.join(available)}); "
                          f"install onnxruntime-gpu or use --device cpu")
    if device == "cuda" or (device == "auto" and CUDA in available):
        return [(CUDA, {"use_tf32": "1" if tf32 else "0"}), CPU]
    return [CPU]


# --------------------------------------------------------------------------- input checks
def check_region_feats(region_feats, img_dim: int, name: str = "region features") -> np.ndarray:
    """Check (n_img, n_region, img_dim) float features with no NaN/Inf; returns them as an ndarray
    (a memmap stays a memmap: the NaN/Inf scan reads it in chunks). Raises InputError."""
    if not isinstance(region_feats, np.ndarray):
        region_feats = np.asarray(region_feats)
    if region_feats.dtype.hasobject:
        raise InputError(f"{name}: holds Python objects; expected a float array")
    if region_feats.ndim != 3:
        raise InputError(f"{name}: expected shape (n_img, n_region, {img_dim}), got {region_feats.shape} "
                         f"({region_feats.ndim} dimensions)")
    n_img, n_region, dim = region_feats.shape
    if dim != img_dim:
        raise InputError(f"{name}: features have size {dim}, the model expects {img_dim} "
                         f"(shape {region_feats.shape})")
    if not np.issubdtype(region_feats.dtype, np.floating):
        raise InputError(f"{name}: expected float features, got dtype {region_feats.dtype}")
    if n_img == 0:
        raise InputError(f"{name}: no images (shape {region_feats.shape})")
    if n_region == 0:
        raise InputError(f"{name}: no regions per image (shape {region_feats.shape})")
    step = max(1, CHECK_BYTES // max(1, n_region * dim * 4))
    for i in range(0, n_img, step):
        bad = ~np.isfinite(np.asarray(region_feats[i:i + step], dtype=np.float32)).reshape(-1, n_region * dim).all(1)
        if bad.any():
            raise InputError(f"{name}: image {i + int(np.argmax(bad))} has NaN or Inf features"
                             f"{'' if region_feats.dtype == np.float32 else ' (as float32)'}")
    return region_feats


def check_captions(captions: Sequence[str], name: str = "captions") -> list[str]:
    """Captions as a list of stripped strings; none may be blank. Raises InputError."""
    if isinstance(captions, str):
        raise InputError(f"{name}: expected a list of captions, got one string")
    captions = list(captions)
    if not captions:
        raise InputError(f"{name}: no captions")
    out = []
    for i, caption in enumerate(captions):
        if not isinstance(caption, str):
            raise InputError(f"{name}: caption {i} is a {type(caption).__name__}, expected a string")
        out.append(caption.strip())
    blank = [i for i, c in enumerate(out) if not c]
    if blank:
        raise InputError(f"{name}: blank captions at {list_some(blank)}")
    return out


def image_paths_or_none(images) -> list[str] | None:
    """``images`` as a list of path strings if it is a list or tuple of str / os.PathLike (an
    empty list counts: ``check_image_paths`` refuses it), else None (an array of features)."""
    if isinstance(images, (list, tuple)) and all(isinstance(p, (str, os.PathLike)) for p in images):
        return [os.fspath(p) for p in images]
    return None


def check_image_paths(paths: Sequence[str | os.PathLike], name: str = "images") -> list[str]:
    """A non-empty list of image file paths as strings. Raises InputError."""
    found = image_paths_or_none(list(paths) if not isinstance(paths, (str, os.PathLike)) else paths)
    if found is None:
        raise InputError(f"{name}: expected a list of image file paths")
    if not found:
        raise InputError(f"{name}: no images")
    return found


def length_shards(lengths: np.ndarray, step: int):
    """Yield the indices of shards of ``step`` captions of similar length, longest first."""
    order = np.argsort(-lengths, kind="stable")
    for j in range(0, len(order), step):
        yield order[j:j + step]


def progress_ticker(total: int, progress: Callable[[int, int], None] | None) -> Callable[[], None]:
    """A function to call after each block of work: it calls progress(done, total), if given."""
    done = 0

    def tick():
        nonlocal done
        done += 1
        if progress:
            progress(done, total)
    return tick


def output_array(out: np.ndarray | None, n_img: int, n_cap: int) -> np.ndarray:
    """``out`` checked to be float32 (n_img, n_cap), or a new such array when None."""
    if out is None:
        return np.empty((n_img, n_cap), dtype=np.float32)
    if out.shape != (n_img, n_cap) or out.dtype != np.float32:
        raise ValueError(f"out must be float32 of shape {(n_img, n_cap)}, got {out.dtype} {out.shape}")
    return out


def session_options(threads: int | None, spinning: bool = True) -> ort.SessionOptions:
    """ONNX Runtime session options: errors only on stderr (no provider-fallback chatter),
    ``threads`` intra-op threads (None: its default), idle threads spinning for work or not."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = int(threads)
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def list_some(items: Sequence[int], n: int = 10) -> str:
    """'1, 4, 9' or '1, 4, ... (25 in all)'."""
    shown = ", ".join(str(i) for i in items[:n])
    return shown if len(items) <= n else f"{shown}, ... ({len(items)} in all)"


# --------------------------------------------------------------------------- the scorer
class Scorer:
    """The ONNX graphs of a model dir, with tokenisation and sharded all-pairs scoring.

    model_dir: a folder written by ``python -m export``. device: "auto" (CUDA when onnxruntime
    offers it, else CPU), "cpu" or "cuda" (DeviceError if unavailable). shard: images and
    captions per shard (None: from PAIR_BUDGET). threads: ONNX Runtime intra-op threads (None:
    its default); on the CPU the matcher's calls instead run single-threaded, ``workers`` of them
    side by side (threads, or None: the CPUs this process may use). image_batch: pictures
    decoded and run through the feature extractor at a time.
    tf32: let CUDA's matrix products use TF32 (faster on recent GPUs, scores move by ~1e-4).
    Attributes: manifest, config (the model config dict), vocab, img_dim, embed_size, mode,
    n_steps, device ("cpu"/"cuda"), provider (the provider in use), workers (matcher calls run
    side by side: 1 on CUDA), has_feature_extractor and,
    when it has one, preprocessing (the manifest's feature spec), feature_size, feature_grid.
    The feature extractor's session is made on first use.
    """

    def __init__(self, model_dir: str | os.PathLike = DEFAULT_MODEL_DIR, device: str = "auto",
                 shard: int | None = None, threads: int | None = None, image_batch: int = IMAGE_BATCH,
                 tf32: bool = False):
        if shard is not None and shard < 1:
            raise ValueError(f"shard must be >= 1, got {shard}")
        if image_batch < 1:
            raise ValueError(f"image_batch must be >= 1, got {image_batch}")
        self.model_dir, self.shard, self.image_batch = os.fspath(model_dir), shard, int(image_batch)
        self.manifest = load_manifest(self.model_dir)
        self.config = self.manifest["model_config"]
        self.img_dim, self.embed_size = int(self.config["img_dim"]), int(self.config["embed_size"])
        self.mode, self.n_steps = self.config["mode"], int(self.config["n_steps"])
        self.has_feature_extractor = FEATURE_EXTRACTOR in self.manifest["graphs"]
        self.preprocessing = self.manifest.get("preprocessing") if self.has_feature_extractor else None
        self.feature_size = int(self.preprocessing["size"]) if self.has_feature_extractor else None
        self.feature_grid = int(self.preprocessing["grid"]) if self.has_feature_extractor else None
        vocab_path = os.path.join(self.model_dir, self.manifest["vocab"]["file"])
        try:
            self.vocab = Vocabulary.load(vocab_path)
        except (OSError, VocabularyError) as e:
            raise ModelDirError(str(e)) from None
        if len(self.vocab) != int(self.config["vocab_size"]):
            raise ModelDirError(f"{vocab_path}: {len(self.vocab)} words, the model has {self.config['vocab_size']}")

        providers = resolve_providers(device, tf32)
        self._threads = threads
        self.projected = takes_projections(self.manifest)
        self.graphs = GRAPHS + (PROJECTIONS if self.projected else ())
        self.sessions = {g: self._load_session(g, providers) for g in self.graphs}
        used = self.sessions["matcher"].get_providers()
        if len(providers) > 1 and CUDA not in used:
            if device == "cuda":
                raise DeviceError(f"device cuda: {CUDA} is installed but failed to start (no GPU or CUDA libraries?)")
            self.sessions = {g: self._load_session(g, [CPU]) for g in self.graphs}
            used = [CPU]
        self._providers = providers if used[0] == CUDA else [CPU]
        self.provider = used[0]
        self.device = "cuda" if self.provider == CUDA else "cpu"
        self.workers = 1 if self.device == "cuda" else int(threads or available_cpus())

    def _load_session(self, graph: str, providers: list) -> ort.InferenceSession:
        spec = self.manifest["graphs"][graph]
        path = os.path.join(self.model_dir, spec["file"])
        if graph != "matcher":  # idle threads of one session spinning for work would slow the matcher's
            options = session_options(self._threads, spinning=False)
        elif providers == [CPU]:  # matcher calls run side by side, one per core, each on its calling thread
            options = session_options(1)
        else:
            options = session_options(self._threads)
        try:
            session = ort.InferenceSession(path, options, providers=providers)
        except Exception as e:  # onnxruntime raises its own exception types
            raise ModelDirError(f"{path}: ONNX Runtime cannot load it ({str(e).splitlines()[0]})") from None
        names = [i.name for i in session.get_inputs()]
        if names != [i["name"] for i in spec["inputs"]]:
            raise ModelDirError(f"{path}: inputs {names} differ from the manifest's")
        return session

    def require_feature_extractor(self) -> None:
        """ModelDirError, saying how to make one, unless the model dir has feature_extractor.onnx."""
        if not self.has_feature_extractor:
            raise ModelDirError(
                f"{self.model_dir}: has no feature_extractor.onnx, so it scores region features (.npy) only; "
                f"to score image files re-export it with python -m export CKPT --out {self.model_dir} "
                f"--feature-extractor (models trained on EfficientNet-Lite0 grid features, img_dim 1280)")
        if FEATURE_EXTRACTOR not in self.sessions:
            self.sessions[FEATURE_EXTRACTOR] = self._load_session(FEATURE_EXTRACTOR, self._providers)

    def __repr__(self) -> str:
        pictures = f", pictures {self.feature_size} px grid {self.feature_grid}" if self.has_feature_extractor else ""
        return (f"Scorer({self.model_dir!r}, mode={self.mode}, K={self.n_steps}, d={self.embed_size}, "
                f"device={self.device}{pictures})")

    # ------------------------------------------------------------------ the graphs
    def _run(self, graph: str, **inputs) -> np.ndarray:
        return self.sessions[graph].run(None, inputs)[0]

    def shard_size(self, n_region: int, n_word: int) -> int:
        """Images = captions per shard: ``self.shard``, or the largest keeping one matcher call's
        biggest tensor (shard^2 * max(n_region, n_word) * 2d values) within PAIR_BUDGET."""
        if self.shard is not None:
            return self.shard
        per_pair = max(n_region, n_word, 1) * 2 * self.embed_size
        budget = CUDA_PAIR_BUDGET if self.device == "cuda" else PAIR_BUDGET
        return max(1, min(MAX_SHARD, math.isqrt(max(1, budget // per_pair))))

    def encode_images(self, region_feats, check: bool = True) -> np.ndarray:
        """(n_img, n_region, img_dim) float -> region embeddings (n_img, n_region, d) float32, in shards."""
        if check:
            region_feats = check_region_feats(region_feats, self.img_dim)
        n_img, n_region, _ = region_feats.shape
        step = self.shard_size(n_region, 1)
        out = np.empty((n_img, n_region, self.embed_size), dtype=np.float32)
        for i in range(0, n_img, step):
            feats = np.ascontiguousarray(region_feats[i:i + step], dtype=np.float32)
            out[i:i + step] = self._run("image_encoder", region_feats=feats)
        return out

    def _feature_batches(self, paths: list[str]):
        """Yield (start, grid features (n, grid*grid, img_dim) float32) for ``image_batch`` pictures
        at a time: decoded and preprocessed by runtime.images, run through feature_extractor.onnx."""
        self.require_feature_extractor()
        for i in range(0, len(paths), self.image_batch):
            try:
                pixels = load_and_preprocess(paths[i:i + self.image_batch], self.feature_size)
            except (ImageError, FileNotFoundError) as e:  # both name the file
                raise InputError(str(e)) from None
            yield i, self._run(FEATURE_EXTRACTOR, images=pixels)

    def image_features(self, paths: Sequence[str | os.PathLike],
                       progress: Callable[[int, int], None] | None = None) -> np.ndarray:
        """Image files -> grid features (n_img, grid*grid, img_dim) float32: what
        ``imram_min.features.extract_features`` makes for training, with feature_extractor.onnx.
        progress(done, total) is called after each batch of pictures."""
        paths = check_image_paths(paths)
        out = np.empty((len(paths), self.feature_grid ** 2, self.img_dim), dtype=np.float32)
        for i, feats in self._feature_batches(paths):
            out[i:i + len(feats)] = feats
            if progress:
                progress(i + len(feats), len(paths))
        return out

    def encode_image_files(self, paths: Sequence[str | os.PathLike],
                           progress: Callable[[int, int], None] | None = None) -> np.ndarray:
        """Image files -> region embeddings (n_img, grid*grid, d) float32 (``image_features`` then
        ``encode_images``). Needs a model dir exported with --feature-extractor."""
        return self.encode_images(self.image_features(paths, progress), check=False)

    def tokenize(self, captions: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Captions -> tokens (n_cap, n_word) int64 padded with <pad>=0, lengths (n_cap,) int64,
        exactly as training encodes them ([<start>] + ids + [<end>])."""
        padded, lengths = self.vocab.encode_batch(captions)
        return (np.asarray(padded, dtype=np.int64).reshape(len(captions), -1),
                np.asarray(lengths, dtype=np.int64))

    def encode_tokens(self, tokens: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """tokens (n_cap, n_word) int64 + lengths (n_cap,) -> word embeddings (n_cap, n_word, d) float32,
        zeros past each length."""
        return self._run("text_encoder", tokens=np.ascontiguousarray(tokens, dtype=np.int64),
                         lengths=np.ascontiguousarray(lengths, dtype=np.int64))

    def encode_captions(self, captions: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Captions -> (word_embs (n_cap, n_word_max, d) float32 with zeros past each length, lengths (n_cap,) int64).

        Encoded in shards of captions of similar length, then laid out padded to the longest."""
        captions = check_captions(captions)
        tokens, lengths = self.tokenize(captions)
        out = np.zeros((len(captions), tokens.shape[1], self.embed_size), dtype=np.float32)
        for idx, embs, _ in self._caption_shards(tokens, lengths, self.shard_size(1, tokens.shape[1])):
            out[idx, :embs.shape[1]] = embs
        return out, lengths

    def project(self, side: str, embs: np.ndarray) -> np.ndarray | None:
        """side "region": region_embs (n_img, n_region, d) -> region_proj (n_img, n_region, P);
        "word": word_embs (n_cap, n_word, d) -> word_proj (n_cap, n_word, P): the per-item parts
        of the memory updates that the fast matcher takes. None when the matcher takes none."""
        if not self.projected:
            return None
        name = "region_embs" if side == "region" else "word_embs"
        return self._run(f"{side}_projection", **{name: np.ascontiguousarray(embs, dtype=np.float32)})

    def match(self, region_embs: np.ndarray, word_embs: np.ndarray, lengths: np.ndarray,
              region_proj: np.ndarray | None = None, word_proj: np.ndarray | None = None) -> np.ndarray:
        """One matcher call: region_embs (n_img, n_region, d), word_embs (n_cap, n_word, d),
        lengths (n_cap,) -> sims (n_img, n_cap) float32. No sharding: keep the batch small.
        region_proj / word_proj: ``project`` of these items, made here when None and needed."""
        feeds = {"region_embs": np.ascontiguousarray(region_embs, dtype=np.float32),
                 "word_embs": np.ascontiguousarray(word_embs, dtype=np.float32),
                 "lengths": np.ascontiguousarray(lengths, dtype=np.int64)}
        if self.projected:
            feeds["region_proj"] = np.ascontiguousarray(
                self.project("region", feeds["region_embs"]) if region_proj is None else region_proj)
            feeds["word_proj"] = np.ascontiguousarray(
                self.project("word", feeds["word_embs"]) if word_proj is None else word_proj)
        return self.sessions["matcher"].run(None, feeds)[0]

    def group_size(self, n_region: int, step: int) -> int:
        """Images encoded and projected together: a multiple of ``step`` (the shard), at most
        MAX_GROUP, their features + embeddings + projections within GROUP_BYTES."""
        proj = 4 * self.embed_size if self.projected else 0  # P <= 4d
        per_image = 4 * max(1, n_region) * (self.img_dim + self.embed_size + proj)
        return max(step, min(MAX_GROUP, GROUP_BYTES // per_image) // step * step)

    def _score_group(self, region_embs: np.ndarray, caption_shards: list, step: int, out: np.ndarray,
                     tick: Callable) -> None:
        """out (n, n_cap) <- one image group's region_embs (n, n_region, d) x every caption shard
        (indices, word_embs, lengths) in matcher calls of ``step`` images, the group and each
        caption shard projected once. The calls run on ``self.workers`` threads; the next caption
        shard is projected while they run, and at most three shards' calls are in flight."""
        region_proj = self.project("region", region_embs)
        queued = deque()  # (caption indices, [(rows, future)]) of the shards in flight

        def collect():
            idx, calls = queued.popleft()
            for rows, call in calls:
                out[rows, idx] = call.result()
                tick()
        pool = ThreadPoolExecutor(self.workers)
        try:
            for idx, word_embs, lens in caption_shards:
                word_proj = self.project("word", word_embs)
                calls = []
                for i in range(0, len(region_embs), step):
                    rows = slice(i, i + step)
                    calls.append((rows, pool.submit(self.match, region_embs[rows], word_embs, lens,
                                                    None if region_proj is None else region_proj[rows], word_proj)))
                queued.append((idx, calls))
                if len(queued) > 2:
                    collect()
            while queued:
                collect()
        finally:  # on an error (or Ctrl-C) the calls not yet started are dropped
            pool.shutdown(wait=True, cancel_futures=True)

    def score_embeddings(self, region_embs: np.ndarray, word_embs: np.ndarray, lengths: np.ndarray,
                         out: np.ndarray | None = None,
                         progress: Callable[[int, int], None] | None = None) -> np.ndarray:
        """Similarities (n_img, n_cap) float32 of every image with every caption, from embeddings:
        region_embs (n_img, n_region, d), word_embs (n_cap, n_word, d) (zeros or anything past each
        length), lengths (n_cap,). As ``score`` does after encoding: captions sorted by length into
        shards, images in groups, matcher calls of shard x shard pairs. out, progress: as ``score``."""
        region_embs = np.asarray(region_embs, dtype=np.float32)
        word_embs, lengths = np.asarray(word_embs, dtype=np.float32), np.asarray(lengths, dtype=np.int64)
        n_img, n_cap = len(region_embs), len(lengths)
        step = self.shard_size(region_embs.shape[1], word_embs.shape[1])
        out = output_array(out, n_img, n_cap)
        caption_shards = [(idx, np.ascontiguousarray(word_embs[idx, :int(lengths[idx].max())]), lengths[idx])
                          for idx in length_shards(lengths, step)]
        tick = progress_ticker(len(caption_shards) * -(-n_img // step), progress)
        group = self.group_size(region_embs.shape[1], step)
        for i in range(0, n_img, group):
            self._score_group(region_embs[i:i + group], caption_shards, step, out[i:i + group], tick)
        return out

    def _caption_shards(self, tokens: np.ndarray, lengths: np.ndarray, step: int):
        """Yield (caption indices, word_embs (n, n_word_shard, d), lengths (n,)) for shards of ``step``
        captions of similar length (longest first), each padded only to its own longest caption."""
        for idx in length_shards(lengths, step):
            lens = lengths[idx]
            yield idx, self.encode_tokens(tokens[idx, :int(lens.max())], lens), lens

    # ------------------------------------------------------------------ all pairs
    def score(self, region_feats, captions: Sequence[str], out: np.ndarray | None = None,
              progress: Callable[[int, int], None] | None = None, check: bool = True) -> np.ndarray:
        """Similarities (n_img, n_cap) float32 of every image with every caption.

        region_feats: (n_img, n_region, img_dim) float array or memmap (read a group at a time),
        or a list of image file paths (decoded a batch at a time while scoring; needs a model dir
        exported with --feature-extractor). captions: list of strings. out: an (n_img, n_cap)
        float32 array to fill (e.g. a memmap), else a new array. progress(done, total) is called
        after each block of work (a caption shard, a batch of pictures, an image x caption shard).
        """
        paths = image_paths_or_none(region_feats)
        if paths is not None:
            paths = check_image_paths(paths)
            self.require_feature_extractor()
            n_img, n_region = len(paths), self.feature_grid ** 2
        else:
            if check:
                region_feats = check_region_feats(region_feats, self.img_dim)
            n_img, n_region, _ = region_feats.shape
        captions = check_captions(captions)
        tokens, lengths = self.tokenize(captions)
        step = self.shard_size(n_region, tokens.shape[1])
        group = self.group_size(n_region, step)
        n_cap_shards, n_img_shards = -(-len(captions) // step), -(-n_img // step)
        total = n_cap_shards * (1 + n_img_shards)
        if paths is not None:  # + the batches of pictures of every image group
            total += sum(-(-min(group, n_img - i) // self.image_batch) for i in range(0, n_img, group))
        out = output_array(out, n_img, len(captions))
        tick = progress_ticker(total, progress)
        caption_shards = []
        for shard in self._caption_shards(tokens, lengths, step):
            caption_shards.append(shard)
            tick()
        for i in range(0, n_img, group):
            if paths is None:
                feats = region_feats[i:i + group]
            else:
                feats = np.empty((min(group, n_img - i), n_region, self.img_dim), dtype=np.float32)
                for j, batch in self._feature_batches(paths[i:i + group]):
                    feats[j:j + len(batch)] = batch
                    tick()
            self._score_group(self.encode_images(feats, check=False), caption_shards, step, out[i:i + group], tick)
        return out
