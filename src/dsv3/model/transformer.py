"""The DeepSeek-V3 decoder: blocks, multi-token-prediction modules, and the causal-LM wrapper.

Module names follow the checkpoint (`model.layers.{i}.self_attn.kv_b_proj.weight`, ...), so `state_dict()` keys
are the official tensor names except two documented differences handled in `dsv3.checkpoint`:
routed experts are stacked ([E, ...] per projection), gate and up projections are fused (`gate_up_proj`, stored as
`gate_proj` / `up_proj`), and the MTP modules share the main embedding and head instead of holding the copies the
checkpoint stores as `model.layers.{L}.embed_tokens` / `shared_head.head`.

Shape legend: B batch, T tokens, D hidden, V vocab.

Sources: DeepSeek-V3 report sections 2.1 (the block) and 2.2 (multi-token prediction, Figure 3); names and layout of
the HF checkpoint `deepseek-ai/DeepSeek-V3`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..config import ModelConfig
from .mla import MLA, LatentCache, absorbed_is_cheaper, packed_attention
from .moe import MLP, MoE, RoutingInfo
from .names import keyed_generator, official_slots
from .norm import RMSNorm
from .rope import Rope, RotaryEmbedding


@dataclass
class ModelOutput:
    """What `DeepseekV3.forward` returns."""

    logits: torch.Tensor | None  # [B, T, V] (None with head=False)
    hidden_states: torch.Tensor  # [B, T, D] after the final norm (what the head and the first MTP module read)
    # mtp_logits[k-1]: [B, T-k, V]; position i predicts token i+k+1 (the main logits predict token i+1)
    mtp_logits: list[torch.Tensor] = field(default_factory=list)
    routing: list[RoutingInfo] = field(default_factory=list)  # main MoE layers in order, then the MTP blocks'


class DecoderLayer(nn.Module):
    """Pre-norm block: h + MLA(norm(h)), then + FFN(norm(h)); FFN is dense SwiGLU or DeepSeekMoE."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MLA(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.is_moe = cfg.is_moe_layer(layer_idx)
        self.mlp = MoE(cfg) if self.is_moe else MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, h: torch.Tensor, rope: Rope, cache: torch.Tensor | None = None,
                start_pos: int | torch.Tensor = 0, absorb: bool = False, mask: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, RoutingInfo | None]:
        """h [B, T, D] at positions start_pos..start_pos+T-1 -> (h' [B, T, D], the MoE's routing or None for a
        dense layer). rope, cache, start_pos, absorb, mask: as in `MLA.forward`.

        Raises:
            ValueError: from `MLA.forward` (start_pos > 0 without a cache, or past the cache's length).
        """
        h = h + self.self_attn(self.input_layernorm(h), rope, cache, start_pos, absorb, mask)
        if self.is_moe:
            out, info = self.mlp(self.post_attention_layernorm(h))
            return h + out, info
        return h + self.mlp(self.post_attention_layernorm(h)), None


