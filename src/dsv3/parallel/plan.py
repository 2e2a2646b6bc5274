"""Per-rank memory of a training layout, from the config alone: what `dsv3 plan` prints, and what each rank of a
real run measures on its own tensors (`Trainer.held_memory`, saved in its trainer state) must equal.

Which tensors a rank holds (the same rules as the trainers, written out here from the tensor names):
- the pipeline cuts the main layers into contiguous, as-even-as-possible stages (`split_stages`); a rank holds
  stage r (1F1B, ZB-H1), stages r and P-1-r (DualPipe: two copies of the parameters, report Table 2) or stages r
  and 2P-1-r of 2P (DualPipeV). The first stage also holds the embedding; the last the final norm, the head, the
  MTP modules and (with MTP) its own copy of the embedding. Without a pipeline: the whole model, once;
- routed experts: 1/ep of each MoE layer's stack; every other tensor is replicated over the stage's dp x ep ranks.
Bytes (dsv3's trainer, every precision, FP8 included: FP8 GEMMs quantize fp32 master weights on the fly):
- parameters and gradients: 4 bytes per element;
- AdamW: two moments per element, 4 bytes each (2 with `optimizer_state_dtype` bf16, the report's choice) plus,
  for torch's fp32 AdamW, a 4-byte step counter per tensor; with ZeRO-1 the replicated tensors' state is
  partitioned over the stage's dp x ep ranks (`zero.zero_owners`), expert shards keep theirs.
Serving: `latent_cache_bytes` is the MLA cache a server allocates (every main and MTP layer's kv_lora_rank +
qk_rope_head_dim values per token, as `LatentCache` holds them; the report's decoding setup keeps all layers on
each GPU, attention data-parallel, so a GPU's cache is its own sequences' tokens times this).
Not modelled yet: activations (so "fits" counts the states only).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..config import ModelConfig
from ..model import DeepseekV3
from .mesh import is_expert_param
from .pipeline import SCHEDULES, split_stages
from .zero import zero_owners

PARAM_BYTES = 4  # fp32 master weights (and their gradients) in every precision dsv3 trains in


@dataclass(frozen=True)
class Layout:
    """A training layout: pp x dp x ep ranks (rank = (pp_index x dp + dp_index) x ep + ep_index), ZeRO-1 or not,
    the pipeline schedule and the AdamW moments' dtype ("fp32" or "bf16")."""

    pp: int = 1
    dp: int = 1
    ep: int = 1
    zero: bool = False
    schedule: str = "dualpipe"
    optimizer_state_dtype: str = "fp32"

    @property
    def world(self) -> int:
        return self.pp * self.dp * self.ep

    def coordinates(self, rank: int) -> tuple[int, int, int]:
        """(pp_index, dp_index, ep_index) of a global rank."""
        pp_index, data_rank = divmod(rank, self.dp * self.ep)
        return (pp_index, *divmod(data_rank, self.ep))


@dataclass
class RankMemory:
    """What one rank holds; the keys of `Trainer.held_memory` plus its place in the mesh."""

    rank: int
    pp_index: int
    dp_index: int
    ep_index: int
    parameters: int
    parameter_bytes: int
    gradient_bytes: int
    optimizer_state_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.parameter_bytes + self.gradient_bytes + self.optimizer_state_bytes

    def held(self) -> dict[str, int]:
        """The figures `Trainer.held_memory` measures."""
        d = asdict(self)
        return {k: d[k] for k in ("parameters", "parameter_bytes", "gradient_bytes", "optimizer_state_bytes")}


def _stage_tensors(names: list[tuple[str, int]], n_layers: int, lo: int, hi: int, mtp: bool) -> list[tuple[str, int]]:
    """(name, elements) of the tensors one pipeline stage of main layers [lo, hi) holds."""
    out = []
    for name, numel in names:
        parts = name.split(".")
        if parts[1] == "layers":
            if lo <= int(parts[2]) < hi or (hi == n_layers and int(parts[2]) >= n_layers):
                out.append((name, numel))
        elif name.startswith("model.embed_tokens."):
            out += [(name, numel)] * ((lo == 0) + (hi == n_layers and mtp))
        elif hi == n_layers:  # the final norm and the head
            out.append((name, numel))
    return out


