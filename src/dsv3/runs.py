"""A training run's directory: its layout, the per-step metrics record, the trainer-state files, and how every
dsv3 command writes what it creates.

This module is the one place that knows how a run is laid out on disk; the trainer writes through it and the CLI,
plots, evaluation, the demo, benchmarks and tests read through it:

    RUN/
      train_config.json              the run's TrainConfig (resume reads it back)
      metrics.jsonl                  one `StepMetrics` record per optimizer step, as a JSON line
      checkpoints.json               the run's record: the checkpoint directories this run wrote (rotation's list)
      checkpoints/step-NNNNNNNN/     an HF-format checkpoint (`dsv3.checkpoint`) + tokenizer.json + trainer state
      plots/                         `dsv3 plot` output

A *checkpoint directory* is anything with a `config.json`; `resolve_checkpoint` accepts either that or a run
(meaning its latest checkpoint), so every command that reads weights takes both.

Trainer state (format "dsv3-trainer-state", version 1). Never a pickle: loading a checkpoint from someone else
runs no code. One file pair per rank of the run that wrote it:

    trainer_state.json + trainer_state.safetensors                          a single-process run
    trainer_state-rank{r:05d}-of-{n:05d}.json + .safetensors, r = 0..n-1    a run on n ranks (torchrun)

The JSON holds {"format", "version", "rank", "world_size", "step", "total_steps", "estimating", "budget_spent_s",
"train_config", "optimizer", "rng"} (`estimating`: a `--minutes` run still re-estimating its step count;
`budget_spent_s`: the seconds of that budget used so far): numbers, strings, lists and objects as themselves; every
tensor is replaced by {"__tensor__": KEY} and stored in the safetensors file under KEY, a dotted path from the top
(`optimizer.state.3.exp_avg`, `rng`); a tuple is {"__tuple__": [...]} and a dict with non-string keys (the
optimizer's parameter indices) is {"__items__": [[key, value], ...]}. `optimizer` is that rank's
`optimizer.state_dict()` (under ZeRO-1 and expert parallelism, its shard), `rng` its `torch.get_rng_state()` (a
uint8 tensor). Resuming needs as many ranks as wrote the state. Older runs stored one `trainer_state.pt` pickle; it
is refused (unpickling can run code) until `dsv3 runs upgrade RUN` converts it, loading it with
`torch.load(weights_only=True)` (tensors and plain data only).

Writing outputs (every command that creates something): `claim_output` refuses an existing non-empty target,
naming it, unless told to overwrite, and then moves the old one aside (`OUT.old-YYYYmmdd-HHMMSS`) rather than
deleting it; `write_atomic` writes a file through a temporary file and a rename, so a crash mid-write leaves the
previous version. A trainer deletes only checkpoints it wrote or that its run's record lists.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from .errors import Dsv3Error

TRAIN_CONFIG = "train_config.json"
METRICS = "metrics.jsonl"
RECORD = "checkpoints.json"
CHECKPOINTS = "checkpoints"
PLOTS = "plots"
TRAINER_STATE = "trainer_state"  # the stem of the trainer-state files (see the module docstring)
LEGACY_TRAINER_STATE = "trainer_state.pt"  # the old pickle, refused
STATE_FORMAT, STATE_VERSION = "dsv3-trainer-state", 1
TOKENIZER = "tokenizer.json"


class RunError(Dsv3Error, ValueError):
    """A path that is not the run or checkpoint it should be; the message names it."""


class OutputExistsError(Dsv3Error, FileExistsError):
    """A command's output path already holds something it did not create; the message names it."""


