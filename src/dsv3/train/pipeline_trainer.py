"""`torchrun --nproc-per-node N -m dsv3 train ... --pp P [--dp D] [--ep E] --pp-schedule dualpipe|dualpipev|1f1b|zb1p`.

The trainer of `dsv3.train` with the step replaced by a pipeline schedule (see `pipeline.py`) on a
pipeline x data x expert-parallel mesh (`mesh.py`): every rank builds the same model and keeps the stages its
schedule assigns to its pipeline position (DualPipe: stages r and P-1-r, each from its own copy of the model;
DualPipeV: stages r and 2P-1-r of a 2P-stage split; 1F1B and ZB-H1: stage r), with the routed experts sharded over its
expert-parallel group. The global batch runs as `pp_chunks` micro-batches; each of a stage's dp x ep ranks takes
its share of the rows of every micro-batch. The last stage also runs the MTP modules (with a copy of the
embedding whose gradient is added to the first stage's).

After the schedule, in order: the two copies of a DualPipe stage add their gradients; the embedding copies add
theirs; dense gradients are averaged over the stage's data group and expert shards over their dp group; the
gradient norm is taken once over the whole mesh; expert loads are summed over every copy and rank, and every
copy of a router applies the same bias update (`Trainer.train_step`, shared; this trainer supplies the schedule
and the gradient sums as its `_forward_backward` and `_sync_gradients`). Checkpoints are written sharded: each
stage's tensors by the ranks that hold them (`_checkpoint_tensors`), into one standard-format directory.

Data parallelism: replicated stages (`--zero 0`), ZeRO-1 (`--zero 1`), or FSDP2 (`--zero 3`: each held stage an
FSDP root over its data group, `parallel.fsdp`; the copies' gradient sums then add local shards, and the runner
runs zero-bubble backwards whole, see `PipelineRunner`).
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn

from ..model.names import official_slots
from ..model.transformer import run_layers, run_mtp
from ..parallel.expert_parallel import apply_expert_parallel
from ..parallel.fsdp import gathered_slots, local
from ..parallel.mesh import Mesh, sync_gradients
from ..parallel.pipeline import PipelineRunner, held_stages, schedule_ops, split_stages
from .balance import sequence_balance_loss
from .losses import lm_loss, mtp_losses, mtp_valid_counts
from .trainer import Trainer, TrainError


class _AttachAux(torch.autograd.Function):
    """Returns h unchanged; in backward, also feeds gradient 1 to `aux`, a loss computed inside this stage.
    So a stage's balance loss trains its routers without travelling down the pipeline."""

    @staticmethod
    def forward(ctx, h, aux):
        return h.view_as(h)

    @staticmethod
    def backward(ctx, grad):
        return grad, torch.ones((), dtype=grad.dtype, device=grad.device)


