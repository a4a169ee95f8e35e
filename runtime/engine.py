"""The engine: an exported model dir run with numpy + ONNX Runtime, no torch.

    engine = Engine("runs/default/model")             # device="auto": CUDA if offered, else CPU
    region_embs = engine.encode_images(region_feats)  # (n_img, n_region, d)
    word_embs, lengths = engine.encode_captions(["a dog on a sofa", ...])
    sims = engine.match(region_embs, word_embs, lengths)   # one matcher call: keep it small

The model dir is read and checked by runtime.modeldir (manifest fields, SHA-256 of every
file); the engine also checks the manifest's shapes against the ONNX graphs themselves, so an
edited img_dim or embed_size is one ModelDirError, not a failure deep in a run. User input is
checked by runtime.inputs (MAX_WORDS tokens per caption, finite features within MAX_FEATURE).

This module is written once for every user of the graphs: ``runtime.scorer.Scorer`` (all pairs)
builds on it. Image files are decoded with Pillow and preprocessed with numpy by runtime.images
exactly as ``imram_min.data.features`` does for training, ``image_batch`` pictures at a time
(pictures over runtime.images.MAX_PIXELS are refused before decoding).

Limits of the settings: shard 1..MAX_SHARD (and cut down to keep one matcher call within
MAX_PAIR_VALUES values), threads 1..MAX_THREADS, image_batch 1..MAX_IMAGE_BATCH (ValueError).
ONNX Runtime prints nothing: its sessions log nothing below fatal, every failure is raised.
"""
from __future__ import annotations

import os
from typing import Callable, Sequence

import numpy as np
import onnxruntime as ort

from .images import ImageError, load_and_preprocess
from .inputs import MAX_WORDS, InputError, check_captions, check_count, check_image_paths, check_region_feats, too_long
from .modeldir import (DEFAULT_MODEL_DIR, FEATURE_EXTRACTOR, GLOBAL_GRAPHS, GRAPHS, MANIFEST_FILE, PROJECTIONS,
                       ModelDirError, has_global_head, load_manifest, load_tokenizer, takes_projections)
from .text import Vocabulary, VocabularyError
from .tiles import block_sizes, caption_blocks

IMAGE_BATCH = 16  # pictures decoded and run through the feature extractor at a time
DEVICES = ("auto", "cpu", "cuda")
CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"
FLOAT, FLOAT16 = 1, 10  # ONNX TensorProto element types
PAIR_BUDGET = 1 << 22  # values in the largest per-pair tensor of one matcher call (16 MB in float32:
#                        small calls keep the matcher's tensors in cache; 7 x 7 pairs at d = 1024)
CUDA_PAIR_BUDGET = 1 << 27  # the same on CUDA: bigger calls, or the GPU idles between small ones
MAX_PAIR_VALUES = 1 << 28  # an explicit ``shard`` is cut down to keep one call within 1 GB of float32
MAX_SHARD = 256  # images / captions per shard, at most
MAX_THREADS = 256  # --threads / threads, at most
MAX_IMAGE_BATCH = 256  # pictures per batch, at most (about 600 KB each once preprocessed at 224 px)


class DeviceError(ValueError):
    """The requested device is not available in this onnxruntime."""


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


def session_options(threads: int | None, spinning: bool = True) -> ort.SessionOptions:
    """ONNX Runtime session options: nothing on stderr (every failure is raised as an exception
    and reported by the caller), ``threads`` intra-op threads (None: its default), idle threads
    spinning for work or not."""
    options = ort.SessionOptions()
    options.log_severity_level = 4
    if threads:
        options.intra_op_num_threads = int(threads)
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def _field(number: int, value) -> bytes:
    """One protobuf field: an int (varint) or bytes / str (length-delimited)."""
    if isinstance(value, int):
        return _varint(number << 3) + _varint(value)
    value = value.encode() if isinstance(value, str) else value
    return _varint(number << 3 | 2) + _varint(len(value)) + value


