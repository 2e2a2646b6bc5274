"""Mutation checks: each test breaks the code one named way with monkeypatch and asserts that the check written
for that bug, the same plain function its normal test calls, now raises AssertionError.

A check that cannot fail proves nothing; these show that each one fails for the bug it names:
  routing bias dropped      the router selects without `e_score_correction_bias`     test_moe (router reference)
  rope layout swapped       MLA rotates half-split pairs instead of interleaved ones  test_attention (reference MLA)
  expert grads not 1/P      `sync_gradients` leaves expert shards' sums unscaled      2-rank EP gradients (here)
  Wgrad tiled wrongly       Wgrad's operands in 128x128 blocks, not 1x128 on tokens   test_fp8_training (fp64 GEMMs)
  grouped GEMM bypassed     the experts never reach torch's grouped_mm                test_moe (spy)
  bubble formula wrong      DualPipe's / ZB-H1's bubble off by one W                  test_parallel (simulation)
  acceptance rule wrong     speculative decoding keeps every draft                    test_engine (statistics)
Each mutation is undone by monkeypatch when its test ends.
"""

import multiprocessing
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import dsv3
import test_attention
import test_engine
import test_fp8_training
import test_moe
import test_parallel
from dsv3.cost import pipeline_bubbles
from dsv3.model import mla as mla_mod
from dsv3.model import moe as moe_mod
from dsv3.parallel import mesh as mesh_mod
from dsv3.parallel.expert_parallel import apply_expert_parallel
from dsv3.quant import fp8 as fp8_mod
from dsv3.quant import linear as fp8_linear_mod

WORKERS = Path(__file__).parent / "workers"
sys.path.insert(0, str(WORKERS))
import ep_worker  # noqa: E402


# ------------------------------------------------------------------------------------------------ routing bias
def test_router_check_fails_when_selection_ignores_the_bias(monkeypatch):
    real_forward = moe_mod.Router.forward

    def forward_without_bias(self, *args, **kwargs):  # the bug: choice = s, not s + b
        bias = self.e_score_correction_bias.clone()
        self.e_score_correction_bias.zero_()
        try:
            return real_forward(self, *args, **kwargs)
        finally:
            self.e_score_correction_bias.copy_(bias)

    test_moe.check_router_matches_per_token_reference({})  # passes as the code is
    monkeypatch.setattr(moe_mod.Router, "forward", forward_without_bias)
    with pytest.raises(AssertionError):
        test_moe.check_router_matches_per_token_reference({})


# ------------------------------------------------------------------------------------------------ rope layout
def test_attention_check_fails_when_the_rope_layout_is_swapped(monkeypatch):
    real_apply = mla_mod.apply_rope

    def swapped(x, rope, interleaved=True):  # the bug: half-split pairs where the checkpoint has interleaved
        return real_apply(x, rope, not interleaved)

    monkeypatch.setattr(mla_mod, "apply_rope", swapped)
    with pytest.raises(AssertionError):
        test_attention.test_naive_and_absorbed_match_reference(32)


# ------------------------------------------------------------------------------------------------ EP gradient scale
def _ep_rank(rank: int, world: int, init: str, out: str) -> None:
    """One rank of `check_expert_parallel_gradients` (a forked child: it inherits the parent's monkeypatches)."""
    torch.set_num_threads(1)  # a forked OpenMP pool is not safe to reuse
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        model, tokens = ep_worker.build()
        mesh = mesh_mod.Mesh(ep=world)
        apply_expert_parallel(model, mesh.ep_group)
        rows = tokens.shape[0] // world
        _, loss = ep_worker.loss_of(model, tokens[rank * rows : (rank + 1) * rows])
        loss.backward()
        mesh_mod.sync_gradients(model, mesh)
        torch.save({n: p.grad for n, p in model.named_parameters()}, out)
    finally:
        dist.destroy_process_group()


