"""Check this runtime against the conformance vectors of a model folder.

    python -m runtime.check MODEL_DIR [--device auto|cpu|cuda]

``python -m export`` writes conformance.json and conformance.bin into every model folder
(export/conformance.py; the layout is in docs/deploy.md): captions with their tokens and ids,
seeded region features with the region and word embeddings, projections and pair scores a correct
runtime computes, and a tolerance per stage. This command runs them through the runtime's own code
(``runtime.scorer.Scorer``: its tokenisation, encoders, projections, matcher and all-pairs
scoring; its first-stage vectors and feature extractor when the folder has a global head or
pictures) and prints one line per stage:

    tokens              ok    1234/1234 captions exact
    region embeddings   ok    max |diff| 1.2e-07 <= 1.0e-05
    ...
    ok: MODEL_DIR conforms (onnxruntime 1.xx.x, CPUExecutionProvider)

Each graph stage is fed the expected arrays of the stages before it (not this runtime's own
outputs), so one wrong stage does not fail the others; the "pipeline scores" stage scores the
region features against caption strings end to end. A float stage passes when the shapes agree,
every value is finite and max |got - expected| <= its tolerance; tokens and ids must be exact.

Exit status 0 when every stage passes; 2 when one fails (the lines, then one ``error:`` line
naming the failed stages), and 2 after one ``error:`` line for bad input: a missing or altered
model folder, a folder exported before the vectors existed (re-export it), damaged vectors,
an unavailable device. numpy, onnxruntime and the standard library only.
"""
from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from . import cli
from .cli import printable
from .engine import DEVICES, DeviceError
from .inputs import InputError
from .modeldir import FEATURE_EXTRACTOR, ModelDirError
from .scorer import Scorer

FORMAT = "imram-min-conformance"
SUPPORTED_FORMAT_VERSIONS = (1, 2)  # 2: stages of the optional graphs, "requires" (export/conformance.py)
MANIFEST_KEY = "conformance"
DTYPES = {"float32": np.dtype("<f4"), "int64": np.dtype("<i8")}
MAX_CAPTIONS = 1 << 20
STAGE_KINDS = ("tokens", "ids", "graph", "pipeline")
LABEL_WIDTH = 20


class ConformanceError(ModelDirError):
    """Conformance vectors that are missing or malformed (the message names the file)."""


@dataclass
class StageResult:
    """One stage's outcome: name, label (what is printed), ok, detail (the rest of the line),
    max_abs_diff and tolerance (float stages; None for tokens and ids)."""
    name: str
    label: str
    ok: bool
    detail: str
    max_abs_diff: float | None = None
    tolerance: float | None = None

    def line(self) -> str:
        return f"{self.label:<{LABEL_WIDTH}}{'ok' if self.ok else 'FAIL':<6}{self.detail}"


# --------------------------------------------------------------------------- reading the vectors
def load_vectors(model_dir: str, manifest: dict) -> tuple[dict, dict]:
    """(conformance.json as a dict, {array name: numpy array}) of a model folder whose manifest
    (already read and hash-checked by runtime.modeldir) lists them; ConformanceError naming the
    file for anything missing or malformed."""
    entry = manifest.get(MANIFEST_KEY)
    if entry is None:
        raise ConformanceError(f"{model_dir}: has no conformance vectors (exported before they existed); re-export "
                               f"it with python -m export CKPT --out {model_dir} --overwrite")
    if not isinstance(entry, dict) or not isinstance(entry.get("file"), str) or not isinstance(entry.get("data"), str):
        raise ConformanceError(f"{os.path.join(model_dir, 'manifest.json')}: conformance must name its file and data")
    path = os.path.join(model_dir, entry["file"])
    try:
        with open(path, encoding="utf-8") as f:
            document = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ConformanceError(f"{path}: cannot read the conformance vectors ({e})") from None
    try:
        check_document(document)
    except (TypeError, ValueError) as e:
        raise ConformanceError(f"{path}: {e}") from None
    data_path = os.path.join(model_dir, document["data"])
    if document["data"] != entry["data"]:
        raise ConformanceError(f"{path}: data {document['data']!r} is not the manifest's {entry['data']!r}")
    try:
        with open(data_path, "rb") as f:
            blob = f.read()
    except OSError as e:
        raise ConformanceError(f"{data_path}: cannot read ({e.strerror})") from None
    arrays = {}
    for name, spec in document["arrays"].items():
        dtype = DTYPES[spec["dtype"]]
        count = math.prod(spec["shape"])  # Python ints: no overflow
        end = spec["offset"] + count * dtype.itemsize
        if end > len(blob):
            raise ConformanceError(f"{data_path}: array {name} ends at byte {end}, the file has {len(blob)}")
        array = np.frombuffer(blob, dtype, count, spec["offset"]).reshape(spec["shape"])
        arrays[name] = array.astype(dtype.newbyteorder("="))  # native byte order, a copy
    return document, arrays


