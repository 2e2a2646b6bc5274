"""Language-model and multi-token-prediction losses.

A training window is `tokens` [B, T+1]; the model reads tokens[:, :T]. The main head at position i predicts
tokens[:, i+1]. MTP depth k at position i (i < T-k) predicts tokens[:, i+k+1], i.e. its targets are
tokens[:, k+1 : T+1].

Documents are packed with an end-of-text token between them. An MTP target must not lie in a later document than
the token the main head predicts at that position: depth k at position i is masked out when an end-of-text token
occurs among tokens i+1 .. i+k (the prediction would jump across a document boundary). The main loss keeps every
position, as usual for packed pre-training.

Post-training packs whole conversations instead, each its own document (`DeepseekV3.forward(segments=...)`):
explicit per-position targets (`packed_targets`, IGNORE outside the assistant's tokens) and per-document groups
for the sequence-wise balance loss (`packed_groups`), so that a packed batch computes what its conversations
would one by one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100


class _CrossEntropy(torch.autograd.Function):
    """sum_i w_i * -log softmax(logits_i)[target_i] over the rows whose target is not IGNORE (w_i = 1 without
    weights), divided by their count (`mean`) or not, with a backward that turns the saved softmax into the
    gradient directly: d/dlogits = w_i * (softmax - onehot(target)) / count, zero on ignored rows.

    The forward keeps the softmax p, not the log-softmax, so the backward needs no exponential: one row scale and a
    scatter. Each row's loss is log-sum-exp minus the target's logit, with log-sum-exp = max(x) - log(max(p)), since
    the largest probability is exp(0) / sum(exp(x - max(x))) and never underflows (at least 1 / V); a -log of the
    target's own probability would be infinite where it underflows. On this project's CPU the log-softmax form's
    backward `exp` (torch's accurate vectorised exp, slower than the one inside softmax) was about half of the loss's
    time; the loss's share of an eager `small` step went from 3% to 2% (`benchmarks/train_profile.py`).

    `F.cross_entropy` computes the same, but its backward first builds a zero [N, V] gradient for the gather
    (`nll_loss_backward`), then reads it and the log-softmax to write a third [N, V] tensor. This one saves one
    [N, V] tensor as torch's does (the softmax, the targets and a 0-dim fp32 count: the memory planner,
    `dsv3.parallel.plan`, counts them; SFT's per-record weights [N], when given, besides), has no host
    synchronisation, and leaves what it saved intact, so a retained graph can be differentiated again (the
    zero-bubble pipeline schedules do: input gradients first, weight gradients later)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, mean: bool, weights: torch.Tensor | None
                ) -> torch.Tensor:
        p = torch.softmax(logits, -1)  # [N, V]
        valid = targets != IGNORE  # [N]
        picked = logits.gather(-1, torch.where(valid, targets, 0)[:, None])[:, 0]  # [N]; a bad target raises here
        nll = (logits.amax(-1) - picked) - p.amax(-1).log()  # [N] log-sum-exp - x_target, large logits cancel first
        count = valid.sum().to(p.dtype) if mean else p.new_ones(())  # [] (0 when none counts: nan, as torch)
        weighted = () if weights is None else (weights.to(p.dtype),)  # [N], saved only when given
        if weighted:
            nll = nll * weighted[0]
        ctx.save_for_backward(p, targets, count, *weighted)
        return torch.where(valid, nll, 0.0).sum() / count

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        p, targets, count, *weighted = ctx.saved_tensors
        kept = targets != IGNORE  # [N]
        valid = kept.to(p.dtype)
        scale = (valid * weighted[0] if weighted else valid) * (grad / count.clamp_min(1))  # [N]
        d = p * scale[:, None]  # [N, V]
        return d.scatter_add_(1, torch.where(kept, targets, 0)[:, None], -scale[:, None]), None, None, None  # - onehot


