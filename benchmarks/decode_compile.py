"""Choices inside the compiled decode step, each against the engine as it ships, same weights, same prompts, one
process:
- "GEMM attention": attention over the latent as batched GEMMs (`FUSED_QUERY_ROWS = 0`) instead of the shipped
  fused broadcast-and-sum contractions (`dsv3.model.mla.FUSED_QUERY_ROWS`);
- "Python wrapper": inductor's Python graph wrapper instead of its C++ one (`dsv3.infer.engine.compile_options`,
  shipped on CPU);
- "library products": the few-row matrix products through the matrix library (`aten.mm`) instead of the shipped
  inductor reductions (`dsv3.infer.gemv.FewRowMatmul`, products of at most `engine.GEMV_MAX_ROWS` rows);
- "other row limit": the same pass with another row limit (`--other-rows`, 8: a k = 1 verify at batch 4, batch 8);
- "one reduction for all rows": the same pass writing an M-row product as one [M, N] reduction instead of the
  shipped M one-row reductions for M <= `gemv.PER_ROW_MAX` (`FewRowMatmul(per_row=0)`);
- "module guards": dynamo checking its guards on the model's modules before every call, as by default, instead of
  skipping them (`guard_filter_fn` in `compile_options`).

Each row builds one compiled engine per variant (`--variants`, the shipped one always first), each compiling its
decode forwards with its own options into graphs of its own (`dsv3.infer.engine.compile_decode`), then runs them in
turn for `--repeats` rounds, the first one rotating. Each round generates `--new-tokens` greedy tokens for a batch
of held-out passages of `--contexts` tokens and times the engine's own decode clock; a ratio is the median of
per-round ratios shipped / variant (min-max), and each variant's greedy tokens are compared with the shipped ones.

    python benchmarks/decode_compile.py RUN_OR_CHECKPOINT --data DATA [--contexts 32 2000] [--batch 1 16]
        [--draft 3] [--repeats 7] [--variants "library products" ...]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

import dsv3
import dsv3.model.mla as mla
from _timing import alternating, pair_ratios, spread
from decode_speed import passages, with_context
from dsv3.allocator import keep_freed_memory
from dsv3.infer import Engine, SamplingParams
from dsv3.infer.engine import GEMV_MAX_ROWS, compile_decode, compile_options
from dsv3.infer.gemv import FewRowMatmul

VARIANTS = ("GEMM attention", "Python wrapper", "library products", "other row limit", "one reduction for all rows",
            "module guards")


def variant_options(variant: str, device: torch.device, other_rows: int) -> dict:
    """The inductor options of a variant's compiled forwards."""
    if variant in ("library products", "module guards"):
        drop = "post_grad_custom_post_pass" if variant == "library products" else "guard_filter_fn"
        return {k: v for k, v in compile_options(device).items() if k != drop}
    if variant == "other row limit":
        return compile_options(device, max_rows=other_rows)
    if variant == "one reduction for all rows":
        return {**compile_options(device), "post_grad_custom_post_pass": FewRowMatmul(GEMV_MAX_ROWS, per_row=0)}
    options = compile_options(device)
    return {**options, "cpp_wrapper": False} if variant == "Python wrapper" else options


def compiled_engine(model, variant: str, batch: int, max_len: int, k: int, other_rows: int) -> Engine:
    """An engine whose decode forwards are compiled with the variant's options (each engine's graphs its own:
    `compile_decode`)."""
    engine = Engine(model, max_batch=batch, max_len=max_len, speculative=k > 0, draft_tokens=max(k, 1),
                    compile=True)
    options = variant_options(variant, next(model.parameters()).device, other_rows)
    engine._main_fn = compile_decode(engine._main_forward, options, engine.graph_limit)
    engine._mtp_fn = compile_decode(engine._mtp_forward, options, engine.graph_limit)
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
    ap.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS), help="what to compare the "
                    "shipped step with")
    ap.add_argument("--other-rows", type=int, default=8, help="the row limit of 'other row limit'")
    args = ap.parse_args()
    variants = ("shipped", *args.variants)
    torch._dynamo.config.accumulated_recompile_limit = 4096  # every variant's graphs, all rows
    keep_freed_memory()
    fused_rows = mla.FUSED_QUERY_ROWS
    rows_of = {v: 0 if v == "GEMM attention" else fused_rows for v in variants}  # each variant's FUSED_QUERY_ROWS
    settings = [(c, b, 0) for c in args.contexts for b in args.batch] + [(min(args.contexts), 1, k) for k in args.draft]
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = with_context(dsv3.resolve_checkpoint(args.checkpoint), Path(tmp), max(args.contexts)
                            + 2 * args.new_tokens + 8)
        model = dsv3.load_pretrained(ckpt, progress=False).eval()
    print(f"{args.checkpoint}: fp32, {torch.get_num_threads()} threads, {args.new_tokens} greedy tokens, "
          f"{args.repeats} rounds; shipped: FUSED_QUERY_ROWS {fused_rows}, "
          f"{compile_options(next(model.parameters()).device)}, GEMV_MAX_ROWS {GEMV_MAX_ROWS}")
    print("\n| context | batch | MTP drafts | " + " | ".join(f"{v} tok/s" for v in variants) + " | "
          + " | ".join(f"shipped / {v}" for v in variants[1:]) + " | same tokens | compile s |\n|"
          + "---|" * (2 * len(variants) + 4))
    params = SamplingParams(max_new_tokens=args.new_tokens, temperature=0)
    for context, batch, k in settings:
        prompts = passages(args.data, max(batch, 1), context)[:batch]
        engines, compile_s = {}, {}
        for variant in variants:
            mla.FUSED_QUERY_ROWS = rows_of[variant]
            engines[variant] = compiled_engine(model, variant, batch, context + args.new_tokens + k + 8, k,
                                               args.other_rows)
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

        res = alternating({variant: trial(variant) for variant in variants}, args.repeats)
        mla.FUSED_QUERY_ROWS = fused_rows
        speed = {v: [x["tps"] for x in res[v]] for v in variants}
        outputs = {v: res[v][-1]["tokens"] for v in variants}
        ratios = {v: pair_ratios(speed["shipped"], speed[v]) for v in variants[1:]}
        same = all(outputs[v] == outputs["shipped"] for v in variants[1:])
        print(f"| {context} | {batch} | {k or ''} | " + " | ".join(spread(speed[v]) for v in variants) + " | "
              + " | ".join(f"{statistics.median(r):.2f}x ({min(r):.2f}-{max(r):.2f})" for r in ratios.values())
              + f" | {'yes' if same else 'NO'} | " + " / ".join(f"{compile_s[v]:.0f}" for v in variants) + " |",
              flush=True)


if __name__ == "__main__":
    main()