def check_expert_parallel_gradients(tmp_path: Path, world: int = 2, timeout: float = 120.0) -> None:
    """`world` ranks (forked from this process, gloo) each run their share of the batch with the routed experts
    sharded over them, then `sync_gradients`: every rank's gradients, its expert shard and the replicated
    parameters, equal the single-process model's on the whole batch (the mean loss). Raises AssertionError
    otherwise, or if a rank fails or outlives `timeout` seconds."""
    ctx = multiprocessing.get_context("fork")
    init = f"file://{tmp_path / 'rendezvous'}"
    outs = [tmp_path / f"rank{r}.pt" for r in range(world)]
    procs = [ctx.Process(target=_ep_rank, args=(r, world, init, str(outs[r]))) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    assert all(p.exitcode == 0 for p in procs), f"rank exit codes {[p.exitcode for p in procs]}"
    model, tokens = ep_worker.build()
    _, loss = ep_worker.loss_of(model, tokens)
    loss.backward()
    n_local = model.config.n_routed_experts // world
    for rank, out in enumerate(outs):
        grads = torch.load(out)
        for name, p in model.named_parameters():
            ref = p.grad[rank * n_local : (rank + 1) * n_local] if mesh_mod.is_expert_param(name) else p.grad
            torch.testing.assert_close(grads[name], ref, atol=1e-5, rtol=1e-4, msg=f"rank {rank}: {name}")


@pytest.mark.slow
def test_expert_parallel_check_fails_without_the_1_over_p_on_expert_grads(monkeypatch, tmp_path):
    real_sync = mesh_mod.sync_gradients

    def sync_leaving_expert_sums(module, mesh):  # the bug: expert shards keep the sum over the EP group
        real_sync(module, mesh)
        for name, p in module.named_parameters():
            if p.grad is not None and mesh_mod.is_expert_param(name) and mesh.ep > 1:
                p.grad.mul_(mesh.data_size)

    (tmp_path / "good").mkdir()
    check_expert_parallel_gradients(tmp_path / "good")  # passes as the code is
    monkeypatch.setattr(mesh_mod, "sync_gradients", sync_leaving_expert_sums)
    (tmp_path / "bad").mkdir()
    with pytest.raises(AssertionError, match="experts"):
        check_expert_parallel_gradients(tmp_path / "bad")


# ------------------------------------------------------------------------------------------------ FP8 Wgrad tiling
def test_fp8_gemm_check_fails_when_wgrad_uses_weight_blocks(monkeypatch):
    real_tiles = fp8_mod.quantize_tiles

    def tiles_or_blocks(x, tile=fp8_mod.BLOCK, pow2_scale=False):
        if x.is_contiguous():  # Fprop's x and Dgrad's dy, untouched
            return real_tiles(x, tile, pow2_scale)
        # the bug: Wgrad's transposed operands (x^T, dy^T) quantized in 128x128 blocks, each row given its
        # block's scale, instead of 1x128 tiles along the tokens
        q, scale = fp8_mod.quantize_blockwise(x, tile, pow2_scale)
        return q, scale.repeat_interleave(tile, 0)[: x.shape[0]]

    monkeypatch.setattr(fp8_linear_mod, "quantize_tiles", tiles_or_blocks)
    with pytest.raises(AssertionError, match="Wgrad"):
        test_fp8_training.check_fp8_linear_gemms_equal_same_quantization_fp64()


# ------------------------------------------------------------------------------------------------ grouped GEMM
def test_grouped_gemm_check_fails_when_the_experts_bypass_grouped_mm(monkeypatch):
    # the bug: the dispatch never picks the grouped GEMM (every call takes the per-expert loop)
    monkeypatch.setattr(moe_mod, "_grouped_mm_ok", lambda x, w: False)
    with pytest.raises(AssertionError, match="grouped GEMMs"):
        test_moe.check_grouped_experts_equal_per_token_loop(monkeypatch, grouped=True)


# ------------------------------------------------------------------------------------------------ bubble formulas
@pytest.mark.parametrize("schedule", ["DualPipe", "ZB1P"])
def test_bubble_check_fails_for_a_wrong_formula(schedule):
    def wrong(**kw):  # the bug: one W too few subtracted
        out = pipeline_bubbles(**kw)
        pp, f, b, w, fb = kw["pp"], kw["f"], kw["b"], kw["w"], kw["fb"]
        out["DualPipe"]["bubble"] = (pp / 2 - 1) * (fb + b - 2 * w) if schedule == "DualPipe" else \
            out["DualPipe"]["bubble"]
        out["ZB1P"]["bubble"] = (pp - 1) * (f + b - w) if schedule == "ZB1P" else out["ZB1P"]["bubble"]
        return out

    with pytest.raises(AssertionError, match=schedule):
        test_parallel.check_bubble_formulas_equal_simulation(wrong)


# ------------------------------------------------------------------------------------------------ acceptance rule
def test_speculative_check_fails_when_every_draft_is_kept(monkeypatch, trained_run):
    from dsv3.infer import engine as engine_mod
    from dsv3.tokenizer import load_tokenizer

    ckpt = dsv3.resolve_checkpoint(trained_run)
    model, tok = test_engine.flattened_draft(dsv3.load_pretrained(ckpt).eval()), load_tokenizer(ckpt)
    monkeypatch.setattr(engine_mod, "speculative_accept", lambda p, q, draft, gen: (True, draft))
    with pytest.raises(AssertionError, match="accepted"):
        test_engine.check_speculative_sampling_statistics(model, tok)
