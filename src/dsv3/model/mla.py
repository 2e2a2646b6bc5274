"""Multi-head Latent Attention (MLA), with its two equivalent forms.

Shape legend: B batch, T new tokens, S attended tokens (cache prefix + new), H heads, D hidden,
r = kv_lora_rank (latent), n = qk_nope_head_dim, p = qk_rope_head_dim, v = v_head_dim.

Keys and values are compressed into one latent c_KV [B, S, r] (RMS-normalised) plus one RoPE key k_pe [B, S, p]
shared by all heads. Only these r + p numbers per token per layer are cached (`LatentCache`).

- naive form (training, prefill): expand the latent through `kv_b_proj` into per-head k_nope [B,S,H,n] and
  v [B,S,H,v], concatenate the shared k_pe to every head, run ordinary attention.
- absorbed form (decode): since scores = q_nope · (W_UK c) = (q_nope W_UK) · c, fold W_UK into the query and
  attend over the latent directly; likewise apply W_UV after the attention-weighted sum of latents. Nothing is
  re-expanded per cached token, so decode cost per step no longer scales with H·(n+v)·S.

Sources: DeepSeek-V3 report section 2.1.1 and DeepSeek-V2 report section 2.1 (MLA, decoupled RoPE); the weight
layout and names of the HF checkpoint (`q_a_proj`, `kv_a_proj_with_mqa`, `kv_b_proj` [H·(n+v), r], ...). The
absorbed form is the `attn_impl = "absorb"` path of DeepSeek's `inference/model.py`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .norm import RMSNorm
from .rope import Rope, apply_rope, softmax_scale


class LatentCache:
    """Preallocated MLA cache: per layer one buffer [B, S_max, r + p] holding c_KV (first r) and the roped,
    head-shared k_pe (last p). Nothing else is cached.

    Layers are the main decoder layers followed by the MTP modules' blocks (index num_hidden_layers + k).
    Keeping c_KV and k_pe side by side lets absorbed attention score against both with one product.
    dtype: the buffers' dtype (the model's, normally); mtp: also allocate the MTP modules' layers.
    """

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", mtp: bool = True):
        n_layers = cfg.num_hidden_layers + (cfg.num_nextn_predict_layers if mtp else 0)
        self.max_len = max_len
        self.kv_lora_rank = cfg.kv_lora_rank
        self.layers = [torch.zeros(batch_size, max_len, cfg.kv_lora_rank + cfg.qk_rope_head_dim, dtype=dtype,
                                   device=device) for _ in range(n_layers)]

    def rows(self, start: int, stop: int) -> LatentCache:
        """A view of cache rows [start, stop) (writes go to this cache): e.g. one request's slot."""
        view = object.__new__(LatentCache)
        view.max_len, view.kv_lora_rank = self.max_len, self.kv_lora_rank
        view.layers = [t[start:stop] for t in self.layers]
        return view

    def move_row(self, src: int, dst: int, length: int | None = None) -> None:
        """Copy row src into row dst in every layer (compacting the running batch); only its first `length`
        positions when given."""
        for t in self.layers:
            t[dst, :length] = t[src, :length]

    @property
    def nbytes(self) -> int:
        """Bytes held by all layers' buffers."""
        return sum(t.numel() * t.element_size() for t in self.layers)


# Under torch.compile, with at most this many query rows (heads x new tokens) per sequence, the absorbed form's two
# contractions over the latent are written as broadcast products summed instead of batched GEMMs: inductor fuses
# them with the mask and softmax into loops that read the cached latent once, where the GEMM library, given a few
# rows, reads it once per row (`benchmarks/decode_compile.py`: the compiled `small` decode step 1.37x faster at a
# 2K context, batch 1). Eager calls (prefill, chunked prefill) keep the GEMMs. 0 turns the fused form off. Another
# compile backend than inductor would materialise the [B, H*T, S, r + p] product.
FUSED_QUERY_ROWS = 16


