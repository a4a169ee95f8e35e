"""The model folder: manifest.json read and checked (numpy-free, onnxruntime-free).

A model dir is what ``python -m export`` writes: image_encoder.onnx, text_encoder.onnx,
matcher.onnx, vocab.json and manifest.json; with the fast matcher (the default) of a model that
updates its memory also region_projection.onnx and word_projection.onnx; and with
``--feature-extractor`` feature_extractor.onnx plus the preprocessing in the manifest; with
``--global-head`` image_global.onnx and text_global.onnx (export.global_head).
``load_manifest`` checks the type and range of every manifest field the runtime reads, and the
SHA-256 of every file it lists, so a half-copied or edited model dir is refused with one
ModelDirError naming the file (the engine then checks the manifest's shapes against the graphs).
"""
from __future__ import annotations

import hashlib
import json
import os
import re

from .images import check_feature_spec
from .text import KNOWN_RULES_VERSIONS, Tokenizer, TokenizerError

DEFAULT_MODEL_DIR = os.path.join("runs", "default", "model")  # where the README's main command puts it
FORMAT = "imram-min-onnx"
SUPPORTED_FORMAT_VERSIONS = (1, 2, 3)  # 2 adds the projection graphs of the fast matcher, 3 tokenizer.json
MANIFEST_FILE = "manifest.json"
GRAPHS = ("image_encoder", "text_encoder", "matcher")
PROJECTIONS = ("region_projection", "word_projection")  # when the matcher takes region_proj, word_proj
FEATURE_EXTRACTOR = "feature_extractor"  # optional: pictures -> region features
GLOBAL_GRAPHS = ("image_global", "text_global")  # optional, both or neither: the first stage's global head
MODES = ("full", "text", "image", "mean")
CONFORMANCE = "conformance"  # manifest key of the conformance vectors' files (export.conformance, runtime.check)
MAX_DIM = 1 << 16  # img_dim / embed_size / size of a graph's static axis in a manifest, at most


class ModelDirError(ValueError):
    """A model dir that is missing, incomplete or altered (the message names the file)."""



