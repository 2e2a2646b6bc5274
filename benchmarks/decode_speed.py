"""Decode and prefill speed, dsv3 vs Hugging Face transformers `generate`, same weights, same prompts, one process.

Rows: batch 1 and batch 16 with 32-token prompts, batch 1 at a 2K-token context (each for dsv3 eager and dsv3 with
the compiled decode step, `Engine(compile=True)`, with its compile time), prefill tokens/s for 512-token prompts,
and dsv3's MTP speculative decoding against dsv3 plain: batch 1 greedy compiled for k = 1..--max-draft chained
drafts (acceptance per draft position, tokens per verification and the issue's target 0.8 x that), and batch 8
at temperature 0.8 (eager, k = 1).

How each figure is measured, so that it survives a noisy machine:
- prefill and decode are timed separately within one call. dsv3: the engine's own clocks (`Engine.stats`
  prefill_time / decode_time); each engine is built and compiled once per row, before its timed rounds (a timed
  call that compiles fails the run). transformers: a no-op stopping criterion stamps the time after every token, so
  prefill = start to the first token and decode = first token to last (batch x (N - 1) tokens).
- the two systems alternate (which goes first rotates every round), `--repeats` rounds; each figure is the
  median with its min-max spread, and the speedup is the median of the per-round ratios.
- prompts are a fixed set of `--passages` windows evenly spaced over the dataset's held-out (val) split; batch 16
  takes the first 16, a batch-1 round r takes passage r (both systems the same one).
- the batch-1 roofline: active weight bytes per token (fp32; embedding lookup excluded, head included; plus the
  latent cache read at 2K) / measured memory bandwidth (`_timing.stream_bandwidth`, a parallel sum over 256 MiB) =
  the least time a decode step can take when its weights stream from memory (weights that stay in the CPU cache
  between steps can beat it); the table shows dsv3's decode as a fraction of it.
- attention forms at long context (`--form-contexts`, 2K/4K/8K tokens): batch-1 greedy decode through the model's
  own cached forward (no engine), every step once with `absorb=True` (attend over the latent, W_UK and W_UV
  folded into the query and output) and once with `absorb=False` (expand the whole cached latent through
  `kv_b_proj` every step, then SDPA), against transformers' `generate` on the same prompt (it caches expanded keys
  and values). Prefill uses the model's default form in both.
Greedy, fp32, no early stop (transformers: min_new_tokens = max_new_tokens and a dynamic cache; dsv3: no stop
token). transformers runs `attn_implementation="sdpa"` and `experts_implementation="grouped_mm"` (its fastest
CPU paths in 5.x; the one actually used is printed). The process's allocator is set as `dsv3 generate` sets
it (`dsv3.allocator.keep_freed_memory`; `serve` and `chat` keep glibc's default), for both systems alike.

    python benchmarks/decode_speed.py RUN_OR_CHECKPOINT [--data data/shakespeare] [--new-tokens 64] [--repeats 5]
        [--only batch1 batch long prefill]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import transformers

import dsv3
from _timing import alternating, pair_ratios, spread, stream_bandwidth
from dsv3.allocator import keep_freed_memory
from dsv3.infer import Engine, SamplingParams
from dsv3.params import count_parameters
from dsv3.runs import resolve_checkpoint
from dsv3.train.data import TokenData


def with_context(ckpt: Path, tmp: Path, max_pos: int) -> Path:
    """A copy of the checkpoint whose config allows `max_pos` positions (speed only; quality is not measured)."""
    out = tmp / f"ctx{max_pos}"
    shutil.copytree(ckpt, out)
    cfg = json.loads((out / "config.json").read_text())
    cfg["max_position_embeddings"] = max(max_pos, cfg["max_position_embeddings"])
    (out / "config.json").write_text(json.dumps(cfg))
    return out


def passages(data_dir: str, count: int, length: int) -> list[list[int]]:
    """`count` fixed windows of `length` token ids, evenly spaced over the val split (they may overlap when the
    split is short). Raises SystemExit naming the split when it holds fewer than `length` tokens."""
    ids = TokenData(data_dir, "val").ids
    if len(ids) < length:
        raise SystemExit(f"{data_dir}: the val split has {len(ids)} tokens, fewer than a {length}-token prompt")
    starts = np.linspace(0, len(ids) - length, count).astype(int)
    return [ids[s : s + length].astype("int64").tolist() for s in starts]


class _StepClock(transformers.StoppingCriteria):
    """Never stops; records perf_counter() each time generate has appended a token (after prefill, then after
    every decode step)."""

    def __init__(self):
        self.times: list[float] = []

    def __call__(self, input_ids, scores, **kwargs):
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def run_hf(model, prompts: list[list[int]], new_tokens: int) -> dict:
    """One transformers `generate` call: prefill and decode seconds and token counts."""
    ids = torch.tensor(prompts)
    clock = _StepClock()
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                             cache_implementation="dynamic",
                             stopping_criteria=transformers.StoppingCriteriaList([clock]))
    assert out.shape[1] == ids.shape[1] + new_tokens and len(clock.times) == new_tokens, (out.shape, clock.times)
    return {"prefill_s": clock.times[0] - t0, "prefill_tokens": ids.numel(),
            "decode_s": clock.times[-1] - clock.times[0], "decode_tokens": len(prompts) * (new_tokens - 1)}


def run_ours(engine: Engine, prompts: list[list[int]], new_tokens: int, temperature: float = 0.0) -> dict:
    """One `Engine.generate` call on a reused engine (its compiled graphs too): prefill and decode seconds and
    token counts from the engine's clocks (counted afresh for this call)."""
    before = dict(engine.stats)
    accepted_at = list(engine.accepted_at)
    params = SamplingParams(max_new_tokens=new_tokens, temperature=temperature, seed=0)
    reqs = engine.generate(prompts, params)
    assert all(len(r.output) == new_tokens for r in reqs)
    s = {k: v - before[k] for k, v in engine.stats.items()}
    assert s["compile_time"] == 0, "a graph compiled during a timed call: warm the engine up first"
    return {"prefill_s": s["prefill_time"], "prefill_tokens": s["prefill_tokens"], "decode_s": s["decode_time"],
            "decode_tokens": len(prompts) * (new_tokens - 1), "drafted": s["drafted"], "accepted": s["accepted"],
            "accepted_at": [x - y for x, y in zip(engine.accepted_at, accepted_at)]}


