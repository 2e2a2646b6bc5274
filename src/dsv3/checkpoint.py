"""Checkpoints in the real DeepSeek-V3 / Hugging Face format.

A checkpoint is a directory with `config.json`, safetensors shards and `model.safetensors.index.json`
({"metadata": {"total_size": ...}, "weight_map": {tensor name: shard file}}), using the official tensor names.
A single `model.safetensors` without an index is read too.

The in-memory model differs from the stored names in three places (stacked routed experts, fused gate_up_proj,
the MTP modules' stored copies of the shared embedding and head); `dsv3.model.names` maps one to the other.
Because each official gate / up tensor is a row range of the fused one, an FP8 checkpoint's 128x128 blocks (one
scale grid per official tensor) load and save exactly, whatever I is. On load the MTP copies are checked against
the main tensors.

FP8 checkpoints (float8_e4m3fn `weight` + fp32 `weight_scale_inv` per 128x128 block) are dequantized on the fly,
one tensor at a time, straight into the model's parameters: peak memory is the model plus one tensor.
Saving writes to a working directory first and renames it into place, so an interrupted save never leaves a
half-written checkpoint where a good one was. The steps are public for sharded saves (`start_checkpoint`, one
`write_shards` per writing process, `finish_checkpoint` names the shards and builds the index from their headers):
the trainer's ranks each write their own tensors, none gathered.
"""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
import sys
import warnings
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .config import ModelConfig
from .errors import Dsv3Error
from .model import DeepseekV3
from .model.names import Slot, official_slots
from .quant.fp8 import BLOCK, FP8, dequantize_blockwise, quantize_blockwise
from .quant.precision import STORAGE_HIGH_PRECISION, keeps_high_precision

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
SHARD_PREFIX = "shard-"  # working names of the safetensors shards while a checkpoint is written
SCALE_SUFFIX = "_scale_inv"  # `X.weight_scale_inv` holds the block scales of FP8 tensor `X.weight`
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
FP8_QUANTIZATION_CONFIG = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                           "weight_block_size": [BLOCK, BLOCK]}


def fp8_eligible(name: str, t: torch.Tensor) -> bool:
    """Whether the official format stores tensor `name` as FP8: a 2-D `.weight` of a module outside
    `quant.precision.STORAGE_HIGH_PRECISION` (the linear weights of attention and FFNs; not the embedding, heads,
    norms, MoE gate or MTP's eh_proj)."""
    return (name.endswith(".weight") and t.dim() == 2
            and not keeps_high_precision(name.removesuffix(".weight"), STORAGE_HIGH_PRECISION))


class CheckpointError(Dsv3Error, RuntimeError):
    """A checkpoint that cannot be read or does not fit the model; names the tensor and the file."""


def checkpoint_slots(model: DeepseekV3) -> dict[str, Slot]:  # (the name checkpoint code has always used)
    """Map every official tensor name of this model's checkpoint to its place in the model (`model.names`)."""
    return official_slots(model)


# ------------------------------------------------------------------------------------------------- reading
@functools.lru_cache(maxsize=4)
def _all_names(config_json: str) -> frozenset[str]:
    """Every official tensor name of the whole model of this config (JSON), built once on the meta device: a
    layer-by-layer load (FSDP2) checks each layer against the same set without rebuilding it."""
    return frozenset(checkpoint_slots(DeepseekV3(ModelConfig.from_dict(json.loads(config_json)), device="meta")))


def _weight_map(path: Path) -> dict[str, str]:
    index = path / INDEX_FILE
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
        for name, file in weight_map.items():
            if not (path / file).exists():
                raise CheckpointError(f"{index}: tensor {name} is mapped to {file}, which does not exist")
        return weight_map
    single = path / SINGLE_FILE
    if single.exists():
        with _open(single) as f:
            return {name: SINGLE_FILE for name in f.keys()}
    raise CheckpointError(f"{path}: no {INDEX_FILE} or {SINGLE_FILE} found")


def _open(file: Path):
    try:
        return safe_open(str(file), framework="pt", device="cpu")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{file}: cannot read safetensors file ({e})") from None


def _checkpoint_dir(path: str | Path) -> Path:
    """`path` itself, checked to be a checkpoint directory (for a training run, `dsv3.runs.resolve_checkpoint`)."""
    path = Path(path)
    if (path / "config.json").exists():
        return path
    raise CheckpointError(f"{path}: not a checkpoint directory (no config.json); for a training run directory "
                          "use dsv3.runs.resolve_checkpoint(run)")


def _is_mtp(name: str, cfg: ModelConfig) -> bool:
    parts = name.split(".")
    return len(parts) > 2 and parts[1] == "layers" and parts[2].isdigit() and int(parts[2]) >= cfg.num_hidden_layers


