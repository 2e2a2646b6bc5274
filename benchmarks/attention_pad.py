"""MLA's attention core in training: SDPA with v zero-padded to the q/k head size (what `MLA._naive` does, so
SDPA can take its fused flash kernel) against SDPA on the unpadded v (its math path on CPU, T x T probabilities
kept for backward). Forward and backward of the same q, k, v, alternating rounds; prints per length the median
time of each, the per-round ratio and the largest difference of outputs and gradients.

    python benchmarks/attention_pad.py [--model-config small] [--batch 8] [--lengths 256 1024] [--repeats 5]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
import dsv3  # noqa: E402
from _timing import alternating, pair_ratios, spread  # noqa: E402


def attention(q, k, v, pad: bool):
    """[B, H, T, qk] x2, [B, H, T, v] -> causal attention [B, H, T, v]; pad: zero-pad v to qk first."""
    width = v.shape[-1]
    if pad:
        v = F.pad(v, (0, q.shape[-1] - width))
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=q.shape[-1] ** -0.5)[..., :width]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-config", default="small")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lengths", type=int, nargs="+", default=[256, 1024])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    cfg = dsv3.get_config(args.model_config)
    h, qk, vd = cfg.num_attention_heads, cfg.qk_head_dim, cfg.v_head_dim
    print(f"{args.model_config}: {h} heads, q/k head {qk}, v head {vd}, batch {args.batch}, "
          f"{torch.get_num_threads()} threads")
    for t in args.lengths:
        g = torch.Generator().manual_seed(0)
        q, k = (torch.randn(args.batch, h, t, qk, generator=g, requires_grad=True) for _ in range(2))
        v = torch.randn(args.batch, h, t, vd, generator=g, requires_grad=True)
        grad_out = torch.randn(args.batch, h, t, vd, generator=g)
        results: dict[bool, list[torch.Tensor]] = {}
        trials = {name: _trial(q, k, v, grad_out, pad, results) for name, pad in (("math", False), ("padded", True))}
        for run in trials.values():
            run(0)  # warm-up
        runs = alternating(trials, args.repeats)
        diff = max(float((a - b).abs().max()) for a, b in zip(results[False], results[True]))
        ms = {n: [r["s"] * 1e3 for r in rows] for n, rows in runs.items()}
        print(f"T = {t}: unpadded {spread(ms['math'])} ms, padded {spread(ms['padded'])} ms, "
              f"speed-up {spread(pair_ratios(ms['math'], ms['padded']), '.2f')}x, max |diff| {diff:.1e}")


def _trial(q, k, v, grad_out, pad: bool, results: dict):
    """One timed forward + backward of `attention`; keeps its output and gradients in results[pad]."""
    def run(_round: int) -> dict:
        for x in (q, k, v):
            x.grad = None
        start = time.perf_counter()
        out = attention(q, k, v, pad)
        out.backward(grad_out)
        seconds = time.perf_counter() - start
        results[pad] = [out.detach(), q.grad.clone(), k.grad.clone(), v.grad.clone()]
        return {"s": seconds}
    return run

if __name__ == "__main__":
    main()
