"""Quantization: fake-quant primitives, layer wrapping, reconstruction."""
