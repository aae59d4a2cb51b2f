"""torch → ONNX export."""