def plan(cfg: ModelConfig, layout: Layout, ranks: list[int] | None = None) -> list[RankMemory]:
    """Per-rank parameters, gradients and optimizer state of training `cfg` on `layout`, for `ranks` (default all).

    Raises:
        ValueError: an unknown schedule or optimizer state dtype, DualPipe on an odd pp, more stages than layers,
            or n_routed_experts not divisible by ep.
    """
    if layout.schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {layout.schedule!r}")
    if layout.schedule == "dualpipe" and layout.pp > 1 and layout.pp % 2:
        raise ValueError(f"DualPipe needs an even number of pipeline ranks, got pp = {layout.pp}")
    if layout.optimizer_state_dtype not in ("fp32", "bf16"):
        raise ValueError(f"optimizer_state_dtype must be fp32 or bf16, got {layout.optimizer_state_dtype!r}")
    if cfg.n_routed_experts and cfg.n_routed_experts % layout.ep:
        raise ValueError(f"n_routed_experts ({cfg.n_routed_experts}) is not divisible by ep ({layout.ep})")
    model = DeepseekV3(cfg, device="meta")
    names = [(name, p.numel()) for name, p in model.named_parameters()]  # a tied head is listed once
    n, mtp, p = cfg.num_hidden_layers, cfg.num_nextn_predict_layers > 0, layout.pp
    if p == 1:
        stages_of = {0: [names]}  # no pipeline: the whole model, once
    else:
        v = layout.schedule == "dualpipev"
        ranges = split_stages(model, 2 * p if v else p)
        mine = {"1f1b": lambda r: [r], "zb1p": lambda r: [r], "dualpipe": lambda r: [r, p - 1 - r],
                "dualpipev": lambda r: [r, 2 * p - 1 - r]}[layout.schedule]
        stages_of = {r: [_stage_tensors(names, n, *ranges[s], mtp) for s in mine(r)] for r in range(p)}
    moment = 4 if layout.optimizer_state_dtype == "fp32" else 2
    step = 4 if layout.optimizer_state_dtype == "fp32" else 0  # torch's AdamW keeps a float32 step per tensor
    data_size = layout.dp * layout.ep
    out = []
    for rank in range(layout.world) if ranks is None else ranks:
        pp_index, dp_index, ep_index = layout.coordinates(rank)
        tensors = [(name, numel // layout.ep if is_expert_param(name) else numel)
                   for copy in stages_of[pp_index] for name, numel in copy]
        held = sum(numel for _, numel in tensors)
        if layout.zero and data_size > 1:
            local = [numel for name, numel in tensors if layout.ep > 1 and is_expert_param(name)]
            shared = [numel for name, numel in tensors if not (layout.ep > 1 and is_expert_param(name))]
            me = dp_index * layout.ep + ep_index
            owned = local + [numel for numel, r in zip(shared, zero_owners(shared, data_size)) if r == me]
        else:
            owned = [numel for _, numel in tensors]
        out.append(RankMemory(rank, pp_index, dp_index, ep_index, held, PARAM_BYTES * held, PARAM_BYTES * held,
                              sum(2 * moment * numel + step for numel in owned)))
    return out


def latent_cache_bytes(cfg: ModelConfig, tokens: int, bytes_per_value: int = 2) -> int:
    """Bytes of the latent KV cache for `tokens` cached tokens over every layer (main + MTP), bf16 by default:
    tokens x layers x (kv_lora_rank + qk_rope_head_dim) x bytes_per_value (what `LatentCache` allocates)."""
    layers = cfg.num_hidden_layers + cfg.num_nextn_predict_layers
    return tokens * layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * bytes_per_value