def load_pretrained(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                    load_mtp: bool | None = None, progress: bool | None = None) -> DeepseekV3:
    """Build a `DeepseekV3` from a checkpoint directory (BF16/FP32 or FP8 with `weight_scale_inv`).

    load_mtp: True requires the MTP modules' tensors, False skips them (and builds the model without MTP),
    None (default) loads them when present and otherwise builds without MTP, with a warning.
    progress: show a progress bar (default: when stderr is a terminal).

    Raises:
        CheckpointError: no checkpoint at `path`, an unreadable file or index, missing or unexpected tensors,
            a tensor of the wrong shape or dtype, an FP8 weight without its scale, non-square FP8 blocks.
        ConfigError: an invalid `config.json`.
    """
    path = _checkpoint_dir(path)
    cfg = ModelConfig.from_json(path / "config.json")
    weight_map = _weight_map(path)
    has_mtp = any(_is_mtp(n, cfg) for n in weight_map)
    if cfg.num_nextn_predict_layers and (load_mtp is False or (load_mtp is None and not has_mtp)):
        if load_mtp is None:
            warnings.warn(f"{path}: the checkpoint has no MTP tensors (model.layers.{cfg.num_hidden_layers}.*); "
                          "building the model without multi-token prediction", stacklevel=2)
        cfg = cfg.replace(num_nextn_predict_layers=0)
    model = DeepseekV3(cfg, dtype=dtype, device="meta")
    model.to_empty(device=device)
    model.tie_weights()
    model.keep_fp32_buffers()
    model.reset_buffers()
    load_weights(model, path, progress=progress)
    return model


def load_weights(model: DeepseekV3, path: str | Path, progress: bool | None = False, only: set[int] | None = None
                 ) -> None:
    """Fill `model`'s tensors from the checkpoint directory `path`, reading only the tensors the model holds off
    the meta device (a rank with one pipeline stage or an expert shard opens only the files, and reads only the
    tensors, it needs: safetensors reads one tensor at a time). The names are checked against every tensor the
    whole model has (meta ones included), so a checkpoint of another shape fails the same way on every rank.
    only: fill just the parameters and buffers whose `id` is in it (one layer, before a wrapper shards it).

    The model may carry parallel wrappers (expert shards map to their experts' official names). The MTP modules'
    stored tensors are skipped when the model has none.

    Raises:
        CheckpointError: as `load_pretrained`.
    """
    path = _checkpoint_dir(path)
    cfg = model.config
    weight_map = _weight_map(path)
    stored_cfg = ModelConfig.from_json(path / "config.json")
    block = tuple((stored_cfg.extra.get("quantization_config") or {}).get("weight_block_size", (BLOCK, BLOCK)))
    if block[0] != block[1]:
        raise CheckpointError(f"{path}: weight_block_size {list(block)} is not square; only square blocks "
                              "are supported")
    skipped = {n for n in weight_map if _is_mtp(n, cfg)} if not cfg.num_nextn_predict_layers else set()
    slots = checkpoint_slots(model)  # the tensors this model object holds (an expert shard: its experts only)
    expected = _all_names(json.dumps(cfg.to_dict(), sort_keys=True))  # the whole model's, whatever the layout

    stored = {n for n in weight_map if not n.endswith(SCALE_SUFFIX)} - skipped
    ignorable = {n for n in stored if n.endswith("rotary_emb.inv_freq")}
    missing = sorted(expected - stored)
    extra = sorted(stored - expected - ignorable)
    if missing or extra:
        lines = [f"{path}: checkpoint does not match the config"]
        if missing:
            lines.append(f"  missing {len(missing)} tensor(s): " + ", ".join(missing[:8])
                         + (" ..." if len(missing) > 8 else ""))
        if extra:
            lines.append(f"  unexpected {len(extra)} tensor(s): "
                         + ", ".join(f"{n} (in {weight_map[n]})" for n in extra[:8])
                         + (" ..." if len(extra) > 8 else ""))
        if missing and all(_is_mtp(n, cfg) for n in missing):
            lines.append("  (the MTP module's tensors; load with load_mtp=False to build the model without MTP)")
        raise CheckpointError("\n".join(lines))

    by_file: dict[str, list[str]] = defaultdict(list)
    aliases = []
    for name in sorted(stored - ignorable):
        if name not in slots or slots[name].target.is_meta or (only is not None and id(slots[name].target) not in only):
            continue  # another rank's tensor (or another layer's; the target, not a view: that could gather it)
        (aliases if slots[name].alias else by_file[weight_map[name]]).append(name)
    show = sys.stderr.isatty() if progress is None else progress
    total = sum(map(len, by_file.values())) + len(aliases)
    with _progress(total, show, f"loading {path.name}") as advance, torch.no_grad():
        for file, names in by_file.items():
            with _open(path / file) as f:
                for name in names:
                    _copy(slots[name].view, _read(f, name, path, file, weight_map, block[0]), name, file)
                    advance()
        for name in aliases:  # MTP copies of the embedding / head: must equal the main tensors
            with _open(path / weight_map[name]) as f:
                t = _read(f, name, path, weight_map[name], weight_map, block[0])
            target = slots[name].view
            if t.shape != target.shape or not torch.equal(t.to(target.dtype), target):
                warnings.warn(f"{name} in {weight_map[name]} differs from the main model's copy; dsv3 shares "
                              "one embedding and head between the model and its MTP modules and keeps the main "
                              "one", stacklevel=2)
            advance()