def one_node_model(op: str, inputs: Sequence[tuple[str, int]], output: tuple[str, int],
                   attributes: Sequence[tuple[str, int]] = ()) -> bytes:
    """A one-node ONNX model, output = op(*inputs), as bytes (ONNX's protobuf written field by field, so
    the runtime needs no onnx package). inputs / output: (name, element type), any shape, types as
    ONNX TensorProto numbers (FLOAT 1, FLOAT16 10); attributes: (name, int value)."""
    def value(name, elem_type):  # ValueInfoProto{name, type{tensor_type{elem_type}}}
        return _field(1, name) + _field(2, _field(1, _field(1, elem_type)))
    node = b"".join(_field(1, name) for name, _ in inputs) + _field(2, output[0]) + _field(4, op) + \
        b"".join(_field(5, _field(1, a) + _field(3, v) + _field(20, 2)) for a, v in attributes)  # AttributeProto, INT
    graph = _field(1, node) + _field(2, op.lower()) + b"".join(_field(11, value(*i)) for i in inputs) + \
        _field(12, value(*output))
    return _field(1, 8) + _field(7, graph) + _field(8, _field(1, "") + _field(2, 17))  # ir_version 8, opset 17


def cast_model(from_type: int, to_type: int) -> bytes:
    """y = Cast(x) from ``from_type`` to ``to_type`` (``one_node_model``)."""
    return one_node_model("Cast", [("x", from_type)], ("y", to_type), [("to", to_type)])


def matmul_model() -> bytes:
    """y = MatMul(a, b), float32 (``one_node_model``)."""
    return one_node_model("MatMul", [("a", FLOAT), ("b", FLOAT)], ("y", FLOAT))


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)



# --------------------------------------------------------------------------- the engine
def mean_embedding_vectors(embs: np.ndarray, lengths: np.ndarray | None = None) -> np.ndarray:
    """The first stage's vector of each item: the mean of its embeddings, l2-normalised, float32.
    embs (n, n_vec, d) (zeros past each length), lengths (n,) (None: all n_vec)."""
    embs = np.asarray(embs, dtype=np.float32)
    if lengths is None:
        mean = embs.mean(1)
    else:
        mean = embs.sum(1) / np.asarray(lengths, dtype=np.float32)[:, None]
    return mean / np.maximum(np.linalg.norm(mean, axis=1, keepdims=True), 1e-8)