def _is_int(value, low: int = 0, high: int = 1 << 40) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def check_document(doc) -> None:
    """Type and range of every conformance.json field this check reads (TypeError / ValueError)."""
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ValueError(f"not an {FORMAT} file")
    if doc.get("format_version") not in SUPPORTED_FORMAT_VERSIONS:
        raise ValueError(f"format version {doc.get('format_version')!r} is not supported (this runtime reads "
                         f"{SUPPORTED_FORMAT_VERSIONS}); update the runtime")
    if not isinstance(doc.get("data"), str) or os.path.basename(doc["data"]) != doc["data"]:
        raise TypeError("data must be a plain file name")
    captions = doc.get("captions")
    if not isinstance(captions, list) or not 0 < len(captions) <= MAX_CAPTIONS:
        raise TypeError("captions must be a non-empty list")
    for i, c in enumerate(captions):
        if not isinstance(c, dict) or not isinstance(c.get("caption"), str) or \
                not isinstance(c.get("tokens"), list) or not all(isinstance(t, str) for t in c["tokens"]) or \
                not isinstance(c.get("ids"), list) or not all(_is_int(t) for t in c["ids"]):
            raise TypeError(f"captions[{i}] must be {{caption: str, tokens: [str], ids: [int]}}")
    arrays = doc.get("arrays")
    if not isinstance(arrays, dict):
        raise TypeError("arrays must be an object")
    for name, spec in arrays.items():
        if not isinstance(spec, dict) or spec.get("dtype") not in DTYPES or not _is_int(spec.get("offset")) or \
                not isinstance(spec.get("shape"), list) or not all(_is_int(a, 0, 1 << 24) for a in spec["shape"]):
            raise TypeError(f"arrays.{name} must be {{dtype: float32|int64, shape: [int], offset: int}}")
    for key in ("embedding_captions", "score_captions"):
        if not isinstance(doc.get(key), list) or not all(_is_int(i, 0, len(captions) - 1) for i in doc[key]):
            raise TypeError(f"{key} must be a list of caption indices")
    stages = doc.get("stages")
    if not isinstance(stages, list) or not stages:
        raise TypeError("stages must be a non-empty list")
    for i, stage in enumerate(stages):
        if not isinstance(stage, dict) or not isinstance(stage.get("name"), str) or \
                not isinstance(stage.get("label"), str) or stage.get("kind") not in STAGE_KINDS:
            raise TypeError(f"stages[{i}] must have a name, a label and a kind (tokens, ids, graph or pipeline)")
        if stage["kind"] in ("graph", "pipeline"):
            tol = stage.get("tolerance")
            if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0 <= tol < float("inf"):
                raise ValueError(f"stages[{i}].tolerance must be a finite number >= 0")
            if stage.get("output") not in arrays or not isinstance(stage.get("inputs"), dict):
                raise TypeError(f"stages[{i}] must name its inputs and an output array")
            names = [v for k, v in stage["inputs"].items() if k != "captions"]
            if any(v not in arrays for v in names):
                raise TypeError(f"stages[{i}] names an input array that arrays does not hold")
        if stage["kind"] == "graph" and not isinstance(stage.get("graph"), str):
            raise TypeError(f"stages[{i}].graph must be a graph name")
        if "requires" in stage and not isinstance(stage["requires"], str):  # this runtime runs every stage
            raise TypeError(f"stages[{i}].requires must be a capability name")


