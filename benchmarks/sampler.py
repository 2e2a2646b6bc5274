"""The engine's sampling against what it did before, in the same engine, same prompts, temperature 0.8:
- shipped: one `_probs` (temperature and softmax) for all the sampled rows of a step, then one `_sample`, inverse
  transform sampling with one uniform per row from the row's own generator;
- multinomial: the same distributions, each row sampled by `torch.multinomial` (what transformers' `generate`
  samples with), which on CPU draws one exponential per vocabulary entry for each sample;
- before: `_probs` row by row, then `torch.multinomial` row by row (the engine before this benchmark).
The engine samples every sampled row of every step (and, speculating, every draft, rejection and bonus token), so
at 8,192 tokens this was a per-row cost comparable to a share of the compiled decode step. Each setting builds one
engine, warms it up, then runs `--repeats` rounds of the variants in turn (the first one rotating), each generating
`--new-tokens` sampled tokens (seeded) for a batch of held-out passages and timing the engine's own decode clock; a
ratio is the median of per-round ratios (min-max). The variants draw different tokens from the same
distributions, so the tokens (and, speculating, the acceptance) differ between them.

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


def multinomial(probs: torch.Tensor, gens: list) -> list[int]:
    """torch.multinomial per row (the engine's sampler before, and transformers')."""
    return [int(torch.multinomial(row, 1, generator=g)) for row, g in zip(probs, gens)]


def probs_per_row(logits: torch.Tensor, params: list) -> torch.Tensor:
    """`_probs` called row by row (how the engine computed the distributions before)."""
    return torch.cat([SHIPPED[0](row[None], [p]) for row, p in zip(logits, params)])


SHIPPED = (engine_module._probs, engine_module._sample)
VARIANTS = {  # name -> (_probs, _sample)
    "shipped": SHIPPED,
    "multinomial": (engine_module._probs, multinomial),
    "before: per row, multinomial": (probs_per_row, multinomial),
}
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
    names = list(VARIANTS)
    cols = ["setting", *(f"{n} tok/s" for n in names), *(f"shipped / {n}" for n in names[1:]), "acceptance"]
    print("\n| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for label, batch, compiled, k in SETTINGS:
        prompts = passages(args.data, batch, args.prompt_len)
        engine, _ = make_engine(model, batch, args.prompt_len + args.new_tokens + k + 2, compile=compiled,
                                speculative=k > 0, k=max(k, 1), temperature=0.8)

        def trial(fns, engine=engine, prompts=prompts):
            def run(_round: int) -> dict:
                engine_module._probs, engine_module._sample = fns
                try:
                    return run_ours(engine, prompts, args.new_tokens, temperature=0.8)
                finally:
                    engine_module._probs, engine_module._sample = SHIPPED
            return run

        res = alternating({name: trial(fns) for name, fns in VARIANTS.items()}, args.repeats)
        tps = {name: [r["decode_tokens"] / r["decode_s"] for r in res[name]] for name in names}
        ratios = [pair_ratios(tps["shipped"], tps[n]) for n in names[1:]]
        accepted = [sum(r["accepted"] for r in res[n]) / max(1, sum(r["drafted"] for r in res[n])) for n in names]
        print(f"| {label} | " + " | ".join(spread(tps[n]) for n in names) + " | "
              + " | ".join(f"{statistics.median(r):.2f}x ({min(r):.2f}-{max(r):.2f})" for r in ratios) + " | "
              + (" / ".join(f"{a:.0%}" for a in accepted) if k else "") + " |", flush=True)


if __name__ == "__main__":
    main()
