"""One rank of the DeepSeek-V3 pipeline check: the tiny model split into stages, run by a schedule on gloo."""

import copy

import torch
import torch.distributed as dist
from launch import worker_args

import dsv3
from dsv3.parallel.pipeline import (
    PipelineRunner,
    schedule_1f1b,
    schedule_dualpipe,
    schedule_dualpipev,
    split_stages,
)
from dsv3.train.losses import lm_loss
from dsv3.train.pipeline_trainer import ModelStage

MB, T = 2, 12


def build():
    cfg = dsv3.get_config("tiny").replace(num_hidden_layers=4, num_nextn_predict_layers=0)
    model = dsv3.DeepseekV3(cfg)
    model.init_weights(seed=3)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3 if p.dim() > 1 else 1)
        for layer in model.main_layers[1:]:
            layer.mlp.gate.e_score_correction_bias.normal_(0, 0.05, generator=torch.Generator().manual_seed(5))
    return model.double()


def batches(n):
    g = torch.Generator().manual_seed(11)
    return [torch.randint(1, 256, (MB, T + 1), generator=g) for _ in range(n)]


def main():
    args = worker_args(("schedule", str), ("chunks", int))
    r, p, n = args.rank, args.world, args.chunks
    tokens = batches(n)
    model = build()
    v = args.schedule == "dualpipev"
    dual = args.schedule == "dualpipe"
    ranges = split_stages(model, 2 * p if v else p)
    copies = {0: copy.deepcopy(model), 1: copy.deepcopy(model)}  # one model copy per direction on this rank
    if args.schedule == "1f1b":
        stage_of = {0: r}
        ops = schedule_1f1b(r, p, n)
        inputs = {0: [t[:, :-1] for t in tokens] if r == 0 else []}
        target = {0: tokens}
    else:
        stage_of = {0: r, 1: (2 * p - 1 - r) if v else (p - 1 - r)}
        ops = (schedule_dualpipev if v else schedule_dualpipe)(r, p, n)
        half = n if v else n // 2
        ids = [t[:, :-1] for t in tokens]
        second = [] if v or r != p - 1 else ids[half:]  # DualPipe's reverse direction enters at the last rank
        inputs = {0: ids[:half] if r == 0 else [], 1: second}
        target = {0: tokens[:half], 1: tokens if v else tokens[half:]}
    stages = {d: ModelStage(copies[d], *ranges[s]) for d, s in stage_of.items()}
    runner = PipelineRunner(stages, r, p, (MB, T, model.config.hidden_size), dual=dual, act_dtype=torch.float64,
                            v_shape=v)
    total = runner.run(ops, inputs, lambda logits, d, i: lm_loss(logits, target[d][i]))
    runner.sync_stage_copies()
    grads = {}
    for d in stage_of:
        for name, prm in copies[d].named_parameters():
            if prm.grad is not None and name not in grads:
                grads[name] = prm.grad
    torch.save({"loss": total, "grads": grads}, args.out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
