"""Where a training step's time goes (issue 13): `torch.profiler` over one forward + backward of dsv3 (random
weights), the operators' own CPU time grouped into GEMMs, attention, the cross-entropy's softmax, the routed
experts' bookkeeping and the element-wise rest, with and without the MTP module. The allocator is set as `dsv3 train`
sets it (`dsv3.allocator`).

    OMP_NUM_THREADS=1 python benchmarks/train_profile.py [--model-config small] [--batch 8] [--seq 256] [--threads 1]
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

import dsv3
from dsv3.allocator import keep_freed_memory
from dsv3.train.losses import lm_loss, mtp_losses

GROUPS = {  # aten operator (self time) -> group; anything else is "element-wise and other"
    "GEMMs (mm, bmm, addmm, grouped_mm)": ("aten::mm", "aten::bmm", "aten::addmm", "aten::_grouped_mm"),
    "attention outside its GEMMs (SDPA flash; the blocks' softmax backward)": (
        "aten::_scaled_dot_product_flash_attention_for_cpu",
        "aten::_scaled_dot_product_flash_attention_for_cpu_backward", "aten::_softmax_backward_data"),
    "cross-entropy (softmax, its maxima; log-softmax and exp under F.cross_entropy)": (
        "aten::_softmax", "aten::amax", "aten::_log_softmax", "aten::exp", "aten::_log_softmax_backward_data",
        "aten::nll_loss_forward", "aten::nll_loss_backward"),
    "routing and dispatch (topk, sort, index, scatter, bincount)": (
        "aten::topk", "aten::sort", "aten::argsort", "aten::index", "aten::index_select", "aten::_index_put_impl_",
        "aten::scatter_add_", "aten::bincount", "aten::gather", "aten::scatter", "aten::index_add_"),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-config", default="small")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    keep_freed_memory()  # as `dsv3 train` runs
    if args.threads:
        torch.set_num_threads(args.threads)
    base = dsv3.get_config(args.model_config)
    x = torch.randint(0, base.vocab_size, (args.batch, args.seq + 1), generator=torch.Generator().manual_seed(0))
    print(f"{args.model_config}, batch {args.batch} x {args.seq}, {torch.get_num_threads()} threads; self CPU time "
          "per group, ms (share)")
    for mtp in (False, True):
        cfg = base if mtp else base.replace(num_nextn_predict_layers=0)
        model = dsv3.DeepseekV3(cfg)
        model.init_weights(seed=0)
        model.train()

        def step(model=model):
            out = model(x[:, :-1])
            loss = lm_loss(out.logits, x)
            if out.mtp_logits:
                loss = loss + 0.1 * sum(mtp_losses(out.mtp_logits, x, None))
            loss.backward()
            model.zero_grad(set_to_none=True)

        for _ in range(2):  # warm-up
            step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        total = 0.0
        spent: dict[str, float] = defaultdict(float)
        for event in prof.key_averages():
            if not event.key.startswith("aten::"):
                continue  # autograd nodes and python wrappers: their work is in the aten ops they call
            ms = event.self_cpu_time_total / 1e3
            total += ms
            group = next((g for g, ops in GROUPS.items() if event.key in ops), "element-wise and other")
            spent[group] += ms
        print(f"{'with' if mtp else 'without'} MTP: {total:.0f} ms of aten self time")
        for group in [*GROUPS, "element-wise and other"]:
            print(f"  {group:<60} {spent[group]:7.0f} ({spent[group] / total:.0%})")


if __name__ == "__main__":
    main()