def _check_weights(weights: torch.Tensor | None, targets: torch.Tensor) -> None:
    """Per-target weights, when given, must have the targets' shape (ValueError otherwise)."""
    if weights is not None and weights.shape != targets.shape:
        raise ValueError(f"weights {tuple(weights.shape)} must have the targets' shape {tuple(targets.shape)}")


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean",
                  weights: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy of logits [N, V] (computed in fp32) against targets [N] (IGNORE: not counted), as
    `F.cross_entropy(..., ignore_index=IGNORE)`: reduction "sum" over the counted rows, or "mean" over them (nan
    with a zero gradient when none is counted, as torch's). `weights` [N], optional constants (no gradient): each
    row's CE times its weight before the reduction (`record_weights`; the mean still divides by the count). The
    training losses' one implementation (`_CrossEntropy`).

    Raises:
        ValueError: another reduction, or weights of another shape than targets.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    _check_weights(weights, targets)
    return _CrossEntropy.apply(logits.float(), targets, reduction == "mean", weights)


def lm_loss(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Mean CE of logits [B, T, V] against tokens [B, T+1] shifted by one."""
    t = logits.shape[1]
    return cross_entropy(logits.flatten(0, 1), tokens[:, 1 : t + 1].flatten())


def mtp_targets(tokens: torch.Tensor, depth: int, eot_id: int | None) -> torch.Tensor:
    """Targets [B, T-k] for MTP depth k from tokens [B, T+1]; IGNORE where the target crosses a document end."""
    t = tokens.shape[1] - 1
    n = t - depth
    targets = tokens[:, depth + 1 : depth + 1 + n].clone()
    if eot_id is not None:
        crossed = torch.zeros_like(targets, dtype=torch.bool)
        for j in range(1, depth + 1):  # tokens i+1 .. i+k
            crossed |= tokens[:, j : j + n] == eot_id
        targets[crossed] = IGNORE
    return targets


def packed_targets(labels: torch.Tensor, positions: torch.Tensor, depth: int) -> torch.Tensor:
    """Targets [B, T-k] of depth k (0 = the main head) for packed rows (`DeepseekV3.forward(segments=...)`).

    labels [B, T]: the next-token target of each position (IGNORE where there is none to learn: the prompt's
    tokens in SFT, a document's last token, padding); positions [B, T]: each token's position within its document
    (`model.mla.packed_positions`). Depth k at position i predicts token i+k+1, which is labels[i+k]; kept only
    when position i+k lies in the same document as i (its position is k further), so no prediction crosses
    from one conversation into the next.
    """
    t = labels.shape[1]
    n = t - depth
    targets = labels[:, depth:].clone()
    targets[positions[:, depth:] != positions[:, :n] + depth] = IGNORE
    return targets


def packed_groups(segments: torch.Tensor, positions: torch.Tensor, depth: int = 0) -> torch.Tensor:
    """The document of each position that depth k reads wholly inside one document, [B, T-k], -1 elsewhere (and for
    padding, segment id < 0): `sequence_balance_loss`'s groups for the main layers (k = 0) and MTP depth k."""
    b, t = segments.shape
    n = t - depth
    start = torch.arange(t, device=segments.device) - positions  # [B, T] the index where each document starts
    groups = (torch.arange(b, device=segments.device)[:, None] * t + start)[:, :n].clone()
    groups[(positions[:, depth:] != positions[:, :n] + depth) | (segments[:, :n] < 0)] = -1
    return groups


def record_weights(targets: torch.Tensor, groups: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Weights [B, T-k] that turn a sum over packed targets [B, T-k] into a sum of per-record means: each target's
    weight is 1 / the number of targets of its record, 0 where the target is IGNORE. groups [B, T-k]: each
    position's document (`packed_groups` of the same depth). Also returns how many records have a target, what
    the weighted sum is divided by for the mean over records (the sequence-level mean, as against the token-level
    one of `cross_entropy(..., "mean")`: a record of 7 target tokens then weighs as much as one of 300)."""
    keep = targets != IGNORE
    _, inverse, counts = torch.unique(groups[keep], return_inverse=True, return_counts=True)
    weights = torch.zeros(targets.shape, dtype=torch.float32, device=targets.device)
    weights[keep] = 1.0 / counts[inverse].float()
    return weights, len(counts)


def mtp_valid_counts(tokens: torch.Tensor, depth: int, eot_id: int | None) -> list[int]:
    """Per MTP depth k = 1..depth, how many targets of the window `tokens` [B, T+1] are not masked: what the depth's
    loss averages over."""
    return [int((mtp_targets(tokens, k, eot_id) != IGNORE).sum()) for k in range(1, depth + 1)]


def mtp_losses(mtp_logits: list[torch.Tensor], tokens: torch.Tensor, eot_id: int | None,
               over: list[float] | None = None) -> list[torch.Tensor]:
    """CE of each MTP depth: the mean over its unmasked positions, or, with `over`, their sum divided by over[k-1].
    A trainer passes its share of the whole step's unmasked targets (`mtp_valid_counts` of the global batch / the
    ranks sharing it), so that the sum over micro-batches and ranks is the global batch's mean whatever the layout
    (a mean per rank or per micro-batch would weight unevenly masked shares differently)."""
    losses = []
    for k, logits in enumerate(mtp_logits, start=1):
        targets = mtp_targets(tokens, k, eot_id)[:, : logits.shape[1]]
        total = cross_entropy(logits.flatten(0, 1), targets.flatten(), "sum")  # 0 in the graph when all are masked
        count = over[k - 1] if over is not None else int((targets != IGNORE).sum())
        losses.append(total / count if count else total * 0.0)
    return losses


def distillation_kl(student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                    weights: torch.Tensor | None = None) -> torch.Tensor:
    """Forward KL(teacher || student) summed over the positions that have a target (targets != IGNORE), each
    distribution the softmax of logits / temperature, times temperature^2 (Hinton et al. 2015, so that gradients
    keep their scale across temperatures). student, teacher [B, T, V] logits; targets [B, T]; weights [B, T],
    optional constants: each position's KL times its weight (as `cross_entropy`'s). The sum, like the cross-entropy
    sums it replaces or mixes with (divide by the target count for a mean, or with `record_weights` by the record
    count). Zero, with zero gradient, when the two logits are equal.

    Raises:
        ValueError: weights of another shape than targets.
    """
    _check_weights(weights, targets)
    keep = targets != IGNORE
    dtype = torch.promote_types(student.dtype, torch.float32)  # at least fp32
    s = F.log_softmax(student[keep].to(dtype) / temperature, -1)
    t = F.log_softmax(teacher[keep].to(dtype) / temperature, -1)
    kl = (t.exp() * (t - s)).sum(-1)  # [targets]
    return (kl if weights is None else kl * weights[keep].to(dtype)).sum() * temperature**2

