"""One rank of the pipeline-schedule check (launched by tests/test_pipeline.py, one process per rank)."""

import torch
import torch.distributed as dist
from launch import worker_args
from torch import nn

from dsv3.parallel.pipeline import PipelineRunner, schedule_1f1b, schedule_dualpipe, schedule_dualpipev, schedule_zb1p

DIM, MB = 16, 3


def stage(s: int) -> nn.Module:
    torch.manual_seed(100 + s)
    return nn.Sequential(nn.Linear(DIM, DIM), nn.Tanh(), nn.Linear(DIM, DIM)).double()


def micro_batches(n: int):
    g = torch.Generator().manual_seed(7)
    xs = [torch.randn(MB, DIM, generator=g, dtype=torch.float64) for _ in range(n)]
    ys = [torch.randn(MB, DIM, generator=g, dtype=torch.float64) for _ in range(n)]
    return xs, ys


def loss(out, target):
    return ((out - target) ** 2).mean()


def main():
    args = worker_args(("schedule", str), ("chunks", int))
    r, p, n = args.rank, args.world, args.chunks
    xs, ys = micro_batches(n)
    dual = args.schedule == "dualpipe"
    if dual:  # direction 0 takes the first half of the micro-batches, direction 1 the second half
        stages = {0: stage(r), 1: stage(p - 1 - r)}
        inputs = {0: xs[: n // 2] if r == 0 else [], 1: xs[n // 2 :] if r == p - 1 else []}
        ops = schedule_dualpipe(r, p, n)

        def loss_fn(out, d, i):
            return loss(out, ys[i] if d == 0 else ys[n // 2 + i])
    elif args.schedule == "dualpipev":  # 2P stages folded into a V: rank r holds stages r and 2P-1-r
        stages = {0: stage(r), 1: stage(2 * p - 1 - r)}
        inputs = {0: xs if r == 0 else [], 1: []}
        ops = schedule_dualpipev(r, p, n)

        def loss_fn(out, d, i):
            return loss(out, ys[i])
    else:
        stages = {0: stage(r)}
        inputs = {0: xs if r == 0 else []}
        ops = (schedule_zb1p if args.schedule == "zb1p" else schedule_1f1b)(r, p, n)

        def loss_fn(out, d, i):
            return loss(out, ys[i])

    runner = PipelineRunner(stages, r, p, (MB, DIM), dual=dual, act_dtype=torch.float64,
                            v_shape=args.schedule == "dualpipev")
    total = runner.run(ops, inputs, loss_fn)
    runner.sync_stage_copies()
    grads = {}
    for d, module in stages.items():
        s = r if d == 0 else (2 * p - 1 - r if args.schedule == "dualpipev" else p - 1 - r)
        grads[s] = [q.grad for q in module.parameters()]
    torch.save({"loss": total, "grads": grads, "ops": ops}, args.out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
