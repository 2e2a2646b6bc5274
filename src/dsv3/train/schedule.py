"""Schedules in the paper's shape, scaled from tokens to optimizer steps.

DeepSeek-V3 pre-training: linear warmup to the peak over 2K steps, constant until 10T of 14.8T tokens (67.6%),
cosine decay to 10% of the peak over the next 4.3T (to 96.6%), then constant (the paper ends on two short
constant tails). The MTP weight lambda is 0.3 for the first 10T tokens, then 0.1.
"""

from __future__ import annotations

import math

DECAY_START = 10.0 / 14.8  # fraction of training at which cosine decay starts
DECAY_END = 14.3 / 14.8  # ... and ends


def lr_at(step: int, total_steps: int, peak: float, warmup: int, min_ratio: float = 0.1,
          decay_start: float = DECAY_START, decay_end: float = DECAY_END) -> float:
    """Learning rate for optimizer step `step` (0-based) of `total_steps`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    start, end = decay_start * total_steps, decay_end * total_steps
    if step < start:
        return peak
    if step >= end:
        return peak * min_ratio
    progress = (step - start) / max(end - start, 1)
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def mtp_weight_at(step: int, total_steps: int, early: float = 0.3, late: float = 0.1,
                  switch: float = DECAY_START) -> float:
    """MTP loss weight lambda for optimizer step `step` (0-based) of `total_steps`: `early`, then `late` from the
    step where the LR decay starts."""
    return early if step < switch * total_steps else late


def decay_start_step(total_steps: int, decay_start: float = DECAY_START) -> int:
    """The first optimizer step (0-based) of a `total_steps`-step run whose LR (`lr_at`) or MTP weight
    (`mtp_weight_at`) depends on `total_steps`; every earlier step is in the warmup or at the peak."""
    return math.ceil(decay_start * total_steps)  # the same product lr_at compares with


def frozen_total(step: int, estimate: int, decay_start: float = DECAY_START) -> int:
    """The step count to fix, just before optimizer step `step`, for a run whose length was estimated so far: at
    least `estimate`, and long enough that the decay starts no earlier than `step`. The steps already run (all in
    the warmup or at the peak) are then exactly the first `step` steps of a run of that length, so the run as a
    whole follows one schedule, as if its length had been known from the start."""
    total = max(estimate, math.floor(step / decay_start) - 1, 1)
    while decay_start_step(total, decay_start) < step:
        total += 1
    return total
