"""`torchrun --nproc-per-node P -m dsv3 train ... --pp P --pp-schedule dualpipe|dualpipev|1f1b`.

The trainer of `dsv3.train` with the step replaced by a pipeline schedule (see `pipeline.py`): every rank builds
the same model, keeps the stages its schedule assigns it (DualPipe: stages r and P-1-r, each from its own copy of
the model; DualPipeV: stages r and 2P-1-r of a 2P-stage split; 1F1B: stage r), and runs the global batch as
`pp_chunks` micro-batches. Each stage attaches its sequence-wise balance loss to its output and counts its expert
loads; after the schedule the copies of a stage add their gradients, loads are summed over every copy, the
gradient norm is taken over the unique stages, and every copy of a router applies the same bias update.
Checkpoints gather the stages into the standard format on rank 0.

Limits for now: the pipeline spans all ranks (no data or expert parallelism beside it) and MTP is off.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist

from ..train.balance import max_violation, update_expert_bias
from ..train.losses import lm_loss
from ..train.schedule import lr_at
from ..train.trainer import Trainer, TrainError
from .pipeline import ModelStage, PipelineRunner, schedule_1f1b, schedule_dualpipe, schedule_dualpipev, split_stages


class PipelineTrainer(Trainer):
    def _parallelize(self) -> None:
        cfg, p, r = self.cfg, self.world, self.rank
        if p != cfg.pp:
            raise TrainError(f"pp = {cfg.pp} needs {cfg.pp} processes (torchrun --nproc-per-node {cfg.pp}); "
                             f"got {p}")
        if cfg.ep > 1 or cfg.zero:
            raise TrainError("pp > 1 cannot be combined with ep or zero yet")
        if self.model.config.num_nextn_predict_layers:
            raise TrainError("pp > 1 does not run the MTP module yet: add --mtp-depth 0")
        if cfg.grad_accum != 1:
            raise TrainError("pp > 1 takes its micro-batches from pp_chunks; leave grad_accum at 1")
        self.chunks = cfg.pp_chunks or 2 * p
        if cfg.batch_size % self.chunks:
            raise TrainError(f"batch_size {cfg.batch_size} must be divisible by pp_chunks {self.chunks}")
        schedule = cfg.pp_schedule
        self.v, self.dual = schedule == "dualpipev", schedule == "dualpipe"
        make = {"1f1b": schedule_1f1b, "dualpipe": schedule_dualpipe, "dualpipev": schedule_dualpipev}[schedule]
        try:
            self.ops = make(r, p, self.chunks)
        except ValueError as e:
            raise TrainError(f"pp_schedule {schedule}: {e}") from None
        n_stages = 2 * p if self.v else p
        try:
            ranges = split_stages(self.model, n_stages)
        except ValueError as e:
            raise TrainError(str(e)) from None
        self.stage_of = {0: r} if schedule == "1f1b" else {0: r, 1: (2 * p - 1 - r) if self.v else (p - 1 - r)}
        alpha = {"aux_free": cfg.seq_aux_alpha, "aux_loss": cfg.aux_loss_alpha, "none": 0.0}[cfg.balance]
        self.copies = {d: (self.model if d == 0 else copy.deepcopy(self.model)) for d in self.stage_of}
        self.stages = {d: ModelStage(self.copies[d], *ranges[s], balance_scale=alpha / self.chunks)
                       for d, s in self.stage_of.items()}
        self.ranges = ranges
        # stages whose gradients, norms and state this rank speaks for (DualPipe: the other copy is the partner's)
        self.unique = [0] if self.dual else list(self.stage_of)
        d_model = self.model.config.hidden_size
        self.runner = PipelineRunner(self.stages, r, p, (cfg.batch_size // self.chunks, cfg.seq_len, d_model),
                                     dual=self.dual, v_shape=self.v)

    def _routers(self) -> list:
        return [router for d in self.stage_of for router in self.stages[d].routers]

    def _optimizer(self, params: list | None = None):
        unique = {id(p): p for d in self.stage_of for p in self.stages[d].parameters()}
        self.model_params = list(unique.values())  # this rank's stages only
        return super()._optimizer(self.model_params)

    def train_step(self) -> dict:
        import time

        cfg, p = self.cfg, self.world
        t0 = time.perf_counter()
        for stage in self.stages.values():
            stage.train()
            stage.reset_stats()
        tokens = self.data.batch(cfg.batch_size, cfg.seq_len, cfg.seed, self.step, 0).to(self.device)
        micro = list(tokens.split(cfg.batch_size // self.chunks))
        ids = [t[:, :-1] for t in micro]
        if not (self.v or self.dual):
            inputs, target = {0: ids if self.rank == 0 else []}, {0: micro}
        else:
            half = self.chunks if self.v else self.chunks // 2
            second = [] if self.v or self.rank != p - 1 else ids[half:]
            inputs = {0: ids[:half] if self.rank == 0 else [], 1: second}
            target = {0: micro[:half], 1: micro if self.v else micro[half:]}
        loss = self.runner.run(self.ops, inputs, lambda logits, d, i: lm_loss(logits, target[d][i]) / self.chunks)
        self.runner.sync_stage_copies()
        # loads and balance of every stage, summed over its copies; the loss from the ranks that computed it
        mine = {self.stage_of[d]: ([x.tolist() for x in self.stages[d].loads], self.stages[d].balance)
                for d in self.stage_of}
        gathered: list = [None] * p
        dist.all_gather_object(gathered, mine)
        totals: dict[int, list] = {}
        balance = 0.0
        for rank_stats in gathered:
            for s, (loads, bal) in rank_stats.items():
                acc = totals.setdefault(s, [torch.zeros(len(x)) for x in loads])
                for a, x in zip(acc, loads):
                    a += torch.tensor(x)
                balance += bal
        flat = torch.tensor([loss], dtype=torch.float64)
        dist.all_reduce(flat)
        loss = float(flat[0])
        if loss != loss:
            raise TrainError(f"the loss became nan at step {self.step + 1}; lower lr (now {cfg.lr})")
        # global gradient norm over the unique stages, then clip every copy alike
        sq = torch.zeros((), dtype=torch.float64)
        for d in self.unique:
            for prm in self.stages[d].parameters():
                if prm.grad is not None:
                    sq += prm.grad.double().pow(2).sum()
        dist.all_reduce(sq)
        grad_norm = float(sq.sqrt())
        scale = cfg.grad_clip / (grad_norm + 1e-6)
        if scale < 1:
            for prm in self.model_params:
                if prm.grad is not None:
                    prm.grad.mul_(scale)
        lr = lr_at(self.step, self.total_steps, cfg.lr, cfg.warmup_steps, cfg.min_lr_ratio)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if cfg.balance == "aux_free":
            for d, s in self.stage_of.items():
                for router, load in zip(self.stages[d].routers, totals[s]):
                    update_expert_bias(router.e_score_correction_bias, load, cfg.bias_update_speed)
        biases: list = [None] * p
        dist.all_gather_object(biases, {self.stage_of[d]: [rt.e_score_correction_bias.tolist()
                                                           for rt in self.stages[d].routers]
                                        for d in self.stage_of})
        bias_by_stage = {s: b for rank_b in biases for s, b in rank_b.items()}
        loads = [load for s in sorted(totals) for load in totals[s]]
        bias = [b for s in sorted(bias_by_stage) for b in bias_by_stage[s]]
        self.step += 1
        dt = time.perf_counter() - t0
        tokens_per_s = cfg.batch_size * cfg.seq_len / dt
        return {
            "step": self.step, "loss": loss, "mtp_loss": [], "balance_loss": balance, "lr": lr,
            "grad_norm": grad_norm, "tokens_per_s": tokens_per_s,
            "mfu": tokens_per_s * self.flops_per_token / self.peak_flops / p,
            "tokens": self.step * cfg.batch_size * cfg.seq_len, "step_time": dt,
            "max_vio": [max_violation(x) for x in loads], "load": [x.int().tolist() for x in loads],
            "bias": [[round(v, 6) for v in b] for b in bias],
        }

    def _model_to_save(self):
        """Every stage's tensors gathered into rank 0's model (the pipeline's copies are the trained ones)."""
        mine = {}
        for d in self.unique:
            lo, hi = self.ranges[self.stage_of[d]]
            n = self.model.config.num_hidden_layers
            for name, t in self.copies[d].state_dict().items():
                parts = name.split(".")
                in_layers = parts[1] == "layers" and lo <= int(parts[2]) < hi
                if in_layers or (lo == 0 and "embed_tokens" in name) or (hi == n and parts[0] in ("lm_head",)) \
                        or (hi == n and name.startswith("model.norm")):
                    mine[name] = t.detach().cpu()
        gathered: list = [None] * self.world
        dist.all_gather_object(gathered, mine)
        state = {}
        for part in gathered:
            state.update(part)
        if self.main_rank:
            self.model.load_state_dict(state, strict=False)
        return self.model
