"""How many chained MTP drafts per step pay, with the eager engine (`dsv3 generate/chat/serve --speculative mtp`
without `--compile`): plain decoding against MTP speculation with each k of `--ks`, batch 1 greedy and batch 8 at
temperature 0.8, same weights, same held-out prompts, one process. (`decode_speed.py` measures the compiled step.)

The engines run in turn for `--repeats` rounds, the first one rotating; each round generates `--new-tokens` tokens
for a batch of held-out 32-token passages (round r starts at passage r) and times the engine's own decode clock;
a speed-up is the median of per-round ratios against plain; acceptance is over all rounds.

    python benchmarks/draft_tokens.py RUN_OR_CHECKPOINT --data DATA [--ks 1 3] [--repeats 7]
"""

from __future__ import annotations

import argparse
import statistics

import torch

from _timing import alternating, load_for_decode, pair_ratios, spread
from dsv3.allocator import keep_freed_memory
from dsv3.infer import Engine, SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", help="a checkpoint directory or a training run")
    ap.add_argument("--data", required=True, help="dataset directory (its val split gives prompts)")
    ap.add_argument("--ks", type=int, nargs="+", default=[1, 3], help="drafts per step to compare")
    ap.add_argument("--new-tokens", type=int, default=96)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    keep_freed_memory()  # as `dsv3 generate` runs
    _, model, _, prompts = load_for_decode(args.checkpoint, args.data, 16, 32)
    print(f"{args.checkpoint}: eager, fp32, {torch.get_num_threads()} threads, {args.new_tokens} new tokens, "
          f"{args.repeats} rounds\n\n| batch, temperature | engine | decode tok/s | vs plain | acceptance |\n"
          "|---|---|---|---|---|")
    for batch, temperature in ((1, 0.0), (8, 0.8)):
        max_len = 32 + args.new_tokens + max(args.ks) + 8
        engines = {"plain": Engine(model, max_batch=batch, max_len=max_len)}
        for k in args.ks:
            engines[f"MTP k = {k}"] = Engine(model, max_batch=batch, max_len=max_len, speculative=True,
                                             draft_tokens=k)

        def trial(engine, batch=batch, temperature=temperature):
            def one(r: int) -> dict:
                engine.stats["decode_time"] = 0.0
                out = engine.generate([prompts[(r + i) % len(prompts)] for i in range(batch)],
                                      SamplingParams(max_new_tokens=args.new_tokens, temperature=temperature, seed=r))
                return {"tps": sum(len(o.output) - 1 for o in out) / engine.stats["decode_time"]}
            return one

        res = alternating({name: trial(engine) for name, engine in engines.items()}, args.repeats)
        speed = {name: [x["tps"] for x in res[name]] for name in engines}
        for name, engine in engines.items():
            ratio = pair_ratios(speed[name], speed["plain"])
            acceptance = f"{engine.acceptance_rate:.0%}" if name != "plain" else ""
            print(f"| {batch}, {temperature:g} | {name} | {spread(speed[name])} | {statistics.median(ratio):.2f}x "
                  f"({min(ratio):.2f}-{max(ratio):.2f}) | {acceptance} |", flush=True)


if __name__ == "__main__":
    main()
