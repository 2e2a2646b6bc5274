"""Pipeline parallelism: the 1F1B and DualPipe schedules over torch.distributed point-to-point messages.

A schedule is, for each rank, a list of operations; an executor runs one rank's list. Operations:
  ("F", d)  forward of the next micro-batch of direction d on this rank's stage for d
  ("B", d)  backward of the oldest forwarded micro-batch of d (input gradient; with `zb`, the weight gradient is
            deferred to a later W so that it can fill a bubble)
  ("W",)    the oldest deferred weight gradient
Messages: activations flow along a direction, gradients flow back; sends are asynchronous, receives block, so a
schedule whose per-rank orders respect the data dependencies cannot deadlock.

1F1B (one direction): rank r warms up with P-1-r forwards, then alternates F and B, then drains the backwards.
ZB-H1 ("zb1p"): the same order with each backward split; rank r defers its first r weight gradients to the end.

DualPipe (P even, micro-batches N >= 2P, N even): rank r holds stage r of the forward pipeline (direction 0,
micro-batches enter at rank 0) and stage P-1-r of the reverse pipeline (direction 1, entering at rank P-1): twice
the parameters, both directions busy at once. With h = min(r, P-1-r) and "phase 0" meaning the direction whose
first stage is on this rank's side (direction 0 for the first half of the ranks, 1 for the second), each rank runs
eight steps (DeepSeek-V3 report, Figure 5):
  1. (P/2-h-1)*2 forwards of phase 0                       warm-up from one end
  2. h+1 x [F phase 0, F phase 1]                          both directions now in flight
  3. P/2-h-1 x [B phase 1 (zero-bubble), W, F phase 1]
  4. N/2-P+h+1 x [F phase 0 + B phase 1, F phase 1 + B phase 0]   the steady state: F of one direction paired
                                                                  with B of the other (overlapped on GPUs)
  5. P/2-h-1 x [B phase 1, F phase 1 + B phase 0]
  6. h+1 x [B phase 1, B phase 0] (the later ones zero-bubble)
  7. P/2-h-1 x [W, B phase 0 (zero-bubble)]
  8. h+1 x W                                                 deferred weight gradients fill the tail
The two copies of each stage (on ranks r and P-1-r) sum their gradients after the step.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

from .fsdp import local

Op = tuple


def schedule_1f1b(rank: int, world: int, chunks: int) -> list[Op]:
    """1F1B for pipeline position `rank` of `world`, over `chunks` micro-batches: P-1-r warm-up forwards, then
    alternating F and B, then the remaining backwards."""
    warm = min(world - 1 - rank, chunks)
    ops: list[Op] = [("F", 0)] * warm
    for _ in range(chunks - warm):
        ops += [("F", 0), ("B", 0)]
    ops += [("B", 0)] * warm
    return ops


def schedule_zb1p(rank: int, world: int, chunks: int) -> list[Op]:
    """ZB-H1 (Qi et al., "Zero Bubble Pipeline Parallelism"): the F/B order of 1F1B, every backward split into
    its input gradient (B, on the critical path) and its weight gradient (W). Rank r runs each W right after its
    B except for its first r, which it keeps for the end: the later ranks push input gradients toward rank 0
    without waiting on weight work, then fill their cool-down, where 1F1B leaves them idle, with the deferred W's.
    Every rank then holds at most P micro-batches' activations (1F1B's peak, on rank 0), and the bubble is
    (P-1)(F + B - 2W) with B the full backward, a third of 1F1B's when F = B/2 = W."""
    warm = min(world - 1 - rank, chunks)
    ops: list[Op] = [("F", 0)] * warm
    deferred = 0
    for k in range(chunks - warm):
        ops += [("F", 0), ("B", 0, "zb")]
        if k >= rank:
            ops.append(("W",))
        else:
            deferred += 1
    for _ in range(warm):
        ops += [("B", 0, "zb"), ("W",)]
    return ops + [("W",)] * deferred


