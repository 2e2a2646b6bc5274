"""Quantization: FP8 (E4M3) block scaling as used by DeepSeek-V3 checkpoints and training."""

from .fp8 import BLOCK, FP8_MAX, dequantize_blockwise, quantize_blockwise

__all__ = ["BLOCK", "FP8_MAX", "dequantize_blockwise", "quantize_blockwise"]
