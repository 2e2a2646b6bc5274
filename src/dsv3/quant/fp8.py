"""FP8 E4M3 weights with one fp32 scale per 128x128 block: the DeepSeek-V3 checkpoint format.

A weight W [R, C] is stored as `weight` (float8_e4m3fn, [R, C]) and `weight_scale_inv` (fp32,
[ceil(R/128), ceil(C/128)]), with W[i, j] = weight[i, j] * weight_scale_inv[i // 128, j // 128].
The last row / column of blocks may be partial ("ragged"): 576 = 4.5 blocks (kv_a_proj_with_mqa), 192 = 1.5.
The name says "inverse" because the quantizer divided by it: q = W / s, s = amax(block) / 448.
"""

from __future__ import annotations

import torch

BLOCK = 128
FP8_MAX = 448.0  # largest finite float8_e4m3fn


def _expand_blocks(scale: torch.Tensor, shape: tuple[int, int], block: int) -> torch.Tensor:
    """Scale [ceil(R/b), ceil(C/b)] -> [R, C], each block's scale repeated over its (possibly partial) block."""
    rows, cols = shape
    return scale.repeat_interleave(block, 0)[:rows].repeat_interleave(block, 1)[:, :cols]


def dequantize_blockwise(q: torch.Tensor, scale_inv: torch.Tensor, block: int = BLOCK,
                         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """float8 weight [R, C] and per-block scale [ceil(R/b), ceil(C/b)] -> dequantized [R, C] in `dtype`."""
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
    """W [R, C] -> (float8_e4m3fn [R, C], scale_inv fp32 [ceil(R/b), ceil(C/b)]) with s = amax(block) / 448.

    pow2_scale rounds each scale up to a power of two (exact rescaling, as some FP8 recipes prefer).
    """
    rows, cols = w.shape
    nr, nc = -(-rows // block), -(-cols // block)
    w32 = w.detach().to(torch.float32)
    padded = w32.new_zeros(nr * block, nc * block)
    padded[:rows, :cols] = w32
    amax = padded.view(nr, block, nc, block).abs().amax(dim=(1, 3))  # [nr, nc]; padding is 0 so it never wins
    scale = (amax / FP8_MAX).clamp(min=1e-12)
    if pow2_scale:
        scale = torch.exp2(torch.ceil(torch.log2(scale)))
    q = (w32 / _expand_blocks(scale, (rows, cols), block)).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scale