def _eight_steps(h: int, half: int, per_phase: int, p0: int, p1: int) -> list[Op]:
    """The DualPipe / DualPipeV step structure for one rank (h: its distance from the pipeline's end, half: the
    ranks on one side, per_phase: micro-batches through each phase on this rank)."""
    ops: list[Op] = []
    ops += [("F", p0)] * ((half - h - 1) * 2)  # 1
    ops += [("F", p0), ("F", p1)] * (h + 1)  # 2
    ops += [("B", p1, "zb"), ("W",), ("F", p1)] * (half - h - 1)  # 3
    ops += [("F", p0), ("B", p1), ("F", p1), ("B", p0)] * (per_phase - 2 * half + h + 1)  # 4
    ops += [("B", p1), ("F", p1), ("B", p0)] * (half - h - 1)  # 5
    zb = False  # 6: from the middle of these backwards on, weight gradients are deferred
    for i in range(h + 1):
        if i == (h + 1) // 2 and h % 2 == 1:
            zb = True
        ops.append(("B", p1, "zb") if zb else ("B", p1))
        if i == (h + 1) // 2 and h % 2 == 0:
            zb = True
        ops.append(("B", p0, "zb") if zb else ("B", p0))
    ops += [("W",), ("B", p0, "zb")] * (half - h - 1)  # 7
    ops += [("W",)] * (h + 1)  # 8
    return ops