# ------------------------------------------------------------------------------------------------ writing outputs
def claim_output(path: str | Path, overwrite: bool = False, hint: str = "choose another --out") -> Path | None:
    """Make `path` free for a command to create: absent or an empty directory is free; anything else is refused,
    or with `overwrite` moved aside to `PATH.old-YYYYmmdd-HHMMSS` (never deleted).

    Returns:
        where the old content was moved, or None when there was none.
    Raises:
        OutputExistsError: `path` exists, is not an empty directory, and `overwrite` is False; the message names
            it and gives `hint` (e.g. "continue it with --resume PATH").
    """
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return None
    if path.is_dir() and not path.is_symlink() and not any(path.iterdir()):
        return None
    if not overwrite:
        raise OutputExistsError(f"{path} already exists and is not empty; {hint}, or pass --overwrite to move it "
                                f"aside to {path.name}.old-<timestamp> (nothing is deleted)")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside = path.with_name(f"{path.name}.old-{stamp}")
    n = 1
    while aside.exists() or aside.is_symlink():
        aside = path.with_name(f"{path.name}.old-{stamp}-{n}")
        n += 1
    os.rename(path, aside)
    return aside


def write_atomic(path: str | Path, data: str | bytes) -> Path:
    """Write `data` to `path` through a temporary file in the same directory and a rename: readers and a crash
    mid-write see the old file or the new one, never a part."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb" if isinstance(data, bytes) else "w") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


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

    @property
    def record_file(self) -> Path:
        return self.root / RECORD

    def recorded_checkpoints(self) -> list[str]:
        """Names (step-NNNNNNNN) of the checkpoint directories the run's record says this run wrote; [] for a run
        without a record (one from before records existed: its checkpoints are never rotated out).

        Raises:
            RunError: the record is not a JSON list of step-* names (the file is named).
        """
        if not self.record_file.exists():
            return []
        try:
            names = json.loads(self.record_file.read_text())["checkpoints"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise RunError(f"{self.record_file}: not a checkpoint record ({e})") from None
        if not isinstance(names, list) or not all(isinstance(n, str) and n.startswith("step-") and "/" not in n
                                                  and n not in (".", "..") for n in names):
            raise RunError(f"{self.record_file}: not a checkpoint record (expected a list of step-* names)")
        return names

    def record_checkpoints(self, names: list[str]) -> None:
        """Write the run's record: the checkpoint directories (step-NNNNNNNN) this run wrote and still keeps."""
        write_atomic(self.record_file, json.dumps({"checkpoints": sorted(set(names))}, indent=2) + "\n")

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
    mfu: float  # achieved model FLOP/s / (ranks x one device's peak: --peak-flops or the measured matmul rate)
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


def jsonl_records(path: Path, error: type[Dsv3Error], text: str | None = None) -> list[tuple[int, object]]:
    """(line number, parsed value) of every non-blank line of a JSON Lines file: the one reader of the JSONL
    files dsv3 is given (training documents, SFT conversations, task records). text: the file's content when the
    caller has read it already.

    Raises:
        error: the file cannot be read or is not UTF-8 (`cannot read PATH: reason`), or a line is not JSON
            (`PATH:LINE: not JSON (reason)`).
    """
    if text is None:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise error(f"cannot read {path}: {e}") from None
    out = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            out.append((lineno, json.loads(line)))
        except json.JSONDecodeError as e:
            raise error(f"{path}:{lineno}: not JSON ({e.msg})") from None
    return out


