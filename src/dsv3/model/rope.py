"""Rotary position embedding with YaRN context extension, for MLA's decoupled RoPE dimensions.

Only `qk_rope_head_dim` dimensions of each query head, and the single shared key head `k_pe`, are rotated.

Layout. DeepSeek's checkpoints were trained with the rotary dims stored as interleaved pairs
(x0, x1), (x2, x3), ... each pair rotated by one frequency (`rope_interleave: true`). The alternative
"half" layout pairs x_i with x_{i+d/2} (Llama style). Either way the output keeps the input's layout, so the
latent cache holds `k_pe` exactly as it would be computed at decode time.

YaRN. Frequencies with wavelengths shorter than the original context are kept (extrapolation), long ones are
divided by `factor` (interpolation), with a linear ramp between the correction dims set by beta_fast/beta_slow.
Two temperature terms exist: `attention_factor` scales cos/sin (equal to 1 for V3, where mscale == mscale_all_dim),
and the softmax scale is multiplied by mscale(factor, mscale_all_dim)^2 (see `softmax_scale`).

Sources: RoPE (Su et al. 2021, "RoFormer"), YaRN (Peng et al. 2023), DeepSeek-V3 report section 2.1.1 (decoupled
RoPE keys and queries); transformers' DeepSeek-V3 implementation for the YaRN constants and the layouts.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn

from ..config import ModelConfig, yarn_mscale


class Rope(NamedTuple):
    """The rotation angles of one forward pass, as `RotaryEmbedding` returns them and `apply_rope` reads them.

    cos, sin: [T, p/2] when every row shares its positions, [B, T, p/2] for per-row positions (p =
    qk_rope_head_dim); in the activations' dtype, already multiplied by YaRN's `attention_factor`.
    """

    cos: torch.Tensor
    sin: torch.Tensor

    def narrow(self, start: int, length: int) -> Rope:
        """The angles of positions [start, start + length) along the token dim (-2), as views."""
        return Rope(self.cos.narrow(-2, start, length), self.sin.narrow(-2, start, length))


def yarn_inv_freq(dim: int, base: float, yarn: dict) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [dim/2] (radians per position, fp32) blended per YaRN, and the cos/sin
    `attention_factor`. `yarn` is the config's `rope_scaling` dict (Peng et al. 2023, "YaRN", section 3; the
    formulas of transformers' `_compute_yarn_parameters`)."""
    factor = float(yarn["factor"])
    original_len = yarn["original_max_position_embeddings"]
    beta_fast = yarn.get("beta_fast") or 32
    beta_slow = yarn.get("beta_slow") or 1

    def correction_dim(n_rot: float) -> float:
        # the dim whose wavelength completes `n_rot` rotations over the original context
        return dim * math.log(original_len / (n_rot * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if yarn.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1: extrapolate (original frequency), 0: interpolate (frequency / factor)
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - keep) + (1.0 / pos_freqs) * keep

    attention_factor = yarn.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = yarn.get("mscale"), yarn.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = yarn_mscale(factor)
    return inv_freq, float(attention_factor)


def softmax_scale(cfg: ModelConfig) -> float:
    """1/sqrt(d_qk), times mscale^2 under YaRN (671B: 1/sqrt(192) * 1.36889^2 = 0.135234)."""
    scale = cfg.qk_head_dim ** -0.5
    yarn = cfg.yarn
    if yarn and yarn.get("mscale_all_dim"):
        m = yarn_mscale(float(yarn["factor"]), float(yarn["mscale_all_dim"]))
        scale *= m * m
    return scale


class RotaryEmbedding(nn.Module):
    """Turns positions into the `Rope` angles for `apply_rope` (stored as `model.rotary_emb`; its `inv_freq`
    buffer [p/2] is derived from the config and never saved)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.interleaved = cfg.rope_interleave
        self.attention_factor = 1.0
        self.register_buffer("inv_freq", self._inv_freq(), persistent=False)

    def _inv_freq(self) -> torch.Tensor:
        dim, base = self.cfg.qk_rope_head_dim, self.cfg.rope_theta
        if self.cfg.yarn:
            inv_freq, self.attention_factor = yarn_inv_freq(dim, base, self.cfg.yarn)
            return inv_freq
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        return inv_freq / self.cfg.linear_rope_factor

    def reset_buffers(self) -> None:
        """Recompute after `to_empty()` (non-persistent buffers are not in checkpoints)."""
        self.inv_freq = self._inv_freq().to(self.inv_freq.device)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> Rope:
        """positions [T] or [B, T] (integer token positions) -> `Rope` with cos, sin [T, p/2] or [B, T, p/2]
        in `dtype` (the angles are computed in fp32)."""
        angles = positions.float()[..., None] * self.inv_freq.float()
        cos = (angles.cos() * self.attention_factor).to(dtype)
        sin = (angles.sin() * self.attention_factor).to(dtype)
        return Rope(cos, sin)


def apply_rope(x: torch.Tensor, rope: Rope, interleaved: bool = True) -> torch.Tensor:
    """Rotate the last dim of x [B, T, p] (the shared k_pe) or [B, T, H, p] (q_pe) by `rope` ([T or B,T, p/2]
    angles); returns the same shape and layout. interleaved: pairs (x0, x1), (x2, x3), ... as in DeepSeek's
    checkpoints (`rope_interleave`), else Llama's halves (x_i, x_{i+p/2})."""
    cos, sin = rope
    if x.dim() == 4:  # per-head tensor: broadcast the angles over heads
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    if (interleaved and x.dtype == torch.float32 and not torch.compiler.is_compiling() and x.stride(-1) == 1
            and x.storage_offset() % 2 == 0):
        # the pair (x0, x1) as the complex number x0 + i x1, rotated by multiplying with cos + i sin:
        # the same arithmetic in three kernels instead of seven (eager only: compiled code fuses the real form)
        rotated = torch.view_as_complex(x.unflatten(-1, (-1, 2))) * torch.complex(cos, sin)
        return torch.view_as_real(rotated).flatten(-2)
    if interleaved:
        pairs = x.unflatten(-1, (-1, 2))
        x1, x2 = pairs[..., 0], pairs[..., 1]
        return torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
