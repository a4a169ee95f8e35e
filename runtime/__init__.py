"""The torch-free side: tokenisation (runtime.text), picture preprocessing (runtime.images) and
scoring with an exported ONNX model (runtime.scorer, CLI ``python -m runtime.score``).

``runtime.Scorer`` is imported on first use, so ``import runtime.text`` (training) does not load
onnxruntime.
"""
__all__ = ["Scorer"]


def __getattr__(name):
    if name == "Scorer":
        from .scorer import Scorer
        return Scorer
    raise AttributeError(f"module 'runtime' has no attribute {name!r}")