def make_engine(model, batch: int, max_len: int, compile: bool, speculative: bool = False, k: int = 1,
                temperature: float = 0.0, all_buckets: bool = False) -> tuple[Engine, float]:
    """An engine, warmed up by one short generation at full batch (which compiles the graphs of that batch
    size; `all_buckets`: every bucket, via `Engine.warmup`, for rows whose requests end at different steps):
    (engine, seconds its compilation took)."""
    engine = Engine(model, max_batch=batch, max_len=max_len, speculative=speculative, draft_tokens=k,
                    compile=compile)
    seconds = engine.warmup() if all_buckets else 0.0
    prompt = [[1] * 8] * batch
    engine.generate(prompt, SamplingParams(max_new_tokens=4, temperature=temperature, seed=0))
    return engine, seconds + engine.stats["compile_time"]


def run_form(model, prompt: list[int], new_tokens: int, absorb: bool) -> dict:
    """Batch-1 greedy decode of `new_tokens` after `prompt` through the model's cached forward with the given
    attention form: prefill and decode seconds and token counts."""
    cache = model.new_cache(1, len(prompt) + new_tokens + 1)
    with torch.no_grad():
        t0 = time.perf_counter()
        logits = model(torch.tensor([prompt]), cache=cache, mtp=False).logits
        t1 = time.perf_counter()
        pos = len(prompt)
        for _ in range(new_tokens - 1):
            token = logits[:, -1].argmax(-1, keepdim=True)  # [1, 1]
            logits = model(token, cache=cache, start_pos=pos, absorb=absorb, mtp=False).logits
            pos += 1
        t2 = time.perf_counter()
    return {"prefill_s": t1 - t0, "prefill_tokens": len(prompt), "decode_s": t2 - t1,
            "decode_tokens": new_tokens - 1}


ROWS = ("batch1", "batch", "long", "prefill")  # the first table's rows, as --only names them


def decode_tps(results: list[dict]) -> list[float]:
    return [r["decode_tokens"] / r["decode_s"] for r in results]