def _metric_lines(path: Path) -> list[tuple[int, str, dict]]:
    """(line number, line, parsed record) of every record in a metrics.jsonl. A last line without its newline that
    does not parse was cut short by a crash mid-write and is left out.

    Raises:
        RunError: any other line that is not a JSON object with a step (file and line named).
    """
    text = path.read_text()
    lines = text.splitlines()
    out = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            int(record["step"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            if lineno == len(lines) and not text.endswith("\n"):
                break  # a write cut short
            raise RunError(f"{path}:{lineno}: not a metrics record ({e})") from None
        out.append((lineno, line, record))
    return out


def read_metrics(run: str | Path) -> list[StepMetrics]:
    """Every step's record of a run, in order.

    Raises:
        RunError: no metrics.jsonl, an empty one, or a line that is not a metrics record (file and line named).
    """
    path = Run(run).metrics_file
    if not path.exists():
        raise RunError(f"{run}: no {METRICS} (not a dsv3 training run)")
    rows = []
    for lineno, _, record in _metric_lines(path):
        try:
            rows.append(StepMetrics.from_dict(record))
        except TypeError as e:
            raise RunError(f"{path}:{lineno}: not a metrics record ({e})") from None
    if not rows:
        raise RunError(f"{path} is empty: the run has not finished a step yet")
    return rows


class MetricsWriter:
    """Appends `StepMetrics` lines to a run's metrics.jsonl (flushed per line); writes nothing when not `enabled`
    (ranks other than 0). `truncate_after(step)` drops the lines of steps after a checkpoint being resumed (they
    will be recomputed), rewriting the file atomically."""

    def __init__(self, run: str | Path, enabled: bool = True):
        self.path = Run(run).metrics_file
        self.enabled = enabled
        self._file = None

    def truncate_after(self, step: int) -> None:
        """Keep the records of steps <= `step` (and drop a last line cut short by a crash).

        Raises:
            RunError: a line in the middle of the file is not a metrics record.
        """
        if self.path.exists():
            kept = [line for _, line, record in _metric_lines(self.path) if record["step"] <= step]
            write_atomic(self.path, "".join(line + "\n" for line in kept))

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
def trainer_state_names(rank: int = 0, world: int = 1) -> tuple[str, str]:
    """The (JSON, safetensors) file names of rank `rank`'s trainer state, in a run of `world` ranks."""
    stem = TRAINER_STATE if world == 1 else f"{TRAINER_STATE}-rank{rank:05d}-of-{world:05d}"
    return stem + ".json", stem + ".safetensors"


def _join(key: str, part: str) -> str:
    return f"{key}.{part}" if key else part


def _encode(value, key: str, tensors: dict[str, torch.Tensor]):
    """`value` as JSON data, its tensors moved into `tensors` under dotted keys (the module docstring's scheme)."""
    if isinstance(value, torch.Tensor):
        if key in tensors:
            raise ValueError(f"trainer state: two tensors under the key {key!r}")
        tensors[key] = value.detach().to("cpu").contiguous()
        return {"__tensor__": key}
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v, _join(key, str(i)), tensors) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, _join(key, str(i)), tensors) for i, v in enumerate(value)]
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in value):
            return {k: _encode(v, _join(key, k), tensors) for k, v in value.items()}
        for k in value:
            if not (k is None or isinstance(k, (bool, int, float, str))):
                raise TypeError(f"trainer state: {key} has a key of type {type(k).__name__}")
        return {"__items__": [[k, _encode(v, _join(key, str(k)), tensors)] for k, v in value.items()]}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"trainer state: {key} is a {type(value).__name__}, which JSON + safetensors cannot hold")


def _decode(value, tensors: dict[str, torch.Tensor], where: Path):
    """The inverse of `_encode`. Raises RunError for a tensor key missing from the safetensors file."""
    if isinstance(value, list):
        return [_decode(v, tensors, where) for v in value]
    if not isinstance(value, dict):
        return value
    if set(value) == {"__tensor__"}:
        if value["__tensor__"] not in tensors:
            raise RunError(f"{where}: tensor {value['__tensor__']!r} is missing from its safetensors file")
        return tensors[value["__tensor__"]]
    if set(value) == {"__tuple__"} and isinstance(value["__tuple__"], list):
        return tuple(_decode(v, tensors, where) for v in value["__tuple__"])
    if set(value) == {"__items__"} and isinstance(value["__items__"], list):
        if not all(isinstance(kv, list) and len(kv) == 2 and not isinstance(kv[0], (list, dict))
                   for kv in value["__items__"]):
            raise RunError(f"{where}: malformed __items__ entry")
        return {k: _decode(v, tensors, where) for k, v in value["__items__"]}
    return {k: _decode(v, tensors, where) for k, v in value.items()}


