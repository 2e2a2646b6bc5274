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
    return early if step < switch * total_steps else late