def schedule_dualpipe(rank: int, world: int, chunks: int) -> list[Op]:
    """DualPipe (DeepSeek-V3 report section 3.2.1, Figure 5) for pipeline position `rank` of `world`: the eight
    steps of the module doc over `chunks` micro-batches, half entering at each end.

    Raises:
        ValueError: an odd number of ranks or micro-batches, or fewer than 2 x ranks micro-batches.
    """
    if world % 2 or chunks % 2 or chunks < 2 * world:
        raise ValueError(f"DualPipe needs an even number of ranks ({world}) and an even number of micro-batches "
                         f">= 2 x ranks ({chunks})")
    half, h = world // 2, min(rank, world - 1 - rank)
    p0, p1 = (0, 1) if rank < half else (1, 0)  # phase -> direction on this rank
    return _eight_steps(h, half, chunks // 2, p0, p1)


def schedule_dualpipev(rank: int, world: int, chunks: int) -> list[Op]:
    """DualPipeV: one pipeline of 2P stages folded into a V over P ranks (rank r holds stages r and 2P-1-r);
    phase 0 runs down the V, phase 1 back up; the same eight steps with h = rank, over all micro-batches.

    Raises:
        ValueError: fewer than 2 x ranks micro-batches.
    """
    if chunks < 2 * world:
        raise ValueError(f"DualPipeV needs micro-batches >= 2 x ranks ({chunks} < {2 * world})")
    return _eight_steps(rank, world, chunks, 0, 1)


def _accumulate(params, grads) -> None:
    for p, g in zip(params, grads):
        p.grad = g if p.grad is None else p.grad + g


class PipelineRunner:
    """Runs one rank's schedule. `stages[d]` is this rank's module for direction d; activations of one shape.

    rank, world: this rank's position in its pipeline and the pipeline's length; peers: the global ranks of the
    pipeline's positions (default: position = global rank), so that many pipelines can share one process group.

    A backward accumulates into the parameters' `.grad` through autograd's own `backward` (what FSDP2's
    post-backward hooks, which reduce-scatter each unit's gradient, rely on). A zero-bubble B (ZB-H1, DualPipe)
    takes only the input gradient first and the weight gradients at its W, with `autograd.grad` on the stage's
    parameters; split_backward=False (FSDP2: its sharded parameters are not the ones in the graph) runs every B
    whole and every W as nothing: the same gradients, without the bubble filling."""

    def __init__(self, stages: dict[int, nn.Module], rank: int, world: int, act_shape: tuple[int, ...],
                 dual: bool, cost: dict[str, float] | None = None, act_dtype: torch.dtype = torch.float32,
                 v_shape: bool = False, peers: list[int] | None = None, device: torch.device | str = "cpu",
                 split_backward: bool = True):
        self.stages, self.rank, self.world, self.dual, self.v = stages, rank, world, dual, v_shape
        self.split_backward = split_backward
        self.act_shape, self.act_dtype, self.device = act_shape, act_dtype, torch.device(device)
        self.peers = peers or list(range(world))
        self.cost = cost  # seconds per op: simulate stage work with sleeps (bubble benchmark)

    # direction 0 flows rank 0 -> P-1; direction 1 flows P-1 -> 0. In the V, the two meet on the last rank:
    # direction 0's output is direction 1's input there ("local"), and gradients turn around the same way.
    LOCAL = "local"

    def _prev(self, d: int):
        if self.v and d == 1 and self.rank == self.world - 1:
            return self.LOCAL
        r = self.rank - 1 if d == 0 else self.rank + 1
        return r if 0 <= r < self.world else None

    def _next(self, d: int):
        if self.v and d == 0 and self.rank == self.world - 1:
            return self.LOCAL
        r = self.rank + 1 if d == 0 else self.rank - 1
        return r if 0 <= r < self.world else None

    def run(self, ops: list[Op], inputs: dict[int, list[torch.Tensor]],
            loss_fn: Callable[[torch.Tensor, int, int], torch.Tensor]) -> float:
        """inputs[d]: micro-batches of direction d (on the rank where d starts); loss_fn(output, d, index) on the
        rank where d ends. Returns the sum of the losses computed on this rank."""
        fwd_count = {0: 0, 1: 0}
        in_flight: dict[int, deque] = {0: deque(), 1: deque()}
        deferred: deque = deque()
        local_act: deque = deque()  # V bottom: direction-0 outputs waiting to enter direction 1
        local_grad: deque = deque()  # ... and direction-1 input gradients waiting for direction 0's backward
        pending_sends = []
        total_loss = 0.0
        for op in ops:
            kind = op[0]
            if kind == "F":
                d = op[1]
                i = fwd_count[d]
                fwd_count[d] += 1
                src = self._prev(d)
                if src is None:
                    x = inputs[d][i]
                elif src == self.LOCAL:
                    x = local_act.popleft()
                else:
                    x = torch.empty(self.act_shape, dtype=self.act_dtype, device=self.device)
                    dist.recv(x, self.peers[src], tag=2 * d)
                    x.requires_grad_(True)
                if self.cost:
                    time.sleep(self.cost["F"])
                    y = x
                else:
                    y = self.stages[d](x)
                dst = self._next(d)
                if dst is None:
                    y = loss_fn(y, d, i) if not self.cost else y.sum() * 0
                    total_loss += float(y.detach())
                elif dst == self.LOCAL:
                    local_act.append(y.detach().requires_grad_(True))
                else:
                    y_out = y.detach().to(self.act_dtype).contiguous()
                    pending_sends.append(dist.isend(y_out, self.peers[dst], tag=2 * d))
                in_flight[d].append((x, y, dst is None))
            elif kind == "B":
                d = op[1]
                zb = len(op) > 2
                x, y, is_last = in_flight[d].popleft()
                if is_last:
                    grad = None
                elif self._next(d) == self.LOCAL:
                    grad = local_grad.popleft()
                else:
                    grad = torch.empty(self.act_shape, dtype=self.act_dtype, device=self.device)
                    dist.recv(grad, self.peers[self._next(d)], tag=2 * d + 1)
                if self.cost:
                    time.sleep(self.cost["B"] - (self.cost["W"] if zb else 0.0))
                    if zb:
                        deferred.append(None)
                    dx = torch.zeros(self.act_shape, dtype=self.act_dtype)
                else:
                    needs_dx = x.requires_grad
                    if zb and needs_dx and self.split_backward:  # input gradient now, weight gradient at a W op
                        (dx,) = torch.autograd.grad(y, [x], grad, retain_graph=True)
                        params = [p for p in self.stages[d].parameters() if p.requires_grad]
                        deferred.append((y, grad, params))
                    else:  # into x.grad (x is a leaf) and every parameter's .grad
                        torch.autograd.backward(y, grad)
                        dx = x.grad if needs_dx else None
                src = self._prev(d)
                if src == self.LOCAL:
                    local_grad.append(dx)
                elif src is not None:
                    pending_sends.append(dist.isend(dx.to(self.act_dtype).contiguous(), self.peers[src],
                                                    tag=2 * d + 1))
            elif kind == "W" and deferred:
                self._weight_grad(deferred.popleft())
        while deferred:  # weight gradients the schedule left (never with complete schedules)
            self._weight_grad(deferred.popleft())
        for work in pending_sends:
            work.wait()
        return total_loss

    def _weight_grad(self, item) -> None:
        if self.cost:
            time.sleep(self.cost["W"])
        elif item is not None:
            y, grad, params = item
            _accumulate(params, torch.autograd.grad(y, params, grad))

    @torch.no_grad()
    def sync_stage_copies(self) -> None:
        """DualPipe: stage s lives on ranks s (direction 0) and P-1-s (direction 1); add the partner's gradients so
        both copies hold the gradient of all micro-batches and step identically."""
        if not self.dual:
            return
        partner = self.peers[self.world - 1 - self.rank]
        # (under FSDP2, the local shards: both copies of a stage are sharded alike over their data groups)
        mine = [local(p.grad) for d in (0, 1) for p in self.stages[d].parameters()]  # my stage r, then P-1-r
        theirs = [torch.empty_like(local(p.grad)) for d in (1, 0) for p in self.stages[d].parameters()]
        sends = [dist.isend(g.contiguous(), partner, tag=100 + i) for i, g in enumerate(mine)]
        # the partner sends its stage P-1-r (= my direction-1 stage) first, then its stage r
        for i, buf in enumerate(theirs):
            dist.recv(buf, partner, tag=100 + i)
        for w in sends:
            w.wait()
        n0 = len(list(self.stages[0].parameters()))
        for p, g in zip(self.stages[1].parameters(), theirs[: len(theirs) - n0]):
            local(p.grad).add_(g)
        for p, g in zip(self.stages[0].parameters(), theirs[len(theirs) - n0 :]):
            local(p.grad).add_(g)


_SCHEDULE_OPS = {"dualpipe": schedule_dualpipe, "dualpipev": schedule_dualpipev, "1f1b": schedule_1f1b,
                 "zb1p": schedule_zb1p}
SCHEDULES = tuple(_SCHEDULE_OPS)  # the pipeline schedules dsv3 runs (zb1p = ZB-H1)


def schedule_ops(schedule: str, rank: int, world: int, chunks: int) -> list[Op]:
    """The op list of `schedule` (one of SCHEDULES) for pipeline position `rank` of `world` over `chunks`
    micro-batches.

    Raises:
        ValueError: an unknown schedule, or one the schedule's own rules refuse (see each schedule_*)."""
    make = _SCHEDULE_OPS.get(schedule)
    if make is None:
        raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    return make(rank, world, chunks)


def held_stages(schedule: str, rank: int, world: int) -> dict[int, int]:
    """direction -> the stage pipeline position `rank` of `world` runs for it: stage r (1F1B, ZB-H1); r and
    P-1-r (DualPipe, each from its own copy of the model); r and 2P-1-r of 2P stages (DualPipeV)."""
    if schedule == "dualpipe":
        return {0: rank, 1: world - 1 - rank}
    if schedule == "dualpipev":
        return {0: rank, 1: 2 * world - 1 - rank}
    return {0: rank}


def split_stages(model, n_stages: int) -> list[tuple[int, int]]:
    """Contiguous, as-even-as-possible [lo, hi) ranges of the main layers for n_stages stages.

    Raises:
        ValueError: more stages than layers.
    """
    n = model.config.num_hidden_layers
    if n_stages > n:
        raise ValueError(f"{n_stages} pipeline stages for {n} layers: at most one stage per layer")
    bounds = [round(i * n / n_stages) for i in range(n_stages + 1)]
    return list(zip(bounds[:-1], bounds[1:]))