def trainer_state_files(state: dict, rank: int = 0, world: int = 1) -> dict[str, bytes]:
    """One rank's trainer state as its two files, name -> content (to write into a checkpoint directory).

    state: {"step": int, "total_steps": int, "train_config": dict, "optimizer": this rank's optimizer.state_dict(),
        "rng": torch.get_rng_state()}; any nesting of dicts, lists, tuples, numbers, strings and tensors.
    Raises:
        TypeError: a value of another type (a programming error, not user input).
    """
    tensors: dict[str, torch.Tensor] = {}
    doc = {"format": STATE_FORMAT, "version": STATE_VERSION, "rank": rank, "world_size": world}
    for key, value in state.items():
        doc[key] = _encode(value, key, tensors)
    json_name, tensor_name = trainer_state_names(rank, world)
    return {json_name: (json.dumps(doc, indent=1) + "\n").encode(),
            tensor_name: safetensors_save(tensors, metadata={"format": "pt"})}


def _legacy_message(checkpoint: Path) -> str:
    run = run_of(checkpoint)
    target = run.root if run is not None else checkpoint
    return (f"{checkpoint / LEGACY_TRAINER_STATE}: trainer state in the old pickle format, which dsv3 no longer loads "
            f"(unpickling a file can run arbitrary code). If you trust where it came from, convert it with "
            f"`dsv3 runs upgrade {target}` (it reads tensors and plain data only)")


