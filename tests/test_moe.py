"""DeepSeekMoE: grouped expert computation and routing against per-token reference loops."""

import pytest
import torch
import torch.nn.functional as F

import dsv3
from dsv3.model import moe as moe_mod
from dsv3.model.moe import MoE


def reference_route(gate, x):
    """Per-token routing, written as the paper states it."""
    cfg_k, g, tg = gate.top_k, gate.n_group, gate.topk_group
    e = gate.n_experts
    idx_out, w_out = [], []
    for tok in x.float():
        logits = gate.weight.float() @ tok
        s = logits.sigmoid() if gate.scoring_func == "sigmoid" else logits.softmax(-1)
        choice = s + gate.e_score_correction_bias
        per = e // g
        group_scores = []
        for grp in range(g):
            member = choice[grp * per : (grp + 1) * per]
            group_scores.append(sorted(member.tolist(), reverse=True)[:2] if gate.scoring_func == "sigmoid"
                                else [member.max().item()])
        group_scores = [sum(v) for v in group_scores]
        kept = sorted(range(g), key=lambda i: -group_scores[i])[:tg] if g > 1 else [0]
        candidates = [j for j in range(e) if j // per in kept]
        chosen = sorted(candidates, key=lambda j: -choice[j].item())[:cfg_k]
        w = s[chosen]
        if gate.norm_topk_prob:
            w = w / w.sum()
        idx_out.append(sorted(chosen))
        w_out.append(dict(zip(chosen, w * gate.routed_scaling_factor)))  # tensors: gradients reach the gate
    return idx_out, w_out


def reference_swiglu(gate, up, down, tok):
    """One token through one SwiGLU given the three official matrices: three matrix-vector products."""
    return down @ (F.silu(gate @ tok) * (up @ tok))


def reference_moe(layer: MoE, x):
    """Per token, per chosen expert: weight * SwiGLU_e(x), plus the shared experts; each SwiGLU from its official
    gate / up / down matrices (the fused gate_up_proj cut back into its halves), three GEMMs as the paper has it."""
    idx, weights = reference_route(layer.gate, x)
    ex = layer.experts
    i = ex.down_proj.shape[-1]
    rows = []
    for t, tok in enumerate(x):
        acc = torch.zeros_like(tok)
        for e in idx[t]:
            acc = acc + weights[t][e] * reference_swiglu(ex.gate_up_proj[e, :i], ex.gate_up_proj[e, i:],
                                                         ex.down_proj[e], tok)
        if layer.shared_experts is not None:
            sh = layer.shared_experts
            i_sh = sh.down_proj.weight.shape[-1]
            acc = acc + reference_swiglu(sh.gate_up_proj.weight[:i_sh], sh.gate_up_proj.weight[i_sh:],
                                         sh.down_proj.weight, tok)
        rows.append(acc)
    return torch.stack(rows)


def make_layer(**kw):
    cfg = dsv3.get_config("tiny").replace(**kw)
    layer = MoE(cfg)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.3)
        layer.gate.e_score_correction_bias.normal_(0, 0.1)
    return layer


@pytest.mark.parametrize("kw", [
    {},
    {"n_group": 1, "topk_group": 1, "num_experts_per_tok": 3},
    {"scoring_func": "softmax", "norm_topk_prob": False, "routed_scaling_factor": 1.0},
    {"n_routed_experts": 16, "n_group": 8, "topk_group": 3, "num_experts_per_tok": 5, "n_shared_experts": 0},
])
def test_router_matches_per_token_reference(kw):
    check_router_matches_per_token_reference(kw)


def check_router_matches_per_token_reference(kw: dict) -> None:
    """The router's choices and weights for 40 tokens equal `reference_route` (the paper's rule per token,
    routing bias included); `load` counts the choices. Raises AssertionError otherwise."""
    layer = make_layer(**kw)
    x = torch.randn(40, layer.gate.weight.shape[1])
    info = layer.gate(x)
    ref_idx, ref_w = reference_route(layer.gate, x)
    assert [sorted(r.tolist()) for r in info.topk_idx] == ref_idx
    for t in range(40):
        got = dict(zip(info.topk_idx[t].tolist(), info.topk_weight[t].tolist()))
        assert got == pytest.approx({e: w.item() for e, w in ref_w[t].items()}, abs=1e-6)
    counts = torch.bincount(info.topk_idx.flatten(), minlength=layer.gate.n_experts).float()
    torch.testing.assert_close(info.load, counts)


