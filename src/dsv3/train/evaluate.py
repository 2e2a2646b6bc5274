"""Held-out evaluation: loss, perplexity and bits-per-byte.

Bits-per-byte divides the total cross-entropy (in bits) of the held-out tokens by the UTF-8 bytes of the text they
encode, so models with different tokenizers compare on the same scale (the paper reports BPB for that reason).
The split is read in consecutive, non-overlapping windows of `seq_len` tokens; the mean per-token loss is
scaled by the split's tokens/bytes ratio.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from ..model import DeepseekV3
from .data import TokenData


@torch.no_grad()
def evaluate(model: DeepseekV3, data_dir: str | Path, seq_len: int = 256, max_tokens: int | None = None,
             split: str = "val") -> dict:
    data = TokenData(data_dir, split)
    model.eval()
    device = model.lm_head.weight.device
    total_nats, count = 0.0, 0
    for window in data.windows(min(seq_len, model.config.max_position_embeddings), max_tokens):
        window = window.to(device)
        logits = model(window[:, :-1], mtp=False).logits
        total_nats += F.cross_entropy(logits[0].float(), window[0, 1:], reduction="sum").item()
        count += window.shape[1] - 1
    loss = total_nats / count
    tokens_per_byte = len(data) / data.bytes
    return {"loss": loss, "perplexity": math.exp(loss), "bpb": loss * tokens_per_byte / math.log(2),
            "tokens": count, "split": split}


class EvalError(ValueError):
    """An evaluation the checkpoint or data cannot support; names the setting."""


@torch.no_grad()
def evaluate_lengths(model: DeepseekV3, data_dir: str | Path, lengths: list[int], max_tokens: int = 16384,
                     buckets: int = 16, split: str = "val") -> dict[int, dict]:
    """Held-out loss by evaluation length and by position (the long-context view: does a model extended to 4K read
    its 4K context better than 256?). For each length L, the split's first `max_tokens` tokens are read in
    consecutive [L + 1]-token windows (the same tokens for every length; a window shorter than L at the end is
    dropped) and each position's loss is kept.

    Returns {L: {"loss": mean nats per token, "tokens": how many, "by_position": the mean loss in each of
    `buckets` equal position ranges [start, stop) of 0..L-1, as {"start", "stop", "loss"}}}.

    Raises:
        EvalError: a length beyond the model's max_position_embeddings, or a split too short for one window.
    """
    data = TokenData(data_dir, split)
    model.eval()
    device = model.lm_head.weight.device
    out = {}
    for length in lengths:
        if length > model.config.max_position_embeddings:
            raise EvalError(f"context length {length} exceeds the model's max_position_embeddings "
                            f"{model.config.max_position_embeddings}")
        per_position = torch.zeros(length, dtype=torch.float64)
        windows = 0
        for window in data.windows(length, max_tokens):
            if window.shape[1] < length + 1:
                continue
            window = window.to(device)
            logits = model(window[:, :-1], mtp=False).logits
            per_position += F.cross_entropy(logits[0].float(), window[0, 1:], reduction="none").double().cpu()
            windows += 1
        if not windows:
            raise EvalError(f"the {split} split of {data_dir} has fewer than {length + 1} tokens within "
                            f"max_tokens {max_tokens}: no window of length {length}")
        per_position /= windows
        edges = [round(i * length / buckets) for i in range(buckets + 1)]
        out[length] = {"loss": float(per_position.mean()), "tokens": windows * length,
                       "by_position": [{"start": a, "stop": b, "loss": float(per_position[a:b].mean())}
                                       for a, b in zip(edges, edges[1:]) if b > a]}
    return out


def plot_lengths(results: dict[int, dict], path: str | Path, title: str = "") -> Path:
    """Loss by position, one line per evaluation length (PNG at `path`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for length, r in sorted(results.items()):
        mids = [(b["start"] + b["stop"]) / 2 for b in r["by_position"]]
        ax.plot(mids, [b["loss"] for b in r["by_position"]], marker=".", label=f"{length} tokens: {r['loss']:.3f}")
    ax.set_xscale("log")
    ax.set_xlabel("position in the window")
    ax.set_ylabel("held-out loss (nats per token)")
    ax.set_title(title or "held-out loss by position")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