def file_digest(path: str | os.PathLike, algorithm: str = "sha256") -> str:
    """The hex digest of a file's bytes, read 1 MiB at a time (hashlib's ``algorithm``)."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    return file_digest(path, "sha256")


def read_manifest_file(folder: str, error: type[Exception], kind: str, made_by: str) -> tuple[str, object]:
    """(FOLDER/manifest.json, its parsed JSON) of a ``kind`` folder written by ``made_by``; anything
    missing or unreadable is one ``error`` naming the file."""
    if not os.path.isdir(folder):
        raise error(f"{folder}: no such {kind} folder (make one with {made_by})")
    path = os.path.join(folder, MANIFEST_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            return path, json.load(f)
    except FileNotFoundError:
        article = "an" if kind[0] in "aeiou" else "a"
        raise error(f"{path}: missing; not {article} {kind} folder written by {made_by}") from None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise error(f"{path}: cannot read the manifest ({e})") from None


def _is_int(value, low: int = 1, high: int = MAX_DIM) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _check_graph(spec, name: str) -> None:
    """A manifest graph entry: {"file": str, "inputs": [{"name": str, "shape": [...]}], "outputs": [...]}."""
    if not isinstance(spec, dict) or not isinstance(spec.get("file"), str):
        raise TypeError(f"graphs.{name}.file must be a file name")
    for side in ("inputs", "outputs"):
        items = spec.get(side)
        if not isinstance(items, list) or not items:
            raise TypeError(f"graphs.{name}.{side} must be a non-empty list")
        for item in items:
            if not isinstance(item, dict) or not isinstance(item.get("name"), str) or \
                    not isinstance(item.get("shape"), list) or \
                    not all(isinstance(a, str) or _is_int(a) for a in item["shape"]):
                raise TypeError(f"graphs.{name}.{side} must hold {{name: str, shape: [axis names or sizes]}}")


def check_manifest_fields(manifest) -> None:
    """Type and range of every manifest field the runtime reads; TypeError / ValueError naming it."""
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"not an {FORMAT} manifest")
    version = manifest.get("format_version")
    if not _is_int(version, 0) or version not in SUPPORTED_FORMAT_VERSIONS:
        raise ValueError(f"format version {version!r} is not supported (this runtime reads {SUPPORTED_FORMAT_VERSIONS})")
    cfg = manifest.get("model_config")
    if not isinstance(cfg, dict):
        raise TypeError("model_config must be an object")
    for key, low in (("img_dim", 1), ("embed_size", 1), ("vocab_size", 4), ("n_steps", 1)):
        if not _is_int(cfg.get(key), low):
            raise ValueError(f"model_config.{key} must be an integer in {low}..{MAX_DIM}, got {cfg.get(key)!r}")
    if cfg.get("mode") not in MODES:
        raise ValueError(f"model_config.mode must be one of {', '.join(MODES)}, got {cfg.get('mode')!r}")
    graphs = manifest.get("graphs")
    if not isinstance(graphs, dict):
        raise TypeError("graphs must be an object")
    for name in GRAPHS + (PROJECTIONS if takes_projections(manifest) else ()):
        if name not in graphs:
            raise ValueError(f"graphs lists no {name}")
        _check_graph(graphs[name], name)
    if FEATURE_EXTRACTOR in graphs:
        _check_graph(graphs[FEATURE_EXTRACTOR], FEATURE_EXTRACTOR)
    if any(g in graphs for g in GLOBAL_GRAPHS):
        for g in GLOBAL_GRAPHS:
            if g not in graphs:
                raise ValueError(f"graphs lists one global head graph but not {g}")
            _check_graph(graphs[g], g)
        sizes = {graphs[g]["outputs"][0]["shape"][-1] for g in GLOBAL_GRAPHS}
        if len(sizes) != 1 or not all(_is_int(v) for v in sizes) or \
                any(graphs[g]["inputs"][0]["shape"][-1] != cfg["embed_size"] for g in GLOBAL_GRAPHS):
            raise ValueError("image_global and text_global must take embed_size vectors and make vectors of one size")
    conformance = manifest.get(CONFORMANCE)
    if conformance is not None and (not isinstance(conformance, dict) or
                                    not all(isinstance(conformance.get(k), str) for k in ("file", "data"))):
        raise TypeError(f"{CONFORMANCE} must name its file and data (runtime.check)")
    if not isinstance(manifest.get("vocab"), dict) or not isinstance(manifest["vocab"].get("file"), str):
        raise TypeError("vocab.file must be a file name")
    tokenizer = manifest.get("tokenizer")
    if tokenizer is not None or version >= 3:  # the tokeniser's rules (runtime.text, docs/tokenizer.md)
        if not isinstance(tokenizer, dict) or not isinstance(tokenizer.get("file"), str) or \
                not _is_int(tokenizer.get("rules_version"), 0):
            raise TypeError('tokenizer must be {"file": file name, "rules_version": integer}')
        if tokenizer["rules_version"] not in KNOWN_RULES_VERSIONS:
            raise ValueError(f"tokeniser rules version {tokenizer['rules_version']} is not known to this runtime "
                             f"(it knows {', '.join(map(str, KNOWN_RULES_VERSIONS))}): use an imram-min that "
                             f"knows it, or re-export the model with this one")
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise TypeError("files must be an object of file name: {sha256: ...}")
    for name, info in files.items():
        if not isinstance(info, dict) or not isinstance(info.get("sha256"), str) or \
                not re.fullmatch(r"[0-9a-f]{64}", info["sha256"]):
            raise ValueError(f"files.{name}.sha256 must be 64 hex digits")
        if os.path.basename(name) != name or name in ("", ".", ".."):
            raise ValueError(f"file name {name!r} is not a plain name")


def load_manifest(model_dir: str | os.PathLike, verify: bool = True) -> dict:
    """Read MODEL_DIR/manifest.json, check its fields and (``verify``) every listed file's SHA-256."""
    model_dir = os.fspath(model_dir)
    path, manifest = read_manifest_file(model_dir, ModelDirError, "model", "python -m export CKPT --out DIR")
    try:
        check_manifest_fields(manifest)
    except (TypeError, ValueError) as e:
        raise ModelDirError(f"{path}: {e}") from None
    files, graphs, cfg = manifest["files"], manifest["graphs"], manifest["model_config"]
    needed = [graphs[g]["file"] for g in GRAPHS + (PROJECTIONS if takes_projections(manifest) else ())]
    needed.append(manifest["vocab"]["file"])
    if manifest.get("tokenizer") is not None:
        needed.append(manifest["tokenizer"]["file"])
    needed += [graphs[g]["file"] for g in GLOBAL_GRAPHS if has_global_head(manifest)]
    if manifest.get(CONFORMANCE) is not None:  # the conformance vectors (runtime.check)
        needed += [manifest[CONFORMANCE]["file"], manifest[CONFORMANCE]["data"]]
    extractor = graphs.get(FEATURE_EXTRACTOR)
    if extractor is not None:
        needed.append(extractor["file"])
        try:
            size, grid = check_feature_spec(manifest.get("preprocessing"), f"{path}: preprocessing")
        except ValueError as e:
            raise ModelDirError(str(e)) from None
        in_shape, out_shape = extractor["inputs"][0]["shape"], extractor["outputs"][0]["shape"]
        if in_shape[1:] != [3, size, size] or out_shape[1:] != [grid * grid, cfg["img_dim"]]:
            raise ModelDirError(f"{path}: feature extractor {in_shape} -> {out_shape} does not fit the "
                                f"preprocessing (size {size}, grid {grid}) and img_dim {cfg['img_dim']}")
    for name in needed:
        if name not in files:
            raise ModelDirError(f"{path}: lists no hash for {name}")
    for name, info in files.items():
        file = os.path.join(model_dir, name)
        if not os.path.isfile(file):
            raise ModelDirError(f"{file}: missing from the model folder")
        if verify:
            try:
                digest = sha256_file(file)
            except OSError as e:
                raise ModelDirError(f"{file}: cannot read ({e.strerror})") from None
            if digest != info["sha256"]:
                raise ModelDirError(f"{file}: SHA-256 {digest[:12]}... does not match the manifest "
                                    f"({info['sha256'][:12]}...); the file was changed or damaged")
    return manifest


