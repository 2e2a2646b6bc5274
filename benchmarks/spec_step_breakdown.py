"""Where a decode step's time goes, plain against MTP-speculative (k = 1), batch 1 greedy, compiled (issue 13).

Wraps the engine's pieces with wall-clock timers and divides by the decode steps of one pass over the prompts
(after a warm-up pass): the compiled main forward (`_main_fn`: one token plain, k + 1 verified), the output head
(`head`), the MTP forward (`_mtp_fn`: the k + 1 catch-up pairs, then each chained draft), the drafts' head
(`draft_head`, full or `--draft-vocab N` rows) and the host-side rest (sampling, acceptance, emitting). Nested
timers overlap: `_run_main` contains `_main_fn` and `head`, `_run_mtp` contains `_mtp_fn` and `draft_head`, the
step contains all. Last, the bounds these set: tokens per speculative step x the plain step's time / the verify's
(`_main_fn` + `head`), what speculation would reach if drafting and the host cost nothing, and the same with the
MTP forward added to the verify (the drafts' head and the host free).

    OMP_NUM_THREADS=1 python benchmarks/spec_step_breakdown.py RUN --data DATA --draft-vocab 2048 --threads 1
"""

from __future__ import annotations

import argparse
import functools
import time

import torch

from _timing import load_for_decode
from dsv3.infer import Engine, SamplingParams
from dsv3.tokenizer import frequent_token_ids, stop_token_ids

PIECES = ("_decode_step", "_speculative_step", "_run_main", "_main_fn", "head", "_run_mtp", "_mtp_fn",
          "draft_head", "_draft", "_choose", "_accept", "_emit")


def timed(times: dict, name: str, fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        times[name] = times.get(name, 0.0) + time.perf_counter() - t0
        return out
    return wrapper


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", help="a checkpoint directory or a training run (with an MTP module)")
    ap.add_argument("--data", required=True, help="dataset directory (its val split gives the prompts)")
    ap.add_argument("--draft-vocab", type=int, default=None, help="restrict the drafts to N tokens")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    ckpt, model, tok, prompts = load_for_decode(args.checkpoint, args.data, args.prompts, 32)
    params = SamplingParams(max_new_tokens=args.new_tokens, temperature=0)
    vocab = (frequent_token_ids(tok, args.draft_vocab, keep=stop_token_ids(tok, ckpt))
             if args.draft_vocab else None)
    plain_ms = None
    for spec in (False, True):
        engine = Engine(model, tok, max_batch=1, max_len=32 + args.new_tokens + 8, compile=True, speculative=spec,
                        draft_vocab=vocab if spec else None)
        engine.generate(prompts, params)  # compiles and warms up
        times: dict[str, float] = {}
        for name in PIECES:
            if hasattr(engine, name):
                setattr(engine, name, timed(times, name, getattr(engine, name)))
        engine.stats["decode_steps"] = 0
        engine.stats["decode_time"] = 0.0
        engine.generate(prompts, params)
        steps = engine.stats["decode_steps"]
        step_ms = 1e3 * engine.stats["decode_time"] / steps
        tokens = sum(args.new_tokens - 1 for _ in prompts)
        what = (f"speculative k = 1, drafts over {len(vocab) if vocab else model.config.vocab_size} tokens, "
                f"acceptance {engine.acceptance_rate:.0%}" if spec else "plain")
        print(f"{what}: {steps} steps, {step_ms:.2f} ms per step"
              + (f" = {step_ms / plain_ms:.2f} plain steps" if plain_ms else "")
              + f", {1e3 * engine.stats['decode_time'] / tokens:.2f} ms per token")
        for name, t in sorted(times.items(), key=lambda item: -item[1]):
            print(f"  {name:>18}: {1e3 * t / steps:6.2f} ms per step")
        if spec:  # the verify alone: the main forward over k + 1 tokens and their head; then with the MTP forward
            verify_ms = 1e3 * (times["_main_fn"] + times["head"]) / steps
            mtp_ms = 1e3 * times["_mtp_fn"] / steps
            per_step = tokens / steps  # tokens kept per verification, 1 + accepted drafts
            print(f"verify alone: {verify_ms:.2f} ms per step = {verify_ms / plain_ms:.2f} plain steps; with "
                  f"{per_step:.2f} tokens per step speculation is at most {per_step * plain_ms / verify_ms:.2f}x "
                  f"plain with free drafts and host, {per_step * plain_ms / (verify_ms + mtp_ms):.2f}x with the MTP "
                  f"forward but free drafts' head and host (the issue's target 0.8 x (1 + a) = "
                  f"{0.8 * (1 + engine.acceptance_rate):.2f}x)")
        plain_ms = plain_ms or step_ms


if __name__ == "__main__":
    main()
