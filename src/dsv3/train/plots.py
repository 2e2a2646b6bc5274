"""`dsv3 plot RUN`: PNGs from a run's metrics.jsonl.

- loss.png          main and MTP losses, learning rate, and MaxVio per MoE layer over steps
- expert_load.png   per MoE layer, a heatmap of each expert's load relative to the mean (experts x steps)
- expert_bias.png   per MoE layer, the trajectory of every expert's selection bias
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..config import ModelConfig
from ..runs import Run, claim_output, read_metrics


def moe_layer_names(run: str | Path, n: int) -> list[str]:
    """Names of the `n` MoE layers in metric order, from the config of the run's latest checkpoint."""
    ckpt = Run(run).latest_checkpoint()
    if ckpt is not None:
        names = ModelConfig.from_json(ckpt / "config.json").moe_layer_names()
        if len(names) == n:
            return names
    return [f"MoE {i}" for i in range(n)]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _smooth(y: np.ndarray, n: int) -> np.ndarray:
    if len(y) < n or n <= 1:
        return y
    return np.convolve(y, np.ones(n) / n, mode="valid")


def _save(fig, path: Path) -> None:
    """The figure as a PNG at `path`, through a temporary file and a rename (never a half-written PNG)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        fig.savefig(tmp, dpi=110, format="png")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def plot_run(run: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """loss.png, expert_load.png and expert_bias.png of a run; their paths. By default in RUN/plots (the run's own
    folder: earlier plots there are replaced); an explicit `out_dir` must be absent or empty (`dsv3 plot
    --overwrite` moves an existing one aside first).

    Raises:
        RunError: the run has no metrics yet.
        OutputExistsError: `out_dir` exists and is not empty.
    """
    plt = _plt()
    rows = read_metrics(run)
    if out_dir:
        claim_output(out_dir)
    out = Path(out_dir) if out_dir else Run(run).plots_dir
    out.mkdir(parents=True, exist_ok=True)
    steps = np.array([r.step for r in rows])
    win = max(1, len(rows) // 50)
    paths = []

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    ax = axes[0]
    loss = np.array([r.loss for r in rows])
    ax.plot(steps, loss, alpha=0.25, color="C0")
    ax.plot(steps[win - 1 :], _smooth(loss, win), color="C0", label="main")
    depth = len(rows[0].mtp_loss)
    for k in range(depth):
        m = np.array([r.mtp_loss[k] for r in rows])
        ax.plot(steps[win - 1 :], _smooth(m, win), color=f"C{k + 1}", label=f"MTP depth {k + 1}")
    ax.set(xlabel="step", ylabel="cross-entropy (nats)", title="training loss")
    ax.legend()
    axes[1].plot(steps, [r.lr for r in rows])
    axes[1].set(xlabel="step", ylabel="learning rate", title="schedule")
    vio = np.array([r.max_vio for r in rows])
    names = moe_layer_names(run, vio.shape[1])
    for layer in range(vio.shape[1]):
        axes[2].plot(steps[win - 1 :], _smooth(vio[:, layer], win), label=names[layer])
    axes[2].set(xlabel="step", ylabel="MaxVio = max load / mean - 1", title="expert load imbalance")
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    paths.append(out / "loss.png")
    _save(fig, paths[-1])
    plt.close(fig)

    load = np.array([r.load for r in rows], dtype=float)  # [steps, layers, experts]
    n_layers = load.shape[1]
    rel = load / np.maximum(load.mean(-1, keepdims=True), 1e-9)
    fig, axes = plt.subplots(n_layers, 1, figsize=(12, 1.6 * n_layers + 1), squeeze=False)
    first, last = (steps[0], steps[-1]) if len(steps) > 1 else (steps[0] - 0.5, steps[0] + 0.5)  # one step
    for layer in range(n_layers):
        ax = axes[layer, 0]
        im = ax.imshow(rel[:, layer].T, aspect="auto", cmap="coolwarm", vmin=0, vmax=2, interpolation="nearest",
                       extent=(first, last, rel.shape[2] - 0.5, -0.5))
        ax.set_ylabel(f"{names[layer]}\nexpert")
    axes[-1, 0].set_xlabel("step")
    fig.suptitle("expert load / mean load per MoE layer (1 = balanced)")
    fig.colorbar(im, ax=axes[:, 0].tolist(), shrink=0.8)
    paths.append(out / "expert_load.png")
    _save(fig, paths[-1])
    plt.close(fig)

    bias = np.array([r.bias for r in rows])  # [steps, layers, experts]
    fig, axes = plt.subplots(1, n_layers, figsize=(3.2 * n_layers, 3.2), squeeze=False)
    for layer in range(n_layers):
        ax = axes[0, layer]
        ax.plot(steps, bias[:, layer], linewidth=0.8)
        ax.set(title=names[layer], xlabel="step")
    axes[0, 0].set_ylabel("e_score_correction_bias")
    fig.suptitle("selection bias of each expert (aux-loss-free balancing)")
    fig.tight_layout()
    paths.append(out / "expert_bias.png")
    _save(fig, paths[-1])
    plt.close(fig)
    return paths
