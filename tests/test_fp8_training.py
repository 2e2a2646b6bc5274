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
from dsv3.runs import read_metrics

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


def test_fp8_linear_backward_matches_autograd_through_the_dequantized_reference():
    torch.manual_seed(1)
    x = torch.randn(2, 70, 192, requires_grad=True)
    w = (torch.randn(300, 192) * 0.05).requires_grad_(True)
    dy = torch.randn(2, 70, 300)
    y = fp8_linear(x, w)
    y.backward(dy)
    # reference: the same quantized operands, each GEMM in float64
    xq, xs = quantize_tiles(x.detach().reshape(-1, 192))
    wq, ws = quantize_blockwise(w.detach())
    x_ref = dequantize_tiles(xq, xs).double().requires_grad_(True)
    w_ref = dequantize_blockwise(wq, ws).double().requires_grad_(True)
    y_ref = x_ref @ w_ref.t()
    assert torch.allclose(y.reshape(-1, 300).double(), y_ref, rtol=0, atol=1e-5 * y_ref.abs().max().item())
    # autograd of the reference with the output gradient quantized as the FP8 backward quantizes it
    dy2 = dy.reshape(-1, 300)
    dyq, dys = quantize_tiles(dy2)
    y_ref.backward(dequantize_tiles(dyq, dys).double())
    dx_rel = (x.grad.reshape(-1, 192).double() - x_ref.grad).norm() / x_ref.grad.norm()
    assert dx_rel < 1e-6
    # Wgrad re-tiles both operands along the tokens (128x1), a different quantization from Fprop: compare to the
    # unquantized gradient within e4m3's resolution
    dw_exact = dy2.double().t() @ x.detach().reshape(-1, 192).double()
    assert (w.grad.double() - dw_exact).norm() / dw_exact.norm() < 0.05
    dx_exact = dy2.double() @ w.detach().double()
    assert (x.grad.reshape(-1, 192).double() - dx_exact).norm() / dx_exact.norm() < 0.05


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
    assert isinstance(model.model.layers[1].mlp.shared_experts.up_proj, FP8Linear)
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
                h = F.silu(fp8_linear(xt, ex.gate_proj[e])) * fp8_linear(xt, ex.up_proj[e])
                acc = acc + info.topk_weight[t, k] * fp8_linear(h, ex.down_proj[e])
            rows.append(acc)
    torch.testing.assert_close(out, torch.cat(rows), atol=1e-5, rtol=1e-5)


def test_fp8_training_tracks_fp32(dataset, tmp_path):

    from dsv3.train.trainer import TrainConfig, Trainer

    def run(precision, **kw):
        cfg = TrainConfig(model_config="tiny", data=str(dataset), out=str(tmp_path / precision), max_steps=12,
                          batch_size=4, seq_len=64, lr=3e-3, warmup_steps=2, checkpoint_every=12,
                          progress=False, precision=precision, **kw)
        Trainer(cfg).fit()
        return [r.loss for r in read_metrics(tmp_path / precision)]

    ref, fp8 = run("fp32"), run("fp8", optimizer_state_dtype="bf16")
    assert fp8[-1] < fp8[0] - 0.5  # it learns
    rel = [abs(a - b) / a for a, b in zip(ref, fp8)]
    assert max(rel) < 0.02, rel  # stays within 2% of the fp32 curve over these steps
    # the checkpoint holds the fp32 master weights in the standard format
    model = dsv3.load_pretrained(dsv3.resolve_checkpoint(tmp_path / "fp8"))
    assert model.lm_head.weight.dtype == torch.float32


def test_bf16_moment_adamw_follows_torch_adamw():
    from dsv3.train.optim import AdamW

    torch.manual_seed(0)
    w1 = torch.nn.Parameter(torch.randn(50, 40))
    w2 = torch.nn.Parameter(w1.detach().clone())
    ours = AdamW([w1], lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, state_dtype=torch.float32)
    ref = torch.optim.AdamW([w2], lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    for _ in range(5):
        g = torch.randn(50, 40)
        w1.grad, w2.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    torch.testing.assert_close(w1, w2, atol=1e-6, rtol=1e-6)
    low = AdamW([torch.nn.Parameter(torch.ones(3))], state_dtype=torch.bfloat16)
    low.param_groups[0]["params"][0].grad = torch.ones(3)
    low.step()
    assert next(iter(low.state.values()))["exp_avg"].dtype == torch.bfloat16