# --------------------------------------------------------------------------- the stages
def compare(stage: dict, got: np.ndarray, expected: np.ndarray) -> StageResult:
    """A float stage's result: same shape, all finite, max |got - expected| <= stage["tolerance"]."""
    tol = float(stage["tolerance"])
    got = np.asarray(got)
    if got.shape != expected.shape:
        return StageResult(stage["name"], stage["label"], False,
                           f"shape {list(got.shape)}, expected {list(expected.shape)}", None, tol)
    if not np.isfinite(got).all():
        return StageResult(stage["name"], stage["label"], False, "NaN or Inf in the output", float("inf"), tol)
    diff = float(np.abs(got.astype(np.float64) - expected.astype(np.float64)).max()) if got.size else 0.0
    ok = diff <= tol
    return StageResult(stage["name"], stage["label"], ok,
                       f"max |diff| {diff:.1e} {'<=' if ok else '>'} {tol:.1e}", diff, tol)


def _show(value, limit: int = 120) -> str:
    text = printable(json.dumps(value, ensure_ascii=False))
    return text if len(text) <= limit else text[:limit - 3] + "..."


def compare_lists(stage: dict, captions: list, got: list, key: str) -> StageResult:
    """Tokens or ids of every caption, exactly."""
    wrong = [i for i, (c, g) in enumerate(zip(captions, got)) if c[key] != g]
    n = len(captions)
    if not wrong:
        return StageResult(stage["name"], stage["label"], True, f"{n}/{n} captions exact")
    i = wrong[0]
    return StageResult(stage["name"], stage["label"], False,
                       f"{len(wrong)}/{n} captions differ; first: caption {i} {_show(captions[i]['caption'])}: "
                       f"got {_show(got[i])}, expected {_show(captions[i][key])}")


def caption_tokenizer(engine: Scorer):
    """The engine's own split of a caption into tokens: its ``tokenizer`` (the model folder's rules)
    when it has one, else runtime.text.tokenize."""
    tokenizer = getattr(engine, "tokenizer", None)
    if tokenizer is not None:
        return tokenizer.tokenize
    from .text import tokenize
    return tokenize


def run_graph_stage(engine: Scorer, stage: dict, arrays: dict) -> np.ndarray:
    """The engine's method for ``stage["graph"]`` on the stage's input arrays."""
    inputs = {k: arrays[v] for k, v in stage["inputs"].items()}
    graph = stage["graph"]
    if graph == "image_encoder":
        return engine.encode_images(inputs["region_feats"])
    if graph == "text_encoder":
        return engine.encode_token_batch(inputs["tokens"], inputs["lengths"])[0]
    if graph in ("region_projection", "word_projection"):
        side = graph.split("_")[0]
        return engine.project(side, inputs[f"{side}_embs"])
    if graph == "matcher":
        return engine.match(inputs["region_embs"], inputs["word_embs"], inputs["lengths"],
                            inputs.get("region_proj"), inputs.get("word_proj"))
    if graph == "image_global":  # runtime.index's and runtime.search's first-stage vectors
        return engine.first_stage_vectors(inputs["region_embs"])
    if graph == "text_global":
        return engine.first_stage_vectors(inputs["word_embs"], inputs["lengths"])
    if graph == FEATURE_EXTRACTOR:  # what image_features runs on each batch of preprocessed pictures
        return engine.extract_features(inputs["images"])
    raise ConformanceError(f"stage {stage['name']}: graph {graph!r} is unknown to this runtime; update it")


