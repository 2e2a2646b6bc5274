"""Decode speed, dsv3 vs Hugging Face transformers `generate`, same weights, same prompts, one run.

Rows: batch 1 and batch 16 with short prompts, batch 1 at a 2K-token context; then dsv3 with and without MTP
speculative decoding (greedy, batch 1) on the given checkpoint (default: the one `make demo` trains).
Decode throughput excludes the prefill for both systems: each call is timed for N new tokens and for 1 new token
(which is the prefill plus its first token), and decode tokens/s = batch x (N - 1) / (t_N - t_1). Greedy
decoding, fp32, no early stop (transformers gets min_new_tokens = max_new_tokens; dsv3 gets no stop token).

    python benchmarks/decode_speed.py [--checkpoint runs/demo] [--new-tokens 64]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch
import transformers

import dsv3
from dsv3.infer import Engine, SamplingParams
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


def prompts_from(data_dir: str, batch: int, length: int) -> list[list[int]]:
    val = TokenData(data_dir, "val")
    return [val.ids[i * 997 : i * 997 + length].astype("int64").tolist() for i in range(batch)]


def time_hf(model, prompts, new_tokens) -> float:
    ids = torch.tensor(prompts)
    t = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    dt = time.perf_counter() - t
    assert out.shape[1] == ids.shape[1] + new_tokens
    return dt


def time_ours(model, prompts, new_tokens, speculative=False) -> tuple[float, Engine]:
    engine = Engine(model, max_batch=len(prompts), max_len=len(prompts[0]) + new_tokens + 2,
                    speculative=speculative)
    t = time.perf_counter()
    reqs = engine.generate(prompts, SamplingParams(max_new_tokens=new_tokens, temperature=0))
    dt = time.perf_counter() - t
    assert all(len(r.output) == new_tokens for r in reqs)
    return dt, engine


def run_hf(model, prompts, new_tokens) -> float:
    """Decode tokens/s, prefill excluded."""
    return len(prompts) * (new_tokens - 1) / (time_hf(model, prompts, new_tokens) - time_hf(model, prompts, 1))


def run_ours(model, prompts, new_tokens, speculative=False) -> tuple[float, Engine]:
    t_n, engine = time_ours(model, prompts, new_tokens, speculative)
    t_1, _ = time_ours(model, prompts, 1, speculative)
    return len(prompts) * (new_tokens - 1) / (t_n - t_1), engine


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", default="runs/demo")
    ap.add_argument("--data", default="data/shakespeare")
    ap.add_argument("--new-tokens", type=int, default=64)
    args = ap.parse_args()
    ckpt = resolve_checkpoint(args.checkpoint)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        long_ckpt = with_context(ckpt, Path(tmp), 4096)
        ours = dsv3.load_pretrained(long_ckpt).eval()
        hf = transformers.DeepseekV3ForCausalLM.from_pretrained(long_ckpt, dtype=torch.float32,
                                                                attn_implementation="sdpa").eval()
        for label, batch, length in (("batch 1", 1, 32), ("batch 16", 16, 32), ("batch 1, 2K context", 1, 2000)):
            prompts = prompts_from(args.data, batch, length)
            run_ours(ours, prompts, 4)  # warm-up
            run_hf(hf, prompts, 4)
            ours_tps, _ = run_ours(ours, prompts, args.new_tokens)
            hf_tps = run_hf(hf, prompts, args.new_tokens)
            rows.append((label, hf_tps, ours_tps))
            print(f"{label:>20}: transformers {hf_tps:7.1f} tok/s | dsv3 {ours_tps:7.1f} tok/s | "
                  f"{ours_tps / hf_tps:.2f}x", flush=True)
    model = dsv3.load_pretrained(ckpt).eval()
    prompts = prompts_from(args.data, 1, 32)
    plain, _ = run_ours(model, prompts, args.new_tokens * 2)
    spec, engine = run_ours(model, prompts, args.new_tokens * 2, speculative=True)
    print(f"{'MTP speculation':>20}: plain {plain:7.1f} tok/s | speculative {spec:7.1f} tok/s | "
          f"{spec / plain:.2f}x, acceptance {engine.acceptance_rate:.1%}")
    print("\n| setting | transformers tok/s | dsv3 tok/s | speedup |\n|---|---|---|---|")
    for label, h, o in rows:
        print(f"| {label} | {h:.1f} | {o:.1f} | {o / h:.2f}x |")
    print(f"| MTP speculative decoding, batch 1 (vs dsv3 plain {plain:.1f}) | | {spec:.1f} | {spec / plain:.2f}x "
          f"(acceptance {engine.acceptance_rate:.0%}) |")


if __name__ == "__main__":
    main()