# Bottom-right causal attention on CPU in fp32 (training, packed or not, a prefill, a prompt's chunk after a cached
# prefix): query blocks of BLOCK_ROWS rows, each against only the keys it can see, as batched GEMMs with the softmax
# between them (`block_causal_attention`). PyTorch's CPU flash kernel takes every key block of a 256-token sequence
# whole and runs its small GEMMs at ~26 GFLOP/s on this project's CPU; this form skips 3/8 of the score and value
# products at T = 256 and was 1.49x faster than it forward and backward on `small`'s shapes (batch 8, one thread),
# 1.66x at T = 512, 1.26x at 1,024; forward alone (batch 1) 1.25x at 512, 1.08x at 1,024 and level at 2,048
# (`benchmarks/attention_pad.py`; `--packed` for documents under their mask). Its backward keeps every block's
# probabilities, ~T/2 values per token and head against the flash kernel's 4 (n + p) + 1, so it runs up to
# BLOCK_CAUSAL_MAX_LEN attended tokens; SDPA beyond.
BLOCK_ROWS = 64
BLOCK_CAUSAL_MAX_LEN = 1024


def query_blocks(t: int) -> list[tuple[int, int]]:
    """The query blocks [lo, hi) of `block_causal_attention` over t new tokens: BLOCK_ROWS rows each, the last
    one shorter when BLOCK_ROWS does not divide t. Block [lo, hi) attends to keys [0, S - t + hi)."""
    return [(lo, min(lo + BLOCK_ROWS, t)) for lo in range(0, t, BLOCK_ROWS)]


class _BlockCausal(torch.autograd.Function):
    """Causal softmax attention, query block by query block: q [N, T, dq], k [N, S, dq], v [N, S, dv] ->
    [N, T, dv], S >= T, query i at position S - T + i seeing keys 0..S - T + i."""

    @staticmethod
    def forward(ctx, q, k, v, scale: float, mask: torch.Tensor | None):
        n, t, _ = q.shape
        offset = k.shape[1] - t
        out = q.new_empty(n, t, v.shape[-1])
        keep = any(ctx.needs_input_grad)  # else each block's probabilities are freed once used
        probs = []
        for lo, hi in query_blocks(t):
            keys = offset + hi
            # [rows, keys] additive mask: row lo + i sees keys 0..offset + lo + i, -inf above that diagonal
            bias = torch.full((hi - lo, keys), float("-inf"), dtype=q.dtype, device=q.device).triu_(offset + lo + 1)
            scores = torch.baddbmm(bias, q[:, lo:hi], k[:, :keys].transpose(1, 2), alpha=scale)  # [N, rows, keys]
            if mask is not None:  # [B, 1, T, S]: also hidden where the mask says so, for each of the H heads
                scores.view(mask.shape[0], -1, hi - lo, keys).masked_fill_(~mask[:, :, lo:hi, :keys], float("-inf"))
            p = torch.softmax(scores, -1)
            out[:, lo:hi].baddbmm_(p, v[:, :keys], beta=0)  # [N, rows, dv]
            if keep:
                probs.append(p)  # [N, rows, keys]
        ctx.save_for_backward(q, k, v, *probs)
        ctx.scale = scale
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_out):
        q, k, v, *probs = ctx.saved_tensors
        d_out = d_out.contiguous()
        dq, dk, dv = torch.empty_like(q), torch.zeros_like(k), torch.zeros_like(v)
        for (lo, hi), p in zip(query_blocks(q.shape[1]), probs):
            keys = p.shape[2]
            d_o = d_out[:, lo:hi]  # [N, rows, dv]
            dv[:, :keys].baddbmm_(p.transpose(1, 2), d_o)
            d_s = torch._softmax_backward_data(torch.bmm(d_o, v[:, :keys].transpose(1, 2)), p, -1, p.dtype)
            dq[:, lo:hi].baddbmm_(d_s, k[:, :keys], beta=0, alpha=ctx.scale)
            dk[:, :keys].baddbmm_(d_s.transpose(1, 2), q[:, lo:hi], alpha=ctx.scale)
        return dq, dk, dv, None, None


