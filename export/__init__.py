"""ONNX export of an IMRAM checkpoint: ``python -m export CKPT --out MODEL_DIR`` (see export.onnx_export)."""
from .graphs import DEFAULT_MATCHER, ImageEncoderGraph, PlainMatcher, TextEncoderGraph, build_matcher
from .onnx_export import DEFAULT_OPSET, FORMAT, FORMAT_VERSION, ExportError, export_checkpoint, export_model

__all__ = ["DEFAULT_MATCHER", "DEFAULT_OPSET", "FORMAT", "FORMAT_VERSION", "ExportError", "ImageEncoderGraph",
           "PlainMatcher", "TextEncoderGraph", "build_matcher", "export_checkpoint", "export_model"]
