"""Training speed, dsv3 vs Hugging Face transformers, on the same weights, batch and machine, in one run.

Both models run forward + backward (+ no optimizer) on identical inputs; timings alternate between the two so
that this machine's speed drift hits both equally. dsv3 computes its MTP head too unless --no-mtp (transformers
has no MTP training), so by default dsv3 does strictly more work per step.

    python benchmarks/train_speed.py [--preset small] [--batch 8] [--seq 256] [--steps 8]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F
import transformers

import dsv3


def hf_config(cfg: dsv3.ModelConfig) -> transformers.DeepseekV3Config:
    d = cfg.to_dict()
    d["num_mtp_layers"] = 0
    d.pop("num_nextn_predict_layers", None)
    return transformers.DeepseekV3Config(**{k: v for k, v in d.items() if k not in ("rope_scaling", "rope_theta")},
                                         rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--no-mtp", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    cfg = dsv3.get_config(args.preset)
    hf = transformers.DeepseekV3ForCausalLM._from_config(hf_config(cfg), attn_implementation="sdpa").float()
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        ours = dsv3.load_pretrained(tmp)
    if not args.no_mtp:  # add an MTP module (random init) so dsv3 trains the full V3 objective
        full = dsv3.DeepseekV3(cfg)
        full.load_state_dict(ours.state_dict(), strict=False)
        ours = full
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1))

    def step_hf():
        logits = hf(input_ids=ids[:, :-1]).logits
        F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).backward()
        hf.zero_grad(set_to_none=True)

    def step_ours():
        out = ours(ids[:, :-1])
        loss = F.cross_entropy(out.logits.flatten(0, 1), ids[:, 1:].flatten())
        for k, m in enumerate(out.mtp_logits, start=1):
            loss = loss + 0.3 * F.cross_entropy(m.flatten(0, 1), ids[:, k + 1 :].flatten())
        loss.backward()
        ours.zero_grad(set_to_none=True)

    times = {"transformers": [], "dsv3": []}
    for fn in (step_hf, step_ours):
        fn()  # warm-up
    for _ in range(args.steps):
        for name, fn in (("transformers", step_hf), ("dsv3", step_ours)):
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    tokens = args.batch * args.seq
    tps = {k: tokens / statistics.median(v) for k, v in times.items()}
    print(f"config {args.preset}, batch {args.batch}x{args.seq}, fp32, {torch.get_num_threads()} threads, "
          f"forward+backward, median of {args.steps}; dsv3 {'with' if not args.no_mtp else 'without'} MTP")
    for name, v in tps.items():
        print(f"  {name:>12}: {v:8.0f} tokens/s")
    print(f"  dsv3 / transformers = {tps['dsv3'] / tps['transformers']:.2f}x")


if __name__ == "__main__":
    main()
