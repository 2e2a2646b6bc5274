"""The host side of a decode step, the engine's against what it did before, in the same engine, same prompts,
temperature 0.8, with the checkpoint's tokenizer streaming text:
- shipped: one `_probs` (temperature and softmax) for all the sampled rows of a step, then one `_sample`, inverse
  transform sampling with one uniform per row from the row's own generator; each row's text decoded a window at a
  time (`dsv3.infer.detokenize.IncrementalText`);
- multinomial: the same, but each row sampled by `torch.multinomial` (what transformers' `generate` samples
  with), which on CPU draws one exponential per vocabulary entry for each sample;
- whole text: the same, but each row's whole output decoded at every step (cost growing with the output);
- before: all three as the engine had them: `_probs` row by row, `torch.multinomial` row by row, the whole text.
The engine samples every sampled row of every step (and, speculating, every draft, rejection and bonus token) and
decodes every row's text, so these are per-row costs beside the compiled decode step. Each setting builds one engine,
warms it up, then runs `--repeats` rounds of the variants in turn (the first one rotating), each generating the
setting's number of sampled tokens (seeded) for a batch of held-out passages and timing the engine's own decode
clock; a ratio is the median of per-round ratios (min-max). The variants draw different tokens from the same
distributions, so the tokens (and, speculating, the acceptance) differ between them. First it times the two
samplers alone, one row and 16 rows of a distribution over the checkpoint's vocabulary.

    python benchmarks/host_step.py RUN_OR_CHECKPOINT --data DATA [--repeats 7]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import timeit
from pathlib import Path

import torch

import dsv3
import dsv3.infer.engine as engine_module
from _timing import alternating, pair_ratios, spread
from decode_speed import passages, run_ours, with_context
from dsv3.allocator import keep_freed_memory
from dsv3.infer import Engine, SamplingParams
from dsv3.tokenizer import load_tokenizer


def multinomial(probs: torch.Tensor, gens: list) -> list[int]:
    """torch.multinomial per row (the engine's sampler before, and transformers')."""
    return [int(torch.multinomial(row, 1, generator=g)) for row, g in zip(probs, gens)]


def probs_per_row(logits: torch.Tensor, params: list) -> torch.Tensor:
    """`_probs` called row by row (how the engine computed the distributions before)."""
    return torch.cat([SHIPPED["_probs"](row[None], [p]) for row, p in zip(logits, params)])


class WholeText:
    """Decodes the whole output at every update (how the engine streamed text before)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def update(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens)


SHIPPED = {name: getattr(engine_module, name) for name in ("_probs", "_sample", "IncrementalText")}
VARIANTS = {  # name -> the engine module's functions it swaps in
    "shipped": {},
    "multinomial": {"_sample": multinomial},
    "whole text": {"IncrementalText": WholeText},
    "before": {"_probs": probs_per_row, "_sample": multinomial, "IncrementalText": WholeText},
}
SETTINGS = (  # (label, batch, compiled, MTP drafts, new tokens)
    ("batch 1, compiled, 64 tokens", 1, True, 0, 64),
    ("batch 16, compiled, 64 tokens", 16, True, 0, 64),
    ("batch 16, compiled, 400 tokens", 16, True, 0, 400),
    ("batch 8, MTP k = 1, eager, 64 tokens", 8, False, 1, 64),
)


def sampler_us(vocab: int, rows: int, calls: int = 300) -> dict[str, float]:
    """Microseconds per call sampling `rows` rows of one softmax distribution over `vocab` tokens (best of three
    timings of `calls` calls): the shipped `_sample` against `multinomial`, each row with its own generator."""
    probs = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(0)).mul(3).softmax(-1)
    gens = [torch.Generator().manual_seed(i) for i in range(rows)]
    out = {}
    for name, fn in (("inverse transform", SHIPPED["_sample"]), ("multinomial", multinomial)):
        fn(probs, gens)
        out[name] = 1e6 / calls * min(timeit.repeat(lambda fn=fn: fn(probs, gens), number=calls, repeat=3))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", help="a checkpoint directory or a training run")
    ap.add_argument("--data", required=True, help="dataset directory (its val split gives prompts)")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    keep_freed_memory()  # as `dsv3 generate` runs
    longest = max(setting[-1] for setting in SETTINGS)
    with tempfile.TemporaryDirectory() as tmp:
        source = dsv3.resolve_checkpoint(args.checkpoint)
        ckpt = with_context(source, Path(tmp), args.prompt_len + longest + 8)
        model = dsv3.load_pretrained(ckpt, progress=False).eval()
        tok = load_tokenizer(ckpt)
    print(f"{args.checkpoint}: fp32, {torch.get_num_threads()} threads, vocabulary {model.config.vocab_size}, "
          f"temperature 0.8, {args.repeats} rounds")
    for rows in (1, 16):
        us = sampler_us(model.config.vocab_size, rows)
        print(f"sampling {rows} row(s) of {model.config.vocab_size} tokens: " + ", ".join(
            f"{name} {t:.0f} us" for name, t in us.items()))
    names = list(VARIANTS)
    cols = ["setting", *(f"{n} tok/s" for n in names), *(f"shipped / {n}" for n in names[1:]), "acceptance"]
    print("\n| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for label, batch, compiled, k, new in SETTINGS:
        prompts = passages(args.data, batch, args.prompt_len)
        engine = Engine(model, tok, max_batch=batch, max_len=args.prompt_len + new + k + 2, speculative=k > 0,
                        draft_tokens=max(k, 1), compile=compiled)
        engine.generate(prompts, SamplingParams(max_new_tokens=4, temperature=0.8, seed=0))  # compiles, warms up

        def trial(swap, engine=engine, prompts=prompts, new=new):
            def one(_round: int) -> dict:
                for name, fn in swap.items():
                    setattr(engine_module, name, fn)
                try:
                    return run_ours(engine, prompts, new, temperature=0.8)
                finally:
                    for name, fn in SHIPPED.items():
                        setattr(engine_module, name, fn)
            return one

        res = alternating({name: trial(swap) for name, swap in VARIANTS.items()}, args.repeats)
        tps = {name: [r["decode_tokens"] / r["decode_s"] for r in res[name]] for name in names}
        ratios = [pair_ratios(tps["shipped"], tps[n]) for n in names[1:]]
        accepted = [sum(r["accepted"] for r in res[n]) / max(1, sum(r["drafted"] for r in res[n])) for n in names]
        print(f"| {label} | " + " | ".join(spread(tps[n]) for n in names) + " | "
              + " | ".join(f"{statistics.median(r):.2f}x ({min(r):.2f}-{max(r):.2f})" for r in ratios) + " | "
              + (" / ".join(f"{a:.0%}" for a in accepted) if k else "") + " |", flush=True)


if __name__ == "__main__":
    main()
