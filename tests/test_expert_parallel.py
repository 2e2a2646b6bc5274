"""Expert parallelism on gloo, 2 and 4 processes: logits, loss, gradients and expert loads equal the
single-process model on the whole batch."""

import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).parent / "workers" / "ep_worker.py"
sys.path.insert(0, str(WORKER.parent))
import ep_worker  # noqa: E402
from launch import run_ranks, run_train, train  # noqa: E402

from dsv3.parallel.plan import Layout, plan  # noqa: E402


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_expert_parallel_equals_single_process(tmp_path, world):
    results = run_ranks(WORKER, world, tmp_path)

    model, tokens = ep_worker.build()
    out, loss = ep_worker.loss_of(model, tokens)
    loss.backward()
    rows = tokens.shape[0] // world
    torch.testing.assert_close(torch.stack([r["loss"] for r in results]), loss.detach().expand(world),
                               atol=1e-5, rtol=1e-5)
    n_local = 8 // world
    for rank, res in enumerate(results):
        torch.testing.assert_close(res["logits"], out.logits[rank * rows : (rank + 1) * rows].detach(),
                                   atol=1e-5, rtol=1e-5)
        for ref_load, load in zip(out.routing, res["loads"]):
            assert torch.equal(load, ref_load.load)  # the bias update would see the global counts
        for name, p in model.named_parameters():
            grad = res["grads"][name]
            if ".mlp.experts." in name:  # this rank's slice of the stacked experts
                ref = p.grad[rank * n_local : (rank + 1) * n_local]
            else:
                ref = p.grad
            torch.testing.assert_close(grad, ref, atol=1e-5, rtol=1e-4, msg=name)



