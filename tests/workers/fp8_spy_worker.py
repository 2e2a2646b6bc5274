"""One rank of a gloo run of the real trainer: `--precision P` with `--ep` / `--pp`, one training step with a spy on
`dsv3.quant.linear.fp8_gemm` (every FP8 GEMM goes through it); saves the number of calls and the rank's FP8
inventory (`Trainer.fp8_inventory`)."""

import torch
from launch import worker_args

args = worker_args(("data", str), ("run", str), ("precision", str), ("ep", int), ("pp", int))

import dsv3.quant.linear as fp8_linear  # noqa: E402

calls = 0
real_gemm = fp8_linear.fp8_gemm


def spy(*a, **kw):
    global calls
    calls += 1
    return real_gemm(*a, **kw)


fp8_linear.fp8_gemm = spy

from dsv3.train.pipeline_trainer import PipelineTrainer  # noqa: E402
from dsv3.train.trainer import TrainConfig, Trainer  # noqa: E402

cfg = TrainConfig(model_config="tiny", data=args.data, out=f"{args.run}", max_steps=1, batch_size=8, seq_len=32,
                  precision=args.precision, ep=args.ep, pp=args.pp, progress=False)
trainer = (PipelineTrainer if args.pp > 1 else Trainer)(cfg)
inventory = trainer.fp8_inventory()
trainer.train_step()
torch.save({"calls": calls, "fp8": inventory}, args.out)
