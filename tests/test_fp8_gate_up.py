"""FP8 GEMMs over the fused gate_up_proj: the same quantization as separate gate and up matrices.

One FP8 GEMM over [W_gate; W_up] equals two over the official tensors only if no 128x128 weight block (and no
1x128 tile of Dgrad's output gradient) straddles the gate/up boundary, i.e. when I is a multiple of 128; below
that, `dsv3.quant.linear` runs the halves separately.
"""

import pytest
import torch
import torch.nn.functional as F

from dsv3.model.moe import MLP, RoutedExperts
from dsv3.quant import FP8RoutedExperts, convert_to_fp8, fp8_linear, quantize_blockwise
from dsv3.quant import linear as fp8_linear_mod
from test_moe import assert_close_to_scale


def test_blocks_of_the_fused_weight_are_those_of_gate_and_up_when_i_is_a_multiple_of_128():
    """I = 256: the fused weight's block scales and fp8 values are the halves' own, stacked."""
    gate, up = torch.randn(256, 320), torch.randn(256, 320) * 5  # different ranges: a shared block would show
    q, s = quantize_blockwise(torch.cat([gate, up]))
    (qg, sg), (qu, su) = quantize_blockwise(gate), quantize_blockwise(up)
    assert torch.equal(s, torch.cat([sg, su]))
    assert torch.equal(q.float(), torch.cat([qg, qu]).float())
    # I = 96 (not a multiple of 128): block row 0 holds gate rows 0-95 and up rows 0-31, so the scales differ
    q, s = quantize_blockwise(torch.cat([gate[:96], up[:96]]))
    assert not torch.equal(s[0], quantize_blockwise(gate[:96])[1][0])


def unfused_fp8_experts(ex: RoutedExperts, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """The pre-fusion FP8 experts: per expert, three FP8 linears over the official gate / up / down matrices."""
    i = ex.down_proj.shape[-1]
    out, start = [], 0
    for e, c in enumerate(counts):
        xs = x[start : start + c]
        start += c
        if c:
            h = F.silu(fp8_linear(xs, ex.gate_up_proj[e, :i])) * fp8_linear(xs, ex.gate_up_proj[e, i:])
            out.append(fp8_linear(h, ex.down_proj[e]))
    return torch.cat(out)


@pytest.mark.parametrize("inter", [128, 48])
def test_fp8_experts_over_the_fused_weight_equal_separate_gate_and_up(monkeypatch, inter):
    """FP8RoutedExperts.swiglu equals FP8 GEMMs over the separate official matrices, forward and every gradient
    (1e-5 of each tensor's scale; only Dgrad's fp32 accumulation order differs); with I = 128 the gate+up GEMM
    is one fp8_linear per expert, with I = 48 two (the halves)."""
    torch.manual_seed(0)
    ex = RoutedExperts(3, 128, inter)
    with torch.no_grad():
        ex.gate_up_proj.normal_(0, 0.1)
        ex.gate_up_proj[:, inter:] *= 4  # gate and up of different ranges: a shared block scale would show
        ex.down_proj.normal_(0, 0.1)
    ref = RoutedExperts(3, 128, inter)
    ref.load_state_dict(ex.state_dict())
    convert_to_fp8(ex)
    assert isinstance(ex, FP8RoutedExperts)
    counts = [50, 0, 30]
    x = torch.randn(80, 128, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)

    shapes = []
    real = fp8_linear_mod.fp8_linear

    def spy(x, w, *args):
        shapes.append(tuple(w.shape))
        return real(x, w, *args)

    monkeypatch.setattr(fp8_linear_mod, "fp8_linear", spy)
    y = ex.swiglu(x, counts)
    monkeypatch.setattr(fp8_linear_mod, "fp8_linear", real)
    gate_up_calls = [s for s in shapes if s[0] != 128]
    assert gate_up_calls == ([(2 * inter, 128)] * 2 if inter % 128 == 0 else [(inter, 128)] * 4), shapes

    y_ref = unfused_fp8_experts(ref, x_ref, counts)
    assert_close_to_scale(y, y_ref, "y")
    g = torch.randn_like(y)
    (y * g).sum().backward()
    (y_ref * g).sum().backward()
    assert_close_to_scale(x.grad, x_ref.grad, "x.grad")
    assert_close_to_scale(ex.gate_up_proj.grad, ref.gate_up_proj.grad, "gate_up_proj.grad")
    assert_close_to_scale(ex.down_proj.grad, ref.down_proj.grad, "down_proj.grad")


@pytest.mark.parametrize("inter", [128, 48])
def test_fp8_mlp_over_the_fused_weight_equals_separate_gate_and_up(inter):
    """The converted MLP (gate_up_proj an FP8Linear with parts = 2) equals FP8 linears over the two halves."""
    mlp = MLP(128, inter)
    with torch.no_grad():
        mlp.gate_up_proj.weight[inter:] *= 4
    convert_to_fp8(mlp)
    assert mlp.gate_up_proj.parts == 2 and mlp.down_proj.parts == 1
    x = torch.randn(4, 40, 128)
    w = mlp.gate_up_proj.weight
    with torch.no_grad():
        ref = fp8_linear(F.silu(fp8_linear(x, w[:inter])) * fp8_linear(x, w[inter:]), mlp.down_proj.weight)
        assert_close_to_scale(mlp(x), ref, "mlp(x)")
