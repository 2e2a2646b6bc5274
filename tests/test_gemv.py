"""The compiled decode step's few-row products as inductor reductions (`dsv3.infer.gemv.FewRowMatmul`)."""

import pytest
import torch
import torch.nn.functional as F

from dsv3.infer.gemv import FewRowMatmul


def block(x, w_a, w_b, bias, gain):
    """A norm feeding a product without bias (`mm`) and one with (`addmm`), as in a decoder block."""
    h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * gain
    return F.linear(h, w_a), F.linear(F.silu(h), w_b, bias)


@pytest.mark.parametrize("rows, dtype, rewritten", [(1, torch.float32, 2), (4, torch.float32, 2),
                                                    ((1, 2), torch.float32, 2), ((2, 2), torch.float32, 2),
                                                    (5, torch.float32, 0), (1, torch.bfloat16, 0)])
@pytest.mark.parametrize("per_row", [4, 0])
def test_few_row_products_become_reductions_with_the_same_result(rows, dtype, rewritten, per_row):
    """With max_rows = 4, the float32 `mm` and `addmm` of 1 to 4 rows are rewritten (as one reduction per row or one
    for all) and give the products of an fp64 reference to float32 rounding (the norm before them stays outside
    the reduction), also for [1, 2, 40] and [2, 2, 40] inputs, whose products reshape their rows before and after as
    a decode step's do; 5 rows, or bf16, are left to the library. Inductor's graph cache is off, so that the pass
    runs here and its count is this graph's."""
    shape = rows if isinstance(rows, tuple) else (rows,)
    g = torch.Generator().manual_seed(len(shape) * 10 + shape[-1])
    x, gain = torch.randn(*shape, 40, generator=g), torch.rand(40, generator=g) + 0.5
    w_a, w_b, bias = torch.randn(48, 40, generator=g), torch.randn(24, 40, generator=g), torch.randn(24, generator=g)
    args = [t.to(dtype) for t in (x, w_a, w_b, bias, gain)]
    fewer = FewRowMatmul(max_rows=4, per_row=per_row)
    compiled = torch.compile(block, dynamic=False, fullgraph=True, isolate_recompiles=True,
                             options={"post_grad_custom_post_pass": fewer, "fx_graph_cache": False})
    with torch.no_grad():
        got = compiled(*args)
    assert fewer.rewritten == rewritten
    want = block(*(t.double() for t in (x, w_a, w_b, bias, gain)))
    tol = 1e-5 if dtype == torch.float32 else 5e-2
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a.double(), b, atol=tol * b.abs().max().item(), rtol=0)


def test_few_row_matmul_refuses_bad_limits_and_keys_its_cache_by_them():
    with pytest.raises(ValueError, match="max_rows"):
        FewRowMatmul(0)
    assert FewRowMatmul(1).uuid() == FewRowMatmul(1).uuid() != FewRowMatmul(4).uuid()
    assert FewRowMatmul(4).uuid() != FewRowMatmul(4, per_row=0).uuid()
    with pytest.raises(ValueError, match="per_row"):
        FewRowMatmul(4, per_row=-1)


def test_the_input_of_a_rewritten_product_is_computed_once():
    """A norm feeding a rewritten product is realised as its own [1, 40] buffer; fused into the reduction instead,
    it would be recomputed for each of the 48 outputs (inductor's wrapper then allocates no such buffer)."""
    from torch._inductor.utils import run_and_get_code

    def normed_product(x, w, gain):
        return F.linear(x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * gain, w)

    fewer = FewRowMatmul(max_rows=1)
    compiled = torch.compile(normed_product, dynamic=False, fullgraph=True,
                             options={"post_grad_custom_post_pass": fewer, "fx_graph_cache": False})
    with torch.no_grad():
        _, code = run_and_get_code(compiled, torch.randn(1, 40), torch.randn(48, 40), torch.rand(40))
    assert fewer.rewritten == 1
    assert "empty_strided_cpu((1, 40)" in code[0]


@pytest.mark.parametrize("per_row", [2, 1])
def test_a_two_row_product_loads_each_weight_row_once_when_per_row(per_row):
    """With per_row = 2, the two one-row reductions of a 2-row product are fused into one loop over the outputs
    that keeps two accumulators (each weight row is loaded once for both rows); with per_row = 1, as one reduction
    for all rows, the loop runs over the rows, then the outputs, with one accumulator."""
    from torch._inductor.utils import run_and_get_code

    fewer = FewRowMatmul(max_rows=2, per_row=per_row)
    compiled = torch.compile(F.linear, dynamic=False, fullgraph=True, isolate_recompiles=True,
                             options={"post_grad_custom_post_pass": fewer, "fx_graph_cache": False})
    x, w = torch.randn(2, 64), torch.randn(96, 64)
    with torch.no_grad():
        got, code = run_and_get_code(compiled, x, w)
    assert fewer.rewritten == 1
    assert ("tmp_acc1" in code[0]) == (per_row == 2)  # inductor's name for a second accumulator (torch 2.13)
    torch.testing.assert_close(got, x @ w.t(), atol=1e-5, rtol=0)


def test_a_product_of_no_rows_compiles():
    """A [0, K] input (no sequence) is rewritten too and gives an empty [0, N] result."""
    fewer = FewRowMatmul(max_rows=4)
    compiled = torch.compile(F.linear, dynamic=False, fullgraph=True, isolate_recompiles=True,
                             options={"post_grad_custom_post_pass": fewer, "fx_graph_cache": False})
    with torch.no_grad():
        got = compiled(torch.randn(0, 64), torch.randn(96, 64))
    assert fewer.rewritten == 1 and got.shape == (0, 96)


def test_scaled_addmm_is_left_to_the_library():
    """`addmm` with beta or alpha other than 1 is not rewritten (the rewrite has no scales); the result is the
    library's."""
    fewer = FewRowMatmul(max_rows=4)
    x, w, bias = torch.randn(2, 16), torch.randn(8, 16), torch.randn(8)

    def scaled(x, w, bias):
        return torch.addmm(bias, x, w.t(), beta=2.0), torch.addmm(bias, x, w.t(), alpha=0.5)

    compiled = torch.compile(scaled, dynamic=False, fullgraph=True,
                             options={"post_grad_custom_post_pass": fewer, "fx_graph_cache": False})
    with torch.no_grad():
        got = compiled(x, w, bias)
    assert fewer.rewritten == 0
    for a, b in zip(got, scaled(x, w, bias), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
