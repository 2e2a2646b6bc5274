"""`dsv3 simulate-routing`: watch aux-loss-free balancing fix a skewed router, without training a model.

Synthetic tokens x = z + m, z ~ N(0, I), with a fixed offset m chosen so that the router's logits carry a
Zipf-like skew (expert 0 most attractive, the last least). The same router runs twice over the same token
stream: with the bias frozen (plain top-k) and with the aux-loss-free update b_i += gamma * sign(mean - load_i)
after every step. The plot shows MaxVio over steps for both, the load of every expert over steps with the bias
on, and the bias trajectories.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..config import get_config
from ..model.moe import Router
from .balance import max_violation, update_expert_bias


def simulate(n_experts: int = 64, n_group: int = 8, topk_group: int = 4, top_k: int = 8, dim: int = 128,
             tokens_per_step: int = 4096, steps: int = 400, gamma: float = 0.001, skew: float = 1.5,
             seed: int = 0) -> dict:
    cfg = get_config("tiny").replace(hidden_size=dim, n_routed_experts=n_experts, n_group=n_group,
                                     topk_group=topk_group, num_experts_per_tok=top_k)
    gen = torch.Generator().manual_seed(seed)
    router = Router(cfg)
    with torch.no_grad():
        router.weight.copy_(torch.randn(n_experts, dim, generator=gen) / dim**0.5)
    # offset m with W m = target logits: a Zipf-like skew over experts, shuffled across groups
    ranks = torch.randperm(n_experts, generator=gen).float()
    target = skew * (1.0 / (1.0 + ranks) ** 0.5 - 0.3)
    offset = torch.linalg.lstsq(router.weight.detach(), target[:, None]).solution[:, 0]
    history = {}
    for mode, g in (("frozen", 0.0), ("aux_free", gamma)):
        with torch.no_grad():
            router.e_score_correction_bias.zero_()
        step_gen = torch.Generator().manual_seed(seed + 1)  # the same token stream for both runs
        loads, biases, vio = [], [], []
        for _ in range(steps):
            x = torch.randn(tokens_per_step, dim, generator=step_gen) + offset
            with torch.no_grad():
                load = router(x).load
            loads.append(load)
            vio.append(max_violation(load))
            update_expert_bias(router.e_score_correction_bias, load, g)
            biases.append(router.e_score_correction_bias.clone())
        history[mode] = {"load": torch.stack(loads), "bias": torch.stack(biases), "max_vio": vio}
    return history


def plot_simulation(history: dict, out: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.6))
    for mode, color in (("frozen", "C3"), ("aux_free", "C0")):
        axes[0].plot(history[mode]["max_vio"], color=color,
                     label={"frozen": "bias frozen", "aux_free": "aux-loss-free bias update"}[mode])
    axes[0].set(xlabel="step", ylabel="MaxVio = max load / mean - 1", title="load imbalance", yscale="log")
    axes[0].legend()
    load = history["aux_free"]["load"]
    rel = (load / load.mean(-1, keepdim=True)).T.numpy()
    im = axes[1].imshow(rel, aspect="auto", cmap="coolwarm", vmin=0, vmax=2, interpolation="nearest")
    axes[1].set(xlabel="step", ylabel="expert", title="load / mean with the bias update")
    fig.colorbar(im, ax=axes[1])
    axes[2].plot(history["aux_free"]["bias"].numpy(), linewidth=0.7)
    axes[2].set(xlabel="step", ylabel="bias", title="e_score_correction_bias per expert")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
