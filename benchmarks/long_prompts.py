"""Long prompts in the engine: chunked prefill (how much a 4K-token prompt stalls the requests already decoding)
and prefix reuse (time to first token of a chat's second turn through `dsv3 serve`).

1. Chunked prefill. Eight requests with 32-token prompts decode (greedy) in one engine; once each has 8 tokens, a
   4,000-token prompt arrives. Each step is timed; the figures are the running requests' inter-token latency (one
   step each gives every running request one token) over the window from the long prompt's arrival to its first
   token — median, mean, 90th percentile and max — against the same requests' latency with no long prompt, and
   the long prompt's own time to first token. Policies: no long prompt, one-shot prefill (`prefill_chunk=None`),
   and chunks of `--chunks` tokens at each of `--shares` (`prefill_share`; 1 = a chunk every step). One engine
   serves every policy (its `prefill_chunk` and `prefill_share` are set per trial) with the decode step compiled
   as `dsv3 serve` runs it (`--no-compile` for eager); policies alternate within each of `--repeats` rounds and
   each figure is the median over rounds.
2. Prefix reuse. Two servers on loopback over the same weights, one with the prefix store and one without
   (`prefix_cache_bytes` 0). Per round a fresh ~2K-token conversation (a different held-out passage as the user's
   message): turn 1 (greedy, 32 tokens) on each server, then turn 2 — the first turn's answer re-sent as the
   assistant message plus a short question — streamed, timing the first content chunk. Reported: turn-2 time to
   first token with and without reuse (median of rounds, and the median per-round ratio), the hit length the
   store found against turn 2's prompt length, and whether the answers are identical.

The model's position limit is raised to fit the prompts (speed only; quality at those lengths is not measured).

    python benchmarks/long_prompts.py [RUN_OR_CHECKPOINT] [--data data/shakespeare] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import openai
import torch

import dsv3
from _timing import alternating, pair_ratios, spread
from decode_speed import passages, with_context
from dsv3.infer import Engine, SamplingParams
from dsv3.runs import resolve_checkpoint
from dsv3.tokenizer import load_tokenizer

GREEDY = dict(temperature=0.0, seed=0)


def itl_trial(engine: Engine, short: list[list[int]], long: list[int] | None, chunk: int | None,
              share: float = 1.0, settle: int = 8) -> dict:
    """One trial of part 1 (module doc): step times in the window, the long prompt's time to first token, and the
    step times with no long prompt (when `long` is None: the next 32 steps after settling)."""
    engine.prefill_chunk, engine.prefill_share = chunk, share
    reqs = [engine.submit(p, SamplingParams(max_new_tokens=engine.max_len - len(p) - 1, **GREEDY)) for p in short]
    while min(len(r.output) for r in reqs) < settle:
        engine.step()
    t_in = time.perf_counter()
    late = engine.submit(long, SamplingParams(max_new_tokens=2, **GREEDY)) if long is not None else None
    gaps, last = [], t_in
    while (late is not None and not late.output) or (late is None and len(gaps) < 32):
        before = [len(r.output) for r in reqs]
        engine.step()
        now = time.perf_counter()
        assert all(len(r.output) == n + 1 for r, n in zip(reqs, before)), "a running request missed a step"
        gaps.append(now - last)
        last = now
    ttft = last - t_in if late is not None else None
    for r in [*reqs, late]:
        if r is not None:
            engine.cancel(r)
    return {"gaps": gaps, "ttft": ttft, "steps": len(gaps)}


def chunked_prefill(model, short, long, chunks, shares, repeats, compile: bool) -> None:
    max_len = len(long) + 64
    engine = Engine(model, max_batch=16, max_len=max_len, compile=compile)
    t0 = time.perf_counter()
    for n in (len(short), len(short) + 1):  # the graphs of 8 running rows, and of 9 once the long prompt joins
        engine.generate([short[0]] * n, SamplingParams(max_new_tokens=3, **GREEDY))
    print(f"part 1: engine ready in {time.perf_counter() - t0:.0f} s ({'compiled' if compile else 'eager'} decode, "
          f"{len(short)} running requests, a {len(long)}-token prompt)", flush=True)
    trials = {"no long prompt": lambda r: itl_trial(engine, short, None, None),
              "one-shot prefill": lambda r: itl_trial(engine, short, long, None)}
    for c in chunks:
        for f in shares:
            trials[f"chunks of {c}, share {f:g}"] = lambda r, c=c, f=f: itl_trial(engine, short, long, c, f)
    res = alternating(trials, repeats)
    base = [statistics.median(t["gaps"]) for t in res["no long prompt"]]
    print("\n| prefill policy | inter-token latency ms: median | mean | p90 | max | median / no long prompt | "
          "mean / no long prompt | long prompt: time to first token s | steps |")
    print("|---|---|---|---|---|---|---|---|---|")
    base_mean = [statistics.mean(t["gaps"]) for t in res["no long prompt"]]
    for name, rs in res.items():
        med = [statistics.median(t["gaps"]) for t in rs]
        mean = [statistics.mean(t["gaps"]) for t in rs]
        p90 = [statistics.quantiles(t["gaps"], n=10)[-1] if len(t["gaps"]) > 1 else t["gaps"][0] for t in rs]
        mx = [max(t["gaps"]) for t in rs]
        ratio = statistics.median(pair_ratios(med, base))
        ttft = spread([t["ttft"] for t in rs], ".2f") if rs[0]["ttft"] is not None else ""
        steps = statistics.median(t["steps"] for t in rs)
        print(f"| {name} | {spread([m * 1e3 for m in med])} | {statistics.median(mean) * 1e3:.1f} | "
              f"{statistics.median(p90) * 1e3:.1f} | {statistics.median(mx) * 1e3:.1f} | {ratio:.2f}x | "
              f"{statistics.median(pair_ratios(mean, base_mean)):.2f}x | {ttft} | {steps:.0f} |", flush=True)


def chat_turn(port: int, messages: list[dict], max_tokens: int) -> tuple[str, float]:
    """One streamed greedy chat completion: (its text, seconds to the first content chunk)."""
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="-", timeout=600, max_retries=0)
    t0 = time.perf_counter()
    first, text = None, []
    for chunk in client.chat.completions.create(model="dsv3", messages=messages, max_tokens=max_tokens,
                                                temperature=0, stream=True):
        delta = chunk.choices[0].delta.content if chunk.choices else None
        if delta and first is None:
            first = time.perf_counter() - t0
        text.append(delta or "")
    return "".join(text), first if first is not None else time.perf_counter() - t0


def prefix_reuse(model, tok, ckpt, convs: list[list[int]], repeats: int, cache_mb: int) -> None:
    from dsv3.infer.server import Server, serve_in_thread

    max_len = max(map(len, convs)) + 256
    engines = {"reuse": Engine(model, tok, max_batch=4, max_len=max_len, prefix_cache_bytes=cache_mb << 20),
               "no reuse": Engine(model, tok, max_batch=4, max_len=max_len)}
    servers = {k: Server(e, tok, model_name="dsv3", checkpoint=ckpt) for k, e in engines.items()}
    with serve_in_thread(servers["reuse"]) as p_reuse, serve_in_thread(servers["no reuse"]) as p_plain:
        ports = {"reuse": p_reuse, "no reuse": p_plain}
        question = "And what does the king say to that?"

        def conversation(r):
            return [{"role": "user", "content": tok.decode(convs[r % len(convs)]) + "\nWhat happens here?"}]

        def trial(name, r):
            store = engines[name].prefix
            before = dict(store.stats) if store else None
            msgs = conversation(r)
            answer, _ = chat_turn(ports[name], msgs, 32)
            msgs = [*msgs, {"role": "assistant", "content": answer}, {"role": "user", "content": question}]
            second, ttft = chat_turn(ports[name], msgs, 16)
            hit = store.stats["hit_tokens"] - before["hit_tokens"] if store else 0
            prompt = len(servers[name].template.encode(tok, msgs, sanitize_control_tokens=True))
            return {"ttft": ttft, "hit": hit, "prompt": prompt, "answers": (answer, second)}

        chat_turn(p_reuse, [{"role": "user", "content": "hello"}], 2)  # warm both up
        chat_turn(p_plain, [{"role": "user", "content": "hello"}], 2)
        res = alternating({k: (lambda r, k=k: trial(k, r)) for k in engines}, repeats)
    a, b = res["reuse"], res["no reuse"]
    same = all(x["answers"] == y["answers"] for x, y in zip(a, b))
    ratio = statistics.median(pair_ratios([t["ttft"] for t in b], [t["ttft"] for t in a]))
    print(f"\npart 2: prefix reuse through the server, {repeats} rounds, conversations of "
          f"{min(map(len, convs))}-{max(map(len, convs))} passage tokens")
    print("| turn 2 | time to first token ms | hit tokens / prompt tokens |")
    print("|---|---|---|")
    for name, rs in res.items():
        hits = ", ".join(f"{t['hit']}/{t['prompt']}" for t in rs)
        print(f"| {name} | {spread([t['ttft'] * 1e3 for t in rs])} | {hits} |")
    print(f"speedup (median of per-round ratios): {ratio:.1f}x; answers identical with and without reuse: {same}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("checkpoint", nargs="?", default="runs/demo", help="a checkpoint directory or a training run")
    ap.add_argument("--data", default="data/shakespeare", help="dataset directory (its val split gives prompts)")
    ap.add_argument("--repeats", type=int, default=3, help="alternating rounds")
    ap.add_argument("--long", type=int, default=4000, help="tokens of the long prompt (part 1)")
    ap.add_argument("--running", type=int, default=8, help="requests decoding when it arrives (part 1)")
    ap.add_argument("--chunks", default="64,256", help="chunk sizes to compare (part 1)")
    ap.add_argument("--shares", default="1,0.5", help="prefill shares to compare with each chunk size (part 1)")
    ap.add_argument("--chat", type=int, default=2000, help="tokens of the conversation's first message (part 2)")
    ap.add_argument("--prefix-cache-mb", type=int, default=256, help="the store's bound in part 2 (MiB)")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                    help="compile the decode step in part 1, as `dsv3 serve` does (default: on)")
    ap.add_argument("--part", choices=["1", "2", "both"], default="both")
    args = ap.parse_args()
    ckpt = resolve_checkpoint(args.checkpoint)
    chunks = [int(c) for c in args.chunks.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        long_ckpt = with_context(ckpt, Path(tmp), max(args.long, args.chat) + 512)
        model = dsv3.load_pretrained(long_ckpt).eval()
        tok = load_tokenizer(long_ckpt)
        print(f"{ckpt}: fp32, {torch.get_num_threads()} threads", flush=True)
        if args.part in ("1", "both"):
            short = passages(args.data, args.running, 32)
            (long,) = passages(args.data, 1, args.long)
            shares = [float(f) for f in args.shares.split(",")]
            chunked_prefill(model, short, long, chunks, shares, args.repeats, args.compile)
        if args.part in ("2", "both"):
            convs = passages(args.data, args.repeats, args.chat)
            prefix_reuse(model, tok, long_ckpt, convs, args.repeats, args.prefix_cache_mb)


if __name__ == "__main__":
    main()
