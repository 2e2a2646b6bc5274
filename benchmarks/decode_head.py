"""The engine's output head: oneDNN-packed (`DecodeHead`, what the engine uses on CPU) against `F.linear` on a
column-major copy of the weight (the layout the engine used before), in the same compiled engine, same prompts.

The compiled decode graphs stop before the head, so both variants share one graph; the head is swapped between
rounds, which alternate. Each round generates `--new-tokens` greedy tokens for a batch of `--batch` held-out
passages and times the engine's own decode clock; the ratio is the median of the per-round ratios (with its
min-max).

    python benchmarks/decode_head.py RUN_OR_CHECKPOINT --data DATA [--batch 1 16] [--draft 0 1] [--repeats 5]
"""

from __future__ import annotations

import argparse
import functools
import statistics

import torch.nn.functional as F

from _timing import load_for_decode
from dsv3.infer import Engine, SamplingParams


def column_major_head(weight, h):
    return F.linear(h, weight)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", help="a checkpoint directory or a training run")
    ap.add_argument("--data", required=True, help="dataset directory (its val split gives prompts)")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16], help="batch sizes, one row each")
    ap.add_argument("--draft", type=int, nargs="+", default=[0, 1], help="MTP drafts per step, 0 = plain (batch 1)")
    ap.add_argument("--new-tokens", type=int, default=96)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    _, model, _, passages = load_for_decode(args.checkpoint, args.data, max(16, *args.batch), args.prompt_len)
    rows = [(b, 0) for b in args.batch] + [(1, k) for k in args.draft if k > 0]
    for batch, k in rows:
        prompts = passages[:batch]
        engine = Engine(model, max_batch=batch, max_len=args.prompt_len + args.new_tokens + 8,
                        speculative=k > 0, draft_tokens=max(k, 1), compile=True)
        engine.warmup()
        column_major = model.lm_head.weight.detach().t().contiguous().t()
        heads = {"packed": engine.head, "F.linear, column-major": functools.partial(column_major_head, column_major)}
        params = SamplingParams(max_new_tokens=args.new_tokens, temperature=0)
        engine.generate(prompts, SamplingParams(max_new_tokens=4, temperature=0))
        speed: dict[str, list[float]] = {name: [] for name in heads}
        for r in range(args.repeats):
            for name in list(heads)[:: 1 if r % 2 == 0 else -1]:
                engine.head = heads[name]
                engine.stats["decode_time"] = 0.0
                out = engine.generate(prompts, params)
                speed[name].append(sum(len(o.output) for o in out) / engine.stats["decode_time"])
        ratios = [a / b for a, b in zip(*speed.values())]
        what = f"batch {batch}" + (f", MTP k={k}" if k else "")
        print(f"{what}: packed {statistics.median(speed['packed']):.1f} tok/s, column-major F.linear "
              f"{statistics.median(speed['F.linear, column-major']):.1f} tok/s; ratio {statistics.median(ratios):.3f} "
              f"({min(ratios):.3f}-{max(ratios):.3f}), {args.repeats} alternating rounds", flush=True)


if __name__ == "__main__":
    main()
