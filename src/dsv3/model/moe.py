"""DeepSeekMoE: shared experts + fine-grained routed experts with group-limited, bias-corrected top-k routing.

Shape legend: N tokens (batch flattened), D hidden, E routed experts, K experts per token, I expert width,
G groups.

Routing (`Router`, stored as `mlp.gate`):
  s = sigmoid(x W_g^T)                         affinities [N, E], computed in fp32
  choice = s + b                               b = `e_score_correction_bias`, a buffer: it steers *which*
                                               experts are picked (aux-loss-free balancing) but never the weights
  group score = sum of the top-2 choice scores in each of G groups; keep the best `topk_group` groups
  top-K of `choice` inside the kept groups
  weights = s[top-K] / sum(s[top-K]) * routed_scaling_factor     (normalised only if norm_topk_prob)
With scoring_func = "softmax" (V2-style) the affinities are a softmax and a group scores by its max.

Experts (`RoutedExperts`) hold stacked weights [E, ...] and run as grouped GEMMs over tokens sorted by expert,
so no token ever gathers a private copy of a weight matrix. Gate and up projections are fused into one matrix,
`gate_up_proj` = [W_gate; W_up] (gate rows first, as transformers 5 stores it), so an expert is two GEMMs:
  [g; u] = x [W_gate; W_up]^T      [M, 2I]
  y = (silu(g) * u) W_down^T        [M, D]
The dense `MLP` and the shared experts are fused the same way (`gate_up_proj` [2I, D], one nn.Linear).
The checkpoint still uses the official names, one tensor per expert and projection
(`mlp.experts.{j}.gate_proj.weight`, `mlp.shared_experts.up_proj.weight`); `dsv3.checkpoint` splits / stacks
on save / load.

Sources: DeepSeek-V3 report section 2.1.2 (DeepSeekMoE, auxiliary-loss-free load balancing) and the routing code
of DeepSeek's `inference/model.py` (`Gate`) and transformers' `DeepseekV3TopkRouter`, which agree.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig

GATE_UP = "gate_up_proj"  # the fused [gate; up] weight's name, in MLP and RoutedExperts alike
GATE_UP_PARTS = ("gate_proj", "up_proj")  # the official names of its two halves, in row order


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SwiGLU's gating: gate_up [..., 2I] (gate columns first) -> silu(gate) * up [..., I]."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x)), with gate and up as one linear `gate_up_proj`
    (weight [2I, D], gate rows first; stored as the official `gate_proj` / `up_proj`). Dense layers and shared
    experts."""

    def __init__(self, dim: int, inter_dim: int):
        super().__init__()
        self.gate_up_proj = nn.Linear(dim, 2 * inter_dim, bias=False)
        self.down_proj = nn.Linear(inter_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., D] -> [..., D]."""
        return self.down_proj(silu_mul(self.gate_up_proj(x)))


@dataclass
class RoutingInfo:
    """What one MoE layer decided for a forward pass (for balancing, statistics and the losses)."""

    topk_idx: torch.Tensor  # [N, K] chosen experts
    topk_weight: torch.Tensor  # [N, K] gate weights applied to their outputs (fp32)
    scores: torch.Tensor  # [N, E] unbiased affinities s (fp32; carries grad to the gate)
    load: torch.Tensor  # [E] tokens routed to each expert in this pass (fp32, no grad)


class Router(nn.Module):
    """The MoE gate (stored as `mlp.gate`): `weight` [E, D] and the routing bias `e_score_correction_bias` [E]
    (fp32 buffer, moved by the aux-loss-free balancer, never by gradients). See the module doc for the rule."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.top_k = cfg.num_experts_per_tok
        self.n_experts = cfg.n_routed_experts
        self.n_group, self.topk_group = cfg.n_group, cfg.topk_group
        self.scoring_func = cfg.scoring_func
        self.norm_topk_prob = cfg.norm_topk_prob
        self.routed_scaling_factor = cfg.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        # Not a Parameter: moved by the load balancer, not by gradients. Persistent, so checkpoints keep it.
        self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_routed_experts, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> RoutingInfo:
        """x [N, D] (any float dtype; scored in fp32) -> the `RoutingInfo` of these N tokens.

        Selection (group limit, top-K on biased scores) is not differentiable; the weights gather the unbiased
        affinities, so the gate's gradient flows through them.
        """
        logits = F.linear(x.float(), self.weight.float())  # [N, E]; routing decisions in fp32
        scores = logits.sigmoid() if self.scoring_func == "sigmoid" else logits.softmax(dim=-1)
        with torch.no_grad():
            choice = scores + self.e_score_correction_bias  # [N, E]
            if self.n_group > 1:
                grouped = choice.view(-1, self.n_group, self.n_experts // self.n_group)  # [N, G, E/G]
                if self.scoring_func == "sigmoid":
                    group_score = grouped.topk(2, dim=-1).values.sum(dim=-1)  # [N, G]
                else:
                    group_score = grouped.amax(dim=-1)
                keep = group_score.topk(self.topk_group, dim=-1).indices  # [N, topk_group]
                drop = torch.ones_like(group_score, dtype=torch.bool).scatter_(1, keep, False)
                choice = grouped.masked_fill(drop[..., None], float("-inf")).flatten(1)
            topk_idx = choice.topk(self.top_k, dim=-1).indices  # [N, K]
        weight = scores.gather(1, topk_idx)
        if self.norm_topk_prob:
            weight = weight / (weight.sum(dim=-1, keepdim=True) + 1e-20)
        weight = weight * self.routed_scaling_factor
        # tokens per expert (a scatter rather than bincount, whose output size depends on the data under compile)
        load = scores.new_zeros(self.n_experts).index_add_(0, topk_idx.flatten(),
                                                           scores.new_ones(topk_idx.numel()))
        return RoutingInfo(topk_idx, weight, scores, load)


# ----------------------------------------------------------------------------------------- grouped GEMM
GROUPED_MM_MIN_ROWS = 64  # below this (decode steps) the per-expert loop is faster than one grouped call


def _grouped_mm_ok(x: torch.Tensor, w: torch.Tensor) -> bool:
    # torch's grouped GEMM needs 16-byte aligned row strides; otherwise fall back to the per-expert loop.
    return (x.shape[0] >= GROUPED_MM_MIN_ROWS and hasattr(F, "grouped_mm") and x.dtype == w.dtype
            and x.dtype in (torch.float32, torch.bfloat16)
            and x.is_contiguous() and all((n * x.element_size()) % 16 == 0 for n in (x.shape[-1], *w.shape[-2:])))


def expert_rows(counts: list[int]):
    """(expert, row slice) for each expert that got rows, when rows are grouped by expert with counts[e] each."""
    start = 0
    for e, c in enumerate(counts):
        if c:
            yield e, slice(start, start + c)
        start += c


def grouped_mm(x: torch.Tensor, w: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Rows of x [M, in] are grouped by expert (`counts[e]` rows each); returns [M, out] with x_e @ w[e]^T
    for w [E, out, in]. Grouped GEMM where torch offers it, else a loop over non-empty experts."""
    if _grouped_mm_ok(x, w):
        offs = torch.tensor(counts, device=x.device).cumsum(0).to(torch.int32)
        return F.grouped_mm(x, w.transpose(1, 2), offs=offs)
    out = x.new_empty(x.shape[0], w.shape[1])
    for e, rows in expert_rows(counts):  # (assigning is several times faster than matmul(..., out=view) on CPU)
        out[rows] = x[rows] @ w[e].t()
    return out


class _GroupedLinear(torch.autograd.Function):
    """y = grouped x @ w[e]^T with an explicit backward (torch's CPU grouped GEMM has no autograd)."""

    @staticmethod
    def forward(ctx, x, w, counts):
        ctx.save_for_backward(x, w)
        ctx.counts = counts
        return grouped_mm(x, w, counts)

    @staticmethod
    def backward(ctx, dy):
        x, w = ctx.saved_tensors
        counts = ctx.counts
        dy = dy.contiguous()
        dx = grouped_mm(dy, w.transpose(1, 2), counts) if ctx.needs_input_grad[0] else None  # Dgrad
        dw = None
        if ctx.needs_input_grad[1]:  # Wgrad: dW_e = dy_e^T x_e, zero for experts that got no token
            dw = torch.zeros_like(w)
            for e, rows in expert_rows(counts):
                dw[e] = dy[rows].t() @ x[rows]
        return dx, dw, None


def grouped_linear(x: torch.Tensor, w: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """`grouped_mm` (x [M, in] grouped by expert, w [E, out, in] -> [M, out]) with autograd when it is needed."""
    if torch.is_grad_enabled() and (x.requires_grad or w.requires_grad):
        return _GroupedLinear.apply(x, w, counts)
    return grouped_mm(x, w, counts)


class RoutedExperts(nn.Module):
    """E SwiGLU experts with stacked weights: gate_up_proj [E, 2I, D] (expert e's [W_gate; W_up], gate rows
    first), down_proj [E, D, I]. Two grouped GEMMs per pass: gate+up, then down."""

    expert_offset = 0  # the layer's index of this stack's first expert (a shard under expert parallelism is not 0)

    def __init__(self, n_experts: int, dim: int, inter_dim: int):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(n_experts, 2 * inter_dim, dim))
        self.down_proj = nn.Parameter(torch.empty(n_experts, dim, inter_dim))

    def forward(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor) -> torch.Tensor:
        """x [N, D], topk_idx / topk_weight [N, K] -> sum_k weight_k * expert_k(x) [N, D].

        Eager, and whenever gradients are wanted: `grouped`, grouped GEMMs over tokens sorted by expert. Compiled
        inference (the engine's decode step): `gathered`, whose shapes do not depend on the routing.
        """
        if torch.compiler.is_compiling() and not torch.is_grad_enabled():
            return self.gathered(x, topk_idx, topk_weight)
        return self.grouped(x, topk_idx, topk_weight)

    def grouped(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor) -> torch.Tensor:
        """`forward`'s eager path: the (token, expert) pairs sorted by expert, two grouped GEMMs, the outputs
        weighted and added back to their tokens. x [N, D], topk_idx / topk_weight [N, K] -> [N, D].

        Under `torch.compile` (the compiled training step, `--compile`) only the two GEMMs run eagerly
        (`expert_gemm`: they need the per-expert counts as Python ints, and inductor has no CPU fp32 grouped GEMM);
        the sort, gather, SwiGLU, weighting and scatter-add between them have static shapes ([N·K, ...]) and are
        compiled with the layer."""
        n, k = topk_idx.shape
        flat = topk_idx.flatten()  # [N*K], slot j belongs to token j // K
        order = flat.argsort(stable=True)  # slots sorted by expert
        token = order // k
        # rows per expert [E] (a scatter rather than bincount, whose output size depends on the data under compile)
        counts = flat.new_zeros(self.gate_up_proj.shape[0]).index_add_(0, flat, torch.ones_like(flat))
        ys = self.swiglu(x[token], counts)  # [N*K, D]
        ys = ys * topk_weight.flatten()[order, None].to(ys.dtype)
        return x.new_zeros(n, x.shape[-1]).index_add_(0, token, ys)

    def gathered(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor) -> torch.Tensor:
        """Same result as `forward` with static shapes (the compiled decode step's path): each of the N·K
        (token, expert) pairs multiplies its expert's rows, indexed by the routing, as products summed over the
        input dim. x [N, D], topk_idx / topk_weight [N, K] -> [N, D].

        Eager this materialises [N·K, 2I, D] products, so `forward` uses it only under `torch.compile`, where the
        index, product and sum fuse into one loop that reads just the chosen experts' rows. Measured (the whole
        compiled `small` decode step, inductor freezing on, two threads): batch 1 5.0 ms vs 7.4 ms for running
        every expert on every token (batched GEMMs weighted by a zero-padded combine matrix); batch 16 16.0 vs
        21.7 ms.
        """
        n, k = topk_idx.shape
        flat = topk_idx.flatten()
        xs = x.repeat_interleave(k, 0)  # [NK, D]
        h = silu_mul((self.gate_up_proj[flat] * xs[:, None, :]).sum(-1))  # [NK, I]
        y = (self.down_proj[flat] * h[:, None, :]).sum(-1)  # [NK, D]
        return (y.view(n, k, -1) * topk_weight.to(y.dtype)[..., None]).sum(1)

    def swiglu(self, xs: torch.Tensor, counts: torch.Tensor | list[int]) -> torch.Tensor:
        """Rows xs [M, D] grouped by expert (counts[e] rows for expert e, in expert order; an int tensor [E] or a
        list) -> [M, D], each row through its expert's SwiGLU (the part expert parallelism reuses between its
        dispatch and combine)."""
        h = silu_mul(self.expert_gemm(xs, self.gate_up_proj, counts, parts=2))  # [M, 2I] -> [M, I]
        return self.expert_gemm(h, self.down_proj, counts)

    @torch.compiler.disable  # the counts as Python ints: a compiled layer runs this call eagerly, between graphs
    def expert_gemm(self, x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor | list[int], parts: int = 1
                    ) -> torch.Tensor:
        """`_linear` with the counts as a list (one host read of a tensor's E values)."""
        return self._linear(x, w, counts.tolist() if isinstance(counts, torch.Tensor) else counts, parts)

    def _linear(self, x: torch.Tensor, w: torch.Tensor, counts: list[int], parts: int = 1) -> torch.Tensor:
        """The per-expert GEMM, x [M, in] grouped by expert, w [E, out, in] -> [M, out] (overridden by the FP8
        version in dsv3.quant). parts: w's rows are that many stacked official matrices (2 for gate_up_proj);
        exact arithmetic does not care, block-scaled FP8 does."""
        return grouped_linear(x, w, counts)


class MoE(nn.Module):
    """A DeepSeekMoE FFN (stored as `model.layers.{i}.mlp`): `gate` (Router), the routed `experts` and, when
    n_shared_experts > 0, `shared_experts`, one SwiGLU of width n_shared_experts x moe_intermediate_size that
    every token goes through. y = shared(x) + sum_k weight_k * expert_k(x)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate = Router(cfg)
        self.experts = RoutedExperts(cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size)
        self.shared_experts = (MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts)
                               if cfg.n_shared_experts > 0 else None)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, RoutingInfo]:
        """x [B, T, D] (or any [..., D]) -> (y of x's shape, the routing of its B·T tokens, flattened as N)."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [N, D]
        route = self.gate(x)
        y = self.experts(x, route.topk_idx, route.topk_weight)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        return y.view(shape), route
