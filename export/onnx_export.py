"""Export an IMRAM checkpoint to three ONNX graphs + vocabulary + manifest (a "model dir").

    python -m export RUN/best.pt --out MODEL_DIR [--opset 17] [--matcher plain|fast]
                     [--feature-extractor [--feature-size PX] [--grid N]]

MODEL_DIR/
    image_encoder.onnx  region_feats (n_img, n_region, img_dim) f32 -> region_embs (n_img, n_region, d) f32
    text_encoder.onnx   tokens (n_cap, n_word) i64, lengths (n_cap,) i64 -> word_embs (n_cap, n_word, d) f32
    matcher.onnx        region_embs, word_embs, lengths[, region_proj, word_proj] -> sims (n_img, n_cap) f32
                        (mode and K fixed)
  with the fast matcher of a model that makes memory updates (K > 1, not the mean baseline):
    region_projection.onnx  region_embs -> region_proj (n_img, n_region, P) f32   P = 2d per direction
    word_projection.onnx    word_embs -> word_proj (n_cap, n_word, P) f32
                            the per-item parts of the memory updates (imram_min.fast), made once per
                            image / caption and fed to the matcher, which then does per pair only
                            what is per pair
    vocab.json          SCAN vocabulary JSON (runtime.text.Vocabulary)
    tokenizer.json      the tokeniser's rules (a copy of runtime/tokenizer.json; docs/tokenizer.md);
                        manifest "tokenizer": {"file", "rules_version"}
    manifest.json       format version, model config, graph inputs/outputs, opset, versions, SHA-256 of each file
    conformance.json    conformance vectors (export.conformance, docs/deploy.md): captions with tokens and
    conformance.bin     ids, seeded features with embeddings, projections and scores, a tolerance per stage;
                        ``python -m runtime.check MODEL_DIR`` checks a runtime against them
  with feature_extractor=True (models with img_dim 1280, trained on imram_min.data.features grid features):
    feature_extractor.onnx  images (n_img, 3, size, size) f32, preprocessed by runtime.images
                            -> region_feats (n_img, grid*grid, 1280) f32; manifest "preprocessing" holds
                            runtime.images.feature_spec(size, grid) (network, size, grid, normalisation)

How each graph is made: ``export.graphs``. Why the TorchScript exporter: the dynamo exporter took ~30x longer, recorded the example's
n_word in the output shape, and its optimiser dropped the ``+ 1e-8`` of l2norm (0/0 = NaN on
zero padding rows). The graphs are checked with ``onnx.checker.check_model(full_check=True)``
and, unless ``verify=False``, compared with PyTorch under ONNX Runtime on a batch of other sizes,
and the runtime (runtime.check) is run on the conformance vectors of the new folder.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import shutil
import tempfile
import warnings

import numpy as np
import onnx
import torch
import torch.nn as nn

from imram_min.model import IMRAM
from runtime.images import FEATURE_DIM, FEATURES_JSON, check_feature_spec, feature_spec
from runtime.modeldir import sha256_file
from runtime.text import PAD, RULES_FILE, TOKENIZER_FILE, Tokenizer, Vocabulary

from .conformance import manifest_entry, onnxruntime_version, verify_conformance, write_conformance
from .graphs import DEFAULT_MATCHER, ImageEncoderGraph, ProjectionGraph, TextEncoderGraph, build_matcher, projection_size

FORMAT = "imram-min-onnx"
FORMAT_VERSION = 3  # 2: the fast matcher takes per-item projections from two more graphs; 3: tokenizer.json
DEFAULT_OPSET = 17
MIN_OPSET = 14  # GRU with linear_before_reset, Trilu-free; 14 is the oldest we test
MAX_OPSET = 20  # the newest the TorchScript exporter writes
VERIFY_TOL = 1e-4  # export-time sanity check (the tests hold the graphs to 1e-5)
DEFAULT_FEATURE_SIZE, DEFAULT_GRID = 128, 4  # = imram_min.data.features.DEFAULT_SIZE, DEFAULT_GRID (a test checks)

FILES = {"image_encoder": "image_encoder.onnx", "text_encoder": "text_encoder.onnx", "matcher": "matcher.onnx"}
PROJECTION_FILES = {"region_projection": "region_projection.onnx", "word_projection": "word_projection.onnx"}
FEATURE_EXTRACTOR = "feature_extractor"  # the optional last graph
FEATURE_EXTRACTOR_FILE = "feature_extractor.onnx"
VOCAB_FILE, MANIFEST_FILE = "vocab.json", "manifest.json"
_UMASK = os.umask(0o022)  # read the process umask (there is no getter) and put it back at once
os.umask(_UMASK)


class ExportError(RuntimeError):
    """The exported graphs do not check out (invalid ONNX, or ONNX Runtime disagrees with PyTorch)."""


class ExportSettingsError(ValueError):
    """An export that cannot be made as asked (e.g. a feature extractor for a model with img_dim != 1280)."""


# --------------------------------------------------------------------------- graph signatures
def graph_signatures(img_dim: int, embed_size: int, proj_size: int = 0) -> dict:
    """Inputs and outputs of each graph: {graph: {"inputs": [...], "outputs": [...]}}, each item
    {"name", "dtype", "shape"} with symbolic dims as strings. The manifest records exactly this.
    proj_size > 0 (the fast matcher of a model that updates its memory): the projection graphs,
    and the matcher takes their outputs (P = proj_size)."""
    def t(name, dtype, *shape):
        return {"name": name, "dtype": dtype, "shape": list(shape)}
    region_embs = t("region_embs", "float32", "n_img", "n_region", embed_size)
    word_embs = t("word_embs", "float32", "n_cap", "n_word", embed_size)
    signatures = {
        "image_encoder": {"inputs": [t("region_feats", "float32", "n_img", "n_region", img_dim)],
                          "outputs": [region_embs]},
        "text_encoder": {"inputs": [t("tokens", "int64", "n_cap", "n_word"), t("lengths", "int64", "n_cap")],
                         "outputs": [word_embs]},
        "matcher": {"inputs": [region_embs, word_embs, t("lengths", "int64", "n_cap")],
                    "outputs": [t("sims", "float32", "n_img", "n_cap")]},
    }
    if proj_size:
        region_proj = t("region_proj", "float32", "n_img", "n_region", proj_size)
        word_proj = t("word_proj", "float32", "n_cap", "n_word", proj_size)
        signatures["region_projection"] = {"inputs": [region_embs], "outputs": [region_proj]}
        signatures["word_projection"] = {"inputs": [word_embs], "outputs": [word_proj]}
        signatures["matcher"]["inputs"] += [region_proj, word_proj]
    return signatures


def feature_extractor_signature(size: int, grid: int) -> dict:
    """Inputs and outputs of feature_extractor.onnx: images (n_img, 3, size, size) -> region_feats
    (n_img, grid*grid, 1280), both float32; the output is the image encoder's input."""
    return {"inputs": [{"name": "images", "dtype": "float32", "shape": ["n_img", 3, size, size]}],
            "outputs": [{"name": "region_feats", "dtype": "float32", "shape": ["n_img", grid * grid, FEATURE_DIM]}]}