class ModelStage(nn.Module):
    """Main decoder layers [lo, hi) of a DeepseekV3 as one pipeline stage: with the embedding when it is the first
    stage (its input is token ids), with the final norm and the output head when it is the last (it returns
    logits). The modules are the model's own, so a stage's gradients land in the model's parameters.

    The last stage also runs the MTP modules (they read the main model's final hidden state and share its head),
    with the embedding of its own model copy (`mtp_embed`): the trainer adds its gradient to the first stage's
    embedding gradient, as for tied embeddings, so both copies stay equal. It needs each micro-batch's tokens
    and each depth's share of the step's unmasked MTP targets (`set_tokens`), and attaches `mtp_scale` x the sum of
    the depth losses to its output.

    balance_scale: weight of this stage's sequence-wise balance loss (alpha / micro-batches), attached to its
    output; `loads`, `balance` and `mtp_sums` accumulate over the forwards of a step (reset with `reset_stats`)."""

    def __init__(self, model, lo: int, hi: int, balance_scale: float = 0.0, eot_id: int | None = None):
        super().__init__()
        self.lo, self.hi = lo, hi
        self.balance_scale, self.eot_id = balance_scale, eot_id
        self.mtp_scale = 0.0
        n = model.config.num_hidden_layers
        self.embed = model.model.embed_tokens if lo == 0 else None
        self.layers = nn.ModuleList(model.main_layers[lo:hi])
        self.norm = model.model.norm if hi == n else None
        self.head = model.lm_head if hi == n else None
        self.mtp = nn.ModuleList(model.mtp_modules if hi == n else [])
        self.mtp_embed = model.model.embed_tokens if len(self.mtp) else None
        self.rotary = model.model.rotary_emb
        moe = [layer for layer in [*self.layers, *self.mtp] if layer.is_moe]
        self.routers = [layer.mlp.gate for layer in moe]
        self.router_layers = [layer.layer_idx for layer in moe]  # the model's layer index of each router
        self.tokens: list[torch.Tensor] = []
        self.share: list[float] = []
        self.reset_stats()

    def reset_stats(self) -> None:
        self.loads = [torch.zeros(r.n_experts) for r in self.routers]
        self.balance = 0.0
        self.mtp_sums = [0.0] * len(self.mtp)
        self._forwards = 0

    def set_tokens(self, tokens: list[torch.Tensor], share: list[float]) -> None:
        """The windows [B, T+1] of this stage's micro-batches, in forward order (the MTP targets), and per depth
        this rank's share of the step's unmasked MTP targets (what each depth's loss sum is divided by)."""
        self.tokens, self.share = tokens, share

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: token ids [B, T] (first stage) or the previous stage's hidden state [B, T, D] -> logits [B, T, V]
        (last stage, with the MTP and balance losses attached for backward) or the hidden state [B, T, D]."""
        h = self.embed(x) if self.embed is not None else x  # [B, T, D]
        rope = self.rotary(torch.arange(h.shape[1], device=h.device), h.dtype)
        h, routing = run_layers(self.layers, h, rope)  # the model's own layer loop, over this stage's range
        aux = None
        if self.head is not None:
            h = self.norm(h)
            out = self.head(h)  # [B, T, V]
            if len(self.mtp):  # also at weight 0 (a late lambda of 0): metrics, and every parameter in the graph
                tokens = self.tokens[self._forwards]
                emb = self.mtp_embed(tokens[:, : h.shape[1]])
                mtp_logits, mtp_routing = run_mtp(self.mtp, self.head, h, emb, rope)
                routing += mtp_routing
                losses = mtp_losses(mtp_logits, tokens, self.eot_id, over=self.share)
                for k, loss in enumerate(losses):
                    self.mtp_sums[k] += float(loss.detach())
                aux = self.mtp_scale * sum(losses)
        else:
            out = h
        self._forwards += 1
        for acc, info in zip(self.loads, routing):
            acc += info.load.cpu()
        if routing and self.balance_scale:
            balance = self.balance_scale * sum(sequence_balance_loss(info, h.shape[0]) for info in routing)
            self.balance += float(balance.detach())
            aux = balance if aux is None else aux + balance
        if aux is not None:
            out = _AttachAux.apply(out, aux)
        return out


class PipelineTrainer(Trainer):
    """The Trainer with its step run as a pipeline schedule (1F1B, ZB-H1, DualPipe, DualPipeV) over a
    pipeline x data x expert-parallel mesh; see the module docstring for the order of the gradient reductions."""

    def _parallelize(self) -> None:
        cfg, mc = self.cfg, self.model.config
        if cfg.grad_accum != 1:
            raise TrainError("pp > 1 takes its micro-batches from pp_chunks; leave grad_accum at 1")
        if mc.tie_word_embeddings:
            raise TrainError("pp > 1 needs untied embeddings (tie_word_embeddings = false, as in DeepSeek-V3)")
        try:
            self.mesh = mesh = Mesh(cfg.pp, cfg.dp, cfg.ep)
        except ValueError as e:
            raise TrainError(str(e)) from None
        r, p = mesh.pp_rank, cfg.pp
        self.chunks = cfg.pp_chunks or 2 * p
        if cfg.batch_size % (self.chunks * mesh.data_size):
            raise TrainError(f"batch_size {cfg.batch_size} must be divisible by pp_chunks x dp x ep = "
                             f"{self.chunks} x {mesh.dp} x {mesh.ep}")
        schedule = cfg.pp_schedule
        self.v, self.dual = schedule == "dualpipev", schedule == "dualpipe"
        try:
            self.ops = schedule_ops(schedule, r, p, self.chunks)
        except ValueError as e:
            raise TrainError(f"pp_schedule {schedule}: {e}") from None
        n_stages = 2 * p if self.v else p
        try:
            ranges = split_stages(self.model, n_stages)
        except ValueError as e:
            raise TrainError(str(e)) from None
        self.ranges, self.n_stages = ranges, n_stages
        two = self.v or self.dual  # two stages per rank
        self.stage_of = held_stages(schedule, r, p)
        alpha = cfg.balance_alpha
        self.copies = {d: (self.model if d == 0 else copy.deepcopy(self.model)) for d in self.stage_of}
        if cfg.ep > 1:
            for model in self.copies.values():
                apply_expert_parallel(model, mesh.ep_group)
        self.stages = {d: ModelStage(self.copies[d], *ranges[s], balance_scale=alpha / self.chunks,
                                     eot_id=self.data.eot_id if self.data is not None else None)
                       for d, s in self.stage_of.items()}
        # stages whose gradients, norms and state this rank speaks for (DualPipe: the other copy is the partner's)
        self.unique = [0] if self.dual else list(self.stage_of)
        self.moe_layers = [layer.layer_idx for layer in self.model.model.layers if layer.is_moe]
        self.row_of = {layer: row for row, layer in enumerate(self.moe_layers)}  # metric row of each MoE layer
        # MTP: the last stage's embedding copy adds its gradient to the first stage's. DualPipe and DualPipeV hold
        # the first and the last stage on the same ranks; 1F1B and ZB-H1 pair each pipeline's two ends in a group.
        self.mtp = mc.num_nextn_predict_layers > 0
        self.embed_group = None
        if self.mtp and not two:
            for j in range(mesh.data_size):
                g = dist.new_group([j, (p - 1) * mesh.data_size + j])
                if j == mesh.data_rank and r in (0, p - 1):
                    self.embed_group = g
        rows = cfg.batch_size // self.chunks // mesh.data_size
        self.fsdp = self._fsdp_mesh()  # FSDP2 shards each stage over its data group (`_materialize`)
        self.runner = PipelineRunner(self.stages, r, p, (rows, cfg.seq_len, mc.hidden_size), dual=self.dual,
                                     v_shape=self.v, peers=mesh.pp_ranks, device=self.device,
                                     split_backward=self.fsdp is None)

    def _held_models(self) -> list:
        return list(self.copies.values())

    def _held_modules(self) -> list:
        return list(self.stages.values())  # the other layers of each copy stay on meta

    def _routers(self) -> list:
        return [(self.row_of[layer], router) for stage in self.stages.values()
                for layer, router in zip(stage.router_layers, stage.routers)]

    def _optimizer(self, params: list | None = None):
        named: dict[int, tuple] = {}
        for d in self.stage_of:  # this rank's stages only; a parameter of both copies (none today) once
            for name, prm in self.stages[d].named_parameters():
                named.setdefault(id(prm), (f"{d}.{name}", prm))
        return super()._optimizer(list(named.values()))

    def _named_params(self):
        """(name, parameter) of the unique stages, without the last stage's embedding copy (counted on the first)."""
        for d in self.unique:
            for name, prm in self.stages[d].named_parameters():
                if not name.startswith("mtp_embed.") or self.stages[d].embed is not None:
                    yield name, prm

    @torch.no_grad()
    def _sum_embedding_grads(self) -> None:
        """The embedding gets gradients on the first stage (the input) and on the last (MTP); give both copies the
        sum, so they take the same optimizer step."""
        holders = [st.embed for st in self.stages.values() if st.embed is not None]
        holders += [st.mtp_embed for st in self.stages.values() if st.mtp_embed is not None and st.embed is None]
        if not holders:
            return
        for m in holders:  # (a copy without a gradient still takes part: the other end waits on this sum)
            if m.weight.grad is None:
                m.weight.grad = torch.zeros_like(m.weight)
        # under FSDP2 every copy is sharded alike over its data group, so the local shards add up
        total = sum(local(m.weight.grad) for m in holders)
        if self.embed_group is not None:  # 1F1B: the other end of the pipeline holds the other copy
            dist.all_reduce(total, group=self.embed_group)
        for m in holders:
            local(m.weight.grad).copy_(total)

    def _forward_backward(self, mtp_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's schedule over this rank's stages (see `Trainer._forward_backward` for what it returns: here
        the main loss is the last stage's, the balance and MTP losses those of the stages this rank holds)."""
        cfg, mesh = self.cfg, self.mesh
        depth = self.model.config.num_nextn_predict_layers
        for stage in self.stages.values():
            stage.train()
            stage.reset_stats()
            stage.mtp_scale = mtp_scale  # (each loss is already this micro-batch's part of the step's mean)
        tokens = self.data.batch(cfg.batch_size, cfg.seq_len, cfg.seed, self.step, 0).to(self.device)
        mb = cfg.batch_size // self.chunks
        rows, j = mb // mesh.data_size, mesh.data_rank  # this rank's rows of every micro-batch
        micro = [tokens[m * mb + j * rows : m * mb + (j + 1) * rows] for m in range(self.chunks)]
        ids = [t[:, :-1] for t in micro]
        r, p = mesh.pp_rank, cfg.pp
        if not (self.v or self.dual):
            inputs, target = {0: ids if r == 0 else []}, {0: micro}
        else:
            half = self.chunks if self.v else self.chunks // 2
            second = [] if self.v or r != p - 1 else ids[half:]
            inputs = {0: ids[:half] if r == 0 else [], 1: second}
            target = {0: micro[:half], 1: micro if self.v else micro[half:]}
        share = [c / mesh.data_size for c in mtp_valid_counts(tokens, depth, self.data.eot_id)]
        for d, stage in self.stages.items():
            stage.set_tokens(target[d], share)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
            loss = self.runner.run(self.ops, inputs,
                                   lambda logits, d, i: lm_loss(logits, target[d][i]) / self.chunks)
        sums = torch.zeros(2 + depth, dtype=torch.float64)
        loads = torch.zeros(len(self.moe_layers), self.model.config.n_routed_experts or 0, dtype=torch.float64)
        sums[0] = loss
        for stage in self.stages.values():  # every copy adds what it computed
            sums[1] += stage.balance
            sums[2 : 2 + len(stage.mtp_sums)] += torch.tensor(stage.mtp_sums, dtype=torch.float64)
            for layer, load in zip(stage.router_layers, stage.loads):
                loads[self.row_of[layer]] += load.double()
        return sums, loads

    def _sync_gradients(self) -> None:
        self.runner.sync_stage_copies()
        if self.mtp:
            self._sum_embedding_grads()
        for stage in self.stages.values():
            sync_gradients(stage, self.mesh)

    def _checkpoint_tensors(self) -> Iterable[tuple[str, torch.Tensor]]:
        """(official name, tensor) this rank writes: the tensors of the stages it speaks for (DualPipe: copy 0;
        a copy's other layers are on meta), from the first rank of each stage's data group (expert shards: from the
        first data-parallel replica of each). The embedding is the first stage's; the last stage writes the MTP
        module's stored copies of the embedding and head."""
        n = self.model.config.num_hidden_layers
        out: list[Iterable[tuple[str, torch.Tensor]]] = []
        for d in self.unique:
            lo, hi = self.ranges[self.stage_of[d]]
            slots = official_slots(self.copies[d])
            names = {name for name, slot in slots.items()
                     if not slot.target.is_meta and not (slot.alias and hi != n) and self._writes(name)
                     # the last stage's embedding is the MTP copy, written under its own name
                     and not (name == "model.embed_tokens.weight" and lo != 0)}
            if self.fsdp is not None:  # every parameter gathered in turn, on every rank of the stage's data group
                out.append(gathered_slots(self.copies[d], names.__contains__))
            else:
                out.append([(name, slots[name].view.detach()) for name in slots if name in names])
        return itertools.chain(*out)
