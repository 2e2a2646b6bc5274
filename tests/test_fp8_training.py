"""FP8 fine-grained quantization, the emulated FP8 GEMMs, the FP8 linear's backward, and the converter."""

import pytest
import torch

import dsv3
from dsv3.quant import (
    FP8Linear,
    FP8RoutedExperts,
    convert_to_fp8,
    dequantize_blockwise,
    dequantize_tiles,
    fp8_gemm,
    fp8_linear,
    quantize_blockwise,
    quantize_tiles,
)
from test_bf16 import train_beside_fp32

E4M3_HALF_ULP = 2.0**-4  # e4m3 keeps 3 mantissa bits: rounding error <= 2^-4 of the value (normal range)


@pytest.mark.parametrize("shape", [(5, 300), (64, 128), (3, 1)])
def test_tile_quantization_error_bounds(shape):
    x = torch.randn(shape) * torch.logspace(-3, 3, shape[0])[:, None]  # rows of very different magnitude
    q, s = quantize_tiles(x)
    assert s.shape == (shape[0], -(-shape[1] // 128))
    back = dequantize_tiles(q, s)
    # per 1x128 tile: error within half an ulp of the value, or of the tile's smallest normal (amax / 448 * 2^-6)
    tile_amax = s.repeat_interleave(128, 1)[:, : shape[1]] * 448
    bound = torch.maximum(x.abs() * E4M3_HALF_ULP, tile_amax / 448 * 2.0**-9)
    assert ((back - x).abs() <= bound * 1.0001).all()
    assert (q.float().abs().amax(1) == 448).all()  # each tile's amax maps onto the format's max


def test_pow2_scales_are_powers_of_two():
    _, s = quantize_tiles(torch.randn(4, 256) * 3, pow2_scale=True)
    assert torch.equal(torch.exp2(torch.log2(s).round()), s)
    _, s = quantize_blockwise(torch.randn(130, 260), pow2_scale=True)
    assert torch.equal(torch.exp2(torch.log2(s).round()), s)


def reference_gemm(aq, as_, bq, bs, b_blocks):
    """Dequantize both operands and multiply in float64."""
    a = dequantize_tiles(aq, as_).double()
    b = dequantize_blockwise(bq, bs).double() if b_blocks else dequantize_tiles(bq, bs).double()
    return a @ b.t()


@pytest.mark.parametrize("m, n, k", [(7, 192, 576), (33, 130, 300), (1, 64, 64)])
def test_emulated_gemm_equals_fp64_reference(m, n, k):
    a, w = torch.randn(m, k), torch.randn(n, k) * 0.05
    aq, as_ = quantize_tiles(a)
    wq, ws = quantize_blockwise(w)
    out = fp8_gemm(aq, as_, wq, ws, b_blocks=True)
    ref = reference_gemm(aq, as_, wq, ws, True)
    # only fp32 rounding of the partial sums separates them: relative error ~1e-7
    assert ((out.double() - ref).abs() / ref.abs().max()).max() < 1e-6
    # 1x128-by-1x128 (the Wgrad form)
    bq, bs = quantize_tiles(torch.randn(n, k))
    out = fp8_gemm(aq, as_, bq, bs, b_blocks=False)
    ref = reference_gemm(aq, as_, bq, bs, False)
    assert ((out.double() - ref).abs() / ref.abs().max()).max() < 1e-6


def relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    """max |got - ref| / max |ref|, in float64."""
    return float((got.detach().double() - ref).abs().max() / ref.abs().max())


def check_fp8_linear_gemms_equal_same_quantization_fp64() -> None:
    """Fprop, Dgrad and Wgrad of `fp8_linear` each equal one float64 GEMM of the operands quantized with the
    tiling the paper gives that GEMM (DeepSeek-V3 report §3.3, Figure 7), to fp32 rounding (1e-6 relative):
      Fprop  y  = x W^T    x in 1x128 tiles along K (hidden), W in 128x128 blocks
      Dgrad  dx = dy W     dy in 1x128 tiles along N (outputs), W in the same 128x128 blocks
      Wgrad  dW = dy^T x   dy^T and x^T in 1x128 tiles along M (tokens), x taken from its FP8 Fprop copy
    Shapes are ragged on purpose (140 tokens, 192 in, 300 out: partial tiles in every dimension).
    Raises AssertionError naming the GEMM that differs."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 70, 192, generator=gen).requires_grad_(True)
    w = (torch.randn(300, 192, generator=gen) * 0.05).requires_grad_(True)
    dy = torch.randn(2, 70, 300, generator=gen)
    y = fp8_linear(x, w)
    y.backward(dy)
    x2, dy2 = x.detach().reshape(-1, 192), dy.reshape(-1, 300)
    xq, xs = quantize_tiles(x2)
    wq, ws = quantize_blockwise(w.detach())
    w_deq = dequantize_blockwise(wq, ws).double()
    y_ref = dequantize_tiles(xq, xs).double() @ w_deq.t()
    err = relative_error(y.reshape(-1, 300), y_ref)
    assert err < 1e-6, f"Fprop differs from the same-quantization fp64 GEMM by {err:.2e}"
    dyq, dys = quantize_tiles(dy2)
    dx_ref = dequantize_tiles(dyq, dys).double() @ w_deq
    err = relative_error(x.grad.reshape(-1, 192), dx_ref)
    assert err < 1e-6, f"Dgrad differs from the same-quantization fp64 GEMM by {err:.2e}"
    xtq, xts = quantize_tiles(dequantize_tiles(xq, xs).t())  # x^T [K, M]: tiles of 128 tokens
    dytq, dyts = quantize_tiles(dy2.t())  # dy^T [N, M]
    assert xts.shape == (192, 2) and dyts.shape == (300, 2)  # 140 tokens: one full and one partial tile
    dw_ref = dequantize_tiles(dytq, dyts).double() @ dequantize_tiles(xtq, xts).double().t()
    err = relative_error(w.grad, dw_ref)
    assert err < 1e-6, f"Wgrad differs from the same-quantization fp64 GEMM by {err:.2e}"
    # and all three stay within e4m3's resolution of the unquantized products (a sanity bound, not the check)
    for name, got, exact in (("Fprop", y.reshape(-1, 300), x2.double() @ w.detach().double().t()),
                             ("Dgrad", x.grad.reshape(-1, 192), dy2.double() @ w.detach().double()),
                             ("Wgrad", w.grad, dy2.double().t() @ x2.double())):
        rel = float((got.detach().double() - exact).norm() / exact.norm())
        assert rel < 0.05, f"{name} is {rel:.3f} (relative norm) from the unquantized product"


def test_fp8_linear_gemms_equal_same_quantization_fp64():
    check_fp8_linear_gemms_equal_same_quantization_fp64()


def test_converter_swaps_the_right_modules_and_keeps_logits_close():
    cfg = dsv3.get_config("tiny")
    model = dsv3.DeepseekV3(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 24))
    with torch.no_grad():
        ref = model(ids)
    params_before = {n: p.data_ptr() for n, p in model.named_parameters()}
    convert_to_fp8(model)
    assert {n: p.data_ptr() for n, p in model.named_parameters()} == params_before  # no copies
    assert type(model.lm_head) is torch.nn.Linear  # head stays high precision
    assert isinstance(model.model.layers[0].self_attn.kv_b_proj, FP8Linear)
    assert isinstance(model.model.layers[0].mlp.down_proj, FP8Linear)
    assert isinstance(model.model.layers[1].mlp.shared_experts.gate_up_proj, FP8Linear)
    assert isinstance(model.model.layers[1].mlp.experts, FP8RoutedExperts)
    assert type(model.model.embed_tokens) is torch.nn.Embedding
    with torch.no_grad():
        out = model(ids)
    rel = (out.logits - ref.logits).norm() / ref.logits.norm()
    # e4m3 rounds each GEMM operand to 3 mantissa bits; through 3 layers of random weights that moves the
    # logits by ~5% (relative norm): close, and certainly not equal
    assert 0.005 < rel < 0.1
    # gradients flow to every trained parameter through the FP8 paths
    model.train()
    out = model(ids)
    (out.logits.logsumexp(-1).mean() + out.mtp_logits[0].logsumexp(-1).mean()).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert missing == []


def test_fp8_experts_equal_a_per_token_fp8_loop():
    """Activations are tiled per token (1x128) and weights per expert, so grouping tokens by expert must not
    change any token's result: the grouped FP8 experts equal a per-token loop of FP8 linears."""
    import torch.nn.functional as F

    from dsv3.model.moe import MoE

    cfg = dsv3.get_config("tiny")
    layer = MoE(cfg)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.2)
    convert_to_fp8(layer)
    x = torch.randn(40, 64)
    with torch.no_grad():
        out, info = layer(x)
        ex = layer.experts
        rows = []
        for t in range(40):
            xt = x[t : t + 1]
            acc = layer.shared_experts(xt)
            for k in range(info.topk_idx.shape[1]):
                e = int(info.topk_idx[t, k])
                i = ex.down_proj.shape[-1]  # gate_up_proj[e] is [gate; up], each [I, D]
                h = F.silu(fp8_linear(xt, ex.gate_up_proj[e, :i])) * fp8_linear(xt, ex.gate_up_proj[e, i:])
                acc = acc + info.topk_weight[t, k] * fp8_linear(h, ex.down_proj[e])
            rows.append(acc)
    torch.testing.assert_close(out, torch.cat(rows), atol=1e-5, rtol=1e-5)


def check_fp8_training_steps_track_fp32(dataset, out) -> list[dict]:
    """12 FP8 training steps (AdamW moments in bf16, as the paper), each against an fp32 step on the same weights
    and batch (`train_beside_fp32`): the loss within 5e-3 relative and the gradients within 0.25 (relative norm,
    all parameters together); and the run learns. Measured on this run: loss 2e-4 typical, 1.5e-3 at most (step
    4); gradients 0.03-0.12 (e4m3 keeps 3 mantissa bits, 2^-4 relative rounding of every GEMM operand, compounded
    over the layers). Two free-running curves (fp32 and FP8 trained separately) drift further apart, 0.7% at most
    over these steps, because small differences flip expert choices; that drift is not the FP8 arithmetic.
    Raises AssertionError otherwise; returns the per-step rows and the trainer."""
    trainer, rows = train_beside_fp32(dataset, out, 12, precision="fp8", optimizer_state_dtype="bf16")
    for i, r in enumerate(rows, start=1):
        assert r["loss_error"] < 5e-3, f"step {i}: FP8 loss {r['loss']} vs fp32 {r['ref_loss']}"
        assert r["grad_error"] < 0.25, f"step {i}: FP8 gradients differ from fp32 by {r['grad_error']:.3g}"
    assert max(r["grad_error"] for r in rows) > 1e-3, "FP8 gradients equal fp32's: the GEMMs did not run in FP8"
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.5  # it learns
    return trainer, rows


def test_fp8_training_steps_track_fp32(dataset, tmp_path):
    trainer, _ = check_fp8_training_steps_track_fp32(dataset, tmp_path)
    # the checkpoint holds the fp32 master weights in the standard format
    trainer.save_checkpoint()
    model = dsv3.load_pretrained(dsv3.resolve_checkpoint(tmp_path / "run"))
    assert model.lm_head.weight.dtype == model.model.layers[0].self_attn.kv_b_proj.weight.dtype == torch.float32