def _read(f, name: str, path: Path, file: str, weight_map: dict[str, str], block: int) -> torch.Tensor:
    try:
        t = f.get_tensor(name)
    except (SafetensorError, OSError, RuntimeError) as e:
        raise CheckpointError(f"tensor {name} in {file}: cannot be read ({e})") from None
    if t.dtype in FP8_DTYPES:
        scale_name = name + SCALE_SUFFIX
        if scale_name not in weight_map:
            raise CheckpointError(f"tensor {name} in {file} is {t.dtype} but {scale_name} is missing")
        with _open(path / weight_map[scale_name]) as sf:
            scale = sf.get_tensor(scale_name)
        try:
            t = dequantize_blockwise(t, scale, block)
        except ValueError as e:
            raise CheckpointError(f"tensor {name} in {file}: {e}") from None
    return t


def _copy(dst: torch.Tensor, src: torch.Tensor, name: str, file: str) -> None:
    if tuple(src.shape) != tuple(dst.shape):
        raise CheckpointError(f"tensor {name} in {file} has shape {list(src.shape)}, the config expects "
                              f"{list(dst.shape)}")
    if not (src.dtype.is_floating_point or src.dtype == dst.dtype):
        raise CheckpointError(f"tensor {name} in {file} has dtype {src.dtype}, expected floating point")
    dst.copy_(src)


class _progress:
    """A rich progress bar over tensors, or nothing (tests, pipes)."""

    def __init__(self, total: int, show: bool, label: str):
        self.total, self.show, self.label = total, show, label

    def __enter__(self):
        if not self.show:
            return lambda: None
        from rich.progress import Progress

        self._bar = Progress(transient=True)
        self._bar.start()
        task = self._bar.add_task(self.label, total=self.total)
        return lambda: self._bar.advance(task)

    def __exit__(self, *exc):
        if self.show:
            self._bar.stop()


# ------------------------------------------------------------------------------------------------- writing
def checkpoint_tensors(model: DeepseekV3):
    """(official name, tensor) for every tensor of the checkpoint, in a stable order."""
    for name, slot in checkpoint_slots(model).items():
        yield name, slot.view.detach()


