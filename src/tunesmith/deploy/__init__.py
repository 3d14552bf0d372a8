"""Turning trained checkpoints into models to serve (int8 quantization, ONNX)."""
