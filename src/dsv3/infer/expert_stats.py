"""Which routed experts the decode steps use: per MoE layer, the tokens each expert received over the last N steps.

The engine's decode forward returns its routing (the top-k expert ids of every token in every main MoE layer, which
the router computes anyway), stacked into one fresh tensor by the (maybe compiled) forward, and hands it to
`ExpertStats.record`, which keeps a reference to it in a ring of the last N steps: no device op, no host
synchronisation (.item(), .tolist()), nothing inside the compiled graph but the `torch.stack`. Counting waits until
someone asks: `counts` and `snapshot` (the `dsv3 serve` page's JSON endpoint) gather the kept ids and count them
with one `scatter_add_`. The ring is a Python list whose slots the engine thread replaces whole, so a reader
copying it (atomic under the GIL) sees every step either before or after, never half written.

What counts: every position a decode forward runs (with MTP speculation, each verified position, accepted or
not: the experts computed them all), for the real rows only (a compiled step's padding rows are left out);
prefill chunks and the MTP module's own MoE layer are not counted. The kept tensors are the forward's own outputs,
fresh every step (the engine compiles without CUDA graphs, which would reuse their memory).
"""

from __future__ import annotations

import torch

from ..model import DeepseekV3


class ExpertStats:
    """The routing of the last `window` decode steps: per step, the main MoE layers' expert ids [L, M, K] and how
    many of the M token positions were real.

    model: the model whose main MoE layers (L of them, E routed experts each, top-K per token) are counted.
    window: decode steps kept (N).
    """

    def __init__(self, model: DeepseekV3, window: int):
        cfg = model.config
        if not isinstance(window, int) or window < 1:
            raise ValueError(f"the expert statistics window must be a positive number of decode steps, got {window!r}")
        self.layers = [layer.layer_idx for layer in model.main_layers if layer.is_moe]  # model layer indices
        self.routers = [layer.mlp.gate for layer in model.main_layers if layer.is_moe]
        self.window = window
        self.top_k = cfg.num_experts_per_tok
        self.n_experts = cfg.n_routed_experts
        self.device = model.lm_head.weight.device
        self._ring: list[tuple[torch.Tensor, int] | None] = [None] * window  # (ids [L, M, K], real positions)
        self._pos = 0  # the slot the next step replaces
        self.steps = 0  # decode steps recorded since the start

    def record(self, topk_idx: torch.Tensor, rows: int) -> None:
        """Keep one decode forward's routing: topk_idx [L, M, K] (int64 expert ids per MoE layer and token position,
        the positions row-major over the batch), of which the first `rows` positions are real (the rest: padding).
        Keeps a reference only: `topk_idx` must not be written to afterwards."""
        self._ring[self._pos] = (topk_idx, rows)
        self._pos = (self._pos + 1) % self.window
        self.steps += 1

    def _kept(self, last: int | None = None) -> list[tuple[torch.Tensor, int]]:
        """The kept steps, oldest first (the newest `last` of them when given)."""
        ring, pos = list(self._ring), self._pos  # a copy: the engine thread goes on replacing slots
        kept = [e for e in ring[pos:] + ring[:pos] if e is not None]
        return kept[max(len(kept) - last, 0):] if last is not None else kept

    def counts(self, last: int | None = None) -> tuple[torch.Tensor, int, int]:
        """(tokens each expert received [L, E] (fp32, on the model's device), token positions counted, steps
        counted) over the kept steps, or the newest `last` of them."""
        kept = self._kept(last)
        out = torch.zeros(len(self.layers), self.n_experts, device=self.device)
        if kept:
            ids = torch.cat([t[:, :rows].reshape(len(self.layers), -1) for t, rows in kept], dim=1)  # [L, P*K]
            out.scatter_add_(1, ids.to(self.device), torch.ones(ids.shape, device=self.device))
        return out, sum(rows for _, rows in kept), len(kept)

    def snapshot(self) -> dict:
        """What the kept decode steps routed, as plain JSON-ready values: window, steps (recorded in all),
        steps_in_window, tokens (positions counted in the window), top_k, n_experts, layers (model layer index of
        each MoE layer), counts [L][E] (tokens each expert received in the window; they sum to tokens x top_k per
        layer), bias [L][E] (each router's current e_score_correction_bias)."""
        counts, tokens, kept = self.counts()
        steps = self.steps  # read after the ring was copied: never fewer than the steps counted
        return {"window": self.window, "steps": steps, "steps_in_window": kept, "tokens": tokens,
                "top_k": self.top_k, "n_experts": self.n_experts, "layers": self.layers,
                "counts": counts.cpu().tolist(), "bias": router_biases(self.routers)}


def router_biases(routers) -> list[list[float]]:
    """Each router's e_score_correction_bias [E] as a list, [L][E]."""
    return [r.e_score_correction_bias.detach().float().cpu().tolist() for r in routers]
