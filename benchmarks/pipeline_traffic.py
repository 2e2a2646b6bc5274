"""Bytes each rank sends per training step, by kind, under a pipeline with ZeRO-1 against FSDP2 (issue 14).

Run under torchrun (gloo); every rank counts the tensors it hands to torch.distributed inside `Trainer.train_step`
(collectives: the input, or the output where torch takes the output first, as all_gather_single does; point-to-point
sends: the tensor sent) and rank 0 prints the last step's figures of every rank as one JSON line each:

    torchrun --nproc-per-node 4 benchmarks/pipeline_traffic.py --zero 1 -- --model-config small --pp 2 --dp 2 \
        --pp-schedule 1f1b --pp-chunks 4 --batch-size 8 --seq-len 64 --max-steps 2 --data data/shakespeare

Everything after `--` is `dsv3 train`'s command line (an --out is made in a temporary directory). Counted: what
this rank puts in, so an all-gather counts its whole output (what the ring moves is (n - 1) / n of it), an all-reduce
its buffer (a ring sends 2 (n - 1) / n of it), a reduce-scatter its input; the counts compare layouts, they are
not wire bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections import Counter

import torch
import torch.distributed as dist

from dsv3.cli import main as dsv3
from dsv3.train.trainer import Trainer

COUNTED = {  # torch.distributed function -> the positional index of the tensor whose bytes it moves
    "all_reduce": 0, "broadcast": 0, "all_gather_single": 0, "reduce_scatter_single": 1,
    "all_gather_into_tensor": 0, "reduce_scatter_tensor": 1, "isend": 0, "send": 0,
}
sent: Counter = Counter()
counting = False


def _counting(name: str, index: int, fn):
    def wrapper(*args, **kwargs):
        if counting:
            t = args[index] if len(args) > index else next(v for v in kwargs.values() if isinstance(v, torch.Tensor))
            sent[name] += t.numel() * t.element_size()
            sent[name + " calls"] += 1
        return fn(*args, **kwargs)
    return wrapper


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--zero", type=int, choices=(0, 1, 3), required=True)
    ap.add_argument("train_args", nargs=argparse.REMAINDER, help="-- then dsv3 train's arguments")
    args = ap.parse_args()
    torch.set_num_threads(1)
    for name, index in COUNTED.items():
        if hasattr(dist, name):
            setattr(dist, name, _counting(name, index, getattr(dist, name)))
    last: dict = {}
    step = Trainer.train_step

    def counted_step(self):
        global counting
        sent.clear()
        counting = True
        try:
            return step(self)
        finally:
            counting = False
            last.update(sent)

    Trainer.train_step = counted_step
    rest = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "run")
        code = dsv3(["train", *rest, "--zero", str(args.zero), "--out", out, "--no-progress",
                     "--checkpoint-every", "1000000"])
    rows = [None] * dist.get_world_size()
    dist.all_gather_object(rows, dict(last))
    if dist.get_rank() == 0:
        for rank, row in enumerate(rows):
            total = sum(v for k, v in row.items() if not k.endswith("calls"))
            print(json.dumps({"zero": args.zero, "rank": rank, "total_MB": round(total / 2**20, 2),
                              **{k: (round(v / 2**20, 2) if not k.endswith("calls") else v)
                                 for k, v in sorted(row.items())}}))
    sys.exit(code)


if __name__ == "__main__":
    main()
