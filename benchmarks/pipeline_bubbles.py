"""Pipeline bubbles measured on gloo with simulated stage costs, next to the DeepSeek-V3 report's formulas.

Each rank runs its real schedule (the same op lists and point-to-point messages as training) but every forward,
backward and weight-gradient chunk is a sleep of a chosen cost (default F=20 ms, B=40 ms, W=20 ms, B including W).
Bubble = wall time - N x (F + B), the busy time of one rank; formulas (F&B = F + B: no comm/compute overlap here):
  1F1B (PP-1)(F+B)   ZB1P (PP-1)(F+B-2W)   DualPipe (PP/2-1)(F&B+B-3W)

    python benchmarks/pipeline_bubbles.py [--pp 4] [--chunks 16]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dsv3.cost import pipeline_bubbles
from dsv3.parallel.pipeline import PipelineRunner, schedule_1f1b, schedule_dualpipe, schedule_dualpipev, schedule_zb1p

SCHEDULES = {"1F1B": schedule_1f1b, "ZB1P": schedule_zb1p, "DualPipe": schedule_dualpipe,
             "DualPipeV": schedule_dualpipev}


def worker(rank, world, init, name, chunks, cost, results):
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    dual = name == "DualPipe"
    runner = PipelineRunner({0: None, 1: None}, rank, world, (1,), dual=dual, cost=cost, v_shape=name == "DualPipeV")
    inputs = {0: [torch.zeros(1)] * chunks, 1: [torch.zeros(1)] * chunks}
    dist.barrier()
    t = time.perf_counter()
    runner.run(SCHEDULES[name](rank, world, chunks), inputs, lambda y, d, i: y.sum())
    dist.barrier()
    results[rank] = time.perf_counter() - t
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pp", type=int, default=4)
    ap.add_argument("--chunks", type=int, default=16)
    ap.add_argument("--f", type=float, default=0.02)
    ap.add_argument("--b", type=float, default=0.04)
    ap.add_argument("--w", type=float, default=0.02)
    args = ap.parse_args()
    cost = {"F": args.f, "B": args.b, "W": args.w}
    formulas = pipeline_bubbles(args.pp, args.chunks, f=args.f, b=args.b, w=args.w)
    busy = args.chunks * (args.f + args.b)
    print(f"PP={args.pp}, {args.chunks} micro-batches, F={args.f * 1e3:.0f} ms, B={args.b * 1e3:.0f} ms, "
          f"W={args.w * 1e3:.0f} ms; busy time per rank {busy:.2f} s\n")
    print("| schedule | measured bubble | formula | measured share of step |\n|---|---|---|---|")
    for name in SCHEDULES:
        # DualPipeV folds the same PP stages onto PP/2 ranks: each rank runs every micro-batch through 2 stages
        ranks = args.pp // 2 if name == "DualPipeV" else args.pp
        rank_busy = busy * (2 if name == "DualPipeV" else 1)
        with tempfile.TemporaryDirectory() as tmp, mp.Manager() as manager:
            results = manager.dict()
            init = f"file://{os.path.join(tmp, 'rdv')}"
            mp.spawn(worker, args=(ranks, init, name, args.chunks, cost, results), nprocs=ranks)
            wall = max(results.values())
        bubble = wall - rank_busy
        formula = formulas["DualPipe" if name == "DualPipeV" else name]["bubble"]
        print(f"| {name} ({ranks} ranks) | {bubble:.3f} s ({bubble / args.f:.1f} F) | {formula:.3f} s "
              f"({formula / args.f:.1f} F) | {bubble / wall:.1%} |", flush=True)


if __name__ == "__main__":
    main()
