"""Expert parallelism on gloo, 2 and 4 processes: logits, loss, gradients and expert loads equal the
single-process model on the whole batch."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).parent / "workers" / "ep_worker.py"
sys.path.insert(0, str(WORKER.parent))
import ep_worker  # noqa: E402


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_expert_parallel_equals_single_process(tmp_path, world):
    init = f"file://{tmp_path / 'rendezvous'}"
    procs = [subprocess.Popen([sys.executable, str(WORKER), "--rank", str(r), "--world", str(world), "--init", init,
                               "--out", str(tmp_path / f"rank{r}.pt")], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in range(world)]
    for p in procs:
        out, _ = p.communicate(timeout=240)
        assert p.returncode == 0, out
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]

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