def _dynamic_axes(signature: dict) -> dict:
    """{tensor name: {axis: symbol}} for torch.onnx.export, from a graph signature."""
    axes = {}
    for item in signature["inputs"] + signature["outputs"]:
        axes[item["name"]] = {i: s for i, s in enumerate(item["shape"]) if isinstance(s, str)}
    return axes


# --------------------------------------------------------------------------- example inputs
def example_inputs(model: IMRAM, seed: int = 0, n_img: int = 2, n_region: int = 3, n_cap: int = 4,
                   n_word: int = 5) -> dict:
    """A small random batch for tracing and checking, sizes all different and > 1 (so no dim is
    specialised): {"region_feats", "tokens", "lengths", "region_embs", "word_embs"} as tensors.
    Lengths run from 1 to n_word; tokens past each length are <pad>."""
    cfg = model.cfg
    g = torch.Generator().manual_seed(seed)
    region_feats = torch.randn(n_img, n_region, cfg.img_dim, generator=g)
    lengths = torch.linspace(n_word, 1, n_cap).round().to(torch.int64)
    tokens = torch.randint(min(4, cfg.vocab_size - 1), cfg.vocab_size, (n_cap, n_word), generator=g)  # no specials
    tokens[torch.arange(n_word)[None, :] >= lengths[:, None]] = PAD
    with torch.no_grad():
        region_embs = model.encode_images(region_feats)
        word_embs = model.encode_captions(tokens, lengths)
    return {"region_feats": region_feats, "tokens": tokens, "lengths": lengths,
            "region_embs": region_embs, "word_embs": word_embs}