def _read_state_json(path: Path) -> dict:
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RunError(f"{path}: not a readable trainer state ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != STATE_FORMAT:
        raise RunError(f"{path}: not a dsv3 trainer state (no \"format\": \"{STATE_FORMAT}\")")
    if doc.get("version") != STATE_VERSION:
        raise RunError(f"{path}: trainer state version {doc.get('version')!r}; this dsv3 reads version {STATE_VERSION}")
    missing = [k for k in ("rank", "world_size", "step", "total_steps", "train_config") if k not in doc]
    if missing or not isinstance(doc["world_size"], int) or doc["world_size"] < 1:
        raise RunError(f"{path}: trainer state without a valid {', '.join(missing) or 'world_size'}")
    return doc


def _rank0_state(checkpoint: Path) -> tuple[Path, dict] | None:
    """Rank 0's trainer-state JSON (path, content); None when the checkpoint holds no trainer state."""
    candidates = (checkpoint / trainer_state_names()[0], *checkpoint.glob(f"{TRAINER_STATE}-rank00000-of-*.json"))
    found = [p for p in candidates if p.is_file()]
    if not found:
        if (checkpoint / LEGACY_TRAINER_STATE).exists():
            raise RunError(_legacy_message(checkpoint))
        return None
    if len(found) > 1:
        raise RunError(f"{checkpoint}: more than one trainer state ({', '.join(p.name for p in found)})")
    doc = _read_state_json(found[0])
    if trainer_state_names(0, doc["world_size"])[0] != found[0].name:
        raise RunError(f"{found[0]}: says world_size {doc['world_size']}, which its file name contradicts")
    return found[0], doc


def load_trainer_state(checkpoint: str | Path, rank: int = 0, world: int | None = None) -> dict:
    """Rank `rank`'s trainer state saved beside a checkpoint's weights; loads JSON and safetensors, never a pickle.

    world: the number of ranks resuming; must equal the number that wrote the state (None: any).
    Returns:
        {"step", "total_steps", "train_config", "optimizer", "rng", "rank", "world_size", ...}, tensors on the CPU.
    Raises:
        RunError: no trainer state (not written by `dsv3 train`); only the old `trainer_state.pt` pickle (the
            message gives the `dsv3 runs upgrade` command); a different number of ranks; a malformed file.
    """
    checkpoint = Path(checkpoint)
    first = _rank0_state(checkpoint)
    if first is None:
        raise RunError(f"{checkpoint}: no trainer state ({trainer_state_names()[0]}): not a checkpoint written by "
                       "dsv3 train")
    path, doc = first
    n = doc["world_size"]
    if world is not None and world != n:
        raise RunError(f"{checkpoint} was written by a run on {n} rank(s); resume it on as many (now {world})")
    if not 0 <= rank < n:
        raise RunError(f"{checkpoint}: no trainer state for rank {rank} (the run had {n} rank(s))")
    json_name, tensor_name = trainer_state_names(rank, n)
    if rank:
        path = checkpoint / json_name
        if not path.is_file():
            raise RunError(f"{checkpoint}: {json_name} is missing")
        doc = _read_state_json(path)
    try:
        tensors = safetensors_load((checkpoint / tensor_name).read_bytes())
    except (OSError, SafetensorError) as e:
        raise RunError(f"{checkpoint / tensor_name}: cannot be read ({e})") from None
    return _decode(doc, tensors, path)


def train_setting(checkpoint: str | Path, key: str):
    """One TrainConfig value recorded with a checkpoint (e.g. its dataset), or None when it records none.

    Raises:
        RunError: the checkpoint's trainer state is the old pickle (see `load_trainer_state`) or malformed.
    """
    first = _rank0_state(Path(checkpoint))
    if first is None or not isinstance(first[1]["train_config"], dict):
        return None
    return first[1]["train_config"].get(key)


def upgrade_trainer_state(checkpoint: str | Path) -> list[Path]:
    """Convert a checkpoint's old `trainer_state.pt` into the JSON + safetensors files, loading it with
    `torch.load(weights_only=True)`: tensors and plain data only, so a crafted file runs no code. The old file is
    left in place (the new files take precedence); nothing is written when the state is already converted.

    Returns:
        the files written ([] when already converted).
    Raises:
        RunError: no trainer_state.pt; it holds more than tensors and plain data (refused, nothing written); it
            cannot be read or is not a dsv3 trainer state.
    """
    import pickle

    checkpoint = Path(checkpoint)
    legacy = checkpoint / LEGACY_TRAINER_STATE
    if not legacy.exists():
        raise RunError(f"{checkpoint}: no {LEGACY_TRAINER_STATE} to convert")
    if (checkpoint / trainer_state_names()[0]).is_file() or any(checkpoint.glob(f"{TRAINER_STATE}-rank*.json")):
        return []
    try:
        state = torch.load(legacy, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        detail = next((ln.strip() for ln in str(e).splitlines() if "Unsupported" in ln), "not plain data")
        raise RunError(f"{legacy}: refused, not converted: it holds more than tensors and plain data, so loading it "
                       f"could run code ({detail})") from None
    except Exception as e:  # noqa: BLE001 -- a corrupt or foreign file, whatever torch says about it
        raise RunError(f"{legacy}: cannot be read ({type(e).__name__}: {e})") from None
    keys = ("step", "total_steps", "optimizer", "rng", "train_config")
    if not isinstance(state, dict) or any(k not in state for k in keys):
        raise RunError(f"{legacy}: not a dsv3 trainer state (expected the keys {', '.join(keys)})")
    optimizers = state["optimizer"] if isinstance(state["optimizer"], list) else [state["optimizer"]]
    files: dict[str, bytes] = {}
    try:
        for rank, optimizer in enumerate(optimizers):  # the old format kept rank 0's RNG state only
            files.update(trainer_state_files({k: state[k] for k in ("step", "total_steps", "train_config")}
                                             | {"optimizer": optimizer, "rng": state["rng"]}, rank, len(optimizers)))
    except (TypeError, ValueError) as e:
        raise RunError(f"{legacy}: cannot be converted ({e})") from None
    order = sorted(files, key=lambda name: (name.endswith(".json"), name == trainer_state_names(0, len(optimizers))[0]))
    return [write_atomic(checkpoint / name, files[name]) for name in order]  # rank 0's JSON last: it marks done
