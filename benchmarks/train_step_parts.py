"""What each of the compiled training step's non-GEMM changes buys (issue 13): the `dsv3 train --compile` step of a
`small` model without MTP, shipped, against the same step with one part put back as it was, in one process on the
same weights and batch:
- "SDPA attention": `MLA` attends through SDPA's CPU flash kernel instead of `block_causal_attention`
  (`mla.BLOCK_CAUSAL_MAX_LEN` set to 0 around the step);
- "experts' dispatch eager": the routed experts' whole sort-by-expert dispatch runs eagerly between two graphs (a
  `RoutedExperts` whose `grouped` is `torch.compiler.disable`d) instead of only their two grouped GEMMs;
- "loss through F.cross_entropy": torch's loss (its log-softmax, and an exp in its backward) instead of
  `dsv3.train.losses.cross_entropy` (which keeps the softmax).
Each variant is its own compiled copy of the model; they alternate, the first rotating every round; step times are
medians (min-max), ratios medians of per-round ratios (variant step time / shipped step time). The allocator is set
as `dsv3 train` sets it.

    OMP_NUM_THREADS=1 python benchmarks/train_step_parts.py [--batch 8] [--seq 256] [--repeats 7] [--threads 1]
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
import dsv3  # noqa: E402
from _timing import alternating, pair_ratios, spread  # noqa: E402
from dsv3.allocator import keep_freed_memory  # noqa: E402
from dsv3.model import mla  # noqa: E402
from dsv3.model.moe import RoutedExperts  # noqa: E402
from dsv3.train.losses import lm_loss  # noqa: E402
from dsv3.train.trainer import compile_layers  # noqa: E402


class EagerDispatchExperts(RoutedExperts):
    """The routed experts with their whole dispatch kept out of `torch.compile`, as before the shipped change."""

    @torch.compiler.disable
    def grouped(self, x, topk_idx, topk_weight):
        return super().grouped(x, topk_idx, topk_weight)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=7, help="alternating rounds")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    keep_freed_memory()
    cfg = dsv3.get_config("small").replace(num_nextn_predict_layers=0)
    shipped = dsv3.DeepseekV3(cfg)
    shipped.init_weights(seed=0)
    models = {name: copy.deepcopy(shipped) for name in ("SDPA attention", "experts' dispatch eager",
                                                         "loss through F.cross_entropy")}
    models = {"shipped": shipped, **models}
    for module in models["experts' dispatch eager"].modules():
        if type(module) is RoutedExperts:
            module.__class__ = EagerDispatchExperts
    for model in models.values():
        compile_layers(model)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), generator=torch.Generator().manual_seed(0))
    limit = mla.BLOCK_CAUSAL_MAX_LEN

    def step(name: str) -> float:
        model = models[name]
        mla.BLOCK_CAUSAL_MAX_LEN = 0 if name == "SDPA attention" else limit
        try:
            start = time.perf_counter()
            logits = model(ids[:, :-1], mtp=False).logits
            if name == "loss through F.cross_entropy":
                loss = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
            else:
                loss = lm_loss(logits, ids)
            loss.backward()
            seconds = time.perf_counter() - start
        finally:
            mla.BLOCK_CAUSAL_MAX_LEN = limit
        model.zero_grad(set_to_none=True)
        return seconds

    start = time.perf_counter()
    for name in models:
        step(name)  # compiles
    print(f"small without MTP, batch {args.batch}x{args.seq}, fp32, {torch.get_num_threads()} threads, compiled "
          f"layers ({time.perf_counter() - start:.0f} s to compile all variants), {args.repeats} alternating rounds")
    runs = alternating({name: (lambda _round, name=name: {"s": step(name)}) for name in models}, args.repeats)
    secs = {name: [r["s"] for r in rows] for name, rows in runs.items()}
    print("\n| variant | step s | step time / shipped |\n|---|---|---|")
    for name, times in secs.items():
        ratio = "" if name == "shipped" else f"{spread(pair_ratios(times, secs['shipped']), '.3f')}x"
        print(f"| {name} | {spread(times, '.3f')} | {ratio} |")


if __name__ == "__main__":
    main()
