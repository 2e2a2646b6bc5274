"""Expert parallelism: routed experts sharded over a process group, tokens moved with all-to-all.

Applied from outside the model: `apply_expert_parallel(model, group)` replaces every `RoutedExperts` with an
`EPExperts` holding only this rank's experts (rank r of EP size P holds experts [r E/P, (r+1) E/P)). Routing,
shared experts, attention — everything else is unchanged and replicated (data parallel).

One MoE forward on each rank (N local tokens, K experts each):
  1. sort the N*K (token, expert) slots by expert: slots for rank r's experts are then contiguous;
  2. exchange per-expert counts (all_to_all_single on a [P, E/P] count matrix) so every rank knows how many
     rows it will receive from each source, for each of its local experts;
  3. dispatch: all_to_all_single of the sorted rows with variable splits;
  4. regroup the received rows by local expert (stable sort of their expert labels), run them through
     `RoutedExperts.swiglu` with the wrapped experts' own per-expert GEMM (FP8 after `convert_to_fp8`);
  5. combine: undo the regrouping and send the rows back with the inverse all_to_all; the gate weight is applied
     at the source, then index_add into the tokens.
The all-to-alls are autograd functions whose backward is the opposite exchange, so an expert's weight gradient
sums the contributions of every token routed to it, on whichever rank that token lives.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ..model.moe import RoutedExperts


class _AllToAll(torch.autograd.Function):
    """all_to_all_single along dim 0 with variable splits; backward is the reverse exchange."""

    @staticmethod
    def forward(ctx, x, out_splits: list[int], in_splits: list[int], group):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty(sum(out_splits), *x.shape[1:])
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        grad_in = grad.new_empty(sum(in_splits), *grad.shape[1:])
        dist.all_to_all_single(grad_in, grad.contiguous(), in_splits, out_splits, group=ctx.group)
        return grad_in, None, None, None


def all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group=None) -> torch.Tensor:
    """Differentiable all-to-all of rows: x [sum(in_splits), ...], in_splits[r] rows going to rank r ->
    [sum(out_splits), ...], out_splits[r] rows received from rank r. Collective over `group`."""
    return _AllToAll.apply(x, out_splits, in_splits, group)


class EPExperts(nn.Module):
    """This rank's slice of the routed experts; same parameter names as `RoutedExperts` (local rows only):
    gate_up_proj [E/P, 2I, D], down_proj [E/P, D, I], copied from `full`.

    Raises:
        ValueError: n_routed_experts not divisible by the size of `group`.
    """

    def __init__(self, full: RoutedExperts, group=None):
        super().__init__()
        self.group = group
        self.world = dist.get_world_size(group)
        rank = dist.get_rank(group)
        self.n_experts = full.gate_up_proj.shape[0]
        if self.n_experts % self.world:
            raise ValueError(f"n_routed_experts ({self.n_experts}) must be divisible by the expert-parallel "
                             f"size ({self.world})")
        self.n_local = self.n_experts // self.world
        self.expert_offset = rank * self.n_local  # this shard holds experts expert_offset.. of the layer
        rows = slice(self.expert_offset, self.expert_offset + self.n_local)
        for pname, p in full.named_parameters(recurse=False):  # gate_up_proj, down_proj: this rank's experts
            setattr(self, pname, nn.Parameter(p.detach()[rows].clone()))
        # EP changes where rows are computed, not how: keep the wrapped class's GEMM (FP8RoutedExperts' FP8 one
        # after convert_to_fp8, which must therefore run first) and its settings
        self._gemm = type(full)._linear
        self.pow2_scale = getattr(full, "pow2_scale", False)

    swiglu = RoutedExperts.swiglu  # the expert computation itself: one implementation, over this rank's rows
    expert_gemm = RoutedExperts.expert_gemm

    def _linear(self, x: torch.Tensor, w: torch.Tensor, counts: list[int], parts: int = 1) -> torch.Tensor:
        return self._gemm(self, x, w, counts, parts)

    def forward(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor) -> torch.Tensor:
        """As `RoutedExperts.forward`: x [N, D] (this rank's tokens), topk_idx / topk_weight [N, K] (global expert
        ids) -> [N, D]. Collective: every rank of the group must call it, in the same order."""
        n, k = topk_idx.shape
        flat = topk_idx.flatten()
        order = flat.argsort(stable=True)  # slots sorted by expert, hence by destination rank
        token = order // k
        expert_counts = torch.bincount(flat, minlength=self.n_experts)  # [E]
        send = expert_counts.view(self.world, self.n_local)  # rows for each rank's each local expert
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=self.group)  # recv[src, e]: rows from src for local expert e
        send_splits, recv_splits = send.sum(1).tolist(), recv.sum(1).tolist()
        rows = all_to_all(x[token], recv_splits, send_splits, self.group)  # dispatch
        labels = torch.arange(self.n_local, device=x.device).repeat(self.world).repeat_interleave(recv.flatten())
        regroup = labels.argsort(stable=True)  # received rows grouped by local expert
        counts = recv.sum(0).tolist()
        ys = self.swiglu(rows[regroup], counts)
        back = torch.empty_like(ys).index_copy(0, regroup, ys)  # undo the regrouping
        out = all_to_all(back, send_splits, recv_splits, self.group)  # combine
        out = out * topk_weight.flatten()[order, None].to(out.dtype)
        return x.new_zeros(n, x.shape[-1]).index_add_(0, token, out)


def apply_expert_parallel(model: nn.Module, group=None) -> nn.Module:
    """Shard every MoE layer's routed experts over `group` (in place); returns the model. Must run on every rank
    of the group (each keeps its own rows) after the model is built identically on all of them."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, RoutedExperts):
                setattr(module, name, EPExperts(child, group))
    return model

