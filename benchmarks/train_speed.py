"""Training speed, dsv3 vs Hugging Face transformers, on the same weights, batch and machine, in one process.

Each model runs forward + backward (no optimizer) on identical inputs: transformers, dsv3 with its MTP module
(the full V3 objective, strictly more work) and dsv3 without it, each eager and with its decoder layers compiled
(`dsv3 train --compile`, `compile_layers`; the compile time is printed), plus dsv3 without MTP computing its loss
through `F.cross_entropy` instead of its own (`dsv3.train.losses.cross_entropy`). They alternate, the first one
rotating every round, `--repeats` rounds; step times are medians with their min-max spread, ratios medians of
per-round ratios.

The primary figure is achieved model FLOP/s / shape-matched GEMM FLOP/s, where
- model FLOP/s = `dsv3.params.training_flops_per_token` (6 x active matmul parameters + causal attention, the
  MFU numerator used everywhere in dsv3) x tokens / median step time;
- shape-matched GEMM FLOP/s is what this machine's plain `torch.matmul` achieves on exactly the GEMMs the model
  runs: every matrix product of one dsv3 forward + backward step is recorded as it is dispatched (q_a/q_b,
  kv_a/kv_b, o_proj, dense and shared SwiGLU, router, each routed expert's gate/up/down at the token count it was
  routed, MTP eh_proj, the head; data and weight gradients alike), each distinct shape timed best-of-N as
  `torch.matmul(a, b)` here, and total GEMM FLOPs / the FLOP-weighted sum of those best times. dsv3's attention
  runs on CPU as batched GEMMs over causal query blocks (`dsv3.model.mla.block_causal_attention`), so its score
  and value products are among the recorded shapes ("batched" below), the masked halves of the diagonal blocks
  included, which the model FLOPs do not count; transformers' runs inside SDPA's fused flash kernel.
So 100% means the step ran at the speed of its own GEMMs with nothing else costing time; it is reported for
dsv3 with and without MTP (each against its own shapes, compiled or not) and for transformers (against the
no-MTP shapes). The denominator is timed in two ways: once, after all the rounds (as earlier versions of this
script did: the median step time over a best-of-N taken at another moment), and per round, as one more trial in
the alternation that times every shape afresh, so that each round's steps are divided by GEMMs timed minutes
apart at most; the per-round ratios' median (min-max) is the steadier figure on a machine whose speed drifts.

The process's allocator is set as `dsv3 train` sets it (`dsv3.allocator.keep_freed_memory`: large blocks
reuse freed memory instead of fresh pages each step), for all the systems alike, transformers and the GEMMs timed
alone included; `--malloc default` leaves glibc's default, to measure what that setting buys.

    python benchmarks/train_speed.py [--model-config small] [--batch 8] [--seq 256] [--repeats 8] [--malloc default]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from collections import Counter

import torch
import torch.nn.functional as F
import transformers
from torch.utils._python_dispatch import TorchDispatchMode

import dsv3
from _timing import alternating, best_of, pair_ratios, spread
from dsv3.allocator import keep_freed_memory
from dsv3.params import training_flops_per_token
from dsv3.train.losses import lm_loss, mtp_losses
from dsv3.train.trainer import compile_layers

aten = torch.ops.aten


def hf_config(cfg: dsv3.ModelConfig) -> transformers.DeepseekV3Config:
    d = cfg.to_dict()
    d["num_mtp_layers"] = 0
    d.pop("num_nextn_predict_layers", None)
    return transformers.DeepseekV3Config(**{k: v for k, v in d.items() if k not in ("rope_scaling", "rope_theta")},
                                         rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta})


class GemmRecorder(TorchDispatchMode):
    """Counts every matrix product dispatched while active, as (batch, m, k, n) -> calls: mm, addmm, bmm,
    baddbmm, and torch's grouped GEMM split into its groups (empty groups dropped)."""

    def __init__(self):
        super().__init__()
        self.shapes: Counter[tuple[int, int, int, int]] = Counter()

    def _add(self, b: int, m: int, k: int, n: int) -> None:
        if b and m and k and n:
            self.shapes[(b, m, k, n)] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        op = func.overloadpacket
        if op is aten.mm:
            (m, k), n = args[0].shape, args[1].shape[1]
            self._add(1, m, k, n)
        elif op is aten.addmm:
            (m, k), n = args[1].shape, args[2].shape[1]
            self._add(1, m, k, n)
        elif op in (aten.bmm, aten.baddbmm):
            a, b = (args[0], args[1]) if op is aten.bmm else (args[1], args[2])
            self._add(a.shape[0], a.shape[1], a.shape[2], b.shape[2])
        elif op is aten._grouped_mm:
            a, b = args[0], args[1]
            offs = kwargs.get("offs", args[2] if len(args) > 2 else None)
            if a.dim() == 2 and b.dim() == 3 and offs is not None:  # [M, K] rows grouped against [G, K, N]
                ends = offs.tolist()
                for lo, hi in zip([0] + ends[:-1], ends):
                    self._add(1, hi - lo, b.shape[1], b.shape[2])
            elif a.dim() == 3 and b.dim() == 3:
                self._add(a.shape[0], a.shape[1], a.shape[2], b.shape[2])
        return func(*args, **kwargs)


