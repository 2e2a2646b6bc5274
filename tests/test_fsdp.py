"""Data parallelism on FSDP2 (`--zero 3`, `dsv3.parallel.fsdp`): on two gloo ranks, with expert parallelism or
without, the single-process curve, loads and biases; a standard checkpoint written by gathering one tensor at a
time; per-rank shards of exactly the planned bytes; an exact resume."""

import sys
from pathlib import Path

import pytest
import torch

import dsv3
from dsv3.parallel.plan import Layout, plan

sys.path.insert(0, str(Path(__file__).parent / "workers"))
from launch import train  # noqa: E402


@pytest.mark.slow
@pytest.mark.parametrize(("layout", "extra"), [
    (["--ep", "2"], []),
    (["--dp", "2"], ["--optimizer-state-dtype", "bf16", "--grad-accum", "2"]),
], ids=["ep2", "dp2-bf16-moments-accumulating"])
def test_torchrun_fsdp_follows_the_single_process_curve(dataset, tmp_path, layout, extra):
    common = ["--model-config", "tiny", "--data", str(dataset), "--batch-size", "4", "--seq-len", "32",
              "--no-progress", "--checkpoint-every", "2", "--bias-update-speed", "0.01", *extra]
    one = train(tmp_path / "one", [*common, "--max-steps", "4"])
    par = train(tmp_path / "par", [*common, "--max-steps", "3", *layout, "--zero", "3"], nproc=2)
    for x, y in zip(one, par):
        assert abs(x.loss - y.loss) < 1e-5
        assert abs(x.grad_norm - y.grad_norm) / x.grad_norm < 1e-5
        assert x.load == y.load and x.bias == y.bias
    # the checkpoint: every official tensor, gathered one at a time and written once, in the standard format
    ckpt = dsv3.resolve_checkpoint(tmp_path / "par")  # step 3; step 2 is in both runs
    mine = dsv3.load_pretrained(ckpt.parent / "step-00000002")
    ref = dsv3.load_pretrained(ckpt.parents[2] / "one" / "checkpoints" / "step-00000002")
    for (name, p), q in zip(mine.state_dict().items(), ref.state_dict().values()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5, msg=name)
    # each rank holds its torch.chunk piece of every sharded tensor, its gradient and AdamW state: the plan's bytes
    held = [dsv3.runs.load_trainer_state(ckpt, rank=r, world=2)["held"] for r in range(2)]
    ep = 2 if "--ep" in layout else 1
    moments = "bf16" if "bf16" in extra else "fp32"
    assert [m.held() for m in plan(mine.config, Layout(dp=2 // ep, ep=ep, zero=3, optimizer_state_dtype=moments))] \
        == held
    assert sum(h["parameters"] for h in held) == mine.num_parameters()  # every element once over the ranks
    # resumed from step 3 (its optimizer shards re-wrapped), step 4 is the uninterrupted one
    resumed = train(tmp_path / "par", ["--resume", str(tmp_path / "par"), "--max-steps", "4", "--no-progress"],
                    nproc=2)
    assert abs(resumed[-1].loss - one[-1].loss) < 1e-5 and resumed[-1].bias == one[-1].bias