@pytest.mark.slow
def test_torchrun_ep_training_follows_the_single_process_curve(dataset, tmp_path):
    """`torchrun --nproc-per-node 2 -m dsv3 train --ep 2` against one process: same global batch, same curve
    (up to float reordering), same expert loads and biases; its checkpoint is a standard one; it resumes; and
    with --zero 1 (ZeRO-1) the curve is the same again."""
    import dsv3

    common = ["--model-config", "tiny", "--data", str(dataset), "--max-steps", "4", "--batch-size", "4",
              "--seq-len", "32", "--no-progress", "--checkpoint-every", "2", "--bias-update-speed", "0.01",
              "--peak-flops", "1e10"]
    a = train(tmp_path / "one", common)
    b = train(tmp_path / "ep", [*common, "--ep", "2"], nproc=2)
    assert [r.step for r in b] == [1, 2, 3, 4]
    # MFU counts every rank's peak: each report implies the same model FLOPs per token whatever the layout
    from dsv3.params import training_flops_per_token

    flops = training_flops_per_token(dsv3.ModelConfig.from_json(dsv3.resolve_checkpoint(tmp_path / "one")
                                                                / "config.json"), 32)
    for rows, world in ((a, 1), (b, 2)):
        for r in rows:
            assert r.mfu * world * 1e10 / r.tokens_per_s == pytest.approx(flops, rel=1e-9)
    for x, y in zip(a, b):
        assert abs(x.loss - y.loss) < 1e-4
        assert abs(x.grad_norm - y.grad_norm) / x.grad_norm < 1e-3
        assert x.load == y.load and x.bias == y.bias
    model = dsv3.load_pretrained(dsv3.resolve_checkpoint(tmp_path / "ep"))  # gathered experts, standard format
    one = dsv3.load_pretrained(dsv3.resolve_checkpoint(tmp_path / "one"))
    for (name, p), q in zip(model.state_dict().items(), one.state_dict().values()):
        torch.testing.assert_close(p, q, atol=1e-4, rtol=1e-3, msg=name)
    # each rank allocated its half of the routed experts only (plus every replicated tensor), and AdamW's two
    # moments (+ a step counter per tensor) for what it holds
    experts = sum(p.numel() for n, p in one.named_parameters() if ".mlp.experts." in n)
    ckpt_ep = dsv3.resolve_checkpoint(tmp_path / "ep")
    held = [dsv3.runs.load_trainer_state(ckpt_ep, rank=r, world=2)["held"] for r in range(2)]
    n_tensors = len(list(one.parameters()))
    for h in held:
        assert h["parameters"] == one.num_parameters() - experts // 2
        assert h["parameter_bytes"] == h["gradient_bytes"] == 4 * h["parameters"]
        assert h["optimizer_state_bytes"] == 8 * h["parameters"] + 4 * n_tensors
    assert [m.held() for m in plan(one.config, Layout(ep=2))] == held  # the planner, exactly
    # written sharded, nothing gathered: rank 0 wrote the replicated tensors and experts 0-3, rank 1 experts 4-7
    import json

    index = json.loads((ckpt_ep / "model.safetensors.index.json").read_text())["weight_map"]
    assert sorted(set(index.values())) == [f"model-0000{i}-of-00002.safetensors" for i in (1, 2)]
    for name, file in index.items():
        expert = int(name.split(".mlp.experts.")[1].split(".")[0]) if ".mlp.experts." in name else 0
        assert file.startswith(f"model-0000{1 + expert // 4}"), (name, file)
    # ZeRO-1 on top: AdamW state sharded over the two ranks, same curve
    for x, y in zip(a, train(tmp_path / "zero", [*common, "--ep", "2", "--zero", "1"], nproc=2)):
        assert abs(x.loss - y.loss) < 1e-4 and x.bias == y.bias
    ckpt = dsv3.runs.resolve_checkpoint(tmp_path / "zero")
    # one JSON + safetensors pair per rank, no pickle
    assert sorted(f.name for f in ckpt.glob("trainer_state*")) == [
        f"trainer_state-rank0000{r}-of-00002.{ext}" for r in (0, 1) for ext in ("json", "safetensors")]
    per_rank = [dsv3.runs.load_trainer_state(ckpt, rank=r, world=2)["optimizer"] for r in range(2)]
    with pytest.raises(dsv3.runs.RunError, match="on 2 rank"):
        dsv3.runs.load_trainer_state(ckpt, world=1)
    n_params = len(list(one.parameters()))
    held = [len(s["state"]) for s in per_rank]
    # replicated parameters have one owner; each rank also holds its 2 expert shards (gate_up_proj, down_proj) per
    # MoE layer (3 layers)
    assert sum(held) == n_params + 6 and all(h < n_params for h in held)
    zero_held = [dsv3.runs.load_trainer_state(ckpt, rank=r, world=2)["held"] for r in range(2)]
    replicated = one.num_parameters() - experts
    assert sum(h["optimizer_state_bytes"] for h in zero_held) == 8 * (replicated + experts) + 4 * (n_params + 6)
    assert [m.held() for m in plan(one.config, Layout(ep=2, zero=True))] == zero_held
    # resume on two ranks from the step-4 checkpoint
    resumed = train(tmp_path / "ep", ["--resume", str(tmp_path / "ep"), "--max-steps", "5", "--no-progress"],
                    nproc=2)
    assert [r.step for r in resumed] == [1, 2, 3, 4, 5]
    # on another layout of the same two ranks the per-rank optimizer state would not fit: a clear error, both named
    other = run_train(tmp_path / "ep", ["--resume", str(tmp_path / "ep"), "--max-steps", "6", "--no-progress",
                                        "--ep", "1"], nproc=2)
    assert other.returncode != 0
    assert "--pp 1 --dp 1 --ep 2 --zero 0" in other.stderr and "--pp 1 --dp 2 --ep 1 --zero 0" in other.stderr


@pytest.mark.slow
def test_torchrun_dp_x_ep_mesh_follows_the_single_process_curve(dataset, tmp_path):
    """4 ranks as 2 (data parallel) x 2 (expert parallel), with ZeRO-1: the single-process curve again."""
    common = ["--model-config", "tiny", "--data", str(dataset), "--max-steps", "3", "--batch-size", "4",
              "--seq-len", "32", "--no-progress", "--checkpoint-every", "3", "--bias-update-speed", "0.01"]
    one = train(tmp_path / "one", common)
    mesh = train(tmp_path / "mesh", [*common, "--dp", "2", "--ep", "2", "--zero", "1"], nproc=4)
    for x, y in zip(one, mesh):
        assert abs(x.loss - y.loss) < 1e-4
        assert abs(x.grad_norm - y.grad_norm) / x.grad_norm < 1e-3
        assert x.load == y.load and x.bias == y.bias