def block_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                           mask: torch.Tensor | None = None) -> torch.Tensor:
    """Causal softmax(q k^T * scale) v: q [B, T, H, dq], k [B, S, H, dq], v [B, S, H, dv] -> [B, T, H, dv], with
    S >= T: query i sits at position S - T + i and sees keys 0..S - T + i (a whole sequence when S = T; a chunk of
    a prompt after S - T cached tokens otherwise). mask [B, 1, T, S] bool, optional: query i then sees only those
    of these keys where it is True (packed documents, `packed_attention`); every row must keep a key.

    Query rows in blocks of BLOCK_ROWS, each block's scores against the keys up to its last row only (batched GEMMs
    over B·H, an additive -inf mask on the block's diagonal part, softmax), with its own backward from the saved
    probabilities (FlashAttention's skipping of fully masked blocks, Dao et al. 2022, with the probabilities kept
    instead of recomputed). Equal to `F.scaled_dot_product_attention` with that mask to rounding
    (`tests/test_attention.py`).
    Under `torch.compile` the block loop fixes T and S: each new length is a new graph (the trainer's is fixed).

    Raises:
        ValueError: fewer keys than queries (S < T), or a mask of another dtype than bool or another shape than
            [B or 1, 1, T, S].
    """
    b, t, h, _ = q.shape
    s = k.shape[1]
    if s < t:
        raise ValueError(f"block-causal attention needs at least as many keys as queries, got {s} < {t}")
    if mask is not None and (mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[0] not in (1, b)
                             or tuple(mask.shape[1:]) != (1, t, s)):
        raise ValueError(f"the mask must be bool [{b} or 1, 1, {t}, {s}], got {mask.dtype} {list(mask.shape)}")

    def heads_first(x):  # [B, L, H, d] -> [B·H, L, d], contiguous
        return x.transpose(1, 2).reshape(b * h, x.shape[1], x.shape[-1])

    out = _BlockCausal.apply(heads_first(q), heads_first(k), heads_first(v), scale, mask)  # [B·H, T, dv]
    return out.view(b, h, t, -1).transpose(1, 2)


def _use_block_causal(q: torch.Tensor, s: int) -> bool:
    """Whether `MLA._naive`'s bottom-right causal case over `s` keys runs `block_causal_attention` rather than
    SDPA: fp32 on CPU, not under autocast (bf16 GEMMs), up to BLOCK_CAUSAL_MAX_LEN keys."""
    return (q.device.type == "cpu" and q.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")
            and s <= BLOCK_CAUSAL_MAX_LEN)


