"""Group Relative Policy Optimization (GRPO): the RL objective of DeepSeek-V3's post-training (report section
5.2.2), introduced in DeepSeekMath (Shao et al. 2024, eq. 3 and section 4.1.2). No critic: for each question q,
G responses o_1..o_G are sampled from the old policy, scored by a rule-based reward r_i, and each response's
advantage is its reward standardised within its own group.

    A_i      = (r_i - mean(r_1..r_G)) / (std(r_1..r_G) + eps)       (std: the sample std, ddof = 1, as TRL's
                                                                      GRPOTrainer; 0 for a group whose rewards are
                                                                      all equal: it teaches nothing)
    ratio_it = pi_theta(o_it | q, o_i<t) / pi_old(o_it | q, o_i<t)
    KL_it    = pi_ref / pi_theta - log(pi_ref / pi_theta) - 1        (Schulman's unbiased, always >= 0 estimator)
    J        = 1/G sum_i 1/|o_i| sum_t [ min(ratio_it A_i, clip(ratio_it, 1 - e, 1 + e) A_i) - beta KL_it ]

The loss is -J, averaged over the questions of a batch: each response's tokens are averaged first, then the
responses of a group, as the formula writes it. pi_old is the policy that sampled (its log-probabilities are
recomputed by the training forward before the updates, not taken from the engine, whose absorbed / compiled /
speculative path rounds differently); pi_ref is a frozen copy of the starting policy.
"""

from __future__ import annotations

import torch


def group_advantages(rewards: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """rewards [P, G] (P questions, G responses each) -> advantages [P, G]: (r - mean) / (std + eps) per row, with
    the sample std (ddof 1); rows whose rewards are all equal get 0. G must be >= 2."""
    if rewards.shape[-1] < 2:
        raise ValueError(f"GRPO needs at least 2 responses per question, got {rewards.shape[-1]}")
    rewards = rewards.double()
    mean = rewards.mean(-1, keepdim=True)
    std = rewards.std(-1, keepdim=True)  # unbiased
    same = (rewards == rewards[..., :1]).all(-1, keepdim=True)
    return torch.where(same, torch.zeros_like(rewards), (rewards - mean) / (std + eps)).float()


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor | None, mask: torch.Tensor,
              advantages: torch.Tensor, clip_eps: float = 0.2, beta: float = 0.04) -> tuple[torch.Tensor, dict]:
    """-J of the module docstring over a batch of groups.

    logp, old_logp, ref_logp: [P, G, T] log-probabilities of each sampled token under the current, the sampling
    and the reference policy (ref_logp may be None when beta is 0); mask [P, G, T] bool, True on response tokens
    (every response has at least one); advantages [P, G] (`group_advantages`).
    Returns (loss, stats): the scalar loss (gradient through logp only) and detached figures: "kl" (mean per-token
    KL estimate over response tokens), "clip_fraction" (share of response tokens whose ratio was clipped where
    that changed the objective), "ratio" (mean ratio).
    """
    mask = mask.to(logp.dtype)
    tokens = mask.sum(-1)  # [P, G]
    if bool((tokens == 0).any()):
        raise ValueError("every response needs at least one token in mask")
    ratio = torch.exp(logp - old_logp.detach())
    adv = advantages[..., None].to(logp.dtype)
    unclipped, clipped = ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv
    objective = torch.minimum(unclipped, clipped)
    kl = torch.zeros_like(logp)
    if beta:
        if ref_logp is None:
            raise ValueError("beta > 0 needs the reference policy's log-probabilities")
        log_ratio = ref_logp.detach() - logp  # log(pi_ref / pi_theta)
        kl = torch.exp(log_ratio) - log_ratio - 1
    per_token = objective - beta * kl
    per_response = (per_token * mask).sum(-1) / tokens  # [P, G]
    loss = -per_response.mean(-1).mean()
    n = mask.sum()
    stats = {"kl": float((kl * mask).sum() / n), "clip_fraction": float(((clipped < unclipped).to(mask.dtype) * mask)
                                                                          .sum() / n),
             "ratio": float((ratio.detach() * mask).sum() / n)}
    return loss, stats
