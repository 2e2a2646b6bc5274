"""Data parallelism on torch's own engine: FSDP2 (`torch.distributed.fsdp.fully_shard`), `--zero 3`.

Every decoder layer (main and MTP) is one FSDP unit, the rest of the model (embedding, final norm, head) the root
unit; under a pipeline, each stage a rank holds is a root of its own over its layers. Each parameter is split
along its first dimension over the stage's data-parallel ranks (`Shard(0)`): a rank holds 1/(dp x ep) of the
parameters, gradients and AdamW state, and a layer's full weights exist only while it
runs (all-gathered before its forward and again before its backward; gradients are reduce-scattered and averaged).
Routed experts under expert parallelism are left out (`ignored_params`): they are the rank's own shard already,
and `mesh.sync_gradients` averages them over their data-parallel replicas as before.

What the rest of dsv3 needs from a sharded model, all here:
- `materialize_sharded`: build, fill and shard one unit at a time (`to_empty`, then the caller's fill — keyed
  initialisation or a checkpoint read, restricted to the unit's tensors — then `fully_shard`), so a rank never
  holds more than one layer's full weights beside its shards;
- `gathered_slots`: the official tensors, one parameter all-gathered at a time, for a checkpoint write;
- `local` and the optimizer-state helpers: the trainer state stores each rank's local shards (safetensors + JSON,
  never DCP's pickled metadata) and re-wraps them on resume.
The MTP module's `shared_head.norm` is its own unit: `run_mtp` calls it outside the module's forward, after the
module has freed its gathered weights.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterator

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from ..model.names import Slot, official_slots
from ..model.transformer import DecoderLayer
from .expert_parallel import EPExperts


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a sharded tensor (the tensor itself otherwise)."""
    return t.to_local() if isinstance(t, DTensor) else t


def _ids(module: nn.Module, recurse: bool = True) -> set[int]:
    return {id(t) for t in (*module.parameters(recurse=recurse), *module.buffers(recurse=recurse))}


def materialize_sharded(root: nn.Module, mesh: DeviceMesh, device: torch.device,
                        fill: Callable[[set[int]], None]) -> None:
    """Allocate, fill and shard `root` (a `DeepseekV3`, or a pipeline stage of one) built on the meta device, one
    FSDP unit at a time: each decoder layer inside it (main and MTP) is a unit, the rest of `root` the root unit.

    fill(only): fill the tensors whose `id` is in `only` (`init_weights` or `load_weights` with `only`).
    Expert-parallel shards (`EPExperts`) are allocated whole and left out of FSDP. (Parameters are looked up
    after `to_empty`, which replaces them.)"""
    layers = [m for m in root.modules() if isinstance(m, DecoderLayer)]
    for layer in layers:
        layer.to_empty(device=device)
        fill(_ids(layer))
        if hasattr(layer, "shared_head"):
            fully_shard(layer.shared_head.norm, mesh=mesh)
        own = {p for m in layer.modules() if isinstance(m, EPExperts) for p in m.parameters()}
        fully_shard(layer, mesh=mesh, ignored_params=own or None)
    rest: set[int] = set()
    inside = {id(m) for layer in layers for m in layer.modules()}
    for m in root.modules():
        if id(m) not in inside:
            m.to_empty(device=device, recurse=False)
            rest |= _ids(m, recurse=False)
    fill(rest)
    fully_shard(root, mesh=mesh)


def gathered_slots(model: nn.Module, keep: Callable[[str], bool]) -> Iterator[tuple[str, torch.Tensor]]:
    """(official name, full tensor) of every official tensor (the MTP module's stored copies of the embedding and
    head included), gathered one parameter at a time (the all-gather is collective: every rank of the mesh must
    exhaust this in the same order); yields only names for which `keep(name)` holds (the writing rank's), so peak
    memory is one full parameter."""
    groups: dict[int, list[tuple[str, Slot]]] = defaultdict(list)
    targets: dict[int, torch.Tensor] = {}
    for name, slot in official_slots(model).items():
        if not slot.target.is_meta:
            groups[id(slot.target)].append((name, slot))
            targets[id(slot.target)] = slot.target
    for key, items in groups.items():
        t = targets[key]
        full = t.full_tensor() if isinstance(t, DTensor) else t
        for name, slot in items:
            if keep(name):
                yield name, Slot(full, slot.index, slot.alias, slot.rows).view.detach()


def local_state(state: dict) -> dict:
    """An optimizer `state_dict()` with every sharded tensor replaced by this rank's shard (storable as is)."""
    return {**state, "state": {k: {n: local(v) for n, v in s.items()} for k, s in state["state"].items()}}


def distribute_state(optimizer: torch.optim.Optimizer) -> None:
    """After `load_state_dict` of a `local_state`: wrap each loaded shard back into the DTensor layout of its
    parameter (the optimizer's step then sees matching tensors)."""
    for p, s in optimizer.state.items():
        if isinstance(p, DTensor):
            for n, v in s.items():
                if isinstance(v, torch.Tensor) and not isinstance(v, DTensor) and v.shape == p.to_local().shape:
                    s[n] = DTensor.from_local(v, p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
