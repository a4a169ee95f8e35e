"""The first-stage global head (imram_min.search.global_head) as two small ONNX graphs in a model dir.

    python -m export RUN/best.pt --out MODEL_DIR                  # includes RUN/global_head.pt if made from best.pt
    python -m export RUN/best.pt --out MODEL_DIR --global-head HEAD.pt   # this head
    python -m export RUN/best.pt --out MODEL_DIR --no-global-head        # none: the mean embeddings

Which head export includes: the rule of imram_min.search.global_head.choose_head, which
``python -m imram_min.evaluate --shortlist`` follows too: the one named by --global-head; else, unless --no-global-head, the head beside the checkpoint
(RUN/global_head.pt, where ``python -m imram_min.search.global_head`` writes it and scripts/run.sh
makes it) when the checkpoint's SHA-256 is the one it was distilled from (a head of another
checkpoint is left out, with a warning: it would shortlist from embeddings it was not trained on);
else none.

MODEL_DIR/
    image_global.onnx   region_embs (n_img, n_region, d) f32 -> image_global (n_img, G) f32, l2-normalised
    text_global.onnx    word_embs (n_cap, n_word, d) f32, lengths (n_cap,) i64 -> text_global (n_cap, G) f32

Both are listed in manifest.json (graphs, files) with "global_head": {"file", "sha256", "out_size"}
of the head they came from. runtime.index stores their vectors as the first stage's vectors
when the model dir has them (the mean embeddings otherwise) and runtime.search makes the
query's the same way. ``add_global_head`` adds them to a written model dir: each graph replaces
its old version, then the manifest (runtime.atomic), so the folder is complete at every moment.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile

import numpy as np
import torch
import torch.nn as nn

from runtime import atomic
from runtime.modeldir import GLOBAL_GRAPHS, MANIFEST_FILE, sha256_file

GLOBAL_FILES = {g: f"{g}.onnx" for g in GLOBAL_GRAPHS}  # image_global.onnx, text_global.onnx
VERIFY_TOL = 1e-5


class ImageGlobalGraph(nn.Module):
    """region_embs -> the global head's image vectors."""

    def __init__(self, head):
        super().__init__()
        self.head = head.image_head

    def forward(self, region_embs):
        return self.head(region_embs)


class TextGlobalGraph(nn.Module):
    """word_embs, lengths -> the global head's caption vectors."""

    def __init__(self, head):
        super().__init__()
        self.head = head.text_head

    def forward(self, word_embs, lengths):
        return self.head(word_embs, lengths)


def global_signatures(embed_size: int, out_size: int) -> dict:
    def t(name, dtype, *shape):
        return {"name": name, "dtype": dtype, "shape": list(shape)}
    return {"image_global": {"inputs": [t("region_embs", "float32", "n_img", "n_region", embed_size)],
                             "outputs": [t("image_global", "float32", "n_img", out_size)]},
            "text_global": {"inputs": [t("word_embs", "float32", "n_cap", "n_word", embed_size),
                                       t("lengths", "int64", "n_cap")],
                            "outputs": [t("text_global", "float32", "n_cap", out_size)]}}


def example(embed_size: int, seed: int = 0, n_img: int = 3, n_region: int = 4, n_cap: int = 5, n_word: int = 6):
    """Random inputs of sizes all different and > 1; lengths 1..n_word, zeros past each length."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.linspace(n_word, 1, n_cap).round().to(torch.int64)
    words = torch.randn(n_cap, n_word, embed_size, generator=g)
    words[torch.arange(n_word)[None, :] >= lengths[:, None]] = 0
    return torch.randn(n_img, n_region, embed_size, generator=g), words, lengths


def verify(head, folder: str) -> dict:
    """Max abs difference ONNX Runtime vs PyTorch of each graph, on inputs of other sizes than the
    traced ones; ExportError above VERIFY_TOL."""
    import onnxruntime as ort
    from .onnx_export import ExportError
    regions, words, lengths = example(head.config["embed_size"], seed=1, n_img=5, n_region=7, n_cap=4, n_word=9)
    with torch.no_grad():
        want = {"image_global": head.image(regions).numpy(), "text_global": head.text(words, lengths).numpy()}
    feeds = {"image_global": {"region_embs": regions.numpy()},
             "text_global": {"word_embs": words.numpy(), "lengths": lengths.numpy()}}
    diffs = {}
    for g, file in GLOBAL_FILES.items():
        sess = ort.InferenceSession(os.path.join(folder, file), providers=["CPUExecutionProvider"])
        diffs[g] = float(np.abs(sess.run(None, feeds[g])[0] - want[g]).max())
        if not diffs[g] <= VERIFY_TOL:
            raise ExportError(f"{file}: ONNX Runtime differs from PyTorch by {diffs[g]:.2e} (> {VERIFY_TOL})")
    return diffs


def add_global_head(model_dir: str | os.PathLike, head, head_path: str | os.PathLike | None = None,
                    opset: int = 17, check: bool = True) -> dict:
    """Write image_global.onnx and text_global.onnx of ``head`` (a GlobalHead of the model's
    embed_size) into MODEL_DIR, list them in its manifest and add their stages to its conformance
    vectors (export.conformance.add_global_head_vectors; with ``check``, runtime.check is run on
    the folder: ExportError naming the failed stages); returns the new manifest."""
    from .conformance import add_global_head_vectors
    from .onnx_export import ExportError, _export_graph, check_graph
    model_dir = os.fspath(model_dir)
    with open(os.path.join(model_dir, MANIFEST_FILE), encoding="utf-8") as f:
        manifest = json.load(f)
    d, out_size = head.config["embed_size"], head.config["out_size"]
    if d != manifest["model_config"]["embed_size"]:
        raise ValueError(f"the global head takes embed_size {d}, "
                         f"the model has {manifest['model_config']['embed_size']}")
    signatures = global_signatures(d, out_size)
    regions, words, lengths = example(d)
    head = head.cpu().eval()
    tmp = tempfile.mkdtemp(prefix=".global-head.tmp-", dir=model_dir)
    try:
        _export_graph(ImageGlobalGraph(head), (regions,), os.path.join(tmp, GLOBAL_FILES["image_global"]),
                      signatures["image_global"], opset)
        _export_graph(TextGlobalGraph(head), (words, lengths), os.path.join(tmp, GLOBAL_FILES["text_global"]),
                      signatures["text_global"], opset)
        for g, file in GLOBAL_FILES.items():
            check_graph(os.path.join(tmp, file), signatures[g])
        diffs = verify(head, tmp) if check else None
        for g, file in GLOBAL_FILES.items():
            path = os.path.join(tmp, file)
            manifest["graphs"][g] = {"file": file, **signatures[g]}
            manifest["files"][file] = {"sha256": sha256_file(path), "bytes": os.path.getsize(path)}
            os.chmod(path, 0o644)
            os.replace(path, os.path.join(model_dir, file))
        manifest["global_head"] = {"out_size": out_size, "max_abs_diff": diffs,
                                   **({"file": os.path.basename(os.fspath(head_path)),
                                       "sha256": sha256_file(head_path)} if head_path else {})}
        atomic.write_json(os.path.join(model_dir, MANIFEST_FILE), manifest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if "conformance" not in manifest:  # a folder written before conformance vectors existed
        return manifest
    try:
        return add_global_head_vectors(model_dir, head, verify=check)
    except ValueError as e:
        raise ExportError(str(e)) from None
