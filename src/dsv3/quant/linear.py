"""FP8 GEMMs with fine-grained scaling and FP32-promoted accumulation, the FP8 linear, and the model converter.

For y = x W^T (x [M, K] activations, W [N, K] weights) the three GEMMs of a linear layer run in FP8 with the
tilings of DeepSeek-V3 (Figure 7 of the report):
  Fprop  y  = x W^T     x in 1x128 tiles along K, W in 128x128 blocks
  Dgrad  dx = dy W      dy in 1x128 tiles along N, W^T in 128x128 blocks (W's blocks, transposed)
  Wgrad  dW = dy^T x    dy^T and x^T in 1x128 tiles along M (the tokens): the transposed, 128x1 tiling
The activation is kept for backward in FP8 (as the paper does) and re-tiled for Wgrad from that FP8 copy.

Accumulation: each 128-wide slice of the reduction dimension is one "tensor-core" partial GEMM whose fp8 x fp8
products are exact in fp32; the partial is multiplied by its two tile scales and added to an fp32 accumulator
(promotion every N_C = 128 elements). On CPU this is an exact emulation (float8 dtypes for the values, fp32
GEMM per slice). On CUDA devices with compute capability >= 8.9 each slice runs as a real FP8 GEMM
(`torch._scaled_mm` with row-wise scales) behind the same function.

Fused gate/up weights ([W_gate; W_up], [2I, D] per expert or per MLP): one FP8 GEMM over the fused matrix equals
the two GEMMs over the official tensors when I is a multiple of 128, because then every 128x128 weight block
and every 1x128 tile of the output gradient (Dgrad's reduction runs over the 2I rows) lies wholly inside the gate
or the up half: the scales, hence the quantized values, are those of the separate matrices (the one difference
is Dgrad's fp32 accumulator, which now sums the gate and up halves' partial products in one chain). DeepSeek-V3
has I = 2048 (experts) and 18432 (dense). When I is not a multiple of 128 (the tiny test configs) a block would
straddle the boundary and mix gate and up into one scale, so the halves run as two FP8 GEMMs instead
(`_fp8_parts`): the quantization is always per official tensor, as in the checkpoint.

The model never sees any of this: `convert_to_fp8(model)` swaps the classes of its linear layers and routed
experts in place (parameters untouched), as torchtitan's float8 converter does. Kept in higher precision, as in
the paper: the embedding, the output head, the MoE gate, the norms and the attention core
(`precision.TRAINING_HIGH_PRECISION`).
"""

from __future__ import annotations

import torch
from torch import nn

from ..model.moe import GATE_UP, RoutedExperts, expert_rows
from .fp8 import BLOCK, dequantize_tiles, quantize_blockwise, quantize_tiles
from .precision import TRAINING_HIGH_PRECISION, keeps_high_precision


def _real_fp8_available(t: torch.Tensor) -> bool:
    return t.is_cuda and torch.cuda.get_device_capability(t.device) >= (8, 9) and hasattr(torch, "_scaled_mm")


def fp8_gemm(a_q: torch.Tensor, a_scale: torch.Tensor, b_q: torch.Tensor, b_scale: torch.Tensor,
             b_blocks: bool, chunk: int = BLOCK) -> torch.Tensor:
    """A B^T [M, N] in fp32 from fp8 operands: A [M, K] with scales [M, ceil(K/128)] (1x128 tiles); B [N, K] with
    scales per 128x128 block [ceil(N/128), ceil(K/128)] (b_blocks) or per 1x128 tile [N, ceil(K/128)].
    Partial sums over each `chunk` of K are promoted to the fp32 accumulator (report section 3.3.2)."""
    m, k = a_q.shape
    n = b_q.shape[0]
    b_rows = b_scale.repeat_interleave(BLOCK, 0)[:n] if b_blocks else b_scale  # [N, Kt] scale of each row
    real = _real_fp8_available(a_q)
    out = torch.zeros(m, n, dtype=torch.float32, device=a_q.device)
    for c, start in enumerate(range(0, k, chunk)):
        ks = slice(start, min(start + chunk, k))
        sa, sb = a_scale[:, c : c + 1].float(), b_rows[:, c][None, :].float()
        if real and (ks.stop - ks.start) % 16 == 0:
            out += torch._scaled_mm(a_q[:, ks].contiguous(), b_q[:, ks].contiguous().t(), scale_a=sa,
                                    scale_b=sb, out_dtype=torch.float32)
        else:  # exact emulation: fp8 products are exact in fp32, summed over at most 128 terms
            out += (a_q[:, ks].float() @ b_q[:, ks].float().t()) * sa * sb
    return out


