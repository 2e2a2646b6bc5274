"""FP8 (E4M3) quantization with DeepSeek-V3's fine-grained scales.

Two tilings, both with one fp32 scale per tile and scale = amax(tile) / 448:
- activations and gradients: 1 x 128 tiles (one row, 128 consecutive elements along the GEMM's reduction dim);
- weights: 128 x 128 blocks.
Edge tiles may be partial ("ragged"): a 576-row weight has 4.5 row-blocks, a 192-wide activation 1.5 tiles.

The checkpoint format stores a weight W [R, C] as `weight` (float8_e4m3fn) and `weight_scale_inv` (fp32,
[ceil(R/128), ceil(C/128)]) with W[i, j] = weight[i, j] * weight_scale_inv[i // 128, j // 128]. The name says
"inverse" because the quantizer divided by it.

Sources: DeepSeek-V3 report section 3.3 (fine-grained quantization, Figure 7); the `weight_scale_inv` layout of
the released FP8 checkpoint and DeepSeek's `inference/kernel.py` (`weight_dequant`).
"""

from __future__ import annotations

import torch

BLOCK = 128
FP8_MAX = 448.0  # largest finite float8_e4m3fn
FP8 = torch.float8_e4m3fn
_TINY = 1e-12  # an all-zero tile still gets a usable scale


def _expand_blocks(scale: torch.Tensor, shape: tuple[int, int], block: int) -> torch.Tensor:
    """Scale [ceil(R/b), ceil(C/b)] -> [R, C], each block's scale repeated over its (possibly partial) block."""
    rows, cols = shape
    return scale.repeat_interleave(block, 0)[:rows].repeat_interleave(block, 1)[:, :cols]


def _scale_from_amax(amax: torch.Tensor, pow2: bool) -> torch.Tensor:
    scale = (amax.float() / FP8_MAX).clamp(min=_TINY)
    if pow2:  # round up to a power of two: rescaling is then exact in any float format
        scale = torch.exp2(torch.ceil(torch.log2(scale)))
    return scale


def dequantize_blockwise(q: torch.Tensor, scale_inv: torch.Tensor, block: int = BLOCK,
                         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """float8 weight [R, C] and per-block scale [ceil(R/b), ceil(C/b)] -> dequantized [R, C] in `dtype`.

    Raises:
        ValueError: q is not 2-D, or the scale's shape does not fit it.
    """
    if q.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(q.shape)}")
    want = (-(-q.shape[0] // block), -(-q.shape[1] // block))
    if tuple(scale_inv.shape) != want:
        raise ValueError(f"scale of shape {tuple(scale_inv.shape)} does not fit a {tuple(q.shape)} weight "
                         f"in {block}x{block} blocks (expected {want})")
    out = q.to(torch.float32)
    out.mul_(_expand_blocks(scale_inv.to(torch.float32), tuple(q.shape), block))
    return out.to(dtype)


def quantize_blockwise(w: torch.Tensor, block: int = BLOCK, pow2_scale: bool = False
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """W [R, C] -> (float8_e4m3fn [R, C], scale_inv fp32 [ceil(R/b), ceil(C/b)]): 128x128 weight blocks."""
    rows, cols = w.shape
    nr, nc = -(-rows // block), -(-cols // block)
    w32 = w.detach().to(torch.float32)
    padded = w32.new_zeros(nr * block, nc * block)
    padded[:rows, :cols] = w32
    amax = padded.view(nr, block, nc, block).abs().amax(dim=(1, 3))  # [nr, nc]; padding is 0 so it never wins
    scale = _scale_from_amax(amax, pow2_scale)
    q = (w32 / _expand_blocks(scale, (rows, cols), block)).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q, scale


def quantize_tiles(x: torch.Tensor, tile: int = BLOCK, pow2_scale: bool = False
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (float8 [M, K], scale fp32 [M, ceil(K/tile)]): one scale per row per `tile` elements of K.

    This is the 1 x 128 tiling of activations and gradients; pass x.t() for the 128 x 1 (transposed) tiling.
    """
    m, k = x.shape
    nt = -(-k // tile)
    x32 = x.detach().to(torch.float32)
    padded = x32.new_zeros(m, nt * tile)
    padded[:, :k] = x32
    amax = padded.view(m, nt, tile).abs().amax(dim=-1)  # [M, nt]
    scale = _scale_from_amax(amax, pow2_scale)
    q = (x32 / scale.repeat_interleave(tile, 1)[:, :k]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q, scale


def dequantize_tiles(q: torch.Tensor, scale: torch.Tensor, tile: int = BLOCK) -> torch.Tensor:
    """The inverse of `quantize_tiles`: float8 [M, K] and scales [M, ceil(K/tile)] -> fp32 [M, K]."""
    return q.to(torch.float32) * scale.repeat_interleave(tile, 1)[:, : q.shape[1]]