def save_pretrained(model: DeepseekV3, path: str | Path, max_shard_bytes: int = 4 << 30,
                    dtype: torch.dtype | None = None, extra_files: dict[str, str | bytes] | None = None,
                    replace: bool = False) -> Path:
    """Write `config.json`, safetensors shards and the index to `path`, atomically.

    dtype: cast floating tensors (the routing bias stays fp32); default: as in the model.
        torch.float8_e4m3fn writes the official FP8 format: linear weights as e4m3 with a `weight_scale_inv`
        per 128x128 block, everything else BF16 (the routing bias fp32).
    extra_files: more files to place in the directory (e.g. `tokenizer.json`), name -> content.
    replace: `path` may be absent or an empty directory; anything else is refused unless `replace`, which swaps
        the new directory in and only then removes the old one. Only for a directory the caller wrote itself (the
        trainer re-saving its own step); to keep what is there, move it aside first (`dsv3.runs.claim_output`,
        the CLI's --overwrite).
    Raises:
        CheckpointError: `path` exists and is not an empty directory, and `replace` is False (checked before
            writing and again at the final rename).
    """
    path = Path(path)
    if not replace:
        refuse_existing(path)
    tmp = start_checkpoint(path, f"tmp-{os.getpid()}")
    try:
        write_shards(stored_tensors(checkpoint_tensors(model), dtype), tmp, "", max_shard_bytes)
        finish_checkpoint(tmp, path, model.config, dtype or model.lm_head.weight.dtype, extra_files, replace)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def start_checkpoint(path: Path, tag: str) -> Path:
    """A fresh working directory beside `path` (`.NAME.TAG`), where a checkpoint is written before it is moved
    into place; one left over by an earlier, interrupted save with the same tag (dsv3's own) is cleared first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{tag}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def stored_tensors(named: Iterable[tuple[str, torch.Tensor]], dtype: torch.dtype | None = None):
    """(official name, tensor as stored) for `save_pretrained`'s dtype rule, one tensor at a time; an FP8
    weight is followed by its `weight_scale_inv`."""
    for name, t in named:
        if name.endswith("e_score_correction_bias") or dtype is None or not t.is_floating_point():
            yield name, t
        elif dtype == FP8 and fp8_eligible(name, t):
            q, scale = quantize_blockwise(t)
            yield name, q
            yield name + SCALE_SUFFIX, scale
        else:
            yield name, t.to(torch.bfloat16 if dtype == FP8 else dtype)


def write_shards(tensors: Iterable[tuple[str, torch.Tensor]], tmp: Path, tag: str,
                 max_shard_bytes: int = 4 << 30) -> None:
    """Write (official name, stored tensor) pairs into safetensors files of at most `max_shard_bytes` each (a
    weight's `weight_scale_inv` stays in its file), named `shard-{tag}NNNNN.safetensors` in the working directory
    `tmp`; nothing is written for no tensors. Each process of a sharded save writes its own with its own `tag`;
    `finish_checkpoint` names them and indexes them."""
    shard: dict[str, torch.Tensor] = {}
    size, part = 0, 0
    for name, t in tensors:
        nbytes = t.numel() * t.element_size()
        if shard and size + nbytes > max_shard_bytes and not name.endswith(SCALE_SUFFIX):
            save_file(shard, str(tmp / f"{SHARD_PREFIX}{tag}{part:05d}.safetensors"), metadata={"format": "pt"})
            shard, size, part = {}, 0, part + 1
        shard[name] = t.to("cpu").contiguous().clone()  # safetensors refuses tensors that share storage
        size += nbytes
    if shard:
        save_file(shard, str(tmp / f"{SHARD_PREFIX}{tag}{part:05d}.safetensors"), metadata={"format": "pt"})


def finish_checkpoint(tmp: Path, path: Path, config: ModelConfig, dtype: torch.dtype = torch.float32,
                      extra_files: dict[str, str | bytes] | None = None, replace: bool = False) -> Path:
    """Complete the checkpoint in `tmp` and move it to `path`: the shard files written there (`shard-*.safetensors`,
    in name order) are renamed `model-0000i-of-0000n.safetensors`, the index is built from their headers (no tensor
    is read), and `config.json` (with `torch_dtype` from `dtype`, the dtype the tensors were stored in; FP8 adds
    the quantization config) and `extra_files` are added.

    Raises:
        CheckpointError: a tensor name in two shards; `path` occupied (see `save_pretrained`).
    """
    fp8 = dtype == FP8
    cfg_dict = config.to_dict()
    cfg_dict.pop("quantization_config", None)  # only true of the weights written if fp8
    if fp8:
        cfg_dict["quantization_config"] = FP8_QUANTIZATION_CONFIG
    cfg_dict["torch_dtype"] = str(torch.bfloat16 if fp8 else dtype).removeprefix("torch.")
    (tmp / "config.json").write_text(json.dumps(cfg_dict, indent=2) + "\n")
    parts = sorted(tmp.glob(f"{SHARD_PREFIX}*.safetensors"))
    weight_map, total = {}, 0
    for i, part in enumerate(parts, start=1):
        file = f"model-{i:05d}-of-{len(parts):05d}.safetensors"
        os.replace(part, tmp / file)
        with _open(tmp / file) as f:
            for name in f.keys():
                if name in weight_map:
                    raise CheckpointError(f"{name} was written twice ({weight_map[name]} and {file})")
                weight_map[name] = file
                piece = f.get_slice(name)
                total += math.prod(piece.get_shape()) * _DTYPE_BYTES[piece.get_dtype()]
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    for name, content in (extra_files or {}).items():
        mode = "wb" if isinstance(content, bytes) else "w"
        with open(tmp / name, mode) as fh:
            fh.write(content)
    _replace_dir(tmp, path, replace)
    return path


_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4, "I16": 2,
                "I8": 1, "U8": 1, "BOOL": 1}


def refuse_existing(path: Path) -> None:
    """Raises CheckpointError unless `path` is absent or an empty directory."""
    if (path.exists() or path.is_symlink()) and not (path.is_dir() and not any(path.iterdir())):
        raise CheckpointError(f"{path} already exists and is not empty; save the checkpoint to another directory "
                              "(dsv3 does not write over what it did not create)")


def _replace_dir(src: Path, dst: Path, replace: bool) -> None:
    """Move src to dst. With `replace`, an existing dst is removed only once src is in place (renames are
    atomic); without, dst must be absent or an empty directory."""
    if replace and dst.exists():
        old = dst.parent / f".{dst.name}.old-{os.getpid()}"
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
        return
    refuse_existing(dst)  # again: something may have appeared there while the checkpoint was written
    try:
        os.replace(src, dst)  # onto nothing, or an empty directory (POSIX rename replaces those only)
    except OSError as e:
        raise CheckpointError(f"{dst}: cannot move the new checkpoint into place ({e})") from None