class _FP8LinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, pow2: bool):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        xq, xs = quantize_tiles(x2, pow2_scale=pow2)  # 1x128 along K
        wq, ws = quantize_blockwise(weight, pow2_scale=pow2)  # 128x128
        y = fp8_gemm(xq, xs, wq, ws, b_blocks=True)  # Fprop [M, N]
        ctx.save_for_backward(xq, xs, wq, ws)  # the activation is cached in FP8
        ctx.pow2, ctx.x_dtype, ctx.w_dtype = pow2, x.dtype, weight.dtype
        return y.to(x.dtype).view(*shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        xq, xs, wq, ws = ctx.saved_tensors
        n = wq.shape[0]
        dy2 = dy.reshape(-1, n)
        dx = dw = None
        if ctx.needs_input_grad[0]:  # Dgrad: reduce over N
            dyq, dys = quantize_tiles(dy2, pow2_scale=ctx.pow2)
            dx = fp8_gemm(dyq, dys, wq.t().contiguous(), ws.t().contiguous(), b_blocks=True)
            dx = dx.to(ctx.x_dtype).view(*dy.shape[:-1], wq.shape[1])
        if ctx.needs_input_grad[1]:  # Wgrad: reduce over M (tokens), both operands tiled along M
            xtq, xts = quantize_tiles(dequantize_tiles(xq, xs).t(), pow2_scale=ctx.pow2)  # [K, M]
            dytq, dyts = quantize_tiles(dy2.t(), pow2_scale=ctx.pow2)  # [N, M]
            dw = fp8_gemm(dytq, dyts, xtq, xts, b_blocks=False).to(ctx.w_dtype)  # [N, K]
        return dx, dw, None


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, pow2_scale: bool = False) -> torch.Tensor:
    """x W^T with all three GEMMs in FP8: x [..., K], weight [N, K] -> [..., N] in x's dtype (no bias).
    pow2_scale: round every scale up to a power of two."""
    return _FP8LinearFn.apply(x, weight, pow2_scale)


def _fp8_parts(x: torch.Tensor, w: torch.Tensor, parts: int, pow2: bool) -> torch.Tensor:
    """x [..., K] @ w [N, K]^T in FP8 where w stacks `parts` official matrices along N (2 for gate_up_proj): one
    FP8 GEMM when each part is a whole number of 128-row blocks, else one per part (concatenated along N), so no
    128x128 block or 1x128 gradient tile straddles two matrices."""
    if parts == 1 or (w.shape[0] // parts) % BLOCK == 0:
        return fp8_linear(x, w, pow2)
    return torch.cat([fp8_linear(x, wp, pow2) for wp in w.chunk(parts, dim=0)], dim=-1)


class FP8Linear(nn.Linear):
    """nn.Linear whose GEMMs run in FP8 (master weight and gradient stay in the parameter's dtype).
    `parts` > 1: the weight stacks that many official matrices along its rows (a fused gate_up_proj), each
    quantized as its own (see the module doc)."""

    pow2_scale = False
    parts = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in_features] -> [..., out_features], as nn.Linear."""
        y = _fp8_parts(x, self.weight, self.parts, self.pow2_scale)
        return y + self.bias if self.bias is not None else y


class FP8RoutedExperts(RoutedExperts):
    """Routed experts whose per-expert GEMMs run in FP8 (each expert's weight is its own 128x128-blocked matrix;
    the fused gate_up_proj [2I, D] as one matrix when I is a multiple of 128, else as its two halves)."""

    pow2_scale = False

    def _linear(self, x: torch.Tensor, w: torch.Tensor, counts: list[int], parts: int = 1) -> torch.Tensor:
        pieces = [_fp8_parts(x[rows], w[e], parts, self.pow2_scale) for e, rows in expert_rows(counts)]
        return torch.cat(pieces) if pieces else x.new_zeros(0, w.shape[1])


def convert_to_fp8(model: nn.Module, pow2_scale: bool = False) -> nn.Module:
    """Swap, in place, every GEMM the paper runs in FP8 to its FP8 version; returns the model.

    Every plain nn.Linear not matched by `TRAINING_HIGH_PRECISION` becomes an `FP8Linear` (in a DeepseekV3 that
    leaves out only `lm_head`: the embedding, gate and norms are not nn.Linear), and every `RoutedExperts` an
    `FP8RoutedExperts`. MTP's `eh_proj` is converted (it is stored in BF16, but trains like any linear). A fused
    `gate_up_proj` linear gets `parts = 2` (its gate and up halves quantized as the official tensors they are).
    """
    for name, module in model.named_modules():
        if type(module) is nn.Linear and not keeps_high_precision(name, TRAINING_HIGH_PRECISION):
            module.__class__ = FP8Linear
            module.pow2_scale = pow2_scale
            module.parts = 2 if name.rpartition(".")[2] == GATE_UP else 1
        elif type(module) is RoutedExperts:
            module.__class__ = FP8RoutedExperts
            module.pow2_scale = pow2_scale
    return model

