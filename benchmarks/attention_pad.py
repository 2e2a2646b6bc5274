"""MLA's attention core over whole causal sequences (training, and a forward without a cache), three forms on the
same q, k, v: `block_causal_attention` (query blocks of 64 rows against the keys they see, what `MLA._naive` runs
on CPU in fp32 up to `BLOCK_CAUSAL_MAX_LEN` tokens), SDPA with v zero-padded to the q/k head size (so that SDPA
takes its fused flash kernel: what `MLA._naive` runs beyond) and SDPA on the unpadded v (its math path on CPU, T x
T probabilities kept for backward). Forward and backward (or the forward alone, `--forward-only`), alternating
rounds; prints per length the median time of each, the per-round ratios against the padded SDPA and the largest
difference of outputs and gradients. `--packed`: each row holds four documents of random lengths, attended under
their mask (`dsv3.model.mla.packed_attention`, what SFT's packed batches pass) by all three forms.

    python benchmarks/attention_pad.py [--model-config small] [--batch 8] [--lengths 256 1024] [--repeats 5]
                                       [--forward-only] [--packed]
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
from dsv3.allocator import keep_freed_memory  # noqa: E402
from dsv3.model.mla import block_causal_attention, packed_attention  # noqa: E402

FORMS = ("blocks", "padded", "math")


def attention(q, k, v, form: str, mask=None):
    """[B, T, H, qk] x2, [B, T, H, v] -> causal attention [B, T, H, v] by `form` (one of FORMS), under the packed
    documents' mask [B, 1, T, T] when given."""
    scale = q.shape[-1] ** -0.5
    if form == "blocks":
        return block_causal_attention(q, k, v, scale, mask)
    width = v.shape[-1]
    if form == "padded":
        v = F.pad(v, (0, q.shape[-1] - width))
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                         is_causal=mask is None, scale=scale)
    return out.transpose(1, 2)[..., :width]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-config", default="small")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lengths", type=int, nargs="+", default=[256, 1024])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--forward-only", action="store_true", help="time the forward alone, without autograd")
    ap.add_argument("--packed", action="store_true", help="four documents per row, under their mask")
    args = ap.parse_args()
    keep_freed_memory()  # as `dsv3 train` runs
    cfg = dsv3.get_config(args.model_config)
    h, qk, vd = cfg.num_attention_heads, cfg.qk_head_dim, cfg.v_head_dim
    print(f"{args.model_config}: {h} heads, q/k head {qk}, v head {vd}, batch {args.batch}, "
          f"{torch.get_num_threads()} threads, {'forward' if args.forward_only else 'forward + backward'}"
          f"{', packed documents' if args.packed else ''}")
    for t in args.lengths:
        g = torch.Generator().manual_seed(0)
        grad = not args.forward_only
        q, k = (torch.randn(args.batch, t, h, qk, generator=g, requires_grad=grad) for _ in range(2))
        v = torch.randn(args.batch, t, h, vd, generator=g, requires_grad=grad)
        grad_out = torch.randn(args.batch, t, h, vd, generator=g)
        mask = None
        if args.packed:  # three cuts per row: four documents
            cuts = torch.sort(torch.randint(1, t, (args.batch, 3), generator=g), 1).values
            mask = packed_attention((torch.arange(t)[None, :, None] >= cuts[:, None, :]).sum(-1))[1]
        results: dict[str, list[torch.Tensor]] = {}
        trials = {form: _trial(q, k, v, grad_out, form, results, mask) for form in FORMS}
        for run in trials.values():
            run(0)  # warm-up
        runs = alternating(trials, args.repeats)
        ms = {n: [r["s"] * 1e3 for r in rows] for n, rows in runs.items()}
        line = ", ".join(f"{form} {spread(ms[form])} ms" for form in FORMS)
        ratios = ", ".join(f"{form} {spread(pair_ratios(ms['padded'], ms[form]), '.2f')}x"
                           for form in FORMS if form != "padded")
        diff = max(float((a - b).abs().max()) for form in ("blocks", "math")
                   for a, b in zip(results[form], results["padded"]))
        print(f"T = {t}: {line}; speed-up over padded SDPA: {ratios}; max |diff| {diff:.1e}")


def _trial(q, k, v, grad_out, form: str, results: dict, mask=None):
    """One timed forward (+ backward) of `attention`; keeps its output and gradients in results[form]."""
    def run(_round: int) -> dict:
        for x in (q, k, v):
            x.grad = None
        start = time.perf_counter()
        out = attention(q, k, v, form, mask)
        if q.requires_grad:
            out.backward(grad_out)
        seconds = time.perf_counter() - start
        results[form] = [out.detach()] + ([q.grad.clone(), k.grad.clone(), v.grad.clone()] if q.requires_grad else [])
        return {"s": seconds}
    return run


if __name__ == "__main__":
    main()
