"""A training run's directory: its layout, the per-step metrics record and the trainer-state files.

This module is the one place that knows how a run is laid out on disk; the trainer writes through it and the CLI,
plots, evaluation, the demo, benchmarks and tests read through it:

    RUN/
      train_config.json              the run's TrainConfig (resume reads it back)
      metrics.jsonl                  one `StepMetrics` record per optimizer step, as a JSON line
      checkpoints/step-NNNNNNNN/     an HF-format checkpoint (`dsv3.checkpoint`) + tokenizer.json + trainer state
      plots/                         `dsv3 plot` output

A *checkpoint directory* is anything with a `config.json`; `resolve_checkpoint` accepts either that or a run
(meaning its latest checkpoint), so every command that reads weights takes both.
"""

from __future__ import annotations

import dataclasses
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import Dsv3Error

TRAIN_CONFIG = "train_config.json"
METRICS = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
PLOTS = "plots"
TRAINER_STATE = "trainer_state.pt"
TOKENIZER = "tokenizer.json"


class RunError(Dsv3Error, ValueError):
    """A path that is not the run or checkpoint it should be; the message names it."""


# ------------------------------------------------------------------------------------------------ layout
@dataclass(frozen=True)
class Run:
    """Paths inside one run directory. Creates nothing."""

    root: Path

    def __init__(self, root: str | Path):
        object.__setattr__(self, "root", Path(root))

    @property
    def config_file(self) -> Path:
        return self.root / TRAIN_CONFIG

    @property
    def metrics_file(self) -> Path:
        return self.root / METRICS

    @property
    def checkpoints_dir(self) -> Path:
        return self.root / CHECKPOINTS

    @property
    def plots_dir(self) -> Path:
        return self.root / PLOTS

    def checkpoint_dir(self, step: int) -> Path:
        """Where the checkpoint of optimizer step `step` goes: checkpoints/step-NNNNNNNN (sorts by step)."""
        return self.checkpoints_dir / f"step-{step:08d}"

    def checkpoints(self) -> list[Path]:
        """The run's checkpoint directories, oldest first."""
        if not self.checkpoints_dir.is_dir():
            return []
        return sorted(p for p in self.checkpoints_dir.glob("step-*") if (p / "config.json").exists())

    def latest_checkpoint(self) -> Path | None:
        ckpts = self.checkpoints()
        return ckpts[-1] if ckpts else None

    def exists(self) -> bool:
        """Whether this directory already holds a run (its config, metrics or checkpoints)."""
        return self.config_file.exists() or self.metrics_file.exists() or self.checkpoints_dir.exists()


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory (it has a config.json), or a training run directory (its latest checkpoint).

    Raises:
        RunError: the path is neither.
    """
    path = Path(path)
    if (path / "config.json").exists():
        return path
    latest = Run(path).latest_checkpoint()
    if latest is not None:
        return latest
    if not path.exists():
        raise RunError(f"{path} does not exist")
    raise RunError(f"{path}: not a checkpoint directory (no config.json) nor a run with checkpoints")


def run_of(checkpoint: Path) -> Run | None:
    """The run a checkpoint directory belongs to (RUN/checkpoints/step-N), or None for a free-standing one."""
    checkpoint = Path(checkpoint)
    return Run(checkpoint.parent.parent) if checkpoint.parent.name == CHECKPOINTS else None


def model_name(checkpoint: Path) -> str:
    """A short name for a checkpoint: its run's directory name, else its own."""
    run = run_of(checkpoint)
    return (run.root.resolve().name if run else Path(checkpoint).resolve().name) or "dsv3"