class Engine:
    """The ONNX graphs of a model dir: tokenisation, encoders, projections and matcher calls.

    model_dir: a folder written by ``python -m export``. device: "auto" (CUDA when onnxruntime
    offers it, else CPU), "cpu" or "cuda" (DeviceError if unavailable). shard: images and
    captions per call (None: from PAIR_BUDGET; 1..MAX_SHARD). threads: ONNX Runtime intra-op
    threads (None: its default; 1..MAX_THREADS); on the CPU the matcher's calls instead run
    single-threaded, ``workers`` of them side by side (threads, or None: the CPUs this process
    may use). image_batch: pictures decoded and run through the feature extractor at a time
    (1..MAX_IMAGE_BATCH). tf32: let CUDA's matrix products use TF32 (faster on recent GPUs,
    scores move by ~1e-4).
    Attributes: manifest, config (the model config dict), vocab, tokenizer (runtime.text.Tokenizer:
    the model folder's rules, modeldir.load_tokenizer), img_dim, embed_size, mode,
    n_steps, device ("cpu"/"cuda"), provider (the provider in use), workers (matcher calls run
    side by side: 1 on CUDA), has_feature_extractor and, when it has one, preprocessing (the
    manifest's feature spec), feature_size, feature_grid. The feature extractor's session is
    made on first use. has_global_head: the model dir has the first stage's head graphs
    (``first_stage_vectors``); global_size: the size of a first-stage vector (the head's, else d).
    projected: the matcher takes per-item projections (``project``); projection_size: their
    size P per region or word (4d for mode full), 0 when it takes none.
    """

    def __init__(self, model_dir: str | os.PathLike = DEFAULT_MODEL_DIR, device: str = "auto",
                 shard: int | None = None, threads: int | None = None, image_batch: int = IMAGE_BATCH,
                 tf32: bool = False):
        self.shard = None if shard is None else check_count(shard, "shard", MAX_SHARD)
        self.image_batch = check_count(image_batch, "image_batch", MAX_IMAGE_BATCH)
        threads = None if threads is None else check_count(threads, "threads", MAX_THREADS)
        self.model_dir = os.fspath(model_dir)
        self.manifest = load_manifest(self.model_dir)
        self.config = self.manifest["model_config"]
        self.img_dim, self.embed_size = self.config["img_dim"], self.config["embed_size"]
        self.mode, self.n_steps = self.config["mode"], self.config["n_steps"]
        self.has_feature_extractor = FEATURE_EXTRACTOR in self.manifest["graphs"]
        self.preprocessing = self.manifest.get("preprocessing") if self.has_feature_extractor else None
        self.feature_size = int(self.preprocessing["size"]) if self.has_feature_extractor else None
        self.feature_grid = int(self.preprocessing["grid"]) if self.has_feature_extractor else None
        vocab_path = os.path.join(self.model_dir, self.manifest["vocab"]["file"])
        try:
            self.vocab = Vocabulary.load(vocab_path)
        except (OSError, VocabularyError) as e:
            raise ModelDirError(str(e)) from None
        if len(self.vocab) != self.config["vocab_size"]:
            raise ModelDirError(f"{vocab_path}: {len(self.vocab)} words, the model has {self.config['vocab_size']}")
        self.tokenizer = load_tokenizer(self.model_dir, self.manifest)  # the folder's rules (format <= 2: built-in)

        providers = resolve_providers(device, tf32)
        self._threads = threads
        self.projected = takes_projections(self.manifest)
        self.projection_size = self.manifest["graphs"]["region_projection"]["outputs"][0]["shape"][-1] \
            if self.projected else 0
        self.has_global_head = has_global_head(self.manifest)
        self.global_size = self.manifest["graphs"]["image_global"]["outputs"][0]["shape"][-1] \
            if self.has_global_head else self.embed_size
        self.graphs = GRAPHS + (PROJECTIONS if self.projected else ()) + (GLOBAL_GRAPHS if self.has_global_head else ())
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
        self._float16_to_float32 = ort.InferenceSession(cast_model(FLOAT16, FLOAT), session_options(1), providers=[CPU])
        self._matmul = None  # made on first use (``matmul``: an index's first stage)

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
        self._check_shapes(path, session, spec)
        return session

    def _check_shapes(self, path: str, session: ort.InferenceSession, spec: dict) -> None:
        """The manifest's names and sizes of the graph's inputs and outputs are the graph's own
        (so an edited img_dim or embed_size is refused here, not deep in a run)."""
        for side, items in (("inputs", session.get_inputs()), ("outputs", session.get_outputs())):
            names = [i.name for i in items]
            if names != [i["name"] for i in spec[side]]:
                raise ModelDirError(f"{path}: {side} {names} differ from the manifest's")
            for item, declared in zip(items, spec[side]):
                fixed = [(a, b) for a, b in zip(item.shape, declared["shape"]) if isinstance(a, int)]
                if len(item.shape) != len(declared["shape"]) or any(a != b for a, b in fixed):
                    raise ModelDirError(f"{path}: {item.name} has shape {item.shape}, the manifest says "
                                        f"{declared['shape']}")
        sizes = {"image_encoder": ("inputs", self.img_dim, "img_dim"),
                 "text_encoder": ("outputs", self.embed_size, "embed_size")}
        graph = next((g for g, s in self.manifest["graphs"].items() if s is spec), None)
        if graph in sizes:
            side, value, key = sizes[graph]
            if spec[side][0]["shape"][-1] != value:
                raise ModelDirError(f"{os.path.join(self.model_dir, MANIFEST_FILE)}: model_config.{key} {value} "
                                    f"differs from {spec['file']}'s {spec[side][0]['shape'][-1]}")

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
        return (f"{type(self).__name__}({self.model_dir!r}, mode={self.mode}, K={self.n_steps}, d={self.embed_size}, "
                f"device={self.device}{pictures})")

    # ------------------------------------------------------------------ the graphs
    def _run(self, graph: str, **inputs) -> np.ndarray:
        return self.sessions[graph].run(None, inputs)[0]

    def per_pair(self, n_region: int, n_word: int) -> int:
        """Values of one image-caption pair in one matcher call: its largest tensor,
        max(n_region, n_word) * 2d, plus the (n_word, n_word) one that grows with the square of
        the caption length."""
        return max(n_region, n_word, 1) * 2 * self.embed_size + n_word * n_word

    def shard_size(self, n_region: int, n_word: int) -> int:
        """Images = captions per call: the largest keeping one matcher call within PAIR_BUDGET
        values (``per_pair``), or ``self.shard`` cut down to MAX_PAIR_VALUES."""
        budget = MAX_PAIR_VALUES if self.shard else CUDA_PAIR_BUDGET if self.device == "cuda" else PAIR_BUDGET
        side = block_sizes(MAX_SHARD, MAX_SHARD, self.per_pair(n_region, n_word), budget, MAX_SHARD, square=True)[0]
        return min(self.shard, side) if self.shard else side

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
            yield i, self.extract_features(pixels)

    def extract_features(self, images: np.ndarray) -> np.ndarray:
        """Preprocessed pictures (n, 3, size, size) float32 (runtime.images.preprocess) -> grid features
        (n, grid*grid, img_dim) float32, through feature_extractor.onnx. InputError for another shape
        or a value that is not finite."""
        self.require_feature_extractor()
        images = np.asarray(images)
        expected = (3, self.feature_size, self.feature_size)
        if images.ndim != 4 or images.shape[1:] != expected:
            raise InputError(f"images: expected (n, {', '.join(map(str, expected))}), got {images.shape}")
        images = np.ascontiguousarray(images, dtype=np.float32)
        if not np.isfinite(images).all():
            raise InputError("images: NaN or Inf in the preprocessed pixels")
        return self._run(FEATURE_EXTRACTOR, images=images)

    def image_features(self, paths: Sequence[str | os.PathLike],
                       progress: Callable[[int, int], None] | None = None) -> np.ndarray:
        """Image files -> grid features (n_img, grid*grid, img_dim) float32: what
        ``imram_min.data.features.extract_features`` makes for training, with feature_extractor.onnx.
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

    def tokenize(self, captions: Sequence[str], name: str = "captions") -> tuple[np.ndarray, np.ndarray]:
        """Captions -> tokens (n_cap, n_word) int64 padded with <pad>=0, lengths (n_cap,) int64,
        exactly as training encodes them ([<start>] + ids + [<end>]). InputError for a caption of
        more than MAX_WORDS tokens."""
        padded, lengths = self.vocab.encode_batch(captions, self.tokenizer.tokenize)
        lengths = np.asarray(lengths, dtype=np.int64)
        if len(lengths) and lengths.max() > MAX_WORDS + 2:
            i = int(np.argmax(lengths))
            raise too_long(name, i, f"{lengths[i] - 2} words (tokens)")
        return np.asarray(padded, dtype=np.int64).reshape(len(captions), -1), lengths

    def encode_tokens(self, tokens: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """tokens (n_cap, n_word) int64 + lengths (n_cap,) -> word embeddings (n_cap, n_word, d) float32,
        zeros past each length."""
        return self._run("text_encoder", tokens=np.ascontiguousarray(tokens, dtype=np.int64),
                         lengths=np.ascontiguousarray(lengths, dtype=np.int64))

    def caption_shards(self, tokens: np.ndarray, lengths: np.ndarray, step: int):
        """Yield (caption indices, word_embs (n, n_word_shard, d), lengths (n,)) for shards of ``step``
        captions of similar length (longest first, runtime.tiles), each padded to its own longest."""
        for idx in caption_blocks(lengths, step):
            lens = lengths[idx]
            yield idx, self.encode_tokens(tokens[idx, :int(lens.max())], lens), lens

    def encode_captions(self, captions: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Captions -> (word_embs (n_cap, n_word_max, d) float32 with zeros past each length, lengths (n_cap,) int64).

        Encoded in shards of captions of similar length, then laid out padded to the longest."""
        return self.encode_token_batch(*self.tokenize(check_captions(captions)))

    def encode_token_batch(self, tokens: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``encode_captions`` from ``tokenize``'s tokens (n_cap, n_word) and lengths (n_cap,): shards of
        captions of similar length through the text encoder, laid out padded to the longest."""
        out = np.zeros((len(lengths), tokens.shape[1], self.embed_size), dtype=np.float32)
        for idx, embs, _ in self.caption_shards(tokens, lengths, self.shard_size(1, tokens.shape[1])):
            out[idx, :embs.shape[1]] = embs
        return out, lengths

    def project(self, side: str, embs: np.ndarray) -> np.ndarray | None:
        """side "region": region_embs (n_img, n_region, d) -> region_proj (n_img, n_region, P);
        "word": word_embs (n_cap, n_word, d) -> word_proj (n_cap, n_word, P): the per-item parts
        of the memory updates that the fast matcher takes. None when the matcher takes none."""
        if not self.projected:
            return None
        name = "region_embs" if side == "region" else "word_embs"
        return self._run(f"{side}_projection", **{name: self.float32(embs)})

    def first_stage_vectors(self, embs: np.ndarray, lengths: np.ndarray | None = None) -> np.ndarray:
        """The first stage's vector of each item (n, global_size) float32, l2-normalised: the global
        head's (image_global / text_global) when the model dir has it, else the mean of the item's
        embeddings. embs (n, n_vec, d) (zeros past each length); lengths (n,) for captions, None for images."""
        if not self.has_global_head:
            return mean_embedding_vectors(embs, lengths)
        embs = self.float32(embs)
        if len(embs) == 0:
            return np.zeros((0, self.global_size), np.float32)
        if lengths is None:
            return self._run("image_global", region_embs=embs)
        return self._run("text_global", word_embs=embs, lengths=np.ascontiguousarray(lengths, dtype=np.int64))

    def float32(self, array: np.ndarray) -> np.ndarray:
        """``array`` as C-contiguous float32. float16 (a float16 index's rows) is converted exactly by
        ONNX Runtime's Cast, on the calling thread: 14 against 49 ms for numpy's astype, 100 x 36 x
        4,096 values on one core of the 2-core CPU (benchmarks/README.md)."""
        if array.dtype == np.float16 and array.size:
            return self._float16_to_float32.run(None, {"x": np.ascontiguousarray(array)})[0]
        return np.ascontiguousarray(array, dtype=np.float32)

    def matmul(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """a @ b in float32, a (m, k), b (k, n) -> (m, n), on ONNX Runtime's CPU threads, which sleep once
        done. numpy's OpenBLAS threads spin for ~0.1 s after each product and take a core from the
        matcher calls that follow: a d = 1024 query at 100K images took 467 ms p50 with numpy's
        product as the first stage's, 416 ms with this one (paired; benchmarks/README.md)."""
        if self._matmul is None:
            self._matmul = ort.InferenceSession(matmul_model(), session_options(self._threads, spinning=False),
                                                providers=[CPU])
        return self._matmul.run(None, {"a": np.ascontiguousarray(a, dtype=np.float32),
                                       "b": np.ascontiguousarray(b, dtype=np.float32)})[0]

    def match(self, region_embs: np.ndarray, word_embs: np.ndarray, lengths: np.ndarray,
              region_proj: np.ndarray | None = None, word_proj: np.ndarray | None = None) -> np.ndarray:
        """One matcher call: region_embs (n_img, n_region, d), word_embs (n_cap, n_word, d),
        lengths (n_cap,) -> sims (n_img, n_cap) float32. No sharding: keep the batch small.
        region_proj / word_proj: ``project`` of these items, made here when None and needed."""
        feeds = {"region_embs": self.float32(region_embs), "word_embs": self.float32(word_embs),
                 "lengths": np.ascontiguousarray(lengths, dtype=np.int64)}
        if self.projected:
            feeds["region_proj"] = self.float32(
                self.project("region", feeds["region_embs"]) if region_proj is None else region_proj)
            feeds["word_proj"] = self.float32(
                self.project("word", feeds["word_embs"]) if word_proj is None else word_proj)
        return self.sessions["matcher"].run(None, feeds)[0]
