"""Few-row matrix products of the compiled decode step as inductor reductions (CPU).

A decode step multiplies one row per sequence (k + 1 when verifying drafts) by each weight matrix. On CPU the matrix
library runs such a product (`aten.mm` with a [M, K] activation, M small, against a [K, N] view of an [N, K] weight)
on one thread, and reads the weight at a few GB/s: on this project's 2-core machine, a 1,536 x 256 weight took 237
us per product where the reduction below takes 51 us (a scratch timing, 16 such weights in turn). `FewRowMatmul`, a
post-grad graph pass given to inductor (`post_grad_custom_post_pass`), rewrites every float32 `mm` / `addmm` on CPU
(an `addmm` scaled by beta or alpha excepted) with at most `max_rows` rows as the same contraction written out,
`(a[:, :, None] * b[None]).sum(1)` (+ bias), which inductor generates as one vectorised reduction over K (contiguous
in the weight's rows), at one row parallel over the N outputs. The inputs are realised first (as inductor's own
`decompose_mm_pass` does), so that a fused producer of `a` (a norm) is not recomputed inside the reduction. The
result equals the product up to float32 summation order.

Products of 2 to `per_row` (`PER_ROW_MAX` = 4) rows, a verify step's, are written as one such reduction per row,
concatenated. As one [M, N] reduction, inductor parallelises the loop over the M rows when M is a multiple of the
thread count, so each thread reads the whole weight once per row (a 2-row 1,536 x 256 product: 28 us against 14 at
one row; scratch timing as above). Per row, inductor fuses the M reductions into one loop over the outputs with M
accumulators, loading each weight row once: 13 us at 2 rows (about the one-row time), 22 at 4 (256 x 1,536: 20 / 27
against 34 / 61). In the whole `small` step the gain is small (`decode_compile.py --variants "one reduction for all
rows"`, three runs): 1.03-1.05x speculating with k = 1 (2 rows), 1.01-1.06x at batch 2 and 4, nothing measurable at
k = 3 (0.93-1.09x); without the limit, batch 16 measured 0.97x and compiled 3.7x longer, hence the limit. An
outputs-outer form, one [N, M] reduction transposed into place, was faster per product than one [M, N] reduction (21
against 28 us at 2 rows) but slower in the step (0.85-0.94x at batch 2-16), and wrong unless its transposed result
was realised (inductor's 2-D tiled code for two consumers of such results computed wrong values on `small`'s
shapes).

Measured against the library's products (`benchmarks/decode_compile.py --variants "library products"`, `small`,
greedy tokens identical, before the per-row form): the compiled step 1.84x at batch 1 with 32-token contexts, 1.56x
at 2,000, 1.45-1.48x at batch 2, 1.33-1.35x speculating; the limit at 16 rows against 4: 1.20x at batch 8. Inductor
has a similar pass (`post_grad_fusion_options={"decompose_mm_pass": {}}`), but on CPU it takes one row only and
reads its limits once per process, when it is first imported. The pattern matcher used here is inductor's
(`torch._inductor`, pinned with torch).
"""

from __future__ import annotations

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files
from torch._inductor.pattern_matcher import Arg, CallFunction, Match, PatternMatcherPass, register_graph_pattern

aten = torch.ops.aten
PER_ROW_MAX = 4  # products of at most this many rows run as one reduction per row (module doc)


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


def _mm_all_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a[:, :, None] * b[None, :, :]).sum(1)  # [M, K, 1] * [1, K, N] -> [M, N]


def _mm_per_row(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.cat([_mm_all_rows(a[i : i + 1], b) for i in range(a.shape[0])])  # M x [1, N] -> [M, N]


class FewRowMatmul(CustomGraphPass):
    """The pass (module doc). `max_rows`: the largest M rewritten. `rewritten` counts the products rewritten in the
    graphs this pass has run on; a graph inductor takes from its cache is not passed through it again."""

    def __init__(self, max_rows: int, per_row: int = PER_ROW_MAX):
        if max_rows < 1 or per_row < 0:
            raise ValueError(f"max_rows must be >= 1 and per_row >= 0, got {max_rows} and {per_row}")
        self.max_rows = max_rows
        self.per_row = per_row
        self.rewritten = 0
        self._patterns = PatternMatcherPass(pass_name="dsv3_few_row_matmul")

        def mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # a's rows are a plain int here (_few_rows)
            return (_mm_per_row if 1 < a.shape[0] <= self.per_row else _mm_all_rows)(a, b)

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
        return f"FewRowMatmul(max_rows={self.max_rows}, per_row={self.per_row})"

    def __call__(self, graph: torch.fx.Graph) -> None:
        self._patterns.apply(graph)

    def uuid(self) -> bytes:
        return get_hash_for_files((__file__,), extra=f"max_rows={self.max_rows} per_row={self.per_row}")