# --------------------------------------------------------------------------- export
def _export_graph(module: nn.Module, args: tuple, path: str, signature: dict, opset: int) -> None:
    """torch.onnx.export (TorchScript exporter) with the signature's names and dynamic axes."""
    module.eval()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the legacy-exporter deprecation notice and tracer notes
        torch.onnx.export(module, args, path, dynamo=False, opset_version=opset, do_constant_folding=True,
                          input_names=[i["name"] for i in signature["inputs"]],
                          output_names=[o["name"] for o in signature["outputs"]],
                          dynamic_axes=_dynamic_axes(signature))
    graph = onnx.load(path)
    graph.producer_name, graph.doc_string = "imram-min export", module.__class__.__doc__.strip().split("\n")[0]
    for values, items in ((graph.graph.input, signature["inputs"]), (graph.graph.output, signature["outputs"])):
        for value, item in zip(values, items):  # declare the signature's shapes (the exporter may invent names)
            dims = value.type.tensor_type.shape.dim
            del dims[:]
            for size in item["shape"]:
                dim = dims.add()
                if isinstance(size, str):
                    dim.dim_param = size
                else:
                    dim.dim_value = size
    onnx.save(graph, path)


def check_graph(path: str, signature: dict | None = None) -> None:
    """onnx.checker full check, plus: inputs/outputs named, typed and shaped as ``signature``."""
    graph = onnx.load(path)
    onnx.checker.check_model(graph, full_check=True)
    if signature is None:
        return
    for kind in ("inputs", "outputs"):
        found = graph.graph.input if kind == "inputs" else graph.graph.output
        got = [{"name": v.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name,
                "shape": [d.dim_param if d.HasField("dim_param") else d.dim_value
                          for d in v.type.tensor_type.shape.dim]} for v in found]
        if got != signature[kind]:
            raise ExportError(f"{os.path.basename(path)}: {kind} are {got}, expected {signature[kind]}")


