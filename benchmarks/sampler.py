"""The engine's sampler (`dsv3.infer.engine._sample`: inverse transform, one uniform per token) against
`torch.multinomial` (what it used before, and what transformers' `generate` samples with), in the same engine, same
prompts, temperature 0.8.

`torch.multinomial` on CPU draws one exponential per vocabulary entry for each sample; the engine samples every
sampled row of every step (and, speculating, every rejected draft and bonus token), so at 8,192 tokens this was a
per-row cost comparable to the compiled decode step itself. Each setting builds one engine, warms it up, then runs
`--repeats` rounds alternating the two samplers (the first one rotating), each round generating `--new-tokens`
sampled tokens (seeded) for a batch of held-out passages and timing the engine's own decode clock; the ratio is the
median of per-round ratios (min-max). The two samplers draw different tokens from the same distributions, so the
tokens (and, speculating, the acceptance) differ between them.

    python benchmarks/sampler.py RUN_OR_CHECKPOINT --data DATA [--repeats 7]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch

import dsv3
import dsv3.infer.engine as engine_module
from _timing import alternating, pair_ratios, spread
from decode_speed import make_engine, passages, run_ours, with_context
from dsv3.allocator import keep_freed_memory


def multinomial(probs: torch.Tensor, gen: torch.Generator | None) -> int:
    """The sampler the engine used before (and transformers uses): torch.multinomial."""
    return int(torch.multinomial(probs, 1, generator=gen))


SAMPLERS = {"inverse transform (shipped)": engine_module._sample, "torch.multinomial": multinomial}
SETTINGS = (  # (label, batch, compiled, MTP drafts)
    ("batch 1, compiled", 1, True, 0),
    ("batch 16, compiled", 16, True, 0),
    ("batch 8, MTP k = 1, eager", 8, False, 1),
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", help="a checkpoint directory or a training run")
    ap.add_argument("--data", required=True, help="dataset directory (its val split gives prompts)")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    keep_freed_memory()  # as `dsv3 generate` runs
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = with_context(dsv3.resolve_checkpoint(args.checkpoint), Path(tmp),
                            args.prompt_len + 2 * args.new_tokens + 8)
        model = dsv3.load_pretrained(ckpt, progress=False).eval()
    print(f"{args.checkpoint}: fp32, {torch.get_num_threads()} threads, vocabulary {model.config.vocab_size}, "
          f"{args.new_tokens} tokens at temperature 0.8, {args.repeats} alternating rounds")
    names = list(SAMPLERS)
    print(f"\n| setting | {names[0]} tok/s | {names[1]} tok/s | ratio | acceptance |\n|---|---|---|---|---|")
    for label, batch, compiled, k in SETTINGS:
        prompts = passages(args.data, batch, args.prompt_len)
        engine, _ = make_engine(model, batch, args.prompt_len + args.new_tokens + k + 2, compile=compiled,
                                speculative=k > 0, k=max(k, 1), temperature=0.8)

        def trial(sampler, engine=engine, prompts=prompts):
            def run(_round: int) -> dict:
                engine_module._sample = sampler
                try:
                    return run_ours(engine, prompts, args.new_tokens, temperature=0.8)
                finally:
                    engine_module._sample = SAMPLERS[names[0]]
            return run

        res = alternating({name: trial(fn) for name, fn in SAMPLERS.items()}, args.repeats)
        tps = {name: [r["decode_tokens"] / r["decode_s"] for r in res[name]] for name in names}
        ratio = pair_ratios(tps[names[0]], tps[names[1]])
        accepted = [sum(r["accepted"] for r in res[n]) / max(1, sum(r["drafted"] for r in res[n])) for n in names]
        print(f"| {label} | {spread(tps[names[0]])} | {spread(tps[names[1]])} | "
              f"{statistics.median(ratio):.2f}x ({min(ratio):.2f}-{max(ratio):.2f}) | "
              + (" / ".join(f"{a:.0%}" for a in accepted) if k else "") + " |", flush=True)


if __name__ == "__main__":
    main()
