"""The process mesh: ranks laid out as pipeline x data x expert parallel, and the collectives that span it.

rank = (pp_index * dp + dp_index) * ep + ep_index

ep is innermost, so an expert-parallel group is a run of consecutive ranks (on a cluster, the GPUs of one node:
the all-to-all stays on NVLink where it can); pp is outermost, so one pipeline stage's dp x ep ranks form a
contiguous block and a pipeline runs through the ranks with the same (dp, ep) position in every block.

Every rank holds one full copy of its stage's dense parameters (attention, norms, router, shared experts) and
1/ep of its routed experts, and trains on its own 1/(dp x ep) share of each micro-batch. Hence the groups:
  ep_group    same stage, same dp index: one full set of routed experts between them (the all-to-all)
  dp_group    same stage, same ep index: replicas of one expert shard (their gradients are averaged)
  data_group  same stage: every replica of the stage's dense parameters (dp x ep ranks)
  pp_ranks    same (dp, ep) position: the global ranks of this rank's pipeline, stage by stage
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor


def is_expert_param(name: str) -> bool:
    """Whether parameter `name` is a routed-expert tensor (sharded under EP, not replicated)."""
    return ".mlp.experts." in name


class Mesh:
    """This rank's place in the pp x dp x ep mesh and its process groups (see the module doc). Collective:
    every rank must build it, with the same arguments, after `dist.init_process_group`.

    Raises:
        ValueError: pp x dp x ep does not equal the world size (or, dp omitted, pp x ep does not divide it).
    """

    def __init__(self, pp: int = 1, dp: int | None = None, ep: int = 1):
        world, rank = dist.get_world_size(), dist.get_rank()
        if dp is None:
            if world % (pp * ep):
                raise ValueError(f"pp x ep = {pp} x {ep} does not divide the {world} ranks")
            dp = world // (pp * ep)
        if pp * dp * ep != world:
            raise ValueError(f"pp x dp x ep = {pp} x {dp} x {ep} must equal the {world} ranks")
        self.pp, self.dp, self.ep = pp, dp, ep
        self.data_size = dp * ep  # ranks sharing one stage (each with its share of the batch)
        self.pp_rank, self.data_rank = divmod(rank, self.data_size)
        self.dp_rank, self.ep_rank = divmod(self.data_rank, ep)
        self.pp_ranks = [s * self.data_size + self.data_rank for s in range(pp)]
        # every rank creates every group, in the same order (a requirement of new_group)
        self.ep_group = self.dp_group = self.data_group = None
        for s in range(pp):
            base = s * self.data_size
            for i in range(dp):
                g = dist.new_group([base + i * ep + j for j in range(ep)])
                if (s, i) == (self.pp_rank, self.dp_rank):
                    self.ep_group = g
            for j in range(ep):
                g = dist.new_group([base + i * ep + j for i in range(dp)])
                if (s, j) == (self.pp_rank, self.ep_rank):
                    self.dp_group = g
            g = dist.new_group(list(range(base, base + self.data_size)))
            if s == self.pp_rank:
                self.data_group = g

    def __repr__(self) -> str:
        return f"Mesh(pp={self.pp}, dp={self.dp}, ep={self.ep})"


def host_all_reduce(t: torch.Tensor, group=None) -> torch.Tensor:
    """Sum a small host-side tensor (metrics, norms, loads) over `group` in place. NCCL only moves GPU memory, so
    under nccl the tensor makes a round trip through the current CUDA device; gloo reduces it where it is."""
    if dist.get_backend(group) == "nccl":
        dev = t.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(dev, group=group)
        t.copy_(dev)
    else:
        dist.all_reduce(t, group=group)
    return t


@torch.no_grad()
def sync_gradients(module: nn.Module, mesh: Mesh) -> None:
    """Data-parallel gradient averaging when each of the stage's dp x ep ranks saw its share of the batch.

    Dense parameters: all-reduce over the data group, divide by its size. An expert shard already summed the
    gradients of every token its EP group routed to it (the all-to-all backward brings them home); it adds the
    other EP groups' sums over its dp group and takes the same 1/(dp x ep), so both equal the gradient of the
    global-batch mean loss.
    """
    for name, p in module.named_parameters():
        if p.grad is None or isinstance(p.grad, DTensor):  # FSDP2 has reduce-scattered and averaged it
            continue
        if is_expert_param(name) and mesh.ep > 1:
            if mesh.dp > 1:
                dist.all_reduce(p.grad, group=mesh.dp_group)
        elif mesh.data_size > 1:
            dist.all_reduce(p.grad, group=mesh.data_group)
        p.grad.div_(mesh.data_size)


def global_grad_norm(named_params, mesh: Mesh | None) -> float:
    """The gradient norm of the whole model, however it is spread over the mesh (call after `sync_gradients`;
    `mesh` None: one process). Squares are summed in float64.

    Each rank adds its gradients' squares divided by the number of ranks holding the same tensor (dense: the
    dp x ep replicas of the stage; an expert shard: its dp replicas), so one all-reduce over every rank counts every
    tensor once. `named_params` must hold each of this rank's stages once (not DualPipe's second copy).
    """
    sq = None
    for name, p in named_params:
        if p.grad is not None:
            grad = p.grad.detach()
            if isinstance(grad, DTensor):  # an FSDP2 shard: every element lives on one rank of the data group
                grad, holders = grad.to_local(), 1
            else:
                holders = 1 if mesh is None else mesh.dp if is_expert_param(name) and mesh.ep > 1 else mesh.data_size
            term = torch.linalg.vector_norm(grad, dtype=torch.float64) ** 2 / holders  # on the gradient's device
            sq = term if sq is None else sq + term
    sq = torch.zeros((), dtype=torch.float64) if sq is None else sq.cpu()  # one transfer
    if mesh is not None:
        host_all_reduce(sq)
    return float(sq.sqrt())


@torch.no_grad()
def clip_gradients(params, max_norm: float, norm: float) -> None:
    """Scale every gradient by max_norm / norm when the (already global) `norm` exceeds `max_norm`."""
    scale = max_norm / (norm + 1e-6)
    if scale < 1:
        for p in params:
            if p.grad is not None:
                p.grad.mul_(scale)
