"""The training loop: AdamW, the paper's LR schedule, aux-loss-free balancing, MTP loss, metrics, checkpoints.

The run directory (config, metrics.jsonl, checkpoints with their trainer state) is `dsv3.runs`'s; the trainer
writes it only through that module.

Determinism: batches are drawn from (seed, step, micro-batch) alone and the model is plain fp32 on CPU, so a run
resumed from a checkpoint reproduces the uninterrupted loss curve exactly.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import shutil
import time
import tomllib
import warnings
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import SafetensorError
from torch.distributed.device_mesh import DeviceMesh

from ..checkpoint import (
    finish_checkpoint,
    load_pretrained,
    load_weights,
    refuse_existing,
    start_checkpoint,
    stored_tensors,
    write_shards,
)
from ..config import ModelConfig, extended_rope_scaling, get_config
from ..cost import model_flops_utilization
from ..errors import Dsv3Error
from ..model import DecoderLayer, DeepseekV3
from ..model.mla import packed_positions
from ..model.moe import RoutedExperts
from ..model.names import official_slots
from ..parallel.expert_parallel import EPExperts, apply_expert_parallel
from ..parallel.fsdp import distribute_state, gathered_slots, local, local_state, materialize_sharded
from ..parallel.mesh import Mesh, clip_gradients, global_grad_norm, host_all_reduce, is_expert_param, sync_gradients
from ..parallel.pipeline import SCHEDULES
from ..parallel.zero import ZeroShardedOptimizer
from ..params import training_flops_per_token
from ..quant.linear import FP8Linear, FP8RoutedExperts, convert_to_fp8
from ..runs import (
    TOKENIZER,
    MetricsWriter,
    OutputExistsError,
    Run,
    RunError,
    StepMetrics,
    claim_output,
    load_trainer_state,
    resolve_checkpoint,
    train_setting,
    trainer_state_files,
    write_atomic,
)
from .balance import max_violation, sequence_balance_loss, update_expert_bias
from .data import TokenData
from .losses import (
    IGNORE,
    cross_entropy,
    distillation_kl,
    lm_loss,
    mtp_losses,
    mtp_valid_counts,
    packed_groups,
    packed_targets,
    record_weights,
)
from .optim import AdamW
from .schedule import decay_start_step, frozen_total, lr_at, mtp_weight_at
from .sft import ConversationData

BALANCE_MODES = ("aux_free", "aux_loss", "none")
UNKNOWN_STEPS = 10**9  # schedule length while a time-budgeted run measures its step time (all in warmup)
STEP_WINDOW = 8  # the recent steps whose mean wall time estimates a time-budgeted run's step count
UNTIMED_STEPS = 2  # steps after each (re)start left out of that window (slower: allocations, caches)
BUDGET_MARGIN = 0.99  # the estimate plans for this fraction of the time left


class TrainError(Dsv3Error, ValueError):
    """Invalid training settings; names the setting."""


PRECISIONS = ("fp32", "bf16", "fp8")
STATE_DTYPES = ("fp32", "bf16")
PP_SCHEDULES = SCHEDULES
LOSS_AVERAGES = ("token", "record")
LEGACY_KEYS = {"preset": "model_config"}  # old TrainConfig keys (TOML files, train_config.json of older runs)


def _opt(default, help: str, choices: tuple | None = None):
    """A TrainConfig field whose help text (and closed set of values) is also the CLI flag's."""
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class TrainConfig:
    """Every setting of a training run: the `dsv3 train` flags (same names, `-` for `_`), TOML keys and the
    run's train_config.json. `validate()` raises TrainError naming the bad setting."""

    # what
    objective: str = _opt("pretrain", "pretrain (token windows of a `dsv3 data prepare` dataset) or sft (packed "
                          "conversations of a messages JSONL, loss on the assistant's tokens; needs init_from)",
                          ("pretrain", "sft"))
    model_config: str = _opt("small", "model config: a preset name (tiny, small, deepseek-v3-671b) or a "
                             "config.json path")
    data: str = _opt("data/shakespeare", "dataset directory (from `dsv3 data prepare`)")
    out: str = _opt("runs/run", "run directory to create")
    init_from: str | None = _opt(None, "start from this checkpoint's (or run's latest) weights and config, with a "
                                 "fresh optimizer and schedule (context extension, continued training)")
    teacher: str | None = _opt(None, "with objective sft: logit distillation from this checkpoint (or run), which "
                               "must share the student's tokenizer: forward KL to its distribution on the "
                               "assistant's tokens")
    loss_average: str = _opt("token", "with objective sft: how a step's loss averages its targets: token (every "
                             "target token weighs the same) or record (every record or conversation weighs the "
                             "same: its tokens' mean, then the mean over the step's records)", LOSS_AVERAGES)
    kd_temperature: float = _opt(1.0, "with teacher: the softmax temperature of both distributions (the KL is "
                                 "scaled by its square)")
    kd_alpha: float = _opt(1.0, "with teacher: weight of the KL term; 1 - kd_alpha weighs the cross-entropy on the "
                           "data's tokens")
    extend_context: float | None = _opt(None, "with init_from: YaRN (rope_scaling written as DeepSeek-V3's config "
                                        "writes it) for this factor over the length the checkpoint was trained at")
    extend_rope: str = _opt("yarn", "with extend_context: how positions stretch — yarn (DeepSeek-V3's), linear "
                            "(position interpolation: every frequency / factor) or none (only the position limit "
                            "grows; a baseline)", ("yarn", "linear", "none"))
    # how long (optimizer steps; `minutes` bounds wall time; with minutes only, steps are estimated)
    max_steps: int | None = _opt(None, "optimizer steps (the LR schedule's length)")
    minutes: float | None = _opt(None, "wall-time budget; alone, the step count is estimated from the step time")
    # batch: batch_size x grad_accum sequences of seq_len tokens per optimizer step
    batch_size: int = _opt(8, "sequences per micro-batch, over all ranks (the global batch)")
    grad_accum: int = _opt(1, "micro-batches accumulated per optimizer step")
    seq_len: int = _opt(256, "training sample length in tokens")
    # optimizer (paper: AdamW, betas 0.9/0.95, wd 0.1, clip 1.0; peak 2.2e-4 at 671B, larger for small models)
    lr: float = _opt(1.5e-3, "peak learning rate (linear warm-up, then cosine to min_lr_ratio x lr)")
    min_lr_ratio: float = _opt(0.1, "final learning rate as a fraction of lr")
    warmup_steps: int = _opt(50, "linear warm-up steps")
    weight_decay: float = _opt(0.1, "AdamW weight decay on matrices (not on norm gains)")
    beta1: float = _opt(0.9, "AdamW beta1")
    beta2: float = _opt(0.95, "AdamW beta2")
    grad_clip: float = _opt(1.0, "clip the global gradient norm to this")
    # load balancing
    balance: str = _opt("aux_free", "load balancing: aux_free (selection bias, the paper's), aux_loss "
                        "(conventional balance loss) or none", BALANCE_MODES)
    bias_update_speed: float = _opt(0.001, "gamma, the aux-loss-free bias step per optimizer step; 0 freezes it")
    seq_aux_alpha: float = _opt(1e-4, "weight of the complementary sequence-wise balance loss (aux_free); 0 off")
    aux_loss_alpha: float = _opt(0.003, "weight of the conventional balance loss (aux_loss)")
    # multi-token prediction
    mtp_depth: int | None = _opt(None, "MTP modules D (default: the model config's num_nextn_predict_layers); "
                                 "0 disables MTP")
    mtp_lambda: float = _opt(0.3, "MTP loss weight lambda for the first 2/3 of training (paper: 0.3)")
    mtp_lambda_late: float = _opt(0.1, "MTP loss weight for the rest (paper: 0.1)")
    # misc
    seed: int = _opt(0, "seed of the initial weights and of the batch order")
    precision: str = _opt("fp32", "GEMM precision: fp32, bf16 (autocast) or fp8 (1x128 / 128x128 scaled FP8 "
                          "GEMMs, dsv3.quant)", PRECISIONS)
    optimizer_state_dtype: str = _opt("fp32", "AdamW moments' dtype (the paper keeps them in bf16)", STATE_DTYPES)
    device: str = _opt("auto", "cpu, cuda or auto (cuda when available)")
    peak_flops: float | None = _opt(None, "one device's peak FLOP/s, the MFU denominator (default: this machine's "
                                          "measured fp32 matmul rate)")
    # scale-out (under torchrun): ranks split the global batch; ep > 1 also shards the routed experts over them
    dp: int | None = _opt(None, "data-parallel size (default: ranks / (ep x pp))")
    ep: int = _opt(1, "expert-parallel size: routed experts sharded over this many consecutive ranks")
    zero: int = _opt(0, "1: ZeRO-1, AdamW state sharded over the data-parallel ranks; 3: FSDP2 (torch's "
                     "fully_shard), parameters, gradients and AdamW state sharded", (0, 1, 3))
    pp: int = _opt(1, "pipeline-parallel stages' ranks (dsv3.train.pipeline_trainer)")
    pp_schedule: str = _opt("dualpipe", "pipeline schedule (zb1p = ZB-H1)", PP_SCHEDULES)
    pp_chunks: int | None = _opt(None, "micro-batches per step under pp (default 2 x pp)")
    compile: bool = _opt(False, "torch.compile the training layers: each decoder layer and MTP module, layers of "
                         "a kind sharing their graphs, the routed experts' grouped GEMMs left eager; fused "
                         "element-wise work after 1-2 minutes of compiling; refused with FP8, expert or pipeline "
                         "parallelism and FSDP2")
    checkpoint_every: int = _opt(200, "save a checkpoint every this many steps (and at the end)")
    keep_checkpoints: int = _opt(2, "checkpoints kept; older ones of this run are deleted")
    progress: bool = _opt(True, "show a progress bar")

    @property
    def balance_alpha(self) -> float:
        """The weight of the balance loss the balancing mode adds (sequence-wise for aux_free, 0 for none)."""
        return {"aux_free": self.seq_aux_alpha, "aux_loss": self.aux_loss_alpha, "none": 0.0}[self.balance]

    def validate(self) -> TrainConfig:
        """Itself, when every setting is in range.

        Raises:
            TrainError: the first invalid setting, named with its value and rule.
        """
        def need(ok, name, rule):
            if not ok:
                raise TrainError(f"invalid training setting {name} = {getattr(self, name)!r}: {rule}")

        need(self.objective in ("pretrain", "sft"), "objective", "must be pretrain or sft")
        need(self.objective == "pretrain" or self.init_from is not None, "objective",
             "sft fine-tunes a checkpoint: give init_from (its tokenizer and chat template encode the conversations)")
        need(self.objective == "pretrain" or self.pp == 1, "pp", "sft runs without a pipeline")
        need(self.teacher is None or self.objective == "sft", "teacher", "logit distillation is an sft objective: "
             "give objective sft too")
        need(self.loss_average in LOSS_AVERAGES, "loss_average", f"must be one of {', '.join(LOSS_AVERAGES)}")
        need(self.loss_average == "token" or self.objective == "sft", "loss_average", "averaging per record is an "
             "sft setting (pre-training windows have no records): give objective sft too")
        need(self.kd_temperature > 0, "kd_temperature", "must be > 0")
        need(0 <= self.kd_alpha <= 1, "kd_alpha", "must be in [0, 1]")
        need(self.balance in BALANCE_MODES, "balance", f"must be one of {', '.join(BALANCE_MODES)}")
        need(self.precision in PRECISIONS, "precision", f"must be one of {', '.join(PRECISIONS)}")
        need(self.optimizer_state_dtype in STATE_DTYPES, "optimizer_state_dtype",
             f"must be one of {', '.join(STATE_DTYPES)}")
        for name in ("batch_size", "grad_accum", "seq_len", "checkpoint_every", "keep_checkpoints"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) >= 1, name, "must be an integer >= 1")
        need(self.max_steps is None or self.max_steps >= 1, "max_steps", "must be >= 1")
        need(self.minutes is None or self.minutes > 0, "minutes", "must be > 0")
        need(self.max_steps is not None or self.minutes is not None, "max_steps", "give max_steps or minutes")
        need(self.lr > 0, "lr", "must be > 0")
        need(self.peak_flops is None or (isinstance(self.peak_flops, (int, float)) and self.peak_flops > 0),
             "peak_flops", "must be a number > 0 (FLOP/s)")
        need(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
        need(self.bias_update_speed >= 0, "bias_update_speed", "must be >= 0")
        need(self.mtp_depth is None or self.mtp_depth >= 0, "mtp_depth", "must be >= 0")
        need(self.extend_context is None or self.init_from is not None, "extend_context",
             "extends a pre-trained checkpoint: give init_from too")
        need(self.extend_context is None or self.extend_context >= 1, "extend_context", "must be >= 1")
        need(self.extend_rope == "yarn" or self.extend_context is not None, "extend_rope",
             "chooses how extend_context stretches positions: give extend_context too")
        need(isinstance(self.ep, int) and self.ep >= 1, "ep", "must be an integer >= 1")
        need(self.zero in (0, 1, 3), "zero", "must be 0, 1 (ZeRO-1) or 3 (FSDP2)")
        need(isinstance(self.pp, int) and self.pp >= 1, "pp", "must be an integer >= 1")
        need(self.pp_schedule in PP_SCHEDULES, "pp_schedule", f"must be one of {', '.join(PP_SCHEDULES)}")
        need(isinstance(self.compile, bool), "compile", "must be true or false")
        for name, plain in (("precision", self.precision != "fp8"), ("ep", self.ep == 1), ("pp", self.pp == 1),
                            ("zero", self.zero != 3)):
            need(not self.compile or plain, name, "is not supported with compile (refused: FP8 GEMMs, expert or "
                 "pipeline parallelism, FSDP2): drop one of them")
        return self

    @classmethod
    def from_dict(cls, values: dict, source: str, **overrides) -> TrainConfig:
        """Settings read from `source` (a file, named in errors), then the non-None `overrides`. Old key names
        (`preset`) are renamed with a warning.

        Raises:
            TrainError: an unknown key.
        """
        values = dict(values)
        for old, new in LEGACY_KEYS.items():
            if old in values:
                warnings.warn(f"{source}: setting '{old}' is now '{new}'", FutureWarning, stacklevel=3)
                values.setdefault(new, values.pop(old))
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise TrainError(f"{source}: unknown setting(s) {', '.join(unknown)}")
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    @classmethod
    def from_toml(cls, path: str | Path, **overrides) -> TrainConfig:
        """A TOML file of TrainConfig keys (top level or a [train] table), then `overrides`.

        Raises:
            TrainError: missing file, invalid TOML (with its position) or an unknown key.
        """
        try:
            values = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise TrainError(f"config file {path} not found") from None
        except tomllib.TOMLDecodeError as e:
            raise TrainError(f"{path}: invalid TOML ({e})") from None
        return cls.from_dict(values.get("train", values), str(path), **overrides)


@functools.cache
def measured_matmul_flops(device: torch.device, n: int = 2048, reps: int = 3, trials: int = 3) -> float:
    """This machine's fp32 matmul FLOP/s (best of a few timed n x n products): the MFU denominator.
    Measured once per process and device (about a second), not once per trainer."""
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(trials):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 * reps / best


class Trainer:
    """Single-process, data-parallel and expert-parallel training of DeepSeek-V3 (the pipeline variant is
    `PipelineTrainer`): AdamW with the report's schedule (§4.2), the MTP loss (§2.2, weight lambda / D),
    aux-loss-free balancing (§2.1.2: the bias moves by gamma x sign(mean load - load) after each step) plus the
    sequence-wise balance loss, FP8 or bf16 GEMMs, checkpoints with resumable trainer state in `dsv3.runs`'s
    run directory. `fit()` runs the loop; `train_step()` is one optimizer step.
    """

    def __init__(self, cfg: TrainConfig, resume: bool = False, overwrite: bool = False, dry_run: bool = False):
        """resume: continue the run in cfg.out from its latest checkpoint. Otherwise cfg.out must be absent or an
        empty directory; `overwrite` moves an existing one aside (`moved_aside` says where), never deletes it.

        dry_run: build this rank's share of the model on the meta device and stop there (no data, no output
        directory, no memory, no optimizer): what `dsv3 plan --dry-run` runs under a fake process group for a
        layout far larger than the machine (`held_memory()` then counts what the rank would hold).
        """
        self.cfg = cfg.validate()
        self.dry_run = dry_run
        if resume and overwrite:
            raise TrainError("resume continues the run in out; overwrite would move it aside: give one of them")
        self.rank, self.world = _init_distributed(cfg)
        self.main_rank = self.rank == 0
        if cfg.pp == 1 and cfg.batch_size % self.world:
            raise TrainError(f"batch_size {cfg.batch_size} (the global batch) must be divisible by the "
                             f"{self.world} ranks")
        if cfg.pp > 1 and type(self).__name__ == "Trainer":
            raise TrainError("pp > 1 is run by dsv3.train.pipeline_trainer.PipelineTrainer (dsv3 train picks it)")
        if cfg.dp is not None and cfg.dp * cfg.ep * cfg.pp != self.world:
            raise TrainError(f"dp x ep x pp = {cfg.dp} x {cfg.ep} x {cfg.pp} must equal the {self.world} ranks")
        if self.world % (cfg.ep * cfg.pp):
            raise TrainError(f"ep x pp = {cfg.ep} x {cfg.pp} must divide the number of ranks ({self.world}): "
                             f"ranks form a pipeline x data-parallel x expert-parallel mesh")
        self.run = Run(cfg.out)
        self.fsdp: DeviceMesh | None = None  # FSDP2's mesh under --zero 3 (`_parallelize`)
        self.moved_aside: Path | None = None  # where an overwritten run directory went
        self._written: set[str] = set()  # checkpoint directories (step-N) this trainer saved
        if not resume and not overwrite and not dry_run:
            self._claim_run_dir(False)  # refuse an occupied out before the expensive setup
        self.device = torch.device(cfg.device if cfg.device != "auto" else
                                   ("cuda" if torch.cuda.is_available() else "cpu"))
        self.data = None if dry_run else self._data()
        self.step = 0
        self.total_steps = cfg.max_steps
        self.estimating = cfg.max_steps is None  # --minutes alone: the step count is re-estimated until the decay
        self.budget_spent_s = 0.0  # seconds of the --minutes budget this run has used (earlier sessions included)
        state = None
        if resume:
            ckpt = resolve_checkpoint(self.run.root)
            state = load_trainer_state(ckpt, rank=self.rank, world=self.world)  # JSON + safetensors, never a pickle
            model_config = ModelConfig.from_json(ckpt / "config.json")
            self.step = state["step"]
            # the schedule's length is the original run's unless max_steps was given anew (extending the run)
            saved = TrainConfig.from_dict(state["train_config"], f"{ckpt} trainer state")
            if _layout(saved, self.world) != _layout(cfg, self.world):  # each rank's optimizer state fits one layout
                raise TrainError(f"{ckpt} was written on the layout {_layout(saved, self.world)}; this run asks for "
                                 f"{_layout(cfg, self.world)}, and the optimizer state of one rank does not fit "
                                 f"another's: resume with the same layout")
            if cfg.max_steps == saved.max_steps:
                self.total_steps = state["total_steps"]  # still an estimate if the run was estimating (fit)
                self.estimating = state.get("estimating", self.total_steps >= UNKNOWN_STEPS)  # (older states)
            if cfg.minutes == saved.minutes:  # a --minutes given anew is a new budget
                self.budget_spent_s = state.get("budget_spent_s", 0.0)
            if self.main_rank:  # only rank 0 writes the metrics file
                MetricsWriter(self.run.root).truncate_after(self.step)
        else:
            model_config = self._model_config()
        # built on the meta device, wrapped for the layout, then only what this rank holds is allocated and filled
        self.model = DeepseekV3(model_config, device="meta")
        mc = self.model.config
        if self.data is not None and mc.vocab_size < self.data.meta["vocab_size"]:
            raise TrainError(f"model vocab_size {mc.vocab_size} is smaller than the tokenizer's "
                             f"{self.data.meta['vocab_size']} (data {cfg.data})")
        if cfg.seq_len > mc.max_position_embeddings:
            raise TrainError(f"seq_len {cfg.seq_len} exceeds the model's max_position_embeddings "
                             f"{mc.max_position_embeddings}")
        if cfg.precision == "fp8":
            convert_to_fp8(self.model)  # master weights stay fp32; the GEMMs run in FP8
        self._parallelize()
        if dry_run:
            return
        self.grad_bytes = 0  # measured at each optimizer step (`held_memory`)
        source = ckpt if resume else self._init_source if cfg.init_from else None  # weights to load, if any
        if source is not None:
            def load(only: set[int] | None = None) -> None:
                for model in self._held_models():
                    load_weights(model, source, only=only)  # each rank reads only the tensors it holds

            # a bad tensor fails on its rank: all stop together
            self._on_every_rank(lambda: self._materialize(load), f"loading {source}")
        else:
            torch.manual_seed(cfg.seed)

            def init(only: set[int] | None = None) -> None:
                for model in self._held_models():  # keyed by (seed, tensor name): the same values in any layout
                    model.init_weights(seed=cfg.seed, only=only)

            self._materialize(init)
        self.routers = self._routers()
        if cfg.compile:
            compile_layers(self.model)
        self.teacher = self._teacher() if cfg.teacher else None
        self.optimizer = self._optimizer()
        if state is not None:
            self.optimizer.load_state_dict(state["optimizer"])  # this rank's (shard of the) optimizer state
            if self.fsdp is not None:
                distribute_state(self.optimizer)
            torch.set_rng_state(state["rng"])
        self.flops_per_token = training_flops_per_token(mc, cfg.seq_len, mtp=mc.num_nextn_predict_layers > 0)
        self.peak_flops = cfg.peak_flops or measured_matmul_flops(self.device)
        if not resume and overwrite:
            self._claim_run_dir(True)  # only once the setup succeeded

    def _data(self) -> TokenData | ConversationData:
        """The training data: a prepared dataset's token windows, or (sft) the packed conversations of a JSONL,
        encoded with init_from's tokenizer and chat template."""
        if self.cfg.objective == "pretrain":
            return TokenData(self.cfg.data, "train")
        try:
            source = resolve_checkpoint(self.cfg.init_from)
        except (RunError, Dsv3Error) as e:
            raise TrainError(f"init_from {self.cfg.init_from}: {e}") from None
        return ConversationData(self.cfg.data, source, self.cfg.seq_len)

    def _teacher(self) -> DeepseekV3:
        """The frozen teacher of logit distillation, on this device, in eval mode.

        Raises:
            TrainError: it cannot be loaded, its tokenizer or vocabulary is not the student's (the
                distributions would be over different tokens), or it reaches fewer positions than seq_len.
        """
        try:
            source = resolve_checkpoint(self.cfg.teacher)
        except (RunError, Dsv3Error) as e:
            raise TrainError(f"teacher {self.cfg.teacher}: {e}") from None
        theirs, ours = source / TOKENIZER, self.data.tokenizer_file
        if not theirs.exists() or theirs.read_bytes() != ours.read_bytes():
            raise TrainError(f"teacher {source}: its tokenizer is not the student's ({ours}); logit distillation "
                             "compares distributions token by token, so both need the same tokenizer (sequence-"
                             "level distillation, `dsv3 distill --mode sequence`, does not)")
        teacher = load_pretrained(source, device=self.device).eval().requires_grad_(False)
        if teacher.config.vocab_size != self.model.config.vocab_size:
            raise TrainError(f"teacher {source}: vocab_size {teacher.config.vocab_size} differs from the student's "
                             f"{self.model.config.vocab_size}")
        if teacher.config.max_position_embeddings < self.cfg.seq_len:
            raise TrainError(f"teacher {source}: it reaches {teacher.config.max_position_embeddings} positions, fewer "
                             f"than seq_len {self.cfg.seq_len} (a record that long would find it without positions)")
        return teacher

    def _claim_run_dir(self, overwrite: bool) -> None:
        """cfg.out must be free for a new run: rank 0 checks (and with `overwrite` moves the old one aside), every
        rank learns the outcome, so all of them stop together.

        Raises:
            TrainError: cfg.out exists and is not empty, without `overwrite`.
        """
        message = ""
        if self.main_rank:
            try:
                self.moved_aside = claim_output(self.run.root, overwrite,
                                                hint=f"continue it with --resume {self.run.root}, choose another --out")
            except OutputExistsError as e:
                message = str(e)
        if self._all_agree(bool(message)):
            raise TrainError(message or f"{self.run.root} already exists and is not empty (see rank 0)")

    # ---------------------------------------------------------------- setup
    def _parallelize(self) -> None:
        """Apply the parallel layout to the built model (the pipeline trainer overrides this); `fsdp` is the
        device mesh FSDP2 shards over under `--zero 3` (applied as the model is materialised), else None."""
        self.mesh = Mesh(1, self.cfg.dp, self.cfg.ep) if self.world > 1 else None
        if self.cfg.ep > 1:  # ep consecutive ranks hold one full set of experts between them
            apply_expert_parallel(self.model, self.mesh.ep_group)
        self.fsdp = self._fsdp_mesh()

    def _fsdp_mesh(self) -> DeviceMesh | None:
        """FSDP2's device mesh under `--zero 3`: the (stage's) data-parallel group; None without FSDP2 or with one
        data-parallel rank."""
        if self.cfg.zero != 3 or self.mesh is None or self.mesh.data_size == 1:
            return None
        if self.model.config.tie_word_embeddings:
            raise TrainError("zero 3 (FSDP2) needs untied embeddings (tie_word_embeddings = false, as in "
                             "DeepSeek-V3)")
        return DeviceMesh.from_group(self.mesh.data_group, self.device.type)

    def held_memory(self) -> dict[str, int]:
        """What this rank holds (its share under EP, PP, ZeRO-1 and FSDP2), measured on its tensors (a sharded
        tensor: its local shard): `parameters` and
        `parameter_bytes` (allocated parameters of its modules, each once; meta ones are not allocated),
        `gradient_bytes` (the gradients present at the last optimizer step; 0 before one) and
        `optimizer_state_bytes` (the tensors of its optimizer's state). Saved in each rank's trainer state.
        After a dry run (nothing allocated): the parameters of the modules the rank would allocate, and only those
        two figures."""
        params = self._held_params(include_meta=self.dry_run)
        if self.dry_run:
            return {"parameters": sum(p.numel() for p in params),
                    "parameter_bytes": sum(p.numel() * p.element_size() for p in params)}
        state = [local(t) for s in self.optimizer.state_dict()["state"].values() for t in s.values()
                 if isinstance(t, torch.Tensor)]
        params = [local(p) for p in params]  # under FSDP2, this rank's shards
        return {"parameters": sum(p.numel() for p in params),
                "parameter_bytes": sum(p.numel() * p.element_size() for p in params),
                "gradient_bytes": self.grad_bytes,
                "optimizer_state_bytes": sum(t.numel() * t.element_size() for t in state)}

    def fp8_inventory(self) -> dict[str, int]:
        """What runs in FP8 on this rank: its linears and routed-expert groups (one per MoE layer held, a shard
        under EP) whose GEMMs are FP8 (`fp8_*`) or not (`high_*`: the output head and, without --precision fp8,
        everything). An expert group is FP8 when its per-expert GEMM is `FP8RoutedExperts`' (kept by `EPExperts`)."""
        counts = dict.fromkeys(("fp8_linears", "high_linears", "fp8_expert_groups", "high_expert_groups"), 0)
        seen = {id(m): m for held in self._held_modules() for m in held.modules()}.values()
        for m in seen:
            if isinstance(m, torch.nn.Linear):
                counts["fp8_linears" if isinstance(m, FP8Linear) else "high_linears"] += 1
            elif isinstance(m, (RoutedExperts, EPExperts)):
                gemm = m._gemm if isinstance(m, EPExperts) else type(m)._linear
                counts["fp8_expert_groups" if gemm is FP8RoutedExperts._linear else "high_expert_groups"] += 1
        return counts

    def _held_params(self, include_meta: bool = False) -> list[torch.nn.Parameter]:
        """This rank's parameters, each once (allocated ones; with include_meta those it would allocate)."""
        return list({id(p): p for m in self._held_modules() for p in m.parameters()
                     if include_meta or not p.is_meta}.values())

    def _held_models(self) -> list[DeepseekV3]:
        """The model objects this rank trains (the pipeline trainer: one per stage copy)."""
        return [self.model]

    def _held_modules(self) -> list[torch.nn.Module]:
        """The modules whose tensors this rank holds (the pipeline trainer: its stages)."""
        return [self.model]

    def _materialize(self, fill: Callable[..., None]) -> None:
        """Allocate on this rank's device the tensors of `_held_modules()` (the rest stay on meta, never
        allocated) and `fill` them (initialise or load); re-tie a tied head, recompute the rotary buffers. Under
        FSDP2 (`--zero 3`), one unit at a time, each sharded once filled (`parallel.fsdp.materialize_sharded`)."""
        if self.fsdp is not None:
            for module in self._held_modules():  # each an FSDP root (the pipeline trainer: each stage)
                materialize_sharded(module, self.fsdp, self.device, fill)
        else:
            for module in self._held_modules():
                module.to_empty(device=self.device)
            fill()
        for model in self._held_models():
            model.tie_weights()
            model.reset_buffers()

    def _routers(self) -> list:
        """(metric row, router) of the routers whose biases this rank updates (every MoE layer's, in metric order)."""
        return list(enumerate(layer.mlp.gate for layer in self.model.model.layers if layer.is_moe))

    def _model_config(self) -> ModelConfig:
        if self.cfg.init_from:
            return self._init_config()
        mc = get_config(self.cfg.model_config)
        if self.data is None:  # a dry run: the config as given
            return mc
        vocab = self.data.meta["vocab_size"]
        changes = {}
        if mc.vocab_size != vocab:
            changes["vocab_size"] = vocab  # the config's vocab follows the dataset's tokenizer
        eot = self.data.eot_id  # documents are separated (and begin) with the tokenizer's end-of-text token
        if (mc.bos_token_id, mc.eos_token_id) != (eot, eot):
            changes["bos_token_id"] = changes["eos_token_id"] = eot
        if self.cfg.mtp_depth is not None:
            changes["num_nextn_predict_layers"] = self.cfg.mtp_depth
        if self.cfg.seq_len > mc.max_position_embeddings:
            changes["max_position_embeddings"] = self.cfg.seq_len
        return mc.replace(**changes) if changes else mc

    def _init_config(self) -> ModelConfig:
        """The config of `init_from`'s checkpoint (kept in `_init_source`), with YaRN for `extend_context`:
        `extended_rope_scaling(extend_rope, extend_context, L)` with L the sequence length the checkpoint was trained
        at (from its trainer state; YaRN's original_max_position_embeddings), and max_position_embeddings = L x
        factor. For an SFT checkpoint L is its row length: packed records restart their positions, so the positions
        it saw reach only its longest record; extend such a checkpoint from a run whose rows were its records' bound
        (as benchmarks/context_extension.py does: 256-token rows of records of at most 256 tokens).

        Raises:
            TrainError: no checkpoint there; the data's tokenizer is not the checkpoint's; an MTP depth other than
                the checkpoint's; extending a checkpoint that is already extended, or one without a trainer state.
        """
        cfg = self.cfg
        try:
            source = resolve_checkpoint(cfg.init_from)
            mc = ModelConfig.from_json(source / "config.json")
        except (RunError, Dsv3Error) as e:
            raise TrainError(f"init_from {cfg.init_from}: {e}") from None
        self._init_source = source
        theirs, ours = source / TOKENIZER, self.data.tokenizer_file if self.data is not None else None
        if ours is not None and theirs.exists() and theirs.read_bytes() != ours.read_bytes():
            raise TrainError(f"init_from {source}: its tokenizer differs from the data's ({ours}); prepare the data "
                             f"with the checkpoint's tokenizer (dsv3 data prepare ... --tokenizer {source})")
        if cfg.mtp_depth is not None and cfg.mtp_depth != mc.num_nextn_predict_layers:
            raise TrainError(f"mtp_depth {cfg.mtp_depth}: init_from {source} has {mc.num_nextn_predict_layers} MTP "
                             "module(s); its weights decide the depth")
        if cfg.extend_context is None:
            return mc
        if mc.rope_scaling:
            raise TrainError(f"init_from {source} is already extended (rope_scaling {mc.rope_scaling}); continue "
                             "it without extend_context (YaRN is set once, for the final length)")
        try:
            trained = train_setting(source, "seq_len")  # its trainer state's JSON only, not the optimizer tensors
        except RunError as e:
            raise TrainError(f"init_from {source}: {e}") from None
        if trained is None:
            raise TrainError(f"init_from {source}: cannot tell the length it was trained at (the YaRN original "
                             "length): it records no trainer state")
        trained = int(trained)
        scaling = extended_rope_scaling(cfg.extend_rope, cfg.extend_context, trained)
        return mc.replace(rope_scaling=scaling,
                          max_position_embeddings=max(int(trained * cfg.extend_context), cfg.seq_len))

    def _optimizer(self, params: list | None = None):
        """AdamW over `params` ((name, parameter) pairs; default: the model's), weight decay on matrices only;
        ZeRO-1 shards its state over the stage's data-parallel ranks."""
        betas = (self.cfg.beta1, self.cfg.beta2)

        def make(groups):
            if self.cfg.optimizer_state_dtype == "bf16":
                return AdamW(groups, lr=self.cfg.lr, betas=betas, state_dtype=torch.bfloat16)
            return torch.optim.AdamW(groups, lr=self.cfg.lr, betas=betas, foreach=self.device.type == "cuda")

        named = list(self.model.named_parameters()) if params is None else params
        if self.cfg.zero == 1 and self.mesh is not None and self.mesh.data_size > 1:
            sharded = self.cfg.ep > 1
            return ZeroShardedOptimizer(named, make, self.cfg.weight_decay, group=self.mesh.data_group,
                                        is_local=lambda name: sharded and is_expert_param(name))
        params = [p for _, p in named]
        return make([{"params": [p for p in params if p.dim() >= 2], "weight_decay": self.cfg.weight_decay},
                     {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}])  # norm gains

    # ---------------------------------------------------------------- one step
    def train_step(self) -> StepMetrics:
        """One optimizer step over the global batch, for every layout: this rank's forward and backward
        (`_forward_backward`; the pipeline trainer runs its schedule there), the gradients averaged over the mesh
        (`_sync_gradients`), the loss, balance and MTP figures and the expert loads summed over every rank, the
        global gradient norm, clipping, AdamW, then the aux-loss-free bias update from the global batch's loads.
        Every rank computes the same figures, so all stop together on a non-finite loss or norm."""
        cfg = self.cfg
        t0 = time.perf_counter()
        depth = self.model.config.num_nextn_predict_layers
        lam = mtp_weight_at(self.step, self.total_steps, cfg.mtp_lambda, cfg.mtp_lambda_late)
        sums, loads = self._forward_backward(lam / depth if depth else 0.0)
        self._sync_gradients()
        if self.world > 1:  # every rank sees the same figures and stops at the same step
            host_all_reduce(sums)
            host_all_reduce(loads)
            sums /= self.mesh.data_size  # the ranks sharing a stage each added the mean over their rows
        loss = float(sums[0])
        lr = lr_at(self.step, self.total_steps, cfg.lr, cfg.warmup_steps, cfg.min_lr_ratio)
        self._check_finite("the loss", loss, lr)
        grad_norm = global_grad_norm(self._named_params(), self.mesh)
        self._check_finite("the gradient norm", grad_norm, lr)  # (before the optimizer step uses it)
        params = self._held_params()
        clip_gradients(params, cfg.grad_clip, grad_norm)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.grad_bytes = sum(local(p.grad).numel() * p.grad.element_size() for p in params if p.grad is not None)
        self.optimizer.zero_grad(set_to_none=True)
        self._check_finite_params(f"after the optimizer step {self.step + 1} at learning rate {lr:.3g}")
        loads = loads.float()
        if cfg.balance == "aux_free":
            for row, router in self.routers:
                update_expert_bias(router.e_score_correction_bias, loads[row], cfg.bias_update_speed)
        self.step += 1
        dt = time.perf_counter() - t0
        tokens_per_s = cfg.batch_size * cfg.grad_accum * cfg.seq_len / dt
        return StepMetrics(
            step=self.step, loss=loss, mtp_loss=sums[2:].tolist(), balance_loss=float(sums[1]),
            lr=lr, grad_norm=grad_norm, tokens_per_s=tokens_per_s,
            mfu=model_flops_utilization(tokens_per_s, self.flops_per_token, self.peak_flops, self.world),
            tokens=self.step * cfg.batch_size * cfg.grad_accum * cfg.seq_len, step_time=dt,
            max_vio=[max_violation(load) for load in loads], load=[load.int().tolist() for load in loads],
            bias=[[round(b, 6) for b in row] for row in self._bias_rows().tolist()],
        )

    def _forward_backward(self, mtp_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward and backward of this rank's share of the step's global batch (grad_accum micro-batches, this
        rank's rows of each), the MTP losses weighted by `mtp_scale` (lambda / D). Returns this rank's
        contributions, summed over the ranks by `train_step`: `sums` float64 [2 + D] (main loss and weighted
        balance loss, the means over this rank's rows; the D MTP losses, this rank's part of the global batch's
        mean, `losses.mtp_losses`), and `loads` [MoE layers, experts] float64, the tokens this rank routed to each
        expert, rows in metric order (`self.routers`' row indices)."""
        cfg, model = self.cfg, self.model
        model.train()
        depth = model.config.num_nextn_predict_layers
        alpha = cfg.balance_alpha
        sums = torch.zeros(2 + depth, dtype=torch.float64)
        loads = torch.zeros(len(self.routers), model.config.n_routed_experts or 0, device=self.device)
        rows = cfg.batch_size // self.world  # this rank's share of the global batch
        if cfg.objective == "sft":
            return self._forward_backward_packed(mtp_scale)
        for micro in range(cfg.grad_accum):
            tokens = self.data.batch(cfg.batch_size, cfg.seq_len, cfg.seed, self.step, micro).to(self.device)
            share = [c / self.world for c in mtp_valid_counts(tokens, depth, self.data.eot_id)]  # of the MTP mean
            tokens = tokens[self.rank * rows : (self.rank + 1) * rows]
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
                out = model(tokens[:, :-1])
            main = lm_loss(out.logits, tokens)
            mtp = mtp_losses(out.mtp_logits, tokens, self.data.eot_id, over=share)
            balance = alpha * sum((sequence_balance_loss(info, tokens.shape[0]) for info in out.routing),
                                  torch.zeros((), device=self.device))
            total = main + balance + mtp_scale * sum(mtp) if mtp else main + balance
            (total / cfg.grad_accum).backward()
            for row, info in enumerate(out.routing):  # routing comes in metric order, as self.routers
                loads[row] += info.load
            sums += torch.stack([main.detach(), balance.detach(), *(m.detach() for m in mtp)]).double().cpu()
        return sums / cfg.grad_accum, loads.double().cpu()

    def _forward_backward_packed(self, mtp_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """`_forward_backward` for packed conversations (objective sft, `train.sft`): each row holds several
        conversations as separate documents (`DeepseekV3.forward(segments=...)`); every loss is the step's mean
        over the global batch's targets (a CE sum divided by the step's target count, so micro-batches and ranks
        add up to it) or, with loss_average "record", the mean over its records of each record's mean; the
        balance loss is per conversation (`packed_groups`), and the loads count real tokens only (padding is
        routed but neither balanced nor counted)."""
        cfg, model = self.cfg, self.model
        model.train()
        depth = model.config.num_nextn_predict_layers
        alpha = cfg.balance_alpha
        sums = torch.zeros(2 + depth, dtype=torch.float64)
        experts = model.config.n_routed_experts or 0
        loads = torch.zeros(len(self.routers), experts, device=self.device)
        rows = cfg.batch_size // self.world
        n_main = sum(layer.is_moe for layer in model.main_layers)
        batches = [self.data.batch(cfg.batch_size, cfg.seq_len, cfg.seed, self.step, m, cfg.grad_accum)
                   for m in range(cfg.grad_accum)]
        # what each depth's loss divides by (0: main): the step's targets over every micro-batch and rank, or with
        # loss_average "record" its records, each target weighted by 1 / its record's targets (`record_weights`)
        counts = [0] * (1 + depth)
        mine = slice(self.rank * rows, (self.rank + 1) * rows)  # this rank's rows of a micro-batch
        positions_of = [packed_positions(b.segments) for b in batches]  # [B, T] each, every rank's rows
        weights_of = []  # per micro-batch, per depth: this rank's [rows, T-k], or None
        for b, positions in zip(batches, positions_of):
            weights_of.append([])
            for k in range(1 + depth):
                targets = packed_targets(b.labels, positions, k)
                if cfg.loss_average == "record":
                    weights, records = record_weights(targets, packed_groups(b.segments, positions, k))
                    weights_of[-1].append(weights[mine].to(self.device))
                    counts[k] += records
                else:
                    weights_of[-1].append(None)
                    counts[k] += int((targets != IGNORE).sum())
        for batch, positions, depth_weights in zip(batches, positions_of, weights_of):
            batch = batch.rows(mine.start, mine.stop).to(self.device)
            positions = positions[mine].to(self.device)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
                out = model(batch.ids, segments=batch.segments)
            ce = []
            for k, logits in enumerate([out.logits] + out.mtp_logits):
                targets, w = packed_targets(batch.labels, positions, k), depth_weights[k]
                total = cross_entropy(logits.flatten(0, 1), targets.flatten(), "sum",
                                      None if w is None else w.flatten())
                if k == 0 and self.teacher is not None:
                    with torch.no_grad():
                        teacher_logits = self.teacher(batch.ids, segments=batch.segments, mtp=False).logits
                    kd = distillation_kl(logits, teacher_logits, targets, cfg.kd_temperature, w)
                    total = cfg.kd_alpha * kd + (1 - cfg.kd_alpha) * total
                ce.append(total / max(counts[k], 1) * self.world)  # this rank's share, times the ranks averaging it
            balance = torch.zeros((), device=self.device)
            for row, info in enumerate(out.routing):
                groups = packed_groups(batch.segments, positions, 0 if row < n_main else row - n_main + 1)
                if alpha:
                    balance = balance + alpha * sequence_balance_loss(info, rows, groups) / cfg.grad_accum
                real = groups.reshape(-1) >= 0
                loads[row] += torch.bincount(info.topk_idx[real].flatten(), minlength=experts).to(loads.dtype)
            main, mtp = ce[0], ce[1:]
            total = main + balance + (mtp_scale * sum(mtp) if mtp else 0.0)
            total.backward()
            sums += torch.stack([main.detach(), balance.detach(), *(m.detach() for m in mtp)]).double().cpu()
        return sums, loads.double().cpu()

    def _sync_gradients(self) -> None:
        """Average the gradients over the data-parallel and expert-parallel ranks (the pipeline trainer first
        adds the copies of a DualPipe stage and of the embedding)."""
        if self.mesh is not None:
            sync_gradients(self.model, self.mesh)

    @torch.no_grad()
    def _bias_rows(self) -> torch.Tensor:
        """Every MoE layer's e_score_correction_bias [MoE layers, experts] float64, in metric order: each rank adds
        the routers it holds, divided by how many hold them (every copy is equal)."""
        n = len(self.model.config.moe_layer_names())
        bias = torch.zeros(n, self.model.config.n_routed_experts or 0, dtype=torch.float64)
        held = torch.zeros(n, 1, dtype=torch.float64)
        for row, router in self.routers:
            bias[row] += router.e_score_correction_bias.double().cpu()
            held[row] += 1
        if self.cfg.pp > 1:  # (without a pipeline every rank holds every router)
            host_all_reduce(bias)
            host_all_reduce(held)
        return bias / held.clamp(min=1)

    # ---------------------------------------------------------------- the loop
    def fit(self) -> StepMetrics | None:
        """Train until max_steps (or the time budget); checkpoint every checkpoint_every steps and at the end.
        Returns the last step's metrics, None when the run was already complete.

        With --minutes alone the step count is re-estimated after every step from the recent step times until the
        LR decay would start, then fixed (`_estimate_total`; DESIGN.md, "Schedules at small scale"). A resumed run
        has the budget its earlier sessions left (`budget_spent_s`, saved with each checkpoint)."""
        cfg = self.cfg
        if self.main_rank:
            self.run.root.mkdir(parents=True, exist_ok=True)
            write_atomic(self.run.config_file, json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
        start, spent = self.clock(), self.budget_spent_s
        deadline = start + cfg.minutes * 60 - spent if cfg.minutes else None
        if self.total_steps is None:
            self.total_steps = UNKNOWN_STEPS  # until the first estimate
        step_s: deque[float] = deque(maxlen=STEP_WINDOW)  # recent steps' wall times, checkpoints left out
        checkpoint_s = 0.0  # the last checkpoint's wall time
        untimed_until = self.step + UNTIMED_STEPS
        last: StepMetrics | None = None
        if self.world > 1:
            dist.barrier()
        log = MetricsWriter(self.run.root, enabled=self.main_rank)
        with _Progress(cfg.progress and self.main_rank) as bar, log:
            task = bar.add(None if self.estimating else self.total_steps, self.step)
            while self.step < self.total_steps:
                if deadline is not None and self._all_agree(self.clock() > deadline):
                    break
                t0 = self.clock()
                last = self.train_step()
                log.write(last)
                bar.update(task, self.step, last)
                now = self.clock()
                if self.step > untimed_until:
                    step_s.append(now - t0)
                if self.estimating and step_s:
                    self._estimate_total(step_s, deadline - now, checkpoint_s)
                    bar.set_total(task, self.total_steps)
                self.budget_spent_s = spent + now - start
                if self.step % cfg.checkpoint_every == 0:
                    self.save_checkpoint()
                    checkpoint_s = self.clock() - now
        if self.estimating:  # the budget ran out while estimating: the run is as long as it got
            self.total_steps, self.estimating = self.step, False
        if last and self.step % cfg.checkpoint_every != 0:
            self.save_checkpoint()
        return last

    def clock(self) -> float:
        """Seconds on the clock the time budget runs on (`time.monotonic`; tests replace it)."""
        return time.monotonic()

    def _estimate_total(self, step_s: deque[float], left_s: float, checkpoint_s: float) -> None:
        """Re-estimate total_steps for a time-budgeted run: the most steps that fit in BUDGET_MARGIN x the `left_s`
        seconds left, at the mean of the recent step times `step_s` (s), with each checkpoint they pass through
        (every checkpoint_every steps, and the final one) costing `checkpoint_s`; rank 0's estimate holds on every
        rank. Once the next step would be in the LR decay under the estimate, the estimate is fixed
        (`frozen_total`) and `estimating` ends."""
        per_step, every, budget = sum(step_s) / len(step_s), self.cfg.checkpoint_every, left_s * BUDGET_MARGIN

        def cost(n: int) -> float:  # seconds for n more steps and their checkpoints
            end = self.step + n
            return n * per_step + (end // every - self.step // every + (end % every != 0)) * checkpoint_s

        n = max(0, int(budget / per_step))
        while n > 0 and cost(n) > budget:
            n -= 1
        estimate = max(int(self._from_rank0(self.step + n)), self.step + 1)
        if self.step >= decay_start_step(estimate):
            self.total_steps, self.estimating = frozen_total(self.step, estimate), False
        else:
            self.total_steps = estimate

    # ---------------------------------------------------------------- checkpoints
    def save_checkpoint(self) -> Path | None:
        """HF-format checkpoint + tokenizer + every rank's trainer state (JSON + safetensors, `dsv3.runs`), written
        sharded and atomically (collective under EP, PP and FSDP2): each rank writes the official tensors it owns
        (`_checkpoint_tensors`: nothing is gathered, except one parameter at a time under FSDP2; nothing pickled)
        and its own trainer state into a working directory, then rank 0 indexes the shards from their headers and
        moves the directory into place. Then older checkpoints beyond keep_checkpoints are deleted, but only those
        this trainer wrote or the run's record lists, never any other directory.

        Raises:
            TrainError: a parameter is NaN or inf: nothing is saved and no checkpoint is rotated out; the step's
                directory exists and is not this run's; a write failed on some rank (all ranks raise together,
                and the working directory is removed).
        """
        self._check_finite_params(f"at step {self.step}, before saving its checkpoint")
        path = self.run.checkpoint_dir(self.step)
        own = set(self.run.recorded_checkpoints()) | self._written if self.main_rank else set()
        replace = path.name in own
        tmp = path.parent / f".{path.name}.{PARTIAL}"

        def start() -> None:
            if not replace:
                refuse_existing(path)  # a foreign directory: never written over
            start_checkpoint(path, PARTIAL)

        def write() -> None:  # this rank's tensors (each written once over all ranks) and its trainer state
            tensors = iter(self._checkpoint_tensors())
            try:
                write_shards(stored_tensors(tensors), tmp, f"rank{self.rank:05d}-")
            finally:
                for _ in tensors:  # a failed write still takes part in the remaining (collective) gathers
                    pass
            state = {"step": self.step, "total_steps": self.total_steps, "estimating": self.estimating,
                     "budget_spent_s": self.budget_spent_s, "held": self.held_memory(), "fp8": self.fp8_inventory(),
                     "optimizer": local_state(self.optimizer.state_dict()),
                     "rng": torch.get_rng_state(), "train_config": dataclasses.asdict(self.cfg)}
            for name, content in trainer_state_files(state, self.rank, self.world).items():
                (tmp / name).write_bytes(content)

        def finish() -> None:
            tokenizer = {TOKENIZER: self.data.tokenizer_file.read_bytes()}
            finish_checkpoint(tmp, path, self.model.config, torch.float32, tokenizer, replace=replace)

        # each phase ends with every rank learning whether any rank failed, so all stop together (the
        # working directory is shared: every rank writes into the one rank 0 made, as on one machine or a
        # shared filesystem)
        self._on_every_rank(start if self.main_rank else None, f"saving step {self.step}", tmp)
        self._on_every_rank(write, f"saving step {self.step}", tmp)
        self._on_every_rank(finish if self.main_rank else None, f"saving step {self.step}", tmp)
        if self.main_rank:
            self._written.add(path.name)
            own.add(path.name)
            self.run.record_checkpoints(sorted(own))
            existing = sorted(name for name in own if (self.run.checkpoints_dir / name).is_dir() and name != path.name)
            for name in existing[: max(0, len(existing) + 1 - self.cfg.keep_checkpoints)]:  # + the new one
                shutil.rmtree(self.run.checkpoints_dir / name, ignore_errors=True)
                own.discard(name)
                self.run.record_checkpoints(sorted(own))
        if self.world > 1:
            dist.barrier()
        return path

    def _on_every_rank(self, work: Callable[[], None] | None, what: str, partial: Path | None = None) -> None:
        """Run `work` on this rank (None: nothing here), then learn whether it failed on any rank; if so every
        rank raises TrainError (the failing one with its reason), after removing the sharded save's working
        directory `partial` (dsv3's own: `.step-N.partial`), so that no rank waits forever on another. An
        unexpected exception (a bug, not a disk or a file) is also announced to the other ranks, then re-raised
        as it is on its own rank, traceback included."""
        message, error = "", None
        if work is not None:
            try:
                work()
            except (OSError, Dsv3Error, SafetensorError) as e:
                message = f"{what} failed on rank {self.rank}: {e}"
            except Exception as e:  # every rank must learn of it, whatever it is
                message, error = f"{what} failed on rank {self.rank}: {type(e).__name__}: {e}", e
        if self._sum_over_ranks(float(bool(message))):
            if partial is not None and self.main_rank:
                shutil.rmtree(partial, ignore_errors=True)
            if error is not None:
                raise error
            raise TrainError(message or f"{what} failed on another rank (see its message)")

    def _checkpoint_tensors(self) -> Iterable[tuple[str, torch.Tensor]]:
        """(official name, tensor) this rank writes into a checkpoint: every tensor once over all ranks. Under
        FSDP2 each parameter is all-gathered in turn (every rank must exhaust this). (The pipeline trainer: each
        stage's, from the rank that holds it.)"""
        if self.fsdp is not None:
            return gathered_slots(self.model, self._writes)
        return [(name, slot.view.detach()) for name, slot in official_slots(self.model).items() if self._writes(name)]

    def _writes(self, name: str) -> bool:
        """Whether this rank writes official tensor `name` of the ones it holds: a replicated tensor from the
        first rank of its data group, an expert from the first data-parallel replica of its shard."""
        mesh = self.mesh
        return mesh is None or (mesh.dp_rank == 0 and (mesh.ep_rank == 0 or is_expert_param(name)))

    def _named_params(self):
        """(name, parameter) of the tensors this rank trains, each stage once (a DualPipe partner holds the other
        copy): the global gradient norm and the finiteness checks."""
        return self.model.named_parameters()

    def _check_finite(self, what: str, value: float, lr: float) -> None:
        """Raises TrainError when `value` (the loss, the gradient norm; the same on every rank) is NaN or inf."""
        if not math.isfinite(value):
            raise TrainError(f"the run diverged at step {self.step + 1}: {what} is {value} at learning rate {lr:.3g} "
                             f"(peak --lr {self.cfg.lr:g}); lower --lr or check the data. Nothing was saved or "
                             "deleted; the last checkpoint is still there")

    @torch.no_grad()
    def _check_finite_params(self, when: str) -> None:
        """Raises TrainError, on every rank, when any rank holds a NaN or inf parameter (named on the rank that
        does)."""
        named = list(self._named_params())
        flags = (torch.stack([torch.isfinite(local(p)).all() for _, p in named]) if named
                 else torch.ones(0, dtype=torch.bool))
        bad = (~flags).nonzero().flatten().tolist()
        if self._sum_over_ranks(float(len(bad))):
            where = f"parameter {named[bad[0]][0]}" if bad else "a parameter on another rank"
            raise TrainError(f"the run diverged: {where} is NaN or inf {when} (peak --lr {self.cfg.lr:g}); lower "
                             "--lr. Nothing was saved or deleted; the last checkpoint is still there")

    def _sum_over_ranks(self, value: float) -> float:
        """`value` summed over every rank (collective when distributed)."""
        if self.world == 1:
            return value
        total = torch.tensor([value], dtype=torch.float64)
        host_all_reduce(total)
        return float(total)

    def _all_agree(self, flag: bool) -> bool:
        """Rank 0's decision, so that every rank stops at the same step."""
        return bool(self._from_rank0(float(flag)))

    def _from_rank0(self, value: float) -> float:
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device="cuda" if dist.get_backend() == "nccl" else "cpu")
        dist.broadcast(t, src=0)
        return float(t)


def compile_layers(model: torch.nn.Module) -> None:
    """`--compile`: torch.compile every `DecoderLayer` of `model` in place (MTP modules too; parameter names
    unchanged). Layers of one kind share their compiled graphs (dynamo inlines nn.Module parameters as inputs), and
    the routed experts' two grouped GEMMs run eagerly between graphs (`RoutedExperts.expert_gemm`)."""
    for layer in model.modules():
        if isinstance(layer, DecoderLayer):
            layer.compile()


def _layout(cfg: TrainConfig, world: int) -> str:
    """What a rank's optimizer state depends on, as flags (dp resolved from the world size): the mesh, ZeRO-1 and
    which stages a rank holds (DualPipe: two copies; DualPipeV: two stages; 1F1B and ZB-H1, interchangeable here:
    one). Micro-batch counts do not matter."""
    dp = cfg.dp or world // (cfg.ep * cfg.pp)
    copies = {"1f1b": "1f1b|zb1p", "zb1p": "1f1b|zb1p"}.get(cfg.pp_schedule, cfg.pp_schedule)
    pipeline = f" --pp-schedule {copies}" if cfg.pp > 1 else ""
    return f"--pp {cfg.pp} --dp {dp} --ep {cfg.ep} --zero {cfg.zero}{pipeline}"


def _init_distributed(cfg: TrainConfig) -> tuple[int, int]:
    """(rank, world size): of the process group already set up (a dry run's fake one), else from torchrun's
    environment when launched by it, else (0, 1)."""
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        need = cfg.ep * cfg.pp * (cfg.dp or 1)
        if need > 1:
            raise TrainError(f"dp x ep x pp = {cfg.dp or 1} x {cfg.ep} x {cfg.pp} needs {need} processes: launch "
                             f"with torchrun --nproc-per-node {need} -m dsv3 train ...")
        return 0, 1
    if not dist.is_initialized():
        if torch.cuda.is_available():  # one GPU per process: "cuda" then means this rank's own device
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


PARTIAL = "partial"  # a sharded save's working directory, .step-N.partial beside the checkpoint it becomes
RESUME_FIXED = ("model_config", "mtp_depth", "data", "seed")  # settings a resumed run keeps from its start


def resume_config(run: str | Path, **overrides) -> TrainConfig:
    """The saved TrainConfig of `run`, with `overrides` (e.g. a larger max_steps) applied.

    Raises:
        TrainError: `run` is not a run directory, or an override would change the model or the data a resumed
            run must keep (RESUME_FIXED).
    """
    path = Run(run).config_file
    if not path.exists():
        raise TrainError(f"cannot resume {run}: no train_config.json (not a dsv3 run directory)")
    saved = TrainConfig.from_dict(json.loads(path.read_text()), str(path))
    for name in RESUME_FIXED:
        if overrides.get(name) is not None and overrides[name] != getattr(saved, name):
            raise TrainError(f"cannot change {name} when resuming {run} (it was {getattr(saved, name)!r}); "
                             "start a new run with another --out instead")
    return dataclasses.replace(saved, out=str(run), **{k: v for k, v in overrides.items()
                                                      if v is not None and k != "out"})


class _Progress:
    """Rich progress bar: step, loss, tokens/s, ETA. Silent when disabled."""

    def __init__(self, enabled: bool):
        self.enabled = enabled

    def __enter__(self):
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[info]}"), TimeRemainingColumn())
            self.bar.start()
        return self

    def __exit__(self, *exc):
        if self.enabled:
            self.bar.stop()

    def add(self, total, completed):
        return self.bar.add_task("train", total=total, completed=completed, info="") if self.enabled else None

    def set_total(self, task, total):
        if self.enabled:
            self.bar.update(task, total=total)

    def update(self, task, step, m):
        if self.enabled:
            mtp = " ".join(f"mtp{k + 1} {v:.3f}" for k, v in enumerate(m.mtp_loss))
            info = (f"loss {m.loss:.3f} {mtp} | {m.tokens_per_s:,.0f} tok/s | "
                    f"MaxVio {max(m.max_vio, default=0):.2f}")
            self.bar.update(task, completed=step, info=info)