class SharedHead(nn.Module):  # stored as `model.layers.{L}.shared_head`
    """Only the norm is the MTP module's own; the output head is the main model's `lm_head`."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class MTPModule(DecoderLayer):
    """Multi-token prediction module k (stored as `model.layers.{num_hidden_layers + k - 1}`).

    h^k_i = Block(eh_proj([enorm(Emb(t_{i+k})); hnorm(h^{k-1}_i)])), logits = head(shared_head.norm(h^k_i)).
    The embedding comes first in the concatenation, as in the released checkpoints. h^0 is the main model's
    final-normed hidden state (what vLLM and SGLang feed their MTP drafters).
    """

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__(cfg, layer_idx)
        self.enorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=False)
        self.shared_head = SharedHead(cfg)

    def forward(self, h_prev: torch.Tensor, emb_next: torch.Tensor, rope: Rope, cache: torch.Tensor | None = None,
                start_pos: int | torch.Tensor = 0, absorb: bool = False, mask: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, RoutingInfo | None]:
        """h_prev = h^{k-1} [B, T, D] at positions start_pos.., emb_next [B, T, D] the embeddings of the tokens
        k further -> (h^k [B, T, D] before shared_head.norm, the block's routing or None). rope, cache,
        start_pos, absorb, mask: as in `DecoderLayer.forward`.

        Raises:
            ValueError: from `MLA.forward` (start_pos > 0 without a cache, or past the cache's length).
        """
        h = self.eh_proj(torch.cat([self.enorm(emb_next), self.hnorm(h_prev)], dim=-1))  # [B, T, 2D] -> [B, T, D]
        return super().forward(h, rope, cache, start_pos, absorb, mask)


class DeepseekV3Model(nn.Module):
    """The `model.` part of the checkpoint: embedding, layers (main then MTP), final norm, rotary embedding."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        n = cfg.num_hidden_layers
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        layers: list[nn.Module] = [DecoderLayer(cfg, i) for i in range(n)]
        layers += [MTPModule(cfg, n + k) for k in range(cfg.num_nextn_predict_layers)]
        self.layers = nn.ModuleList(layers)  # main layers, then the MTP modules (checkpoint order)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(cfg)


class DeepseekV3(nn.Module):
    """DeepSeek-V3 causal LM (plain single-process PyTorch; FP8 and parallelism are applied from outside).

    dtype: cast parameters after init (the routing bias stays fp32); device: where to build ("meta" skips the
    init, for loading). Raises `ConfigError` (from `cfg.validate()`) for an invalid config.
    """

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype | None = None, device: torch.device | str | None = None):
        super().__init__()
        cfg.validate()
        self.config = cfg
        with torch.device(device or "cpu"):
            self.model = DeepseekV3Model(cfg)
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tie_weights()
        if str(device) != "meta":
            self.init_weights()
        if dtype is not None:
            self.to(dtype)
            self.keep_fp32_buffers()

    # ---------------------------------------------------------------- structure
    @property
    def main_layers(self) -> list[DecoderLayer]:
        """The num_hidden_layers decoder layers, in order."""
        return list(self.model.layers[: self.config.num_hidden_layers])

    @property
    def mtp_modules(self) -> list[MTPModule]:
        """The MTP modules, depth 1 first (empty when num_nextn_predict_layers is 0)."""
        return list(self.model.layers[self.config.num_hidden_layers :])

    def tie_weights(self) -> None:
        """Share the head with the embedding when configured (re-done after `to_empty()`, which unties)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @torch.no_grad()
    def init_weights(self, seed: int | None = None, only: set[int] | None = None) -> None:
        """Normal(0, initializer_range) for every matrix, ones for norms, zeros for the routing bias, for every
        tensor the model holds that is not on the meta device (only: just the parameters and buffers whose `id` is
        in it, e.g. one layer's, filled before a wrapper shards them).

        Each official tensor (`model.names`: one expert's `gate_proj`, `up_proj`, `down_proj`, the halves of a fused
        `gate_up_proj`, ...) is drawn whole from its own generator keyed by (seed, official name), then copied into
        its place. So the weights do not depend on the layout: a rank holding an expert shard or one pipeline stage
        (the rest left on `meta`) gets exactly the values one process holding everything gets. seed None draws one
        from torch's global generator (so `torch.manual_seed` still decides).
        """
        if seed is None:
            seed = int(torch.randint(0, 2**62, ()))
        std = self.config.initializer_range
        for name, slot in official_slots(self).items():
            if slot.alias or slot.target.is_meta or (only is not None and id(slot.target) not in only):
                continue  # (checked before taking the view: a view of a sharded tensor would gather it)
            view = slot.view
            if name.endswith("norm.weight"):
                view.fill_(1.0)
            elif name.endswith("bias"):  # the routing bias e_score_correction_bias (a buffer)
                view.zero_()
            else:
                draw = torch.randn(view.shape, generator=keyed_generator(seed, name), dtype=torch.float32)
                view.copy_(draw * std)
        self.reset_buffers()

    def reset_buffers(self) -> None:
        """Recompute non-persistent buffers (needed after building on the meta device)."""
        self.model.rotary_emb.reset_buffers()

    def keep_fp32_buffers(self) -> None:
        """The routing bias stays fp32 whatever the model dtype: its steps (1e-3) vanish in bf16 near 1."""
        for mod in self.modules():
            if hasattr(mod, "e_score_correction_bias"):
                mod.e_score_correction_bias.data = mod.e_score_correction_bias.data.float()

    def new_cache(self, batch_size: int, max_len: int, dtype: torch.dtype | None = None) -> LatentCache:
        """A zeroed `LatentCache` of [batch_size, max_len] per layer (MTP layers included), in the model's dtype
        and on its device unless `dtype` is given."""
        p = self.lm_head.weight
        return LatentCache(self.config, batch_size, max_len, dtype or p.dtype, p.device,
                           mtp=bool(self.config.num_nextn_predict_layers))

    # ------------------------------------------------------------------ forward
    def forward(self, input_ids: torch.Tensor, cache: LatentCache | None = None,
                start_pos: int | torch.Tensor = 0, absorb: bool | None = None, mtp: bool = True,
                head: bool = True, segments: torch.Tensor | None = None) -> ModelOutput:
        """input_ids [B, T] at positions start_pos..start_pos+T-1 (start_pos: int, or LongTensor [B] per row).

        cache: the `LatentCache` to write the new latents into and attend over (None: attend within input_ids).
        absorb: attention form; default naive without a cache, else whichever costs fewer FLOPs for T new tokens
            (`mla.absorbed_is_cheaper`: absorbed for decode, speculative verification and short prefill chunks,
            naive for long prompts).
        mtp: also run the MTP modules (only when there is no cache: speculative decoding drives them itself).
        head: False skips the main output head (`logits` is None) for a caller that applies its own where it
            wants it (the engine's `DecodeHead`, at each row's last prompt position with `at_positions`) to
            `hidden_states`, the final-normed states the head reads.
            The MTP modules (mtp=True without a cache) still use the model's head for `mtp_logits`.
        segments: [B, T] integers for packed sequences (no cache): each run of equal ids is its own document,
            attending only to itself from position 0 (`mla.packed_attention`); the MTP modules likewise. Every
            output at a token equals that of its document run alone; positions whose MTP input reaches into the
            next run are computed but belong to no document (`train.losses.packed_targets` masks them).

        Raises:
            ValueError: positions past max_position_embeddings or the cache length, start_pos > 0 without a
                cache, or segments with a cache or of another shape than input_ids.
        """
        b, t = input_ids.shape
        mask = None
        if segments is not None:
            if cache is not None or segments.shape != input_ids.shape:
                raise ValueError(f"segments must be [B, T] like input_ids ({tuple(input_ids.shape)}), without a "
                                 f"cache; got {tuple(segments.shape)}" + (" and a cache" if cache is not None else ""))
            positions, mask = packed_attention(segments)
            self._positions(0, int(positions.max()) + 1 if t else 0, input_ids.device)  # the context-length check
        else:
            positions = self._positions(start_pos, t, input_ids.device)
        if absorb is None:
            absorb = cache is not None and absorbed_is_cheaper(self.config, t)
        emb = self.model.embed_tokens(input_ids)  # [B, T, D]
        rope = self.model.rotary_emb(positions, emb.dtype)
        caches = cache.layers[: len(self.main_layers)] if cache is not None else None
        h, routing = run_layers(self.main_layers, emb, rope, caches, start_pos, absorb, mask)
        h = self.model.norm(h)
        out = ModelOutput(logits=self.lm_head(h) if head else None, hidden_states=h, routing=routing)
        if mtp and cache is None:
            out.mtp_logits, mtp_routing = run_mtp(self.mtp_modules, self.lm_head, h, emb, rope, mask)
            out.routing += mtp_routing
        return out

    def _positions(self, start_pos: int | torch.Tensor, t: int, device) -> torch.Tensor:
        """[T] positions for a shared start, [B, T] for per-row starts; checked against the context length."""
        steps = torch.arange(t, device=device)
        positions = steps + start_pos if isinstance(start_pos, int) else start_pos[:, None].to(device) + steps
        if torch.compiler.is_compiling():  # a compiled step cannot read its positions; its caller checks them
            return positions
        last = int(positions.max()) + 1 if positions.numel() else 0
        if last > self.config.max_position_embeddings:
            raise ValueError(f"positions up to {last} exceed max_position_embeddings "
                             f"({self.config.max_position_embeddings})")
        return positions

    def mtp_step(self, depth: int, h_prev: torch.Tensor, next_ids: torch.Tensor, cache: LatentCache,
                 start_pos: int | torch.Tensor, logits_at: torch.Tensor | None = None, head: bool = True
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run MTP module `depth` (1-based) incrementally over the cache, for speculative decoding.

        h_prev [B, T, D]: h^{depth-1} at positions start_pos..; next_ids [B, T]: the tokens one further.
        logits_at: LongTensor [B], the position (0..T-1) in each row whose logits are wanted (default: the last).
        Returns (h^depth [B, T, D] before shared_head.norm, which a chained draft feeds back as h_prev;
        logits [B, V] at logits_at, predicting the token after next_ids[b, logits_at[b]]; with head=False the
        normed hidden state [B, D] the head would read there, for a caller applying its own head).

        Raises:
            ValueError: positions past max_position_embeddings or the cache length (eager only).
        """
        module = self.mtp_modules[depth - 1]
        layer = self.config.num_hidden_layers + depth - 1
        positions = self._positions(start_pos, next_ids.shape[1], next_ids.device)
        emb = self.model.embed_tokens(next_ids)
        rope = self.model.rotary_emb(positions, emb.dtype)
        h, _ = module(h_prev, emb, rope, cache.layers[layer], start_pos,
                      absorb=absorbed_is_cheaper(self.config, next_ids.shape[1]))
        picked = h[:, -1] if logits_at is None else at_positions(h, logits_at)  # [B, D]
        normed = module.shared_head.norm(picked)
        return h, self.lm_head(normed) if head else normed

    def num_parameters(self) -> int:
        """Parameters held by the module (a tied head counted once)."""
        return sum(p.numel() for p in self.parameters())


def at_positions(x: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
    """Row b's entry at position at[b]: x [B, T, ...], at LongTensor [B] (values in 0..T-1) -> [B, ...]."""
    index = at.view(-1, 1, *([1] * (x.dim() - 2))).expand(-1, 1, *x.shape[2:])
    return x.gather(1, index).squeeze(1)


def run_layers(layers, h: torch.Tensor, rope: Rope, caches: list | None = None, start_pos: int | torch.Tensor = 0,
               absorb: bool = False, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, list[RoutingInfo]]:
    """Decoder layers in order over h [B, T, D] -> (h [B, T, D], the MoE layers' routing in order): the one layer
    loop of `DeepseekV3.forward` and of a pipeline stage (which runs its range of the same layers). caches: one
    per layer (a `LatentCache` layer each) or None; start_pos, absorb, mask: as `MLA.forward`."""
    routing: list[RoutingInfo] = []
    for i, layer in enumerate(layers):
        h, info = layer(h, rope, caches[i] if caches is not None else None, start_pos, absorb, mask)
        if info is not None:
            routing.append(info)
    return h, routing


def run_mtp(modules: list[MTPModule], head: nn.Module, h: torch.Tensor, emb: torch.Tensor, rope: Rope,
            mask: torch.Tensor | None = None) -> tuple[list[torch.Tensor], list[RoutingInfo]]:
    """The MTP modules over a whole window, no cache (training and evaluation; also a pipeline's last stage,
    which holds its own copy of the embedding).

    h [B, T, D]: the main model's final-normed hidden state; emb [B, T, D]: the embedded input ids; rope: the
    angles of positions 0..T-1 (shared by the rows). Returns (logits [B, T-k, V] for depth k = 1, 2, ..., where
    position i predicts token i+k+1; the routing of the MoE blocks among them, in depth order). Depths with
    T-k <= 0 are skipped. mask: packed sequences' [B, 1, T, T] attention mask (`mla.packed_attention`), cut to
    the first T-k positions at depth k; rope then holds each row's own positions.
    """
    logits, routing = [], []
    t = h.shape[1]
    for k, module in enumerate(modules, start=1):
        if t - k <= 0:
            break
        # depth k at position i reads h^{k-1}_i and the embedding of token i+k
        h, info = module(h[:, :-1], emb[:, k:], rope.narrow(0, t - k),
                         mask=None if mask is None else mask[:, :, : t - k, : t - k])
        if info is not None:
            routing.append(info)
        logits.append(head(module.shared_head.norm(h)))
    return logits, routing
