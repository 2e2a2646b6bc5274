"""Two choices inside the compiled decode step, each against the engine as it ships, same weights, same prompts, one
process:
- attention over the latent as fused broadcast-and-sum contractions (`dsv3.model.mla.FUSED_QUERY_ROWS`, shipped)
  against batched GEMMs (`FUSED_QUERY_ROWS = 0`);
- inductor's C++ graph wrapper (`dsv3.infer.engine.compile_options`, shipped on CPU) against its Python wrapper.

Each row builds three compiled engines (shipped; GEMM attention; Python wrapper), each compiling its own copy of
the decode forwards (a fresh code object, so that dynamo keeps every variant's graphs apart), then runs them in
turn for `--repeats` rounds, the first one rotating. Each round generates `--new-tokens` greedy tokens for a batch
of held-out passages of `--contexts` tokens and times the engine's own decode clock; a ratio is the median of
per-round ratios shipped / variant (min-max), and each variant's greedy tokens are compared with the shipped ones.

    python benchmarks/decode_compile.py RUN_OR_CHECKPOINT --data DATA [--contexts 32 2000] [--batch 1 16]
        [--draft 3] [--repeats 7]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import types
from pathlib import Path

import torch

import dsv3
import dsv3.model.mla as mla
from _timing import alternating, pair_ratios, spread
from decode_speed import passages, with_context
from dsv3.allocator import keep_freed_memory
from dsv3.infer import Engine, SamplingParams
from dsv3.infer.engine import compile_options

VARIANTS = ("shipped", "GEMM attention", "Python wrapper")


def compiled_engine(model, variant: str, batch: int, max_len: int, k: int) -> Engine:
    """An engine whose decode forwards are compiled from fresh function objects with the variant's options."""
    engine = Engine(model, max_batch=batch, max_len=max_len, speculative=k > 0, draft_tokens=max(k, 1),
                    compile=True)
    options = compile_options(next(model.parameters()).device)
    if variant == "Python wrapper":
        options = {**options, "cpp_wrapper": False}

    def main_forward(self, ids, start):
        return Engine._main_forward(self, ids, start)

    def mtp_forward(self, h, ids, start, at):
        return Engine._mtp_forward(self, h, ids, start, at)

    engine._main_fn = torch.compile(types.MethodType(main_forward, engine), dynamic=False, fullgraph=True,
                                    options=options)
    engine._mtp_fn = torch.compile(types.MethodType(mtp_forward, engine), dynamic=False, fullgraph=True,
                                   options=options)
    return engine


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", help="a checkpoint directory or a training run")
    ap.add_argument("--data", required=True, help="dataset directory (its val split gives prompts)")
    ap.add_argument("--contexts", type=int, nargs="+", default=[32, 2000], help="prompt tokens, one row each")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16], help="batch sizes, one row each")
    ap.add_argument("--draft", type=int, nargs="*", default=[3], help="also MTP speculation with k drafts (batch 1, "
                    "the shortest context): its verify step attends with k + 1 query tokens")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    keep_freed_memory()
    fused_rows = mla.FUSED_QUERY_ROWS
    rows_of = {v: 0 if v == "GEMM attention" else fused_rows for v in VARIANTS}  # each variant's FUSED_QUERY_ROWS
    settings = [(c, b, 0) for c in args.contexts for b in args.batch] + [(min(args.contexts), 1, k) for k in args.draft]
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = with_context(dsv3.resolve_checkpoint(args.checkpoint), Path(tmp), max(args.contexts)
                            + 2 * args.new_tokens + 8)
        model = dsv3.load_pretrained(ckpt, progress=False).eval()
    print(f"{args.checkpoint}: fp32, {torch.get_num_threads()} threads, {args.new_tokens} greedy tokens, "
          f"{args.repeats} rounds; shipped: FUSED_QUERY_ROWS {fused_rows}, "
          f"{compile_options(next(model.parameters()).device)}")
    print("\n| context | batch | MTP drafts | shipped tok/s | GEMM attention tok/s | Python wrapper tok/s | "
          "shipped / GEMM attention | shipped / Python wrapper | same tokens | compile s |\n|" + "---|" * 10)
    params = SamplingParams(max_new_tokens=args.new_tokens, temperature=0)
    for context, batch, k in settings:
        prompts = passages(args.data, max(batch, 1), context)[:batch]
        engines, compile_s = {}, {}
        for variant in VARIANTS:
            mla.FUSED_QUERY_ROWS = rows_of[variant]
            engines[variant] = compiled_engine(model, variant, batch, context + args.new_tokens + k + 8, k)
            t = time.perf_counter()
            engines[variant].generate(prompts, SamplingParams(max_new_tokens=4, temperature=0))  # compiles
            compile_s[variant] = time.perf_counter() - t

        def trial(variant, engines=engines, prompts=prompts):
            def one(_round: int) -> dict:
                mla.FUSED_QUERY_ROWS = rows_of[variant]  # dynamo's guard picks that variant's graph
                engine = engines[variant]
                engine.stats["decode_time"] = 0.0
                out = engine.generate(prompts, params)
                return {"tps": sum(len(o.output) - 1 for o in out) / engine.stats["decode_time"],
                        "tokens": [o.output for o in out]}
            return one

        res = alternating({variant: trial(variant) for variant in VARIANTS}, args.repeats)
        mla.FUSED_QUERY_ROWS = fused_rows
        speed = {v: [x["tps"] for x in res[v]] for v in VARIANTS}
        outputs = {v: res[v][-1]["tokens"] for v in VARIANTS}
        ratios = {v: pair_ratios(speed["shipped"], speed[v]) for v in VARIANTS[1:]}
        same = all(outputs[v] == outputs["shipped"] for v in VARIANTS[1:])
        print(f"| {context} | {batch} | {k or ''} | " + " | ".join(spread(speed[v]) for v in VARIANTS) + " | "
              + " | ".join(f"{statistics.median(r):.2f}x ({min(r):.2f}-{max(r):.2f})" for r in ratios.values())
              + f" | {'yes' if same else 'NO'} | " + " / ".join(f"{compile_s[v]:.0f}" for v in VARIANTS) + " |",
              flush=True)


if __name__ == "__main__":
    main()