def load_tokenizer(model_dir: str | os.PathLike, manifest: dict) -> Tokenizer:
    """The model folder's tokeniser: the rules of its tokenizer.json (format 3), whose version must be
    the manifest's; a folder of format 1 or 2 has none and is read with the built-in rules (version 1,
    what the exporter of those folders used: docs/tokenizer.md). ModelDirError naming the file."""
    entry = manifest.get("tokenizer")
    if entry is None:
        return Tokenizer.builtin()
    path = os.path.join(os.fspath(model_dir), entry["file"])
    try:
        tokenizer = Tokenizer.load(path)
    except TokenizerError as e:
        raise ModelDirError(str(e)) from None
    if tokenizer.rules_version != entry["rules_version"]:
        raise ModelDirError(f"{path}: rules version {tokenizer.rules_version}, the manifest says "
                            f"{entry['rules_version']}")
    return tokenizer


def takes_projections(manifest: dict) -> bool:
    """Whether the manifest's matcher takes region_proj and word_proj (made by the projection graphs)."""
    try:
        return "region_proj" in [i["name"] for i in manifest["graphs"]["matcher"]["inputs"]]
    except (KeyError, TypeError):
        return False



def has_global_head(manifest: dict) -> bool:
    """Whether the model dir has the first stage's global head graphs (image_global, text_global)."""
    return isinstance(manifest.get("graphs"), dict) and all(g in manifest["graphs"] for g in GLOBAL_GRAPHS)


def model_manifest_sha256(model_dir: str) -> str:
    """SHA-256 of MODEL_DIR/manifest.json (which lists the SHA-256 of every model file)."""
    path = os.path.join(model_dir, MANIFEST_FILE)
    try:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    except OSError as e:
        raise ModelDirError(f"{path}: cannot read the model's manifest ({e.strerror})") from None
