"""The official (Hugging Face / DeepSeek) tensor names of an in-memory model, and where each one lives in it.

The in-memory model differs from the stored names in three places:
- routed experts are stacked ([E, ...] per projection) but stored one tensor per expert
  (`model.layers.{i}.mlp.experts.{j}.down_proj.weight`); a shard of the stack (expert parallelism) holds experts
  `expert_offset ..` of the layer and maps to those names;
- gate and up projections are fused (`gate_up_proj`, [2I, D] or [E, 2I, D], gate rows first) but stored as the
  official `gate_proj` / `up_proj` tensors: each is a row range of the fused one;
- each MTP module is stored with its own copies of the embedding and output head
  (`model.layers.{L}.embed_tokens.weight`, `model.layers.{L}.shared_head.head.weight`), which the model shares with
  the main ones: those names are `alias` slots.

Checkpoints read and write through this map (`dsv3.checkpoint`), and initialisation draws each official tensor
from its own generator (`DeepseekV3.init_weights`), so that weights do not depend on how the model is laid out.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from torch import nn

from .moe import GATE_UP, GATE_UP_PARTS


@dataclass
class Slot:
    """Where one stored tensor lives in the model: `target`, or row `index` of a stacked `target`, then (for a
    half of a fused gate_up_proj) the row range `rows` of that."""

    target: torch.Tensor
    index: int | None = None
    alias: bool = False  # a stored copy of a tensor the model shares (MTP embedding / head)
    rows: slice | None = None

    @property
    def view(self) -> torch.Tensor:
        """The stored tensor's place, a view into the model's parameter: `target`, its row `index` (one expert's
        matrix), and of that the rows `rows` (the [I, D] gate or up half of a [2I, D] gate_up_proj)."""
        t = self.target if self.index is None else self.target[self.index]
        return t if self.rows is None else t[self.rows]


def official_slots(model: nn.Module) -> dict[str, Slot]:
    """Map every official tensor name this model holds to its place in it.

    model: a `DeepseekV3`, possibly with parallel wrappers applied (expert shards map to their global expert
    indices through their `expert_offset`). Tensors on the meta device are included (their views are meta).
    """
    cfg = model.config
    slots: dict[str, Slot] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        if cfg.tie_word_embeddings and name == "lm_head.weight":
            continue  # tied: stored once, as the embedding
        if ".mlp.experts." in name:  # stacked routed experts: `...experts.gate_up_proj` [E, 2I, D]
            prefix, proj = name.rsplit(".", 1)
            offset = getattr(model.get_submodule(prefix), "expert_offset", 0)
            for j in range(t.shape[0]):
                slots.update(_unfused(f"{prefix}.{offset + j}.{proj}.weight", t, j))
        else:
            slots.update(_unfused(name, t, None))
    for k in range(cfg.num_nextn_predict_layers):
        layer = f"model.layers.{cfg.num_hidden_layers + k}"
        slots[f"{layer}.embed_tokens.weight"] = Slot(model.model.embed_tokens.weight, alias=True)
        slots[f"{layer}.shared_head.head.weight"] = Slot(model.lm_head.weight, alias=True)
    return slots


def _unfused(name: str, t: torch.Tensor, index: int | None) -> dict[str, Slot]:
    """{name: Slot(t, index)}, except a fused `...gate_up_proj.weight` ([2I, D] rows of t or t[index]), which is
    stored as two tensors: `...gate_proj.weight` (rows [0, I)) and `...up_proj.weight` (rows [I, 2I))."""
    module, _, leaf = name.removesuffix(".weight").rpartition(".")
    if leaf != GATE_UP:
        return {name: Slot(t, index)}
    half = t.shape[-2] // 2
    return {f"{module}.{part}.weight": Slot(t, index, rows=slice(i * half, (i + 1) * half))
            for i, part in enumerate(GATE_UP_PARTS)}


def keyed_generator(seed: int, name: str) -> torch.Generator:
    """A CPU generator seeded from (seed, official tensor name) alone (SHA-256 of both, 63 bits), so a tensor's
    initial values do not depend on which other tensors a process holds or in what order it draws them."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
