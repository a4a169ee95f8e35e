"""ONNX export of an IMRAM checkpoint: ``python -m export CKPT --out MODEL_DIR`` (see export.onnx_export)."""