def gemm_flops(shapes: Counter) -> float:
    return sum(2 * b * m * k * n * c for (b, m, k, n), c in shapes.items())


def shape_matched_seconds(shapes: Counter, n: int, cache: dict) -> float:
    """Sum over recorded GEMMs of the best-of-n time of `torch.matmul` of that shape (timed once per shape and
    cache: a fresh cache times every shape again)."""
    total = 0.0
    for (b, m, k, n_), count in shapes.items():
        if (b, m, k, n_) not in cache:
            x = torch.randn(m, k) if b == 1 else torch.randn(b, m, k)
            w = torch.randn(k, n_) if b == 1 else torch.randn(b, k, n_)
            cache[(b, m, k, n_)] = best_of(lambda x=x, w=w: torch.matmul(x, w), n)
        total += count * cache[(b, m, k, n_)]
    return total


GEMMS = "shape-matched GEMMs alone"  # the alternating trial that times the denominator in every round


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model-config", "--preset", dest="model_config", default="small", help="preset or config.json")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--repeats", "--steps", dest="repeats", type=int, default=8, help="alternating rounds")
    ap.add_argument("--gemm-repeats", type=int, default=5, help="best-of-N per distinct GEMM shape")
    ap.add_argument("--malloc", choices=("kept", "default"), default="kept",
                    help="kept: freed memory reused, as `dsv3 train` runs (default); default: glibc's own")
    args = ap.parse_args()
    kept = keep_freed_memory() if args.malloc == "kept" else False
    torch.manual_seed(0)
    cfg = dsv3.get_config(args.model_config)
    hf = transformers.DeepseekV3ForCausalLM._from_config(hf_config(cfg), attn_implementation="sdpa",
                                                         experts_implementation="grouped_mm").float()
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        loaded = dsv3.load_pretrained(tmp)
    ours = dsv3.DeepseekV3(cfg)  # the same weights plus an MTP module (random init): the full V3 objective
    ours.load_state_dict(loaded.state_dict(), strict=False)
    del loaded
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1))

    def step_hf():
        logits = hf(input_ids=ids[:, :-1]).logits
        F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).backward()
        hf.zero_grad(set_to_none=True)

    compiled = copy.deepcopy(ours)  # `dsv3 train --compile`: the same weights, its layers compiled in place
    compile_layers(compiled)

    def step_ours(mtp: bool, model=ours, torch_ce: bool = False):
        out = model(ids[:, :-1], mtp=mtp)  # the losses `dsv3 train` computes (dsv3.train.losses)
        if torch_ce:  # the same loss through F.cross_entropy (what dsv3 used before its own backward)
            loss = F.cross_entropy(out.logits.flatten(0, 1), ids[:, 1:].flatten())
        else:
            loss = lm_loss(out.logits, ids) + 0.3 * sum(mtp_losses(out.mtp_logits or [], ids, eot_id=None), 0.0)
        loss.backward()
        model.zero_grad(set_to_none=True)

    def timed(fn):
        def trial(_round):
            t = time.perf_counter()
            fn()
            return {"s": time.perf_counter() - t}
        return trial

    steps = {"transformers": step_hf, "dsv3 with MTP": lambda: step_ours(True),
             "dsv3 no MTP": lambda: step_ours(False),
             "dsv3 no MTP, F.cross_entropy": lambda: step_ours(False, torch_ce=True),
             "dsv3 with MTP, compiled": lambda: step_ours(True, compiled),
             "dsv3 no MTP, compiled": lambda: step_ours(False, compiled)}
    compiling = 0.0
    for name, fn in steps.items():
        t = time.perf_counter()
        fn()  # warm-up; the first compiled step compiles the layers (MTP's too), the second reuses them
        compiling += time.perf_counter() - t if name.endswith("compiled") else 0.0
    print(f"compiling: {compiling:.1f} s for the two compiled warm-up steps", flush=True)

    shapes = {}
    for name, mtp in (("dsv3 with MTP", True), ("dsv3 no MTP", False)):
        rec = GemmRecorder()
        with rec:
            step_ours(mtp)
        shapes[name] = rec.shapes

    def recorded(name: str) -> str:  # the shape set a step is measured against (transformers: dsv3's without MTP)
        return "dsv3 with MTP" if "with MTP" in name else "dsv3 no MTP"

    def gemms_alone(_round):
        """This round's shape-matched GEMM FLOP/s of both shape sets (every shape timed afresh, best-of-N)."""
        cache: dict = {}
        return {name: gemm_flops(shapes[name]) / shape_matched_seconds(shapes[name], args.gemm_repeats, cache)
                for name in shapes}

    trials = {name: timed(fn) for name, fn in steps.items()}
    trials[GEMMS] = gemms_alone
    res = alternating(trials, args.repeats)
    secs = {name: [r["s"] for r in res[name]] for name in steps}
    # per round: the GEMMs alone timed in the same round as the steps; once: timed again after all the rounds
    per_round = {name: [r[recorded(name)] for r in res[GEMMS]] for name in steps}
    once = gemms_alone(-1)
    matched = {name: once[recorded(name)] for name in steps}

    tokens = args.batch * args.seq
    model_flops = {name: training_flops_per_token(cfg, args.seq, mtp="with MTP" in name)
                   * tokens for name in steps}
    print(f"config {args.model_config}, batch {args.batch}x{args.seq}, fp32, {torch.get_num_threads()} threads, "
          f"forward+backward, {args.repeats} alternating rounds, freed memory {'kept' if kept else 'unmapped'}; "
          f"transformers {transformers.__version__} "
          f"(attention {hf.config._attn_implementation}, experts {hf.config._experts_implementation})")
    for name in ("dsv3 with MTP", "dsv3 no MTP"):
        g = gemm_flops(shapes[name])
        batched = gemm_flops(Counter({s: c for s, c in shapes[name].items() if s[0] > 1}))
        print(f"  {name:>12}: {sum(shapes[name].values())} GEMMs in {len(shapes[name])} shapes, "
              f"{g / tokens / 1e6:.1f} MFLOP/token recorded ({batched / tokens / 1e6:.1f} of it batched: attention)"
              f" vs {model_flops[name] / tokens / 1e6:.1f} by formula; "
              f"shape-matched torch.matmul {matched[name] / 1e9:.2f} GFLOP/s")

    print("\n| model | tokens/s | achieved model GFLOP/s | shape-matched GEMM GFLOP/s, once | achieved / "
          "shape-matched, once | per round: shape-matched GFLOP/s | per round: achieved / shape-matched "
          "| vs transformers |\n|---|---|---|---|---|---|---|---|")
    for name in steps:
        tps = [tokens / s for s in secs[name]]
        achieved = [model_flops[name] / s for s in secs[name]]
        frac = statistics.median(achieved) / matched[name]
        fracs = pair_ratios(achieved, per_round[name])
        vs = statistics.median(pair_ratios(secs["transformers"], secs[name]))
        print(f"| {name} | {spread(tps, '.0f')} | {spread([a / 1e9 for a in achieved], '.2f')} | "
              f"{matched[name] / 1e9:.2f} | {frac:.0%} | {spread([m / 1e9 for m in per_round[name]], '.2f')} | "
              f"{statistics.median(fracs):.0%} ({min(fracs):.0%}-{max(fracs):.0%}) | {vs:.2f}x |")
    print("\n(tokens/s and FLOP/s: median (min-max); 'vs transformers' = median per-round step-time ratio "
          "transformers / this, so with MTP dsv3 also does the MTP module's extra work)")


if __name__ == "__main__":
    main()
