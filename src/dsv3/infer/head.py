"""The output head for decode-size batches (a few rows per step), the engine's one way to turn hidden states into
logits.

A decode step multiplies 1-32 rows by the whole [V, D] head, the largest matrix a step reads (`small`: 8 MiB of
the 23 MiB it streams per token). Measured on this project's CPU (AMD EPYC, torch 2.13's MKL, two threads,
`small`'s 8192 x 256 head, microseconds per product):

| rows | `F.linear` (MKL) | MKL on a column-major copy | oneDNN, packed weight |
|---|---|---|---|
| 1 | 980-1100 | 450-540 | 300-430 |
| 2 | 2060-2210 | 870-1120 | 310-600 |
| 16 | 3890-4260 | 3120-4360 | 1380-1460 |

MKL's small-M GEMM costs about one pass over the weight per row, so a speculative verify (2+ rows) paid for the head
twice; oneDNN's product on a weight it packed once reads it about once. So on CPU in fp32 the head keeps a packed
copy of the weight (`torch.ops.mkldnn._reorder_linear_weight`, what inductor's own weight prepacking uses) and
everywhere else, or if packing is unavailable, it is `F.linear`. Smaller matrices (the attention and expert
projections) measured slower packed (a fixed ~50 us per call), so only the head is.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

PACK_ROWS_HINT = 2  # oneDNN picks its packed layout for this many rows; 2 measured best across 1, 2 and 16


class DecodeHead:
    """logits = h @ weight^T for h [..., D] -> [..., V]. The packed copy is a snapshot of `weight` [V, D] taken at
    construction (the engine's weights do not change while it serves); the `F.linear` fallback reads the weight
    itself.

    `packed` says whether the oneDNN product is used (CPU, fp32, oneDNN available and the packing succeeded).
    The values equal `F.linear` up to summation order (~1e-6 relative).
    """

    def __init__(self, weight: torch.Tensor):
        self.weight = weight.detach()
        self._packed = None
        if self.weight.device.type == "cpu" and self.weight.dtype == torch.float32 \
                and torch.backends.mkldnn.is_available():
            try:
                self._packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.contiguous(), PACK_ROWS_HINT)
            except (RuntimeError, AttributeError):  # a torch without the op, or a build without oneDNN
                self._packed = None

    @property
    def packed(self) -> bool:
        return self._packed is not None

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        if self._packed is None or h.dtype != torch.float32:
            return F.linear(h, self.weight)
        return torch.ops.mkldnn._linear_pointwise(h.contiguous(), self._packed, None, "none", [], "")


class DraftHead:
    """The MTP drafter's head over a subset of the vocabulary (FR-Spec, Zhao et al. 2025): h [..., D] -> logits
    [..., V] computed for the rows `ids` of `weight` [V, D] only (a `DecodeHead` over a copy of those rows), -inf
    for every other token. A draft is then always one of `ids` and its distribution q is zero elsewhere; the
    verification against the main model's full distribution p keeps the output exact (q enters only the acceptance
    min(1, p/q) of the drafted token and the residual max(0, p - q) a rejection resamples from). What it saves is
    the head's share of a draft: on `small`, 1.16 ms of a k = 1 step's 2.9 ms of drafting (README).

    Raises:
        ValueError: ids empty, repeated or outside [0, V).
    """

    def __init__(self, weight: torch.Tensor, ids: list[int]):
        vocab = weight.shape[0]
        if not ids or len(set(ids)) != len(ids) or min(ids) < 0 or max(ids) >= vocab:
            raise ValueError(f"draft vocabulary: {len(ids)} ids, which must be distinct and in [0, {vocab})")
        self.vocab = vocab
        self.ids = torch.tensor(sorted(ids), device=weight.device)  # [N]
        self.head = DecodeHead(weight.detach()[self.ids])  # a copy of the N rows [N, D], packed like the full head

    @property
    def packed(self) -> bool:
        return self.head.packed

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        sub = self.head(h)  # [..., N]
        out = sub.new_full((*sub.shape[:-1], self.vocab), float("-inf"))  # [..., V]
        return out.index_copy_(-1, self.ids, sub)