def prefill_tps(results: list[dict]) -> list[float]:
    return [r["prefill_tokens"] / r["prefill_s"] for r in results]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("checkpoint", nargs="?", default=None, help="a checkpoint directory or a training run")
    ap.add_argument("--checkpoint", dest="checkpoint_opt", default=None, help="same as the positional argument")
    ap.add_argument("--data", default="data/shakespeare", help="dataset directory (its val split gives prompts)")
    ap.add_argument("--new-tokens", type=int, default=64, help="tokens generated per decode trial (MTP rows: 2x)")
    ap.add_argument("--repeats", type=int, default=5, help="alternating rounds per row")
    ap.add_argument("--passages", type=int, default=16, help="held-out prompts (>= 16 for the batch-16 row)")
    ap.add_argument("--prompt-len", type=int, default=32, help="prompt tokens of the short-context rows")
    ap.add_argument("--long-context", type=int, default=2000, help="prompt tokens of the long-context row")
    ap.add_argument("--prefill-len", type=int, default=512, help="prompt tokens of the prefill row")
    ap.add_argument("--batch", type=int, default=16, help="batch size of the batched row")
    ap.add_argument("--max-draft", type=int, default=3, help="MTP rows for k = 1..this many chained drafts")
    ap.add_argument("--spec-batch", type=int, default=8, help="batch size of the sampled MTP row")
    ap.add_argument("--stream-mb", type=float, default=256, help="MiB of the fp32 buffer summed for the bandwidth")
    ap.add_argument("--form-contexts", default="2000,4000,8000",
                    help="contexts (tokens) of the absorbed-vs-naive rows; empty to skip them")
    ap.add_argument("--only-forms", action="store_true", help="run only the absorbed-vs-naive rows")
    ap.add_argument("--only", nargs="+", choices=ROWS, help="run only these rows of the first table (batch1, "
                    "batch, long: the long-context row, prefill), neither the form rows nor the MTP rows")
    args = ap.parse_args()
    keep_freed_memory()
    transformers.logging.set_verbosity_error()  # its load report lists the MTP tensors it does not use
    transformers.logging.disable_progress_bar()
    ckpt = resolve_checkpoint(args.checkpoint or args.checkpoint_opt or "runs/demo")
    if args.passages < args.batch:
        raise SystemExit(f"--passages ({args.passages}) must be at least --batch ({args.batch})")
    n = args.new_tokens
    short = passages(args.data, args.passages, args.prompt_len)
    long = passages(args.data, args.passages, args.long_context)
    pre = passages(args.data, args.passages, args.prefill_len)

    bw = stream_bandwidth(args.stream_mb)
    rows = []  # (label, hf results, ours results, roofline tok/s or None)
    with tempfile.TemporaryDirectory() as tmp:
        form_contexts = [int(c) for c in args.form_contexts.split(",") if c and not args.only]
        ctx = max(args.long_context, args.prefill_len, args.prompt_len, *form_contexts) + 2 * n + 8
        long_ckpt = with_context(ckpt, Path(tmp), ctx)
        ours = dsv3.load_pretrained(long_ckpt).eval()
        kwargs = {"dtype": torch.float32, "attn_implementation": "sdpa", "experts_implementation": "grouped_mm"}
        hf = transformers.DeepseekV3ForCausalLM.from_pretrained(long_ckpt, **kwargs).eval()
        cfg = ours.config
        report = count_parameters(cfg)
        weight_bytes = 4 * (report.activated - report.main["embedding"])
        latent_bytes, _ = report.kv_bytes_per_token(4)
        print(f"{ckpt}: {report.activated / 1e6:.2f}M active parameters/token; fp32, "
              f"{torch.get_num_threads()} threads; transformers {transformers.__version__} "
              f"(attention {hf.config._attn_implementation}, experts "
              f"{getattr(hf.config, '_experts_implementation', 'n/a')}); {args.repeats} alternating rounds, "
              f"{n} new tokens")
        print(f"roofline: stream bandwidth {bw / 1e9:.1f} GB/s (best sum of {args.stream_mb:g} MiB of fp32); "
              f"{weight_bytes / 2**20:.1f} MiB active weights/token -> batch-1 decode step >= "
              f"{weight_bytes / bw * 1e3:.3f} ms ({bw / weight_bytes:.0f} tok/s)", flush=True)

        settings = (("batch 1", short, 1, n, weight_bytes + latent_bytes * (args.prompt_len + n / 2)),
                    (f"batch {args.batch}", short, args.batch, n, None),
                    (f"batch 1, {args.long_context / 1000:g}K context", long, 1, n,
                     weight_bytes + latent_bytes * (args.long_context + n / 2)),
                    (f"prefill, {args.prefill_len}-token prompts", pre, 1, 1, None))
        settings = [row for key, row in zip(ROWS, settings, strict=True) if not args.only or key in args.only]
        for label, prompts, batch, new, step_bytes in settings if not args.only_forms else ():
            def pick(r, prompts=prompts, batch=batch):  # round r's prompts: passage r, or the first `batch`
                return [prompts[r % len(prompts)]] if batch == 1 else prompts[:batch]

            max_len = len(prompts[0]) + new + 2
            systems = {"dsv3": make_engine(ours, batch, max_len, compile=False)[0]}
            compile_s = None
            if new > 1:  # decode rows: also the compiled step
                systems["dsv3 compiled"], compile_s = make_engine(ours, batch, max_len, compile=True)
            run_hf(hf, pick(0), min(new, 4))  # warm-up
            trials = {"transformers": lambda r, pick=pick, new=new: run_hf(hf, pick(r), new)}
            for name, engine in systems.items():
                run_ours(engine, pick(0), min(new, 4))
                trials[name] = lambda r, pick=pick, new=new, engine=engine: run_ours(engine, pick(r), new)
            res = alternating(trials, args.repeats)
            roof = bw / step_bytes if step_bytes else None
            rows.append((label, res, roof, compile_s))
            h = res["transformers"]
            if new > 1:
                cells = " | ".join(f"{name} {spread(decode_tps(res[name]))} "
                                   f"({statistics.median(pair_ratios(decode_tps(res[name]), decode_tps(h))):.2f}x)"
                                   for name in systems)
                print(f"{label:>28}: decode tok/s transformers {spread(decode_tps(h))} | {cells}   "
                      f"(compile {compile_s:.0f} s)", flush=True)
            else:
                o = res["dsv3"]
                print(f"{label:>28}: prefill tok/s transformers {spread(prefill_tps(h), '.0f')} | dsv3 "
                      f"{spread(prefill_tps(o), '.0f')} | "
                      f"{statistics.median(pair_ratios(prefill_tps(o), prefill_tps(h))):.2f}x", flush=True)

        form_rows = []  # (context, results of transformers / absorbed / naive)
        for length in form_contexts:
            (prompt,) = passages(args.data, 1, length)
            run_hf(hf, [prompt], 2)  # warm-up
            res = alternating({"transformers": lambda r, p=prompt: run_hf(hf, [p], n),
                               "absorbed": lambda r, p=prompt: run_form(ours, p, n, True),
                               "naive": lambda r, p=prompt: run_form(ours, p, n, False)}, args.repeats)
            form_rows.append((length, res))
            print(f"{length:>6}-token context: decode tok/s " + " | ".join(
                f"{k} {spread(decode_tps(v))}" for k, v in res.items()), flush=True)

    model = ours  # the same weights (only its position limit was raised)
    spec_rows = []  # (label, plain results, speculative results, k, compile seconds)
    if args.only_forms or args.only:
        pass
    elif model.config.num_nextn_predict_layers >= 1:
        # batch 1 greedy, compiled, k = 1..max: the plain compiled step against each speculative one
        max_len = args.prompt_len + 2 * n + 2 + args.max_draft
        one = lambda r: [short[r % len(short)]]  # noqa: E731
        plain, _ = make_engine(model, 1, max_len, compile=True)
        trials = {"plain": lambda r: run_ours(plain, one(r), 2 * n)}
        compile_s = {}
        for k in range(1, args.max_draft + 1):
            engine, compile_s[k] = make_engine(model, 1, max_len, compile=True, speculative=True, k=k)
            trials[f"k={k}"] = lambda r, engine=engine: run_ours(engine, one(r), 2 * n)
        res = alternating(trials, args.repeats)
        for k in range(1, args.max_draft + 1):
            spec_rows.append((f"MTP k={k}, batch 1 greedy, compiled", res["plain"], res[f"k={k}"], k, compile_s[k]))
        # batch 8, temperature 0.8, eager (requests end at different steps: every bucket would need compiling)
        eight = lambda r: [short[(r + i) % len(short)] for i in range(args.spec_batch)]  # noqa: E731
        max_len = args.prompt_len + n + 2 + args.max_draft
        plain8, _ = make_engine(model, args.spec_batch, max_len, compile=False, temperature=0.8)
        spec8, _ = make_engine(model, args.spec_batch, max_len, compile=False, speculative=True, temperature=0.8)
        res8 = alternating({"plain": lambda r: run_ours(plain8, eight(r), n, temperature=0.8),
                            "spec": lambda r: run_ours(spec8, eight(r), n, temperature=0.8)}, args.repeats)
        spec_rows.append((f"MTP k=1, batch {args.spec_batch}, temperature 0.8, eager", res8["plain"], res8["spec"],
                          1, None))
        for label, p, sp, k, _ in spec_rows:
            acc = sum(r["accepted"] for r in sp) / max(1, sum(r["drafted"] for r in sp))
            steps = sum(r["drafted"] for r in sp) / k  # verifications
            per_pos = [sum(r["accepted_at"][i] for r in sp) / steps for i in range(k)]
            print(f"{label:>40}: decode tok/s plain {spread(decode_tps(p))} | speculative {spread(decode_tps(sp))}"
                  f" | {statistics.median(pair_ratios(decode_tps(sp), decode_tps(p))):.2f}x; acceptance {acc:.1%}, "
                  f"per draft position {', '.join(f'{x:.0%}' for x in per_pos)}; tokens per verification "
                  f"{1 + sum(per_pos):.2f}", flush=True)
    else:
        print("MTP speculation: skipped, the checkpoint has no MTP module")

    print(f"\nmedian (min-max) of {args.repeats} alternating rounds; speedup = median of per-round ratios; "
          f"roofline = stream bandwidth {bw / 1e9:.1f} GB/s / active fp32 weight (+ latent cache) bytes per step\n")
    if rows:
        print("| setting | transformers tok/s | dsv3 eager tok/s | dsv3 compiled tok/s | eager / transformers | "
              "compiled / transformers | compiled / batch-1 roofline | compile s |")
        print("|---|---|---|---|---|---|---|---|")
    for label, res, roof, compile_s in rows:
        h, o = res["transformers"], res["dsv3"]
        f = decode_tps if h[0]["decode_tokens"] else prefill_tps
        fmt = ".1f" if f is decode_tps else ".0f"
        c = res.get("dsv3 compiled")
        roof_cell = f"{statistics.median(f(c)) / roof:.1%} of {roof:.0f}" if roof and c else ""
        comp = (f"{spread(f(c), fmt)} | {statistics.median(pair_ratios(f(c), f(h))):.2f}x" if c else " | ")
        print(f"| {label} | {spread(f(h), fmt)} | {spread(f(o), fmt)} | {comp.split(' | ')[0]} | "
              f"{statistics.median(pair_ratios(f(o), f(h))):.2f}x | {comp.split(' | ')[1]} | {roof_cell} | "
              f"{f'{compile_s:.0f}' if compile_s else ''} |")
    if form_rows:
        print("\n| batch-1 decode, context | transformers tok/s | dsv3 absorbed tok/s | dsv3 naive tok/s | "
              "absorbed / naive | absorbed / transformers |")
        print("|---|---|---|---|---|---|")
        for length, res in form_rows:
            h, a, v = (decode_tps(res[k]) for k in ("transformers", "absorbed", "naive"))
            print(f"| {length / 1000:g}K | {spread(h)} | {spread(a)} | {spread(v)} | "
                  f"{statistics.median(pair_ratios(a, v)):.2f}x | {statistics.median(pair_ratios(a, h)):.2f}x |")
    if spec_rows:
        print("\n| speculation | plain tok/s | speculative tok/s | speedup | acceptance (per draft position) | "
              "target 0.8 x tokens per verification | compile s |")
        print("|---|---|---|---|---|---|---|")
        for label, p, sp, k, compile_s in spec_rows:
            steps = sum(r["drafted"] for r in sp) / k
            per_pos = [sum(r["accepted_at"][i] for r in sp) / steps for i in range(k)]
            acc = sum(r["accepted"] for r in sp) / max(1, sum(r["drafted"] for r in sp))
            print(f"| {label} | {spread(decode_tps(p))} | {spread(decode_tps(sp))} | "
                  f"{statistics.median(pair_ratios(decode_tps(sp), decode_tps(p))):.2f}x | {acc:.0%} "
                  f"({', '.join(f'{x:.0%}' for x in per_pos)}) | {0.8 * (1 + sum(per_pos)):.2f}x | "
                  f"{f'{compile_s:.0f}' if compile_s else ''} |")

if __name__ == "__main__":
    main()