def _write_cache(buf: torch.Tensor, c_kv: torch.Tensor, k_pe: torch.Tensor, start_pos: int | torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Store the new latents [c_KV; k_pe] at their positions in this layer's buffer [B, S_max, r + p]; return
    everything to attend to [B, S, r + p] and the mask (True = visible).

    start_pos: an int shared by all rows, or a LongTensor [B] of per-row positions (rows of different lengths,
    as in continuous batching and speculative verification). Cache slots past a row's own length may hold stale
    values from an earlier request; the mask hides them. Under `torch.compile` with per-row positions the result
    spans the whole buffer (S = S_max, a static shape) and the positions are not checked.
    """
    b, t, _ = c_kv.shape
    new = torch.cat([c_kv, k_pe], dim=-1)
    if isinstance(start_pos, int):
        end = start_pos + t
        if end > buf.shape[1]:
            raise ValueError(f"sequence of {end} tokens exceeds the cache length {buf.shape[1]}")
        buf[:b, start_pos:end] = new
        mask = None  # a prefill from 0 is plainly causal, and one new token sees everything
        if start_pos > 0 and t > 1:  # [T, S]: query i sits at start_pos + i
            mask = torch.arange(end, device=c_kv.device) <= torch.arange(start_pos, end, device=c_kv.device)[:, None]
    else:
        cols = start_pos[:, None] + torch.arange(t, device=c_kv.device)  # [B, T] positions of the new tokens
        if torch.compiler.is_compiling():
            # static shapes: attend over the whole buffer (the mask hides what lies past each row's length);
            # the caller (the engine) has checked the positions, which a compiled step cannot read
            end = buf.shape[1]
        else:
            end = int(cols.max()) + 1
            if end > buf.shape[1]:
                raise ValueError(f"sequence of {end} tokens exceeds the cache length {buf.shape[1]}")
        buf[torch.arange(b, device=c_kv.device)[:, None], cols] = new
        mask = (torch.arange(end, device=c_kv.device) <= cols[:, :, None])[:, None]  # [B, 1, T, S]
    return buf[:b, :end], mask


def absorbed_is_cheaper(cfg: ModelConfig, t: int) -> bool:
    """Whether `t` new tokens attend over a cache in fewer FLOPs absorbed than naive, per cached token and head:
    naive expands each cached latent through `kv_b_proj` (r(n + v)) and then scores and sums (t(n + p + v));
    absorbed scores and sums against the latent itself (t(2r + p)). So absorbed iff t(2r - n - v) < r(n + v):
    t < 64 on `small`, t < 171 on the 671B model (r 512, n = v = 128): decode, speculative verification and
    short prefill chunks. (The query/output folding, t·(n + v)·r per head, does not grow with the cache.)"""
    r, n, v = cfg.kv_lora_rank, cfg.qk_nope_head_dim, cfg.v_head_dim
    return t * (2 * r - n - v) < r * (n + v)


def packed_positions(segments: torch.Tensor) -> torch.Tensor:
    """Positions of packed sequences: several documents (conversations) laid one after another in a row, each
    numbered from position 0. segments [B, T] (integers): the document each token belongs to; a document is a run
    of equal ids (padding can be one more run, e.g. -1). Returns positions [B, T], the index within the run."""
    b, t = segments.shape
    idx = torch.arange(t, device=segments.device).expand(b, t)
    starts = torch.ones_like(segments, dtype=torch.bool)
    starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
    run_start = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values  # [B, T]
    return idx - run_start


def packed_attention(segments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions and attention mask of packed sequences, each document attending only to itself, so that each
    computes what it would alone. segments [B, T]: as `packed_positions`. Returns (positions [B, T]; mask
    [B, 1, T, T] bool, True where query t may see key s: same run and s <= t).
    """
    positions = packed_positions(segments)
    t = segments.shape[1]
    run_start = torch.arange(t, device=segments.device) - positions  # [B, T] (ids may repeat in runs apart)
    same = run_start[:, :, None] == run_start[:, None, :]  # [B, T, T]: the same run
    causal = torch.ones(t, t, dtype=torch.bool, device=segments.device).tril()
    return positions, (same & causal)[:, None]


class MLA(nn.Module):
    """Multi-head Latent Attention of one layer (stored as `model.layers.{i}.self_attn`).

    Projections (HF names; q_a_* absent when q_lora_rank is None, then one `q_proj` [H·(n+p), D]):
      q = q_b_proj(q_a_layernorm(q_a_proj(x)))        [B, T, H, n+p], split into q_nope [.., n] and q_pe [.., p]
      [c_KV; k_pe] = kv_a_proj_with_mqa(x)            [B, T, r + p]; c_KV is RMS-normed, k_pe roped
      [k_nope; v] = kv_b_proj(c_KV)                   [B, S, H, n + v] (naive form only)
      out = o_proj(attention)                         [B, T, D]
    The softmax scale is 1/sqrt(n+p), times mscale² under YaRN (`rope.softmax_scale`).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.num_attention_heads
        self.q_lora_rank = cfg.q_lora_rank
        self.kv_lora_rank = cfg.kv_lora_rank
        self.nope_dim, self.rope_dim, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.qk_dim = cfg.qk_head_dim
        self.interleaved = cfg.rope_interleave
        h, d, bias = cfg.num_attention_heads, cfg.hidden_size, cfg.attention_bias
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(d, h * self.qk_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(d, cfg.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, h * self.qk_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(d, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, cfg.rms_norm_eps)
        self.kv_b_proj = nn.Linear(cfg.kv_lora_rank, h * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = nn.Linear(h * self.v_dim, d, bias=bias)
        self.softmax_scale = softmax_scale(cfg)

    def forward(self, x: torch.Tensor, rope: Rope, cache: torch.Tensor | None = None,
                start_pos: int | torch.Tensor = 0, absorb: bool = False, mask: torch.Tensor | None = None
                ) -> torch.Tensor:
        """x [B, T, D] at positions start_pos..start_pos+T-1 -> [B, T, D].

        rope: the angles of those positions. cache: this layer's latent buffer [B, S_max, r + p] (c_KV then
        k_pe); the new latents are written at [start_pos, start_pos+T) and attention covers [0, start_pos+T).
        start_pos may be a LongTensor [B] of per-row positions. absorb: the absorbed form instead of the naive
        one (same result to rounding). mask: without a cache, who sees whom, [B, 1, T, T] bool (True = visible;
        packed sequences, `packed_attention`), within the causal order (no token sees a later one); None = causal.

        Raises:
            ValueError: start_pos > 0 without a cache, start_pos + T beyond the cache length, or a mask with a
                cache.
        """
        b, t, _ = x.shape
        if self.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(b, t, self.n_heads, self.qk_dim)  # [B, T, H, n+p]
        q_nope, q_pe = q.split([self.nope_dim, self.rope_dim], dim=-1)
        q_pe = apply_rope(q_pe, rope, self.interleaved)

        c_kv, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        c_kv = self.kv_a_layernorm(c_kv)  # [B, T, r]
        k_pe = apply_rope(k_pe, rope, self.interleaved)  # [B, T, p], one head shared by all
        if cache is not None:
            if mask is not None:
                raise ValueError("an attention mask is for a forward without a cache (packed sequences)")
            latent, mask = _write_cache(cache, c_kv, k_pe, start_pos)  # [B, S, r + p]
        elif not isinstance(start_pos, int) or start_pos != 0:
            raise ValueError("start_pos > 0 needs a cache holding the earlier tokens")
        else:
            latent = torch.cat([c_kv, k_pe], dim=-1)
        if absorb:
            out = self._absorbed(q_nope, q_pe, latent, mask)  # [B, T, H, v]
        else:  # bottom-right causal: a whole sequence (packed or not), or new tokens after an equal prefix in each row
            out = self._naive(q_nope, q_pe, latent, mask, causal=cache is None or isinstance(start_pos, int))
        return self.o_proj(out.flatten(2))

    def _naive(self, q_nope: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor, mask: torch.Tensor | None,
               causal: bool = False) -> torch.Tensor:
        """Expand the latent into per-head keys and values, then one attention call: `block_causal_attention`
        when the attention is causal and `_use_block_causal` allows, else SDPA.

        q_nope [B, T, H, n], q_pe [B, T, H, p] (roped), latent [B, S, r + p] (c_KV, roped k_pe), mask [T, S] or
        [B, 1, T, S] (True = visible) or None (causal when T == S, else all visible) -> [B, T, H, v]. causal: the
        caller's promise that what the mask shows lies within the bottom-right causal order (query i sees at most
        keys 0..S - T + i): a [T, S] mask is that order itself, a [B, 1, T, S] one (packed documents) a part of it.
        """
        c_kv, k_pe = latent.split([self.kv_lora_rank, self.rope_dim], dim=-1)
        b, s, _ = c_kv.shape
        kv = self.kv_b_proj(c_kv).view(b, s, self.n_heads, self.nope_dim + self.v_dim)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)  # [B, S, H, n], [B, S, H, v]
        k = torch.cat([k_nope, k_pe[:, :, None, :].expand(-1, -1, self.n_heads, -1)], dim=-1)
        q = torch.cat([q_nope, q_pe], dim=-1)
        if causal and _use_block_causal(q, s):
            return block_causal_attention(q, k, v, self.softmax_scale, mask if mask is not None and mask.dim() == 4
                                          else None)
        # SDPA's fused kernels (flash on CPU) need one head size for q, k and v: v is zero-padded from v to n + p
        # (the padded output columns are zero and cut off), else SDPA takes its math path, which builds and keeps
        # the T x S probabilities (slower, and quadratic memory in training)
        pad = self.qk_dim - self.v_dim
        if pad > 0:
            v = F.pad(v, (0, pad))
        # SDPA wants [B, H, T, d]
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=mask, is_causal=mask is None and q.shape[1] == s,
                                             scale=self.softmax_scale)
        return out.transpose(1, 2)[..., : self.v_dim]

    def _absorbed(self, q_nope: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor,
                  mask: torch.Tensor | None) -> torch.Tensor:
        """Attend over the latent itself: W_UK folded into the query, W_UV applied after the weighted sum.

        Same arguments and result as `_naive`: q_nope [B, T, H, n], q_pe [B, T, H, p], latent [B, S, r + p],
        mask [T, S] / [B, 1, T, S] / None -> [B, T, H, v]. Two batched GEMMs against the latent (scores, then
        the weighted sum of c_KV rows), or under torch.compile with few query rows the same sums written for
        inductor to fuse (`FUSED_QUERY_ROWS`); softmax in fp32.
        """
        b, t = q_nope.shape[:2]
        s = latent.shape[1]
        w = self.kv_b_proj.weight.view(self.n_heads, self.nope_dim + self.v_dim, self.kv_lora_rank)
        w_uk, w_uv = w[:, : self.nope_dim], w[:, self.nope_dim :]  # [H, n, r], [H, v, r]
        # query into latent space: q_nope W_UK, then [q_lat; q_pe] . [c_KV; k_pe] is the full q.k score
        q_lat = torch.matmul(q_nope.transpose(1, 2), w_uk)  # [B, H, T, r]
        q = torch.cat([q_lat, q_pe.transpose(1, 2)], dim=-1) * self.softmax_scale  # [B, H, T, r + p]
        # The latent is one key/value "head" shared by every query head (MQA-like), so all H x T queries of a row
        # score against it in a single batched GEMM: no per-head copy of the cache is ever made.
        q_rows = q.view(b, -1, q.shape[-1])  # [B, H*T, r + p]
        fused = torch.compiler.is_compiling() and q_rows.shape[1] <= FUSED_QUERY_ROWS
        if fused:  # the same sum as a broadcast product, which inductor fuses into one pass over the latent
            scores = (q_rows[:, :, None, :] * latent[:, None]).sum(-1)  # [B, H*T, S]
        else:
            scores = torch.bmm(q_rows, latent.transpose(1, 2))
        scores = scores.view(b, self.n_heads, t, s)
        if mask is None and t > 1:  # a prefill from position 0: plainly causal
            mask = torch.ones(t, s, dtype=torch.bool, device=q.device).tril(s - t)
        if mask is not None:  # [T, S] or [B, 1, T, S], True = visible
            scores = scores.masked_fill(~mask, float("-inf"))
        probs = scores.float().softmax(dim=-1).to(latent.dtype)
        # values are c_KV itself; W_UV is applied after the attention-weighted sum
        if fused:
            o_lat = (probs.view(b, -1, s, 1) * latent[:, None, :, : self.kv_lora_rank]).sum(-2)  # [B, H*T, r]
        else:
            o_lat = torch.bmm(probs.view(b, -1, s), latent[..., : self.kv_lora_rank])  # [B, H*T, r]
        o_lat = o_lat.view(b, self.n_heads, t, self.kv_lora_rank)
        return torch.matmul(o_lat, w_uv.transpose(1, 2)).transpose(1, 2)  # [B, T, H, v]
