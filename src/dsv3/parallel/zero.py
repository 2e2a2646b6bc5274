"""ZeRO-1: optimizer state sharded over data-parallel ranks.

Every rank still holds all (replicated) parameters and all-reduces their gradients, but keeps AdamW moments only
for the parameters it owns: a size-balanced partition (largest first, onto the least-loaded rank). After its
step a rank broadcasts the parameters it owns, so all replicas stay identical. Expert shards under expert
parallelism are rank-local already: their owner is always the local rank, and they are never broadcast.
Optimizer memory per rank drops to ~1/P of the replicated state (DeepSeek-V3 trains with ZeRO-1 data parallelism).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn


def zero_owners(sizes: list[int], world: int) -> list[int]:
    """The ZeRO-1 partition: the owner rank of each of the tensors of sizes `sizes` (elements): largest first
    (ties in the given order), each onto the least-loaded rank so far (the lowest on ties). Deterministic, so every
    rank computes the same partition, and `parallel.plan` the same figures."""
    load = [0] * world
    owners = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        r = min(range(world), key=lambda j: load[j])
        load[r] += sizes[i]
        owners[i] = r
    return owners


class ZeroShardedOptimizer:
    """ZeRO-1 over `group`: wraps the optimizer `make_optimizer` builds for this rank's owned parameters, with
    the step / zero_grad / state_dict surface the trainer uses (see the module doc)."""

    def __init__(self, named_params: list[tuple[str, nn.Parameter]],
                 make_optimizer: Callable[[list[dict]], torch.optim.Optimizer], weight_decay: float,
                 is_local: Callable[[str], bool], group=None):
        """named_params: this rank's parameters, the same names in the same order on every rank of `group`;
        make_optimizer: builds the inner optimizer from param groups; is_local: names of rank-local (expert
        shard) parameters, always owned here."""
        self.group = group
        self.rank, world = dist.get_rank(group), dist.get_world_size(group)
        named = list(named_params)
        shared = [p for name, p in named if not is_local(name)]
        self.owner: list[tuple[nn.Parameter, int]] = list(zip(shared, zero_owners([p.numel() for p in shared], world)))
        mine = [p for name, p in named if is_local(name)] + [p for p, r in self.owner if r == self.rank]
        ids = {id(p) for p in mine}
        ordered = [p for _, p in named if id(p) in ids]  # model order, for a stable state_dict
        self.params = [p for _, p in named]
        self.optimizer = make_optimizer([
            {"params": [p for p in ordered if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in ordered if p.dim() < 2], "weight_decay": 0.0}])

    @property
    def param_groups(self):
        """The inner optimizer's param groups (the trainer sets the learning rate there)."""
        return self.optimizer.param_groups

    @torch.no_grad()
    def step(self) -> None:
        """Step the owned parameters, then each owner broadcasts its parameters to the group (collective)."""
        self.optimizer.step()
        for p, r in self.owner:
            dist.broadcast(p.data, src=dist.get_global_rank(self.group, r) if self.group else r, group=self.group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state)