def run_checks(engine: Scorer, document: dict, arrays: dict) -> list[StageResult]:
    """Every stage of ``document`` run by ``engine`` (a Scorer of the model folder), in order."""
    results = []
    for stage in document["stages"]:
        try:
            results.append(run_stage(engine, stage, document, arrays))
        except ConformanceError:
            raise
        except Exception as e:  # inconsistent vectors, or a runtime that breaks on them: this stage fails
            tol = stage.get("tolerance")
            results.append(StageResult(stage["name"], stage["label"], False,
                                       f"the runtime raised {type(e).__name__}: {cli.one_line(e)[:200]}",
                                       None, None if tol is None else float(tol)))
    return results


def run_stage(engine: Scorer, stage: dict, document: dict, arrays: dict) -> StageResult:
    """One stage of ``document`` run by ``engine``."""
    captions = document["captions"]
    texts = [c["caption"] for c in captions]
    kind = stage["kind"]
    if kind == "tokens":
        split = caption_tokenizer(engine)
        return compare_lists(stage, captions, [list(split(t)) for t in texts], "tokens")
    if kind == "ids":
        tokens, lengths = engine.tokenize(texts)
        return compare_lists(stage, captions, [row[:n].tolist() for row, n in zip(tokens, lengths)], "ids")
    if kind == "graph":
        if stage["graph"] not in engine.sessions and not (stage["graph"] == FEATURE_EXTRACTOR and
                                                          engine.has_feature_extractor):  # its session: on first use
            return StageResult(stage["name"], stage["label"], False,
                               f"the model folder has no {stage['graph']} graph", None, float(stage["tolerance"]))
        return compare(stage, run_graph_stage(engine, stage, arrays), arrays[stage["output"]])
    # pipeline: caption strings and region features, all pairs, through Scorer.score
    chosen = [texts[i] for i in document[stage["inputs"]["captions"]]]
    return compare(stage, engine.score(arrays[stage["inputs"]["region_feats"]], chosen), arrays[stage["output"]])


def check_model_dir(model_dir: str, device: str = "auto") -> tuple[Scorer, list[StageResult]]:
    """(the Scorer, the stage results) of MODEL_DIR's conformance vectors run by this runtime.
    ModelDirError / ConformanceError / DeviceError for a folder or device that cannot be checked."""
    engine = Scorer(model_dir, device=device)
    document, arrays = load_vectors(model_dir, engine.manifest)
    return engine, run_checks(engine, document, arrays)


# --------------------------------------------------------------------------- command line
def _main(argv: list[str] | None) -> int:
    p = cli.ArgumentParser(prog="python -m runtime.check",
                           description="Check this runtime against a model folder's conformance vectors "
                                       "(one line per stage; exit 0 when all pass, 2 otherwise).")
    p.add_argument("model_dir", metavar="MODEL_DIR", help="a model folder written by python -m export")
    p.add_argument("--device", default="auto", choices=DEVICES,
                   help="auto (CUDA when onnxruntime offers it, else CPU), cpu or cuda (default %(default)s)")
    args = p.parse_args(argv)
    engine, results = check_model_dir(args.model_dir, args.device)
    for result in results:
        print(result.line(), flush=True)
    failed = [r.label for r in results if not r.ok]
    if failed:
        print(f"error: {len(failed)} of {len(results)} stages failed ({', '.join(failed)}): this runtime does not "
              f"compute what {args.model_dir} expects", file=sys.stderr)
        return cli.USAGE
    print(f"ok: {args.model_dir} conforms (onnxruntime {ort.__version__}, {engine.provider})")
    return 0


def main(argv: list[str] | None = None) -> int:
    """0 when every stage passes; 2 after the lines when one fails, or after one error line for bad input."""
    return cli.run(_main, argv, user_errors=(ModelDirError, DeviceError, InputError))


if __name__ == "__main__":
    sys.exit(main())
