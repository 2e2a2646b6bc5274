"""Few-row matrix products of the compiled decode step as inductor reductions (CPU).

A decode step multiplies one row per sequence (k + 1 when verifying drafts) by each weight matrix. On CPU the matrix
library runs such a product (`aten.mm` with a [M, K] activation, M small, against a [K, N] view of an [N, K] weight)
on one thread, and reads the weight at a few GB/s: on this project's 2-core machine, a 1,536 x 256 weight took 237
us per product where the reduction below takes 51 us (a scratch timing, 16 such weights in turn). `FewRowMatmul`, a
post-grad graph pass given to inductor (`post_grad_custom_post_pass`), rewrites every float32 `mm` / `addmm` on CPU
(an `addmm` scaled by beta or alpha excepted) with at most `max_rows` rows as the same contraction written out,
`(a[:, :, None] * b[None]).sum(1)` (+ bias), which inductor generates as one vectorised reduction over K (contiguous
in the weight's rows), parallel over the N outputs. The inputs are realised first (as inductor's own
`decompose_mm_pass` does), so that a fused producer of `a` (a norm) is not recomputed inside the reduction. The
result equals the product up to float32 summation order.

Measured against the library's products (`benchmarks/decode_compile.py --variants "library products"`, `small`,
greedy tokens identical): the compiled step 1.84x at batch 1 with 32-token contexts, 1.56x at 2,000, 1.45-1.48x at
batch 2, 1.33-1.35x speculating; the limit at 16 rows against 4: 1.20x at batch 8. Inductor has a similar pass
(`post_grad_fusion_options={"decompose_mm_pass": {}}`), but on CPU it takes one row only and reads its limits once
per process, when it is first imported. The pattern matcher used here is inductor's (`torch._inductor`, pinned with
torch).
"""

from __future__ import annotations

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files
from torch._inductor.pattern_matcher import Arg, CallFunction, Match, PatternMatcherPass, register_graph_pattern

aten = torch.ops.aten


def _few_rows(a: torch.fx.Node, b: torch.fx.Node, max_rows: int) -> bool:
    """Whether `a @ b` (2-D, float32, CPU) has at most `max_rows` rows."""
    va, vb = a.meta.get("val"), b.meta.get("val")
    if not isinstance(va, torch.Tensor) or not isinstance(vb, torch.Tensor) or va.dim() != 2 or vb.dim() != 2:
        return False
    if va.device.type != "cpu" or vb.device.type != "cpu" or va.dtype != torch.float32 or vb.dtype != torch.float32:
        return False
    rows = va.shape[0]
    return isinstance(rows, int) and rows <= max_rows


def _realise(*nodes: torch.fx.Node) -> None:
    """Ask inductor to materialise these inputs (with their strides) rather than fuse their producers inside."""
    for n in nodes:
        n.meta["inductor_realize_to_strides"] = True


def _mm_per_row(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    rows = [(a[i : i + 1, :, None] * b[None, :, :]).sum(1) for i in range(a.shape[0])]  # [1, K, 1] * [1, K, N]
    return torch.cat(rows) if len(rows) > 1 else rows[0]  # [M, N]


def _mm_all_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a[:, :, None] * b[None, :, :]).sum(1)  # [M, K, 1] * [1, K, N] -> [M, N]


class FewRowMatmul(CustomGraphPass):
    """The pass (module doc). `max_rows`: the largest M rewritten. `rewritten` counts the products rewritten in the
    graphs this pass has run on; a graph inductor takes from its cache is not passed through it again."""

    def __init__(self, max_rows: int, per_row: bool = True):
        if max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, got {max_rows}")
        self.max_rows = max_rows
        self.per_row = per_row
        self.rewritten = 0
        self._patterns = PatternMatcherPass(pass_name="dsv3_few_row_matmul")
        mm = _mm_per_row if per_row else _mm_all_rows

        def addmm(bias: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return mm(a, b) + bias

        @register_graph_pattern(CallFunction(aten.mm, Arg(), Arg()), pass_dict=self._patterns)
        def on_mm(match: Match, a: torch.fx.Node, b: torch.fx.Node) -> None:
            self._rewrite(match, mm, [a, b])

        @register_graph_pattern(CallFunction(aten.addmm, Arg(), Arg(), Arg()), pass_dict=self._patterns)
        def on_addmm(match: Match, bias: torch.fx.Node, a: torch.fx.Node, b: torch.fx.Node) -> None:
            if all(match.output_node().kwargs.get(k, 1) == 1 for k in ("beta", "alpha")):  # not scaled
                self._rewrite(match, addmm, [bias, a, b])

    def _rewrite(self, match: Match, example, args: list[torch.fx.Node]) -> None:
        """Replace the matched product, whose last two args are a and b, by `example` when it has few rows."""
        a, b = args[-2:]
        if _few_rows(a, b, self.max_rows):
            match.replace_by_example(example, args)
            _realise(a, b)
            self.rewritten += 1

    def __repr__(self) -> str:
        return f"FewRowMatmul(max_rows={self.max_rows}{'' if self.per_row else ', per_row=False'})"

    def __call__(self, graph: torch.fx.Graph) -> None:
        self._patterns.apply(graph)

    def uuid(self) -> bytes:
        return get_hash_for_files((__file__,), extra=f"max_rows={self.max_rows} per_row={self.per_row}")
