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
  partitioned over the stage's dp x ep ranks (`zero.zero_owners`), expert shards keep theirs;
- FSDP2 (`zero` 3, `parallel.fsdp`): every tensor but an expert-parallel shard is cut along its first dimension
  into `torch.chunk` pieces over the dp x ep ranks, and its gradient and AdamW state with it.
Activations (`saved_activations`, `stage_activation_bytes`, `in_flight`): what one micro-batch leaves saved for
backward in each block of a stage, itemised (recipe "dsv3": exactly what dsv3's fp32 eager autograd keeps, held
equal to saved-tensor hooks in tests/test_plan.py; recipe "paper": the report's stated recipe plus named
assumptions), times the peak number of micro-batches a rank's schedule holds at once, walked from the schedule's
own op lists (1F1B: P - r; ZB-H1: P; DualPipe: P + 1 over its two stages, report Table 2). Without a pipeline, one
micro-batch (gradient accumulation frees each before the next).
Recipe "paper" for the states: bf16 weights (2 B), fp32 gradients (4 B), fp32 master weights and bf16 moments in
the optimizer (8 B, partitioned by ZeRO-1 like dsv3's), the MTP module's embedding shared with the first stage's
where one rank holds both ends (report section 3.2.3). Expert shards keep their optimizer state unpartitioned, as
dsv3's ZeRO-1 does (an upper bound for the report's).
Serving: `latent_cache_bytes` is the MLA cache a server allocates (every main and MTP layer's kv_lora_rank +
qk_rope_head_dim values per token, as `LatentCache` holds them; the report's decoding setup keeps all layers on
each GPU, attention data-parallel, so a GPU's cache is its own sequences' tokens times this).
Not modelled: temporary buffers (all-to-all, the allocator's fragmentation), the EMA the report keeps in CPU memory.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..config import ModelConfig
from ..model import DeepseekV3, mla
from .mesh import is_expert_param
from .pipeline import SCHEDULES, held_stages, schedule_ops, split_stages
from .zero import zero_owners

PARAM_BYTES = 4  # fp32 master weights (and their gradients) in every precision dsv3 trains in


@dataclass(frozen=True)
class Layout:
    """A training layout: pp x dp x ep ranks (rank = (pp_index x dp + dp_index) x ep + ep_index), how data
    parallelism shards (`zero`), the pipeline schedule and the AdamW moments' dtype ("fp32" or "bf16"); for the
    activations, the recipe and the micro-batch."""

    pp: int = 1
    dp: int = 1
    ep: int = 1
    zero: int = 0  # 0: replicated; 1: ZeRO-1 (optimizer state partitioned); 3: FSDP2 (everything sharded)
    schedule: str = "dualpipe"
    optimizer_state_dtype: str = "fp32"
    recipe: str = "dsv3"  # "dsv3": what dsv3's trainer holds; "paper": the report's precision and memory recipe
    rows: int = 1  # sequences per micro-batch on one rank
    seq_len: int = 4096  # tokens per sequence (the report pre-trains at 4K)
    chunks: int | None = None  # micro-batches per step under a pipeline (default: 2 x pp, the trainer's)

    @property
    def world(self) -> int:
        return self.pp * self.dp * self.ep

    def coordinates(self, rank: int) -> tuple[int, int, int]:
        """(pp_index, dp_index, ep_index) of a global rank."""
        pp_index, data_rank = divmod(rank, self.dp * self.ep)
        return (pp_index, *divmod(data_rank, self.ep))


@dataclass
class RankMemory:
    """What one rank holds, in bytes: the states (the keys of `Trainer.held_memory`), the activations at the peak
    of its schedule, and its place in the mesh."""

    rank: int
    pp_index: int
    dp_index: int
    ep_index: int
    parameters: int
    parameter_bytes: int
    gradient_bytes: int
    optimizer_state_bytes: int
    activation_bytes: int = 0  # the peak of the micro-batches in flight (`in_flight`)
    in_flight: float = 0.0  # that peak in micro-batches of its stages (DualPipe: both stages together)

    @property
    def total_bytes(self) -> int:
        return self.parameter_bytes + self.gradient_bytes + self.optimizer_state_bytes + self.activation_bytes

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
    """Per-rank parameters, gradients, optimizer state and activations (the peak of the micro-batches in flight)
    of training `cfg` on `layout`, for `ranks` (default all), in bytes (see the module doc for every rule).

    Raises:
        ValueError: an unknown schedule, optimizer state dtype, recipe or zero mode, DualPipe on
            an odd pp, more stages than layers, or n_routed_experts not divisible by ep.
    """
    if layout.schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {layout.schedule!r}")
    if layout.schedule == "dualpipe" and layout.pp > 1 and layout.pp % 2:
        raise ValueError(f"DualPipe needs an even number of pipeline ranks, got pp = {layout.pp}")
    if layout.optimizer_state_dtype not in ("fp32", "bf16"):
        raise ValueError(f"optimizer_state_dtype must be fp32 or bf16, got {layout.optimizer_state_dtype!r}")
    if layout.zero not in (0, 1, 3):
        raise ValueError(f"zero must be 0, 1 or 3, got {layout.zero}")
    if cfg.n_routed_experts and cfg.n_routed_experts % layout.ep:
        raise ValueError(f"n_routed_experts ({cfg.n_routed_experts}) is not divisible by ep ({layout.ep})")
    if layout.recipe not in RECIPES:
        raise ValueError(f"recipe must be one of {', '.join(RECIPES)}, got {layout.recipe!r}")
    model = DeepseekV3(cfg, device="meta")
    names = [(name, p.numel()) for name, p in model.named_parameters()]  # a tied head is listed once
    first_dim = {name: p.shape[0] for name, p in model.named_parameters()}
    n, mtp, p = cfg.num_hidden_layers, cfg.num_nextn_predict_layers > 0, layout.pp
    paper = layout.recipe == "paper"
    if p == 1:
        stages = {0: {0: (0, n)}}  # no pipeline: the whole model, once, one micro-batch at a time
    else:
        v = layout.schedule == "dualpipev"
        ranges = split_stages(model, 2 * p if v else p)
        stages = {r: {d: ranges[s] for d, s in held_stages(layout.schedule, r, p).items()}
                  for r in range(p)}  # direction -> layers
        chunks = layout.chunks or 2 * p
    if paper:  # bf16 compute weights, fp32 gradients; fp32 master weights and bf16 moments in the optimizer
        param_bytes, grad_bytes, state_bytes, step = 2, 4, 4 + 2 + 2, 0
    else:
        param_bytes, grad_bytes = PARAM_BYTES, PARAM_BYTES
        state_bytes = 2 * (4 if layout.optimizer_state_dtype == "fp32" else 2)
        step = 4 if layout.optimizer_state_dtype == "fp32" else 0  # torch's AdamW keeps a float32 step per tensor
    data_size = layout.dp * layout.ep
    activations = {}  # (lo, hi) -> bytes of one micro-batch on that stage
    out = []
    for rank in range(layout.world) if ranks is None else ranks:
        pp_index, dp_index, ep_index = layout.coordinates(rank)
        held = stages[pp_index]
        both_ends = p == 1 or (min(lo for lo, _ in held.values()) == 0 and max(hi for _, hi in held.values()) == n)
        copies = [names] if p == 1 else [_stage_tensors(names, n, lo, hi, mtp and not (paper and both_ends))
                                         for lo, hi in held.values()]  # the paper shares the MTP embedding
        tensors = [(name, numel // layout.ep if is_expert_param(name) else numel)
                   for copy in copies for name, numel in copy]
        me = dp_index * layout.ep + ep_index  # the rank's place in its stage's data group
        if layout.zero == 3 and data_size > 1:  # FSDP2: dim 0 in torch.chunk pieces over the data group
            def shard(name: str, numel: int, me: int = me) -> int:
                rows = first_dim[name]
                per = -(-rows // data_size)
                return max(0, min(per, rows - me * per)) * (numel // rows)

            tensors = [(name, numel if layout.ep > 1 and is_expert_param(name) else shard(name, numel))
                       for name, numel in tensors]
        elements = sum(numel for _, numel in tensors)
        if layout.zero == 1 and data_size > 1:
            local = [numel for name, numel in tensors if layout.ep > 1 and is_expert_param(name)]
            shared = [numel for name, numel in tensors if not (layout.ep > 1 and is_expert_param(name))]
            owned = local + [numel for numel, r in zip(shared, zero_owners(shared, data_size)) if r == me]
        else:
            owned = [numel for _, numel in tensors]
        for lo_hi in held.values():
            if lo_hi not in activations:
                activations[lo_hi] = stage_activation_bytes(cfg, *lo_hi, layout.rows, layout.seq_len, layout.recipe)
        sizes = {d: activations[lo_hi] for d, lo_hi in held.items()}
        ops = [("F", 0), ("B", 0)] if p == 1 else schedule_ops(layout.schedule, pp_index, p, chunks)
        peak, count = in_flight(ops, sizes), in_flight(ops, dict.fromkeys(sizes, 1.0))
        out.append(RankMemory(rank, pp_index, dp_index, ep_index, elements, param_bytes * elements,
                              grad_bytes * elements, sum(state_bytes * numel + step for numel in owned),
                              int(peak), count))
    return out


def latent_cache_bytes(cfg: ModelConfig, tokens: int, bytes_per_value: int = 2) -> int:
    """Bytes of the latent KV cache for `tokens` cached tokens over every layer (main + MTP), bf16 by default:
    tokens x layers x (kv_lora_rank + qk_rope_head_dim) x bytes_per_value (what `LatentCache` allocates)."""
    layers = cfg.num_hidden_layers + cfg.num_nextn_predict_layers
    return tokens * layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * bytes_per_value


# ------------------------------------------------------------------------------------------------ activations
RECIPES = ("dsv3", "paper")
FP8_BYTES = 1 + 4 / 128  # an FP8 value plus its share of a 1 x 128 tile's fp32 scale (report section 3.3)


def _attention_items(rows: int, seq_len: int, h: int, qk: int, v: int) -> list[tuple[str, float]]:
    """What the attention core of one layer saves in fp32 on CPU (`MLA._naive`'s two causal paths)."""
    n = rows * seq_len
    if seq_len <= mla.BLOCK_CAUSAL_MAX_LEN:
        blocks = sum((hi - lo) * hi for lo, hi in mla.query_blocks(seq_len))  # each block's rows x keys it sees
        return [("block-causal attention: q, k, v, heads first", 4 * n * h * (2 * qk + v)),
                ("block-causal attention: each query block's probabilities", 4 * rows * h * blocks)]
    return [("SDPA flash kernel: q, k, v (zero-padded to the qk head size) and its output", 4 * n * 4 * h * qk),
            ("SDPA flash kernel: log-sum-exp", 4 * n * h)]


def saved_activations(cfg: ModelConfig, block: str, rows: int, seq_len: int, recipe: str = "dsv3"
                      ) -> list[tuple[str, float]]:
    """What one micro-batch of `rows` sequences of `seq_len` tokens leaves saved for backward in one block:
    (what, bytes) items. block: "dense" or "moe" (a decoder layer), "mtp" (an MTP module's own norms and
    projection, without its decoder layer and head), "head" (final norm, output head and cross-entropy of one
    prediction depth over `seq_len` positions). Parameters are not counted.

    recipe "dsv3": what dsv3's trainer keeps, fp32 eager autograd with nothing recomputed: each saved tensor's
    storage once (a view keeps its whole storage: the split `kv_a_proj_with_mqa` output, the fused gate/up output).
    Attention (`MLA._naive`, fp32 on CPU) runs up to BLOCK_CAUSAL_MAX_LEN tokens as `block_causal_attention`, which
    keeps heads-first copies of q, k, v and each query block's probabilities (the causal part of the T x T matrix,
    whole blocks of BLOCK_ROWS rows); beyond that SDPA's flash kernel (v zero-padded to the qk head size): q, k, v,
    the output and the log-sum-exp, no T x T matrix.
    `tests/test_plan.py` holds every block equal to the bytes saved-tensor hooks count on tiny and small.

    recipe "paper": the report's training recipe, as stated there and otherwise assumed (each item says which):
    BF16 activations; RMSNorm and the MLA up-projections recomputed in backward, keeping only their inputs
    (section 3.2.3); the MoE up-projections' inputs cached in FP8 as dispatched, the SwiGLU input cached in FP8
    and its output recomputed, the attention output (o_proj input) in E5M6, 1.5 bytes (section 3.3.3); attention as
    a fused kernel that saves its output and fp32 log-sum-exp but no T x T matrix (assumed: FlashAttention-style);
    the expert outputs kept in BF16 for the gate-weight gradient of the combine (assumed); the cross-entropy
    keeping BF16 logits (assumed). Not measurable here: no such kernels run on this machine."""
    if recipe not in RECIPES:
        raise ValueError(f"recipe must be one of {', '.join(RECIPES)}, got {recipe!r}")
    n = rows * seq_len  # tokens of the micro-batch
    d, h, e, k = cfg.hidden_size, cfg.num_attention_heads, cfg.n_routed_experts or 0, cfg.num_experts_per_tok
    qr, r, p, v, qk = cfg.q_lora_rank, cfg.kv_lora_rank, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.qk_head_dim
    inter = cfg.intermediate_size if block == "dense" else cfg.moe_intermediate_size
    shared = (cfg.n_shared_experts or 0) * cfg.moe_intermediate_size
    if block == "head":
        if recipe == "dsv3":
            return [("final norm: input, normalised, rstd", 4 * n * (2 * d + 1)), ("head input", 4 * n * d),
                    ("softmax of the logits (cross-entropy)", 4 * n * cfg.vocab_size),
                    ("targets (int64, shifted copy) and the loss's weight", 8 * n + 4)]
        return [("logits for the cross-entropy, bf16 (assumed)", 2 * n * cfg.vocab_size),  # norm: recomputed
                ("targets (int64)", 8 * n)]
    if block == "mtp":
        if recipe == "dsv3":
            return [("enorm, hnorm: normalised, rstd", 4 * n * (2 * d + 2)), ("eh_proj input", 4 * n * 2 * d)]
        return [("eh_proj input, FP8", FP8_BYTES * n * 2 * d)]  # the norms recomputed from their inputs
    if block not in ("dense", "moe"):
        raise ValueError(f"block must be dense, moe, mtp or head, got {block!r}")
    balance = ("sequence-wise balance loss: per-token affinity sums, per-sequence f (fp32)", 4 * n + 4 * rows * e)
    if recipe == "paper":
        items = [("layer input (residual; RMSNorm recomputed from it), bf16", 2 * n * d)]
        if qr:
            items.append(("q down-projection output c_Q (q norm and up-projection recomputed), bf16", 2 * n * qr))
        items += [("kv down-projection output [c_KV; k_pe] (kv norm and up-projection recomputed), bf16",
                   2 * n * (r + p)),
                  ("attention output = o_proj input, E5M6", 1.5 * n * h * v),
                  ("attention log-sum-exp, fp32 (fused kernel, assumed)", 4 * n * h),
                  ("FFN input (residual; RMSNorm recomputed from it), bf16", 2 * n * d)]
        if block == "dense":
            return items + [("SwiGLU input, FP8 (its output recomputed)", FP8_BYTES * n * 2 * inter)]
        return items + [("router affinities, fp32", 4 * n * e), ("top-k indices and weights", 8 * n * k),
                        ("dispatched tokens, FP8 (the up-projections' cached input)", FP8_BYTES * n * k * d),
                        ("experts' SwiGLU input, FP8 (output recomputed)", FP8_BYTES * n * k * 2 * inter),
                        ("experts' outputs for the combine, bf16 (assumed)", 2 * n * k * d),
                        ("shared experts' SwiGLU input, FP8", FP8_BYTES * n * 2 * shared), balance]
    items = [("attention norm: input, normalised, rstd", 4 * n * (2 * d + 1)),
             ("q / kv down-projection input", 4 * n * d)]
    if qr:
        items += [("q norm: input, normalised, rstd", 4 * n * (2 * qr + 1)), ("q up-projection input", 4 * n * qr)]
    items += [("kv down-projection output [c_KV; k_pe] (the kv norm's input)", 4 * n * (r + p)),
              ("kv norm: normalised, rstd", 4 * n * (r + 1)),
              ("latent [c_KV; k_pe] (kv up-projection input)", 4 * n * (r + p)),
              ("RoPE angles, complex (q and k; per position)", 8 * p * seq_len),
              *_attention_items(rows, seq_len, h, qk, v), ("o_proj input", 4 * n * h * v),
              ("FFN norm: input, normalised, rstd", 4 * n * (2 * d + 1))]
    if block == "dense":
        return items + [("FFN input", 4 * n * d), ("gate_up output", 4 * n * 2 * inter),
                        ("SwiGLU: silu(gate), down-projection input", 4 * n * 2 * inter)]
    return items + [("FFN input (router, shared experts)", 4 * n * d), ("router affinities", 4 * n * e),
                    ("top-k weights and their sum", 4 * n * (k + 1)),
                    ("top-k, dispatch and combine indices (int64)", 8 * n * 3 * k),
                    ("dispatched token rows", 4 * n * k * d), ("experts' gate_up output", 4 * n * k * 2 * inter),
                    ("experts' SwiGLU: silu(gate), down-projection input", 4 * n * k * 2 * inter),
                    ("gate weights per slot", 4 * n * k), ("experts' outputs, weighted outputs", 4 * n * k * 2 * d),
                    ("shared experts: gate_up output, silu(gate), down input", 4 * n * 4 * shared), balance]


def stage_activation_bytes(cfg: ModelConfig, lo: int, hi: int, rows: int, seq_len: int, recipe: str = "dsv3"
                           ) -> int:
    """Bytes one micro-batch of `rows` sequences saves in a stage of main layers [lo, hi) (`saved_activations`'
    blocks; the last stage also runs the head and the MTP modules: depth k over seq_len - k positions, with its
    decoder layer and the shared head)."""
    def block(kind: str, length: int) -> float:
        return sum(b for _, b in saved_activations(cfg, kind, rows, length, recipe))

    n = cfg.num_hidden_layers
    total = sum(block("moe" if cfg.is_moe_layer(i) else "dense", seq_len) for i in range(lo, hi))
    if hi == n:
        total += block("head", seq_len)
        if lo > 0 and cfg.num_nextn_predict_layers:  # the MTP modules' embedding lookup (on the first stage, the
            total += (4 if recipe == "dsv3" else 2) * rows * seq_len * cfg.hidden_size  # first layer's input)
        for depth in range(1, cfg.num_nextn_predict_layers + 1):
            length = seq_len - depth
            if length > 0:
                kind = "moe" if cfg.is_moe_layer(n + depth - 1) else "dense"
                total += block("mtp", length) + block(kind, length) + block("head", length)
    return int(total)


def in_flight(ops: list[tuple], sizes: dict[int, float]) -> float:
    """The peak over a rank's schedule `ops` (`parallel.pipeline`) of the activations it holds: each forward of
    direction d adds `sizes[d]` (one micro-batch on that stage), each full backward frees the oldest; a split
    backward ("zb") frees it only at its deferred weight-gradient op W (which still needs the layer inputs)."""
    held = {d: 0 for d in sizes}
    deferred: list[int] = []
    peak = 0.0
    for op in ops:
        if op[0] == "F":
            held[op[1]] += 1
        elif op[0] == "B" and len(op) < 3:
            held[op[1]] -= 1
        elif op[0] == "B":
            deferred.append(op[1])
        elif op[0] == "W" and deferred:
            held[deferred.pop(0)] -= 1
        peak = max(peak, sum(held[d] * sizes[d] for d in sizes))
    return peak
