"""`dsv3 simulate-routing`: watch aux-loss-free balancing fix a skewed router, without training a model.

Synthetic tokens x = z + m, z ~ N(0, I), with a fixed offset m chosen so that the router's logits carry a
Zipf-like skew (expert 0 most attractive, the last least). The same router (the model's `Router`, its
`e_score_correction_bias` moved by `train.balance.update_expert_bias`) runs over the same token stream once per
balancing mode:
- "frozen": the bias stays 0 (plain top-k);
- "aux_free": the aux-loss-free update b_i += gamma * sign(mean - load_i) after every step;
- "aux_loss": no bias; the router's weights take a plain gradient-descent step (learning rate 1, so `aux_alpha` is
  the step size) on aux_alpha x `train.balance.sequence_balance_loss` (the step's tokens as one sequence). There is
  no language-model loss here, so the interference a large alpha causes in training does not show, only how fast
  (or slowly) the loss balances.
The plot shows MaxVio over steps for each mode, the load of every expert over steps with the bias on, and the bias
trajectories. `simulation` yields the steps as they are computed (the `dsv3 serve` page streams them);
`simulate` collects them.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from ..config import get_config
from ..errors import Dsv3Error
from ..model.moe import Router
from .balance import max_violation, sequence_balance_loss, update_expert_bias

MODES = ("frozen", "aux_free", "aux_loss")


class SimulationError(Dsv3Error, ValueError):
    """Simulation settings that cannot run; the message names the setting, `field` holds its name."""

    def __init__(self, message: str, field: str):
        super().__init__(message)
        self.field = field


def check_settings(n_experts: int, n_group: int, topk_group: int, top_k: int, modes: tuple[str, ...]) -> None:
    """Raises SimulationError naming the first inconsistent setting (what `Router` could not route)."""
    if n_experts < 2 or n_group < 1 or n_experts % n_group:
        raise SimulationError(f"the experts ({n_experts}) must split evenly into the groups ({n_group}), at least 2",
                              "n_group")
    if n_group > 1 and n_experts // n_group < 2:
        raise SimulationError(f"each group needs at least 2 experts (a group scores by its top 2); {n_experts} "
                              f"experts in {n_group} groups", "n_group")
    if not 1 <= topk_group <= n_group:
        raise SimulationError(f"the groups a token may use ({topk_group}) must be in [1, {n_group}]", "topk_group")
    room = n_experts if n_group == 1 else topk_group * (n_experts // n_group)
    if not 1 <= top_k <= room:
        raise SimulationError(f"top-k ({top_k}) must be in [1, {room}] (the experts in {topk_group} of {n_group} "
                              f"groups)", "top_k")
    if not modes or any(m not in MODES for m in modes) or len(set(modes)) != len(modes):
        raise SimulationError(f"modes must be distinct names among {', '.join(MODES)}, got {modes!r}", "modes")


def simulation(n_experts: int = 64, n_group: int = 8, topk_group: int = 4, top_k: int = 8, dim: int = 128,
               tokens_per_step: int = 4096, steps: int = 400, gamma: float = 0.001, skew: float = 1.5,
               seed: int = 0, modes: tuple[str, ...] = ("frozen", "aux_free"), aux_alpha: float = 0.003
               ) -> Iterator[dict[str, dict]]:
    """The simulation one step at a time: yields, after each of the `steps` steps, mode -> {"load": [E] tokens
    routed to each expert at this step (fp32 counts; each token counts top_k times), "bias": [E] the bias after
    this step's update (fp32), "max_vio": MaxVio of this step's load}. Every mode routes the same tokens.

    Raises:
        SimulationError: settings the router cannot route (`check_settings`).
    """
    modes = tuple(modes)
    check_settings(n_experts, n_group, topk_group, top_k, modes)
    cfg = get_config("tiny").replace(hidden_size=dim, n_routed_experts=n_experts, n_group=n_group,
                                     topk_group=topk_group, num_experts_per_tok=top_k)
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(n_experts, dim, generator=gen) / dim**0.5  # [E, dim]
    # offset m with W m = target logits: a Zipf-like skew over experts, shuffled across groups
    ranks = torch.randperm(n_experts, generator=gen).float()
    target = skew * (1.0 / (1.0 + ranks) ** 0.5 - 0.3)
    offset = torch.linalg.lstsq(weight, target[:, None]).solution[:, 0]  # [dim]
    routers = {}
    for mode in modes:
        routers[mode] = router = Router(cfg)
        with torch.no_grad():
            router.weight.copy_(weight)
    step_gen = torch.Generator().manual_seed(seed + 1)  # one token stream, routed by every mode
    for _ in range(steps):
        x = torch.randn(tokens_per_step, dim, generator=step_gen) + offset  # [N, dim]
        out = {}
        for mode, router in routers.items():
            if mode == "aux_loss":
                router.weight.grad = None
                info = router(x)
                (aux_alpha * sequence_balance_loss(info, 1)).backward()
                with torch.no_grad():
                    router.weight -= router.weight.grad  # learning rate 1: aux_alpha is the step size
            else:
                with torch.no_grad():
                    info = router(x)
                update_expert_bias(router.e_score_correction_bias, info.load, gamma if mode == "aux_free" else 0.0)
            out[mode] = {"load": info.load, "bias": router.e_score_correction_bias.clone(),
                         "max_vio": max_violation(info.load)}
        yield out


def simulate(n_experts: int = 64, n_group: int = 8, topk_group: int = 4, top_k: int = 8, dim: int = 128,
             tokens_per_step: int = 4096, steps: int = 400, gamma: float = 0.001, skew: float = 1.5,
             seed: int = 0, modes: tuple[str, ...] = ("frozen", "aux_free"), aux_alpha: float = 0.003) -> dict:
    """The whole `simulation`: mode -> {"load": [steps, E], "bias": [steps, E], "max_vio": list of `steps`
    floats}.

    Raises:
        SimulationError: settings the router cannot route.
    """
    history = {m: {"load": [], "bias": [], "max_vio": []} for m in modes}
    for step in simulation(n_experts, n_group, topk_group, top_k, dim, tokens_per_step, steps, gamma, skew, seed,
                           modes, aux_alpha):
        for mode, s in step.items():
            for key in history[mode]:
                history[mode][key].append(s[key])
    return {m: {"load": torch.stack(h["load"]), "bias": torch.stack(h["bias"]), "max_vio": h["max_vio"]}
            for m, h in history.items()}


def plot_simulation(history: dict, out: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.6))
    labels = {"frozen": "bias frozen", "aux_free": "aux-loss-free bias update", "aux_loss": "auxiliary loss"}
    for mode, color in (("frozen", "C3"), ("aux_free", "C0"), ("aux_loss", "C2")):
        if mode in history:
            axes[0].plot(history[mode]["max_vio"], color=color, label=labels[mode])
    axes[0].set(xlabel="step", ylabel="MaxVio = max load / mean - 1", title="load imbalance", yscale="log")
    axes[0].legend()
    shown = "aux_free" if "aux_free" in history else next(iter(history))  # the loads and biases of one mode
    load = history[shown]["load"]
    rel = (load / load.mean(-1, keepdim=True)).T.numpy()
    im = axes[1].imshow(rel, aspect="auto", cmap="coolwarm", vmin=0, vmax=2, interpolation="nearest")
    axes[1].set(xlabel="step", ylabel="expert", title=f"load / mean ({labels[shown]})")
    fig.colorbar(im, ax=axes[1])
    axes[2].plot(history[shown]["bias"].numpy(), linewidth=0.7)
    axes[2].set(xlabel="step", ylabel="bias", title="e_score_correction_bias per expert")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
