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


def sequence_balance_loss(info: RoutingInfo, batch_size: int) -> torch.Tensor:
    """sum_i f_i P_i per sequence, averaged over the batch (alpha not applied). Tokens are [B*T] in order."""
    n, e = info.scores.shape
    k = info.topk_idx.shape[1]
    t = n // batch_size
    chosen = torch.zeros(batch_size, t, e, device=info.scores.device)
    chosen.scatter_(2, info.topk_idx.view(batch_size, t, k), 1.0)
    f = chosen.sum(1) * e / (k * t)  # [B, E]
    s = info.scores.view(batch_size, t, e)
    p = (s / s.sum(-1, keepdim=True)).mean(1)  # [B, E]
    return (f * p).sum(-1).mean()


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