def example_images(size: int, n_img: int = 2, seed: int = 0) -> torch.Tensor:
    """(n_img, 3, size, size) float32 in [-1, 1): stands in for preprocessed pictures."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n_img, 3, size, size, generator=g) * 2 - 1


def verify_feature_extractor(extractor: nn.Module, path: str, tol: float = VERIFY_TOL) -> float:
    """feature_extractor.onnx under ONNX Runtime (CPU) vs PyTorch on 3 random images (the export
    example had 2); returns the max abs difference, raises ExportError beyond ``tol``."""
    import onnxruntime as ort

    images = example_images(extractor.size, n_img=3, seed=1)
    with torch.no_grad():
        expected = extractor(images).numpy()
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    got = session.run(None, {"images": images.numpy()})[0]
    diff = float(np.abs(got - expected).max()) if got.shape == expected.shape else float("inf")
    if not np.isfinite(got).all() or not diff <= tol:
        raise ExportError(f"{os.path.basename(path)}: ONNX Runtime differs from PyTorch by {diff:.3g} "
                          f"(tolerance {tol:g}; shapes {got.shape} vs {expected.shape})")
    return diff


def verify_graphs(model: IMRAM, folder: str, matcher: nn.Module, projections: dict | None = None,
                  tol: float = VERIFY_TOL) -> dict:
    """Run the graphs of ``folder`` under ONNX Runtime (CPU) on a batch of other sizes than the
    export example and compare with PyTorch. projections: {graph: ProjectionGraph} when the
    matcher takes projections. Returns {graph: max abs difference}; raises ExportError."""
    import onnxruntime as ort

    projections = projections or {}
    batch = example_inputs(model, seed=1, n_img=3, n_region=4, n_cap=5, n_word=7)
    r, w, lengths = batch["region_embs"], batch["word_embs"], batch["lengths"]
    feeds = {"image_encoder": {"region_feats": batch["region_feats"]},
             "text_encoder": {"tokens": batch["tokens"], "lengths": lengths},
             "matcher": {"region_embs": r, "word_embs": w, "lengths": lengths}}
    with torch.no_grad():
        expected = {"image_encoder": r, "text_encoder": w, "matcher": matcher(r, w, lengths)}
        if projections:
            expected["region_projection"] = projections["region_projection"](r)
            expected["word_projection"] = projections["word_projection"](w)
            feeds["region_projection"], feeds["word_projection"] = {"region_embs": r}, {"word_embs": w}
            feeds["matcher"].update(region_proj=expected["region_projection"], word_proj=expected["word_projection"])
    diffs = {}
    for name, file in {**FILES, **{g: PROJECTION_FILES[g] for g in projections}}.items():
        session = ort.InferenceSession(os.path.join(folder, file), providers=["CPUExecutionProvider"])
        got = session.run(None, {k: v.numpy() for k, v in feeds[name].items()})[0]
        diff = float(np.abs(got - expected[name].numpy()).max())
        if not np.isfinite(got).all() or not diff <= tol:
            raise ExportError(f"{file}: ONNX Runtime differs from PyTorch by {diff:.3g} (tolerance {tol:g})")
        diffs[name] = diff
    return diffs


def _jsonable(obj):
    """``obj`` as plain JSON data (anything unknown as its str)."""
    return json.loads(json.dumps(obj, default=str))


def build_feature_extractor(img_dim: int, size: int, grid: int, network: nn.Module | None = None) -> nn.Module:
    """``imram_min.data.features.GridFeatureExtractor`` (packaged ImageNet weights unless ``network``) in
    eval mode, for a model with ``img_dim``; ExportSettingsError if it cannot be made."""
    if img_dim != FEATURE_DIM:
        raise ExportSettingsError(
            f"--feature-extractor needs a model trained on EfficientNet-Lite0 grid features (img_dim {FEATURE_DIM}); "
            f"this model has img_dim {img_dim}: score it with precomputed region features (.npy) instead")
    if isinstance(size, bool) or not isinstance(size, int) or size < 32:
        raise ExportSettingsError(f"feature size must be an integer >= 32 pixels, got {size!r}")
    if isinstance(grid, bool) or not isinstance(grid, int) or grid < 1:
        raise ExportSettingsError(f"grid must be an integer >= 1, got {grid!r}")
    from imram_min.data.features import EfficientNetLite0, GridFeatureExtractor
    if network is None:
        try:
            network = EfficientNetLite0.pretrained()
        except (ImportError, ValueError) as e:
            raise ExportSettingsError(str(e)) from None
    return GridFeatureExtractor(network.cpu().eval(), size, grid).eval()


def export_model(model: IMRAM, vocab: Vocabulary, out_dir: str | os.PathLike, opset: int = DEFAULT_OPSET,
                 matcher: str = DEFAULT_MATCHER, verify: bool = True, source: dict | None = None,
                 feature_extractor: bool = False, feature_size: int = DEFAULT_FEATURE_SIZE,
                 grid: int = DEFAULT_GRID, feature_network: nn.Module | None = None) -> dict:
    """Write the model dir (see the module docstring) atomically; returns the manifest.

    feature_extractor: also write feature_extractor.onnx for pictures preprocessed at
    ``feature_size`` px and pooled to ``grid`` x ``grid`` (the model must have img_dim 1280);
    ``feature_network``: an EfficientNetLite0 to use instead of loading the packaged weights.

    Everything is written into a temporary folder next to ``out_dir`` first. If ``out_dir`` does
    not exist the folder is renamed to it (one atomic step); otherwise each file replaces its old
    version (os.replace), manifest.json last, and other files in ``out_dir`` are left alone.
    """
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ValueError(f"opset must be in {MIN_OPSET}..{MAX_OPSET}, got {opset}")
    if len(vocab) != model.cfg.vocab_size:
        raise ValueError(f"vocabulary has {len(vocab)} words but the model has vocab_size={model.cfg.vocab_size}")
    model = model.cpu().eval()
    cfg = model.cfg
    extractor = build_feature_extractor(cfg.img_dim, feature_size, grid, feature_network) \
        if feature_extractor else None
    out_dir = os.path.abspath(os.fspath(out_dir))
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    signatures = graph_signatures(cfg.img_dim, cfg.embed_size, projection_size(model, matcher))
    matcher_module = build_matcher(model, matcher).eval()
    projections = {f"{side}_projection": ProjectionGraph(model, side).eval()
                   for side in ("region", "word") if f"{side}_projection" in signatures}
    ex = example_inputs(model)

    tmp = tempfile.mkdtemp(prefix="." + os.path.basename(out_dir) + ".tmp-", dir=parent)
    try:
        _export_graph(ImageEncoderGraph(model), (ex["region_feats"],),
                      os.path.join(tmp, FILES["image_encoder"]), signatures["image_encoder"], opset)
        _export_graph(TextEncoderGraph(model.txt_enc), (ex["tokens"], ex["lengths"]),
                      os.path.join(tmp, FILES["text_encoder"]), signatures["text_encoder"], opset)
        matcher_args = (ex["region_embs"], ex["word_embs"], ex["lengths"])
        files_written = dict(FILES)
        for name, module in projections.items():  # region_projection, then word_projection
            embs = ex[f"{module.side}_embs"]
            _export_graph(module, (embs,), os.path.join(tmp, PROJECTION_FILES[name]), signatures[name], opset)
            files_written[name] = PROJECTION_FILES[name]
            with torch.no_grad():
                matcher_args += (module(embs),)  # the matcher's region_proj, word_proj
        _export_graph(matcher_module, matcher_args, os.path.join(tmp, FILES["matcher"]), signatures["matcher"], opset)
        if extractor is not None:
            signatures[FEATURE_EXTRACTOR] = feature_extractor_signature(feature_size, grid)
            files_written[FEATURE_EXTRACTOR] = FEATURE_EXTRACTOR_FILE
            _export_graph(extractor, (example_images(feature_size),), os.path.join(tmp, FEATURE_EXTRACTOR_FILE),
                          signatures[FEATURE_EXTRACTOR], opset)
        for name, file in files_written.items():
            check_graph(os.path.join(tmp, file), signatures[name])
        diffs = verify_graphs(model, tmp, matcher_module, projections) if verify else None
        if verify and extractor is not None:
            diffs[FEATURE_EXTRACTOR] = verify_feature_extractor(extractor, os.path.join(tmp, FEATURE_EXTRACTOR_FILE))
        vocab.save(os.path.join(tmp, VOCAB_FILE))
        shutil.copyfile(RULES_FILE, os.path.join(tmp, TOKENIZER_FILE))  # before the conformance vectors use it
        conformance_files = write_conformance(model, vocab, tmp, signatures,  # export.conformance
                                              feature_extractor=extractor)

        files = {f: {"sha256": sha256_file(os.path.join(tmp, f)), "bytes": os.path.getsize(os.path.join(tmp, f))}
                 for f in [*files_written.values(), VOCAB_FILE, TOKENIZER_FILE, *conformance_files]}
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "model_config": cfg.to_dict(),
            "matcher": {"mode": cfg.mode, "n_steps": cfg.n_steps, "form": matcher},
            "graphs": {name: {"file": file, **signatures[name]} for name, file in files_written.items()},
            "vocab": {"file": VOCAB_FILE, "size": len(vocab)},
            "tokenizer": {"file": TOKENIZER_FILE, "rules_version": Tokenizer.builtin().rules_version},
            "opset": opset,
            "versions": {"torch": torch.__version__, "onnx": onnx.__version__, "numpy": np.__version__,
                         "python": platform.python_version(), "onnxruntime": onnxruntime_version()},
            "exporter": "torch.onnx.export(dynamo=False)",
            "verification": {"max_abs_diff": diffs, "provider": "CPUExecutionProvider"} if verify else None,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "source": _jsonable(source or {}),
            "files": files,
            "conformance": manifest_entry(tmp),  # "verified" filled in below
        }
        if extractor is not None:  # how pictures become the extractor's input; runtime.images implements it
            manifest["preprocessing"] = feature_spec(feature_size, grid)
        with open(os.path.join(tmp, MANIFEST_FILE), "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=2)
            f.write("\n")
        if verify:  # the runtime itself (runtime.check, ONNX Runtime CPU) against the vectors just written
            try:
                manifest["conformance"]["verified"] = verify_conformance(tmp)
            except ValueError as e:
                raise ExportError(str(e)) from None
            with open(os.path.join(tmp, MANIFEST_FILE), "w", encoding="utf-8") as f:
                json.dump(manifest, f, indent=2)
                f.write("\n")
        for file in [*files, MANIFEST_FILE]:
            os.chmod(os.path.join(tmp, file), 0o666 & ~_UMASK)  # mkdtemp made a private folder
        os.chmod(tmp, 0o777 & ~_UMASK)

        if not os.path.exists(out_dir):
            os.rename(tmp, out_dir)
        else:
            if not os.path.isdir(out_dir):
                raise NotADirectoryError(f"{out_dir} exists and is not a folder")
            for file in [*files, MANIFEST_FILE]:  # the manifest last: it vouches for the others
                os.replace(os.path.join(tmp, file), os.path.join(out_dir, file))
            os.rmdir(tmp)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
    return manifest


def recorded_feature_settings(checkpoint: str | os.PathLike, ckpt: dict,
                              looked: list[str] | None = None) -> tuple[dict | None, str | None]:
    """(feature spec, where it was found) of the data a checkpoint was trained on, or (None, None).
    ``looked``, when given, receives each features.json path tried (for the error message).

    First found wins: the checkpoint's meta["features"] (a feature spec); else the features.json
    of its data folder, the folder named by the checkpoint's train_state (last.pt) or by the
    config.json that ``imram_min.train`` writes beside it (a relative path is tried from the
    current folder, then from the checkpoint's folder). ExportSettingsError if what is found is
    malformed."""
    meta = ckpt.get("meta") or {}
    if isinstance(meta, dict) and meta.get("features") is not None:
        where = f"{os.fspath(checkpoint)} (meta.features)"
        try:
            check_feature_spec(meta["features"], where, strict=False)
        except ValueError as e:
            raise ExportSettingsError(str(e)) from None
        return dict(meta["features"]), where
    run_dir = os.path.dirname(os.path.abspath(os.fspath(checkpoint)))
    data_dirs = []
    train_state = ckpt.get("train_state") if isinstance(ckpt.get("train_state"), dict) else {}
    data_dirs.append((train_state.get("train_config") or {}).get("data"))
    config_path = os.path.join(run_dir, "config.json")
    if os.path.isfile(config_path):
        try:
            with open(config_path, encoding="utf-8") as f:
                data_dirs.append(((json.load(f) or {}).get("train") or {}).get("data"))
        except (OSError, ValueError, AttributeError):
            pass  # not a run folder's config.json: nothing recorded there
    for data_dir in data_dirs:
        if not isinstance(data_dir, str) or not data_dir:
            continue
        for base in (os.getcwd(), run_dir):
            path = os.path.join(base, data_dir, FEATURES_JSON)
            if looked is not None and os.path.normpath(path) not in looked:
                looked.append(os.path.normpath(path))
            if os.path.isfile(path):
                try:
                    with open(path, encoding="utf-8") as f:
                        spec = json.load(f)
                    check_feature_spec(spec, path, strict=False)
                except (OSError, ValueError) as e:
                    raise ExportSettingsError(f"{path}: cannot read the recorded feature settings ({e}); "
                                              f"give --feature-size and --grid") from None
                return spec, os.path.normpath(path)
    return None, None


def export_checkpoint(checkpoint: str | os.PathLike, out_dir: str | os.PathLike, opset: int = DEFAULT_OPSET,
                      matcher: str = DEFAULT_MATCHER, verify: bool = True, feature_extractor: bool = False,
                      feature_size: int | None = None, grid: int | None = None) -> dict:
    """Load a project checkpoint (imram_min.engineering.checkpoint) and ``export_model`` it; returns the manifest.

    With ``feature_extractor``: a size or grid left None is taken from ``recorded_feature_settings``;
    when nothing is recorded, ExportSettingsError (an extractor made at guessed settings would feed
    the model features it was not trained on). manifest["source"]["feature_settings"] says which
    (size, grid, from, and the recorded size/grid when they were overridden)."""
    from imram_min.engineering.checkpoint import load_checkpoint, model_from_checkpoint

    ckpt = load_checkpoint(checkpoint)
    rules = (ckpt.get("tokenizer") or {}).get("rules_version", Tokenizer.builtin().rules_version)  # older: none
    if rules != Tokenizer.builtin().rules_version:  # the model folder gets the built-in rules
        raise ExportSettingsError(f"{os.fspath(checkpoint)}: trained with tokeniser rules version {rules!r}, this "
                                  f"exporter writes version {Tokenizer.builtin().rules_version}: export it with "
                                  f"the imram-min it was trained with")
    model, vocab = model_from_checkpoint(ckpt, "cpu")
    meta = {**(ckpt.get("meta") or {}), "format": ckpt["format"]}  # as load_model's meta, less the config
    source = {"checkpoint": os.path.basename(os.fspath(checkpoint)), "checkpoint_sha256": sha256_file(checkpoint),
              "meta": meta}
    if feature_extractor:
        if model.cfg.img_dim != FEATURE_DIM:  # say so before looking for settings that would not matter
            build_feature_extractor(model.cfg.img_dim, DEFAULT_FEATURE_SIZE, DEFAULT_GRID)
        looked: list[str] = []
        try:
            recorded, where = recorded_feature_settings(checkpoint, ckpt, looked)
        except ExportSettingsError:
            if feature_size is None or grid is None:
                raise
            recorded, where = None, None  # both given: the recorded ones are not needed
        settings = {"size": feature_size, "grid": grid, "from": "command line"}
        if (feature_size is None or grid is None) and not recorded:
            places = (" (looked for " + " and ".join(looked) + ")") if looked else \
                " (no training data folder is named by the checkpoint or a config.json beside it)"
            raise ExportSettingsError(
                f"{os.fspath(checkpoint)}: the picture size and grid its training features were made with are not "
                f"recorded{places}: pass --feature-size PX --grid N as given to imram_min.data.features, or put that "
                f"{FEATURES_JSON} in the training data folder")
        if feature_size is None or grid is None:
            settings["from"] = where
        for key in ("size", "grid"):
            if settings[key] is None:
                settings[key] = int(recorded[key])
        if recorded and (int(recorded["size"]), int(recorded["grid"])) != (settings["size"], settings["grid"]):
            settings["recorded"] = {"size": int(recorded["size"]), "grid": int(recorded["grid"]), "from": where}
        source["feature_settings"] = settings
        feature_size, grid = settings["size"], settings["grid"]
    return export_model(model, vocab, out_dir, opset=opset, matcher=matcher, verify=verify, source=source,
                        feature_extractor=feature_extractor, feature_size=feature_size or DEFAULT_FEATURE_SIZE,
                        grid=grid or DEFAULT_GRID)
