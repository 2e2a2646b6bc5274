"""Quantization: FP8 (E4M3) fine-grained scaling for checkpoints and training, applied from outside the model."""

from .fp8 import BLOCK, FP8_MAX, dequantize_blockwise, dequantize_tiles, quantize_blockwise, quantize_tiles
from .linear import FP8Linear, FP8RoutedExperts, convert_to_fp8, fp8_gemm, fp8_linear
from .precision import STORAGE_HIGH_PRECISION, TRAINING_HIGH_PRECISION, keeps_high_precision

__all__ = ["BLOCK", "FP8_MAX", "dequantize_blockwise", "dequantize_tiles", "quantize_blockwise", "quantize_tiles",
           "FP8Linear", "FP8RoutedExperts", "convert_to_fp8", "fp8_gemm", "fp8_linear",
           "STORAGE_HIGH_PRECISION", "TRAINING_HIGH_PRECISION", "keeps_high_precision"]
