"""imram-min: IMRAM (Chen et al., CVPR 2020) in PyTorch, exported to ONNX."""
