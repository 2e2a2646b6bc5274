"""Load balancing of the routed experts: the auxiliary-loss-free bias update and the balance losses.

Modes (`TrainConfig.balance`):
- "aux_free" (DeepSeek-V3): after every optimizer step, each expert's selection bias moves by
  gamma * sign(mean load - load): overloaded experts become less attractive, underloaded ones more. Loads are
  counted over the whole global batch (every micro-batch; under data/expert parallelism, every rank). The bias
  only steers selection, never the gate weights, so balance costs no gradient interference. It is complemented
  by a tiny sequence-wise balance loss (alpha = 1e-4) that prevents extreme imbalance inside single sequences.
- "aux_loss": the conventional approach, no bias update and a larger balance loss (alpha_aux, default 0.003,
  DeepSeek-V2's expert-level factor), for ablations.
- "none": neither.

Sequence-wise balance loss for one sequence of T tokens (paper, eq. 17-20):
    f_i = E / (K T) * sum_t 1[expert i in top-K of token t]
    P_i = 1/T * sum_t s'_{i,t},   s'_{i,t} = s_{i,t} / sum_j s_{j,t}   (affinities normalised per token)
    L   = alpha * sum_i f_i P_i,  averaged over the sequences of the batch
f carries no gradient (a count); the gradient reaches the router through P.
"""

from __future__ import annotations

import torch

from ..model.moe import RoutingInfo


def sequence_balance_loss(info: RoutingInfo, batch_size: int, groups: torch.Tensor | None = None) -> torch.Tensor:
    """sum_i f_i P_i per sequence, averaged over the sequences (alpha not applied). Tokens are [B*T] in order.

    groups: for packed rows, the sequence each token belongs to, [B, T] or [B*T] integers, -1 for tokens that
    belong to none (padding; MTP positions whose input reaches into the next document): each group is one
    sequence of the formula (`train.losses.packed_groups`). Default: each row is one sequence.
    """
    n, e = info.scores.shape
    k = info.topk_idx.shape[1]
    if groups is None:  # rows of equal length: the dense form (what `dsv3 plan` counts as saved activations)
        t = n // batch_size
        chosen = torch.zeros(batch_size, t, e, device=info.scores.device)
        chosen.scatter_(2, info.topk_idx.view(batch_size, t, k), 1.0)
        f = chosen.sum(1) * e / (k * t)  # [B, E]
        s = info.scores.view(batch_size, t, e)
        p = (s / s.sum(-1, keepdim=True)).mean(1)  # [B, E]
        return (f * p).sum(-1).mean()
    # packed rows: one sequence per group id (tests/test_packing.py holds it equal to the sequences one by one)
    groups = groups.reshape(-1).to(info.scores.device)
    keep = groups >= 0
    ids, inverse = torch.unique(groups[keep], return_inverse=True)  # one row per sequence
    count = torch.bincount(inverse, minlength=len(ids)).to(info.scores.dtype)[:, None]  # [G, 1] tokens
    chosen = torch.zeros(int(keep.sum()), e, device=info.scores.device).scatter_(1, info.topk_idx[keep], 1.0)
    f = torch.zeros(len(ids), e, device=info.scores.device).index_add_(0, inverse, chosen) * e / (k * count)
    s = info.scores[keep]
    p = torch.zeros(len(ids), e, device=s.device, dtype=s.dtype).index_add_(0, inverse, s / s.sum(-1, keepdim=True))
    return (f * p / count).sum(-1).mean()  # f [G, E] counts (no grad), p / count [G, E] mean normalised affinity


def max_violation(load: torch.Tensor) -> float:
    """MaxVio = max load / mean load - 1 (0 when perfectly balanced)."""
    mean = load.float().mean()
    return float(load.max() / mean - 1) if mean > 0 else 0.0


@torch.no_grad()
def update_expert_bias(bias: torch.Tensor, load: torch.Tensor, gamma: float) -> torch.Tensor:
    """b_i += gamma * sign(mean load - load_i), in place; `load` summed over the whole global batch."""
    if gamma:
        load = load.to(bias.device, torch.float32)
        bias.add_(gamma * torch.sign(load.mean() - load))
    return bias