# ------------------------------------------------------------------------------------------------ metrics
@dataclass
class StepMetrics:
    """What one optimizer step reports: a line of metrics.jsonl, the progress bar's text, a point of the plots.

    Losses are in nats per token, averaged over the step's global batch; per-MoE-layer lists are in metric order
    (main MoE layers by index, then the MTP modules' MoE layers: `ModelConfig.moe_layer_names()`).
    """

    step: int  # optimizer steps done, 1-based
    loss: float  # main next-token cross-entropy
    mtp_loss: list[float]  # per MTP depth k = 1..D: the cross-entropy of predicting token t+1+k
    balance_loss: float  # the weighted sequence-wise (or conventional) balance loss added to the objective
    lr: float  # learning rate used for this step
    grad_norm: float  # global L2 norm of the gradient before clipping
    tokens_per_s: float  # trained tokens per second of this step (wall clock)
    mfu: float  # achieved model FLOP/s / the measured matmul peak of this machine, per rank
    tokens: int  # trained tokens so far
    step_time: float  # seconds
    max_vio: list[float] = field(default_factory=list)  # per MoE layer: max load / mean load - 1
    load: list[list[int]] = field(default_factory=list)  # per MoE layer: tokens routed to each expert
    bias: list[list[float]] = field(default_factory=list)  # per MoE layer: e_score_correction_bias after the step

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, d: dict) -> StepMetrics:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def read_metrics(run: str | Path) -> list[StepMetrics]:
    """Every step's record of a run, in order.

    Raises:
        RunError: no metrics.jsonl, an empty one, or a line that is not a metrics record (file and line named).
    """
    path = Run(run).metrics_file
    if not path.exists():
        raise RunError(f"{run}: no {METRICS} (not a dsv3 training run)")
    rows = []
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(StepMetrics.from_dict(json.loads(line)))
        except (json.JSONDecodeError, TypeError) as e:
            raise RunError(f"{path}:{lineno}: not a metrics record ({e})") from None
    if not rows:
        raise RunError(f"{path} is empty: the run has not finished a step yet")
    return rows


class MetricsWriter:
    """Appends `StepMetrics` lines to a run's metrics.jsonl (flushed per line); writes nothing when not `enabled`
    (ranks other than 0). `truncate_after(step)` drops the lines of steps after a checkpoint being resumed (they
    will be recomputed)."""

    def __init__(self, run: str | Path, enabled: bool = True):
        self.path = Run(run).metrics_file
        self.enabled = enabled
        self._file = None

    def truncate_after(self, step: int) -> None:
        if self.path.exists():
            lines = [ln for ln in self.path.read_text().splitlines() if ln and json.loads(ln)["step"] <= step]
            self.path.write_text("".join(ln + "\n" for ln in lines))

    def __enter__(self) -> MetricsWriter:
        if self.enabled:
            self._file = open(self.path, "a")
        return self

    def __exit__(self, *exc) -> None:
        if self._file is not None:
            self._file.close()

    def write(self, m: StepMetrics) -> None:
        if self._file is not None:
            self._file.write(m.to_json() + "\n")
            self._file.flush()


# ------------------------------------------------------------------------------------------------ trainer state
def trainer_state_bytes(state: dict) -> bytes:
    """The serialized trainer state (step, schedule length, optimizer state, RNG, train config) of a checkpoint."""
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def load_trainer_state(checkpoint: str | Path) -> dict:
    """The trainer state saved beside a checkpoint's weights.

    Raises:
        RunError: the checkpoint holds no trainer state (it was not written by `dsv3 train`).
    """
    path = Path(checkpoint) / TRAINER_STATE
    if not path.exists():
        raise RunError(f"{checkpoint}: no {TRAINER_STATE} (not a checkpoint written by dsv3 train)")
    return torch.load(path, map_location="cpu", weights_only=False)


def has_trainer_state(checkpoint: str | Path) -> bool:
    return (Path(checkpoint) / TRAINER_STATE).exists()


def train_setting(checkpoint: str | Path, key: str):
    """One TrainConfig value recorded with a checkpoint (e.g. its dataset), or None when it records none."""
    if not has_trainer_state(checkpoint):
        return None
    return load_trainer_state(checkpoint)["train_config"].get(key)

