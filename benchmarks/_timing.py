"""Helpers shared by the speed benchmarks: alternating repeated trials, median and spread, stream bandwidth, and
the held-out prompts the decode benchmarks feed.

On a shared, noisy machine one timing is worth little: a single slow prefill once turned a 2.3x row into 0.4x.
So every figure here is a median over repeated trials, the systems under comparison alternate within each round
(drift hits both equally) and ratios are taken per round before the median, with the min-max spread shown.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def alternating(trials: dict[str, Callable[[int], dict]], repeats: int) -> dict[str, list[dict]]:
    """Run every trial `repeats` times, one of each per round, rotating which goes first each round.

    trials: name -> fn(round index) returning a dict of measurements. Returns name -> the `repeats` dicts, in
    round order, so that results[a][r] and results[b][r] come from the same round (a pair).
    """
    names = list(trials)
    out: dict[str, list[dict]] = {n: [] for n in names}
    for r in range(repeats):
        for n in names[r % len(names):] + names[: r % len(names)]:
            out[n].append(trials[n](r))
    return out


def spread(values: list[float], fmt: str = ".1f") -> str:
    """'median (min-max)' of the values, e.g. '123.4 (110.2-130.9)'."""
    return f"{statistics.median(values):{fmt}} ({min(values):{fmt}}-{max(values):{fmt}})"


def pair_ratios(num: list[float], den: list[float]) -> list[float]:
    """num[r] / den[r] for each round r (same-round pairs)."""
    return [a / b for a, b in zip(num, den, strict=True)]


def best_of(fn: Callable[[], object], n: int) -> float:
    """Smallest wall time of n calls of fn, in seconds (after one untimed warm-up call)."""
    fn()
    best = float("inf")
    for _ in range(n):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def stream_bandwidth(mbytes: float = 256, n: int = 10) -> float:
    """Measured memory-stream bandwidth in bytes/s: the sum of an fp32 buffer of `mbytes` MiB, best of n. The
    default is 8x this machine's 32 MiB L3 cache, so that the buffer streams from memory, and `sum` runs on every
    thread. (It was a one-row product `x @ W` over 32 MiB: 17.9-25 GB/s against 31.7 this way, because the matrix
    library runs one-row products on one thread; see `dsv3.infer.gemv`.) A batch-1 decode step streams every active
    weight, so active weight bytes / this bandwidth is the least time it takes when its weights come from memory
    (the roofline); weights that stay in the cache between steps can beat it."""
    w = torch.randn(int(mbytes * 2**20 / 4))
    return w.numel() * 4 / best_of(w.sum, n)


def load_for_decode(checkpoint: str, data: str, count: int, length: int):
    """(checkpoint directory, model in eval mode, tokenizer, prompts) for a decode benchmark: `count` prompts of
    `length` tokens each, cut at even strides from the val split of the prepared dataset `data`."""
    import dsv3
    from dsv3.tokenizer import load_tokenizer
    from dsv3.train.data import TokenData

    ckpt = dsv3.resolve_checkpoint(checkpoint)
    model = dsv3.load_pretrained(ckpt, progress=False).eval()
    ids = TokenData(data, "val").ids
    stride = len(ids) // (count + 1)
    prompts = [ids[i * stride : i * stride + length].astype("int64").tolist() for i in range(count)]
    return ckpt, model, load_tokenizer(ckpt), prompts
