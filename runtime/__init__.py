"""The torch-free side: tokenisation (runtime.text), picture preprocessing (runtime.images) and
scoring with an exported ONNX model (runtime.scorer, CLI ``python -m runtime.score``), and search
of an index folder (runtime.search, CLIs ``python -m runtime.index`` and ``python -m runtime.search``).

``runtime.Scorer`` and ``runtime.Index`` are imported on first use, so ``import runtime.text`` (training) does not load
onnxruntime.
"""
__all__ = ["Scorer", "Index"]


def __getattr__(name):
    if name == "Scorer":
        from .scorer import Scorer
        return Scorer
    if name == "Index":
        from .search import Index
        return Index
    raise AttributeError(f"module 'runtime' has no attribute {name!r}")