def test_group_limit_is_honoured():
    layer = make_layer(n_routed_experts=16, n_group=8, topk_group=2, num_experts_per_tok=4)
    info = layer.gate(torch.randn(200, 64))
    for row in info.topk_idx:  # 8 groups of 2 experts; at most topk_group = 2 groups per token
        assert len({int(e) // 2 for e in row}) <= 2


def test_bias_changes_selection_not_weights():
    layer = make_layer()
    x = torch.randn(64, 64)
    before = layer.gate(x)
    with torch.no_grad():
        layer.gate.e_score_correction_bias.zero_()
        layer.gate.e_score_correction_bias[3] = 10.0  # expert 3 now always chosen
    after = layer.gate(x)
    assert (after.topk_idx == 3).any(-1).all()
    assert not torch.equal(before.topk_idx, after.topk_idx)
    # the weights still come from the unbiased affinities: normalised they sum to the scaling factor
    torch.testing.assert_close(after.topk_weight.sum(-1), torch.full((64,), 2.5))
    pos = (after.topk_idx == 3).nonzero()
    assert (after.topk_weight[pos[:, 0], pos[:, 1]] < 2.5).all()


def spy_grouped_mm(monkeypatch) -> list:
    """Wrap torch.nn.functional.grouped_mm (what `model/moe.py` calls for its grouped GEMMs) with a spy; returns
    the list that collects each call's row count."""
    real = F.grouped_mm
    calls = []

    def spy(x, w, *args, **kwargs):
        calls.append(x.shape[0])
        return real(x, w, *args, **kwargs)

    monkeypatch.setattr(F, "grouped_mm", spy)
    return calls


def assert_close_to_scale(got: torch.Tensor, ref: torch.Tensor, name: str, tol: float = 1e-5) -> None:
    """max |got - ref| <= tol * max |ref|: relative to the tensor's scale, not per element (entries near zero,
    sums of terms of size ~100 that cancel, carry fp32 rounding of ~1e-5 absolute)."""
    err = (got.double() - ref.double()).abs().max().item()
    scale = ref.double().abs().max().item()
    assert err <= tol * scale, f"{name}: max error {err:.3g} > {tol} x max |ref| {scale:.3g}"


def check_grouped_experts_equal_per_token_loop(monkeypatch, grouped: bool = True) -> None:
    """The MoE layer (grouped: torch's grouped GEMM, else the per-expert loop) equals `reference_moe`, forward and
    every gradient, to 1e-5; with `grouped` the forward's two expert GEMMs (fused gate+up, then down) and the
    backward's two input gradients must have run through torch.nn.functional.grouped_mm, once each. Raises
    AssertionError otherwise."""
    calls = spy_grouped_mm(monkeypatch)
    if not grouped:  # force the per-expert loop fallback
        monkeypatch.setattr(moe_mod, "GROUPED_MM_MIN_ROWS", 10**9)
    kw = dict(n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=3)
    layer, ref_layer = make_layer(**kw), make_layer(**kw)
    with torch.no_grad():
        layer.gate.e_score_correction_bias[:2] = -10.0  # experts 0 and 1 never chosen: empty groups
    ref_layer.load_state_dict(layer.state_dict())
    ref_layer.double()  # the reference in fp64, so the 1e-5 below is this layer's fp32 error alone
    n = 37  # 37 tokens x 3 experts = 111 rows, above the grouped GEMM's threshold
    assert n * 3 >= moe_mod.GROUPED_MM_MIN_ROWS or not grouped, \
        f"{n * 3} rows no longer reach GROUPED_MM_MIN_ROWS = {moe_mod.GROUPED_MM_MIN_ROWS}: raise n"
    x = torch.randn(n, 64, requires_grad=True)
    x_ref = x.detach().double().requires_grad_(True)
    y, info = layer(x)
    forward_calls = len(calls)
    y_ref = reference_moe(ref_layer, x_ref)
    # fp32 against fp64 (grouped GEMMs vs per-token dot products): 1e-5 of the largest entry
    assert_close_to_scale(y, y_ref, "y")
    assert (info.load[:2] == 0).all() and (info.load[2:] > 0).sum() > 8
    g = torch.randn_like(y)
    (y * g).sum().backward()
    (y_ref * g.double()).sum().backward()
    assert_close_to_scale(x.grad, x_ref.grad, "x.grad")
    for (name, p), p_ref in zip(layer.named_parameters(), ref_layer.parameters()):
        assert p.grad is not None, name
        assert_close_to_scale(p.grad, p_ref.grad, name)
    if grouped:  # gate+up and down forward (the shared experts are a plain linear); their input gradients backward
        assert forward_calls == 2, f"the forward ran {forward_calls} grouped GEMMs, expected 2 (gate+up, down)"
        assert len(calls) - forward_calls == 2, f"the backward ran {len(calls) - forward_calls} grouped GEMMs"
        assert all(rows == n * 3 for rows in calls), calls
    else:
        assert calls == []


@pytest.mark.parametrize("grouped", [True, False])
def test_grouped_experts_equal_per_token_loop_forward_and_backward(monkeypatch, grouped):
    check_grouped_experts_equal_per_token_loop(monkeypatch, grouped)


def test_empty_experts_get_zero_grad():
    layer = make_layer(n_routed_experts=16, n_group=1, topk_group=1, num_experts_per_tok=1)
    x = torch.randn(3, 64)
    y, info = layer(x)
    y.sum().backward()
    unused = (info.load == 0).nonzero().flatten()
    assert len(unused) >= 13
    assert (layer.experts.gate_up_proj.grad[unused] == 0).all()
    assert (layer.experts.down_proj.grad[unused] == 0).all()


def test_grouped_mm_function_equals_per_expert_products(monkeypatch):
    """96 rows (above GROUPED_MM_MIN_ROWS) in groups with empty experts: torch's grouped GEMM runs, once, and
    equals the per-expert products; the loop fallback gives the same."""
    calls = spy_grouped_mm(monkeypatch)
    x = torch.randn(96, 32)
    w = torch.randn(5, 16, 32)
    counts = [20, 0, 40, 0, 36]
    ref = torch.cat([x[0:20] @ w[0].T, x[20:60] @ w[2].T, x[60:96] @ w[4].T])
    torch.testing.assert_close(moe_mod.grouped_mm(x, w, counts), ref)
    assert calls == [96]
    monkeypatch.setattr(moe_mod, "GROUPED_MM_MIN_ROWS", 10**9)
    torch.testing.assert_close(moe_mod.grouped_mm(x, w, counts), ref)
    assert calls == [96]  # the loop did not call it again


def test_fused_mlp_equals_separate_gate_and_up():
    """The dense MLP's one gate_up_proj linear equals silu(x Wg^T) * (x Wu^T) Wd^T with Wg / Wu its two halves
    (gate rows first, as the checkpoint's gate_proj / up_proj), forward and every gradient."""
    mlp = moe_mod.MLP(64, 48)
    x = torch.randn(5, 7, 64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    w = mlp.gate_up_proj.weight.detach().clone().requires_grad_(True)
    wd = mlp.down_proj.weight.detach().clone().requires_grad_(True)
    y = mlp(x)
    y_ref = F.linear(F.silu(F.linear(x_ref, w[:48])) * F.linear(x_ref, w[48:]), wd)
    torch.testing.assert_close(y, y_ref, atol=1e-6, rtol=1e-5)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    (y_ref * g).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(mlp.gate_up_proj.weight.grad, w.grad, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(mlp.down_proj.weight.grad, wd.grad, atol=1e-6, rtol=1e-5)


def test_gathered_experts_equal_per_token_loop():
    """`RoutedExperts.gathered` (the compiled decode step's expert path) against the fp64 per-token reference, for
    decode-size batches with a token routed to overlapping experts."""
    kw = dict(n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=3)
    layer, ref_layer = make_layer(**kw), make_layer(**kw)
    ref_layer.load_state_dict(layer.state_dict())
    ref_layer.double()
    for n in (1, 5):
        x = torch.randn(n, 64)
        with torch.no_grad():
            route = layer.gate(x)
            y = layer.experts.gathered(x, route.topk_idx, route.topk_weight) + layer.shared_experts(x)
            y_ref = reference_moe(ref_layer, x.double())
        assert_close_to_scale(y, y_ref, f"gathered, {n} tokens")
