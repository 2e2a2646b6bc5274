"""llama.cpp against dsv3 on the same weights: the exported GGUF file runs in llama.cpp (llama-cpp-python) and gives
dsv3's tokens, logits and tokenization; then batch-1 greedy decode speed, both in one process.

    pip install llama-cpp-python==0.3.36     # builds llama.cpp from source: ~30-60 min on 2 cores; not in make test
    python benchmarks/vs_llama_cpp.py RUN_OR_CHECKPOINT [--work DIR] [--new-tokens 64] [--repeats 3]

What it does, in order:
1. exports the checkpoint with `dsv3 convert --format gguf --dtype fp32` (into --work; an existing file there is
   reused) and loads it in llama.cpp with an f32 KV cache (`type_k` / `type_v` = GGML_TYPE_F32), `logits_all`,
   no flash attention, `--threads` threads for both systems (default: torch's);
2. tokenization: llama.cpp's tokenizer (from the file's vocabulary and merges) against dsv3's on the prompt text;
3. logits: every prompt position's logits, llama.cpp (`Llama.eval` over the prompt ids) against dsv3's model
   forward, max |difference| (the issue's bar: 1e-3 at the first position);
4. greedy continuation: `--new-tokens` tokens, argmax of llama.cpp's logits one `eval` per token, against dsv3's
   engine at temperature 0; the first divergence (if any) is printed with both top-2 logit gaps;
5. speed: `--repeats` alternating rounds of the same greedy decode (llama.cpp; dsv3 eager; dsv3 with the compiled
   decode step), decode tokens/s from the first generated token to the last, medians and same-round ratios.
The llama.cpp version is printed (llama-cpp-python's, and the vendored llama.cpp commit whose conventions the
exporter follows, `dsv3.gguf_export.LLAMA_CPP_COMMIT`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from _timing import alternating, pair_ratios, spread
from dsv3.checkpoint import load_pretrained
from dsv3.gguf_export import LLAMA_CPP_COMMIT, export_gguf
from dsv3.infer import Engine, SamplingParams
from dsv3.runs import resolve_checkpoint
from dsv3.tokenizer import load_tokenizer

PROMPT = ("KING. What say you, my lord? Speak, and let the court hear it.\n"
          "LORD. My gracious liege, the night is cold and the day")


def llama_model(path: Path, n_ctx: int, threads: int):
    """The GGUF file loaded in llama.cpp with f32 weights (as stored) and an f32 KV cache."""
    try:
        import llama_cpp
    except ImportError:
        sys.exit("llama-cpp-python is not installed: pip install llama-cpp-python==0.3.36 (it compiles llama.cpp)")
    f32 = 0  # GGML_TYPE_F32
    return llama_cpp, llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx,
                                      n_threads=threads, n_threads_batch=threads, logits_all=True, type_k=f32,
                                      type_v=f32, flash_attn=False, verbose=False)


def llama_greedy(llm, prompt: list[int], new_tokens: int) -> dict:
    """Prompt, then `new_tokens` argmax tokens one eval each: the tokens, the prompt logits, decode seconds."""
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(prompt)
    prompt_logits = np.array(llm.scores[: len(prompt)], dtype=np.float64)
    out = [int(np.argmax(llm.scores[len(prompt) - 1]))]
    t1 = time.perf_counter()
    for _ in range(new_tokens - 1):
        llm.eval([out[-1]])
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
    t2 = time.perf_counter()
    return {"tokens": out, "prompt_logits": prompt_logits, "prefill_s": t1 - t0, "decode_s": t2 - t1,
            "decode_tokens": new_tokens - 1}


def dsv3_greedy(engine: Engine, prompt: list[int], new_tokens: int) -> dict:
    before = dict(engine.stats)
    (req,) = engine.generate([prompt], SamplingParams(max_new_tokens=new_tokens, temperature=0.0, seed=0))
    s = {k: v - before[k] for k, v in engine.stats.items()}
    assert s["compile_time"] == 0, "a graph compiled during a timed call: warm the engine up first"
    return {"tokens": list(req.output), "prefill_s": s["prefill_time"], "decode_s": s["decode_time"],
            "decode_tokens": new_tokens - 1}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("--work", default="runs/llama-cpp", help="folder for the exported GGUF file")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(),
                    help="threads for both llama.cpp and torch (default: torch's)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)  # both systems get the same threads

    ckpt = resolve_checkpoint(args.checkpoint)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    gguf_file = work / f"{ckpt.parent.parent.name if ckpt.parent.name == 'checkpoints' else ckpt.name}-f32.gguf"
    if not gguf_file.exists():
        t = time.perf_counter()
        export_gguf(ckpt, gguf_file, "f32")
        print(f"exported {gguf_file} in {time.perf_counter() - t:.1f} s")
    tok = load_tokenizer(ckpt)
    model = load_pretrained(ckpt).eval()
    cfg = model.config
    prompt = tok.encode(PROMPT).ids
    n_ctx = len(prompt) + args.new_tokens + 8
    llama_cpp, llm = llama_model(gguf_file, n_ctx, args.threads)
    print(f"llama-cpp-python {llama_cpp.__version__} (exporter conventions read at llama.cpp {LLAMA_CPP_COMMIT}); "
          f"torch {torch.__version__}, {args.threads} threads; model {ckpt} ({cfg.num_hidden_layers} layers, "
          f"{cfg.n_routed_experts} routed experts, vocab {cfg.vocab_size})")

    # 2. tokenization
    theirs = llm.tokenize(PROMPT.encode(), add_bos=False, special=False)
    print(f"tokenization: {len(prompt)} tokens; llama.cpp's equals dsv3's: {list(theirs) == prompt}")

    # 3. logits over the prompt
    run = llama_greedy(llm, prompt, args.new_tokens)
    with torch.no_grad():
        ours_logits = model(torch.tensor([prompt])).logits[0].double().numpy()
    diff = np.abs(run["prompt_logits"] - ours_logits)
    print(f"logits: first position max |diff| {diff[0].max():.2e}, all {len(prompt)} positions {diff.max():.2e} "
          f"(logit scale {np.abs(ours_logits).max():.2f})")

    # 4. greedy continuation
    eager = Engine(model, max_batch=1, max_len=n_ctx + 8, compile=False)
    compiled = Engine(model, max_batch=1, max_len=n_ctx + 8, compile=True)
    for engine in (eager, compiled):
        engine.generate([prompt[:8]], SamplingParams(max_new_tokens=4, temperature=0.0, seed=0))  # warm / compile
    ours = dsv3_greedy(eager, prompt, args.new_tokens)["tokens"]
    same = next((i for i, (a, b) in enumerate(zip(run["tokens"], ours)) if a != b), None)
    if same is None:
        print(f"greedy: {args.new_tokens} tokens, identical")
    else:
        print(f"greedy: first divergence at token {same} (llama.cpp {run['tokens'][same]}, dsv3 {ours[same]})")

    # 5. decode speed, alternating rounds
    results = alternating({
        "llama.cpp": lambda r: llama_greedy(llm, prompt, args.new_tokens),
        "dsv3 eager": lambda r: dsv3_greedy(eager, prompt, args.new_tokens),
        "dsv3 compiled": lambda r: dsv3_greedy(compiled, prompt, args.new_tokens),
    }, args.repeats)
    tps = {k: [x["decode_tokens"] / x["decode_s"] for x in v] for k, v in results.items()}
    print(f"\nbatch-1 greedy decode, {len(prompt)}-token prompt, {args.new_tokens} new tokens, {args.repeats} rounds "
          f"(median (min-max)):")
    print("| system | decode tok/s | vs llama.cpp (same-round median) |\n|---|---|---|")
    for name, values in tps.items():
        ratio = statistics.median(pair_ratios(values, tps["llama.cpp"]))
        print(f"| {name} | {spread(values)} | {ratio:.2f}x |")
    print(json.dumps({"tokens_equal": same is None, "first_divergence": same,
                      "first_position_max_abs_diff": float(diff[0].max()), "all_positions_max_abs_diff": float(
                          diff.max()), "decode_tps": {k: statistics.median(v) for k, v in tps.items()}}))
    llm.close()  # free the model now: at interpreter exit llama-cpp-python's finaliser finds its library unloaded


if __name__ == "__main__":
    main()
