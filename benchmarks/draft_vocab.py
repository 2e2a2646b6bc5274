"""MTP speculation with a reduced draft vocabulary (`Engine(draft_vocab=...)`, `--draft-vocab N`) against the full
draft head and against plain decoding: batch 1, greedy, the compiled decode step, the same prompts (issue 13).

The compiled graphs stop before the heads, so every draft vocabulary shares one speculative engine per k: its
`draft_head` is swapped between rounds, and the rounds alternate (plain, full, then each N; reversed every other
round). Each round generates `--new-tokens` greedy tokens for `--prompts` held-out passages and reads the engine's
own decode clock (prefill and compilation excluded). Reported per variant: decode tokens/s (median, min-max),
acceptance, the median of the per-round speed-ups over plain, and the issue's target 0.8 x (1 + a) for k = 1
(0.8 x tokens per verification in general), a the variant's own acceptance. Greedy output is identical in every
variant (checked).

    OMP_NUM_THREADS=1 python benchmarks/draft_vocab.py RUN --data DATA --vocab 512 1024 2048 --k 1 2 --threads 1
"""

from __future__ import annotations

import argparse
import statistics

import torch

from _timing import load_for_decode
from dsv3.infer import Engine, SamplingParams
from dsv3.infer.head import DraftHead
from dsv3.tokenizer import frequent_token_ids, stop_token_ids


def run(engine: Engine, prompts: list[list[int]], params: SamplingParams) -> tuple[float, int, int, list]:
    """(decode tokens/s, drafted, accepted, outputs) of one round."""
    for key in ("decode_time", "drafted", "accepted"):
        engine.stats[key] = 0
    out = engine.generate(prompts, params)
    tokens = sum(len(r.output) - 1 for r in out)  # the first token of each comes from the prefill
    return tokens / engine.stats["decode_time"], engine.stats["drafted"], engine.stats["accepted"], \
        [r.output for r in out]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", help="a checkpoint directory or a training run (with an MTP module)")
    ap.add_argument("--data", required=True, help="dataset directory (its val split gives the prompts)")
    ap.add_argument("--vocab", type=int, nargs="+", default=[512, 1024, 2048], help="draft vocabulary sizes")
    ap.add_argument("--k", type=int, nargs="+", default=[1, 2], help="chained drafts per step")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (1 when sharing the CPU)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    ckpt, model, tok, prompts = load_for_decode(args.checkpoint, args.data, args.prompts, args.prompt_len)
    params = SamplingParams(max_new_tokens=args.new_tokens, temperature=0)
    max_len = args.prompt_len + args.new_tokens + 8
    plain = Engine(model, tok, max_batch=1, max_len=max_len, compile=True)
    heads = {n: DraftHead(model.lm_head.weight, frequent_token_ids(tok, n, keep=stop_token_ids(tok, ckpt)))
             for n in args.vocab}
    print(f"{ckpt}: {args.prompts} prompts of {args.prompt_len} tokens, {args.new_tokens} new, "
          f"{torch.get_num_threads()} threads; draft heads {', '.join(str(len(h.ids)) for h in heads.values())} of "
          f"{model.config.vocab_size} tokens (packed: {all(h.packed for h in heads.values())})", flush=True)
    rows = []
    for k in args.k:
        spec = Engine(model, tok, max_batch=1, max_len=max_len, compile=True, speculative=True, draft_tokens=k)
        variants = {"plain": (plain, None), "full": (spec, spec.draft_head),
                    **{f"N={n}": (spec, h) for n, h in heads.items()}}
        for engine, head in variants.values():  # compile, and warm every variant up
            if head is not None:
                engine.draft_head = head
            engine.generate(prompts[:1], SamplingParams(max_new_tokens=8, temperature=0))
        speed = {name: [] for name in variants}
        counts = {name: [0, 0] for name in variants}
        reference = None
        for r in range(args.repeats):
            for name in list(variants)[:: 1 if r % 2 == 0 else -1]:
                engine, head = variants[name]
                if head is not None:
                    engine.draft_head = head
                tps, drafted, accepted, outputs = run(engine, prompts, params)
                reference = reference or outputs
                assert outputs == reference, f"{name}: greedy output differs from the other variants"
                speed[name].append(tps)
                counts[name][0] += drafted
                counts[name][1] += accepted
        for name in variants:
            s = speed[name]
            drafted, accepted = counts[name]
            a = accepted / drafted if drafted else 0.0
            ratios = [x / y for x, y in zip(s, speed["plain"])]
            target = 0.8 * (1 + a * k) if drafted else None  # 0.8 x tokens per verification
            rows.append((k, name, statistics.median(s), min(s), max(s), a, statistics.median(ratios), min(ratios),
                         max(ratios), target))
            print(f"k={k} {name:>7}: {statistics.median(s):6.1f} tok/s ({min(s):.1f}-{max(s):.1f}) acceptance "
                  f"{a:.0%} speed-up {statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})"
                  + (f" target {target:.2f}x" if target else ""), flush=True)
    print("\n| k | draft head | decode tok/s | acceptance | speed-up vs plain | target 0.8 x (1 + k a) |")
    print("|---|---|---|---|---|---|")
    for k, name, med, lo, hi, a, ratio, rlo, rhi, target in rows:
        if name == "plain" and k != args.k[0]:
            continue
        print(f"| {k if name != 'plain' else '-'} | {name} | {med:.1f} ({lo:.1f}-{hi:.1f}) | "
              f"{f'{a:.0%}' if target else ''} | {ratio:.2f}x ({rlo:.2f}-{rhi:.2f}) | "
              f"{f'{target:.2f}x' if target else ''} |")


if __name__ == "__main__":
    main()
