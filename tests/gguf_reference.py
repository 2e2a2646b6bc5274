"""An independent numpy forward pass over a GGUF file, written from llama.cpp's `deepseek2` graph, not from dsv3.

It reads only the file (tensors and metadata through the `gguf` package's reader) and follows llama.cpp at commit
0c1e57098bba43ac29e6e3b677cdceebdd22334f (the one llama-cpp-python 0.3.36 vendors):
- `src/models/deepseek2.cpp`: MLA in the absorbed form (q_nope through `attn_k_b` into the latent, attention over
  the normalised latent plus the roped shared key, values through `attn_v_b`), `kq_scale` from the YaRN
  magnitude, dense FFN for the first `leading_dense_block_count` blocks, then routed + shared experts;
- `src/llama-graph.cpp` `build_moe_ffn`: gating function, selection bias added for selection only, groups ranked by
  the sum of their top two biased scores, weights from the unbiased probabilities, normalised (sum clamped at
  6.1e-5) and scaled;
- `ggml/src/ggml-cpu/ops.cpp` rope (type NORM: adjacent pairs rotate) with YaRN's ramp and magnitude, and
  `src/llama-context.cpp` for the attention factor (including the deepseek2 `yarn_log_multiplier` handling).

Shapes: numpy order (the reverse of ggml's `ne`). T tokens, D hidden, H heads, r latent, n/p/v nope/rope/value dims.
"""

from __future__ import annotations

import math

import numpy as np


def _value(field):
    return field.contents()


class GGUFReference:
    """The model in a GGUF file, run in float64 numpy."""

    def __init__(self, path):
        import gguf

        reader = gguf.GGUFReader(str(path))
        self.meta = {name: _value(f) for name, f in reader.fields.items() if not name.startswith("GGUF.")}
        arch = self.meta["general.architecture"]
        assert arch == "deepseek2", arch
        self.w = {}
        for t in reader.tensors:
            shape = tuple(int(d) for d in reversed(t.shape))  # numpy order
            data = gguf.quants.dequantize(t.data, t.tensor_type)
            self.w[t.name] = np.asarray(data, dtype=np.float64).reshape(shape)

        def key(k, default=None):
            return self.meta.get(f"{arch}.{k}", default)

        self.n_layer = key("block_count")
        self.n_head = key("attention.head_count")
        self.eps = key("attention.layer_norm_rms_epsilon")
        self.dense_lead = key("leading_dense_block_count", 0)
        self.r = key("attention.kv_lora_rank")
        self.dk = key("attention.key_length_mla")
        self.dv = key("attention.value_length_mla")
        self.n_rot = key("rope.dimension_count")
        self.n_nope = self.dk - self.n_rot
        self.freq_base = key("rope.freq_base", 10000.0)
        self.n_expert = key("expert_count", 0)
        self.n_used = key("expert_used_count", 0)
        self.n_groups = key("expert_group_count", 0)
        self.n_group_used = key("expert_group_used_count", 0)
        self.w_norm = key("expert_weights_norm", False)
        self.w_scale = key("expert_weights_scale", 0.0)
        self.gating = key("expert_gating_func", 1)  # 1 softmax, 2 sigmoid
        # RoPE scaling and the attention factor, as llama_context's constructor derives them
        scaling = key("rope.scaling.type", "none")
        factor = key("rope.scaling.factor", 1.0) if scaling in ("yarn", "linear") else 1.0
        self.freq_scale = 1.0 / factor
        self.ext_factor = 1.0 if scaling == "yarn" else 0.0
        self.n_ctx_orig = key("rope.scaling.original_context_length", key("context_length"))
        self.beta_fast = key("rope.scaling.yarn_beta_fast", 32.0)
        self.beta_slow = key("rope.scaling.yarn_beta_slow", 1.0)
        log_mul = key("rope.scaling.yarn_log_multiplier", 0.0) / 0.1  # the loader cancels the converter's 0.1
        attn_factor = 1.0

        def get_mscale(scale, mscale):
            return 1.0 if scale <= 1.0 else 0.1 * mscale * math.log(scale) + 1.0

        if self.ext_factor != 0:
            if log_mul != 0.0:
                mscale = log_mul  # deepseek2: mscale is taken equal to mscale_all_dim
                attn_factor = get_mscale(factor, mscale) / get_mscale(factor, log_mul)
            else:
                attn_factor = get_mscale(factor, 1.0)
            attn_factor *= 1.0 / (1.0 + 0.1 * math.log(factor))
        self.attn_factor = attn_factor
        attn_factor_org = attn_factor * (1.0 + 0.1 * math.log(1.0 / self.freq_scale))
        mscale = attn_factor_org * (1.0 + 0.1 * log_mul * math.log(1.0 / self.freq_scale))
        self.kq_scale = mscale * mscale / math.sqrt(self.dk)

    # ------------------------------------------------------------------------------------------------ pieces
    def _rms(self, x, weight):
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + self.eps) * weight

    def _rope(self, x, pos):
        """ggml_rope_ext, mode NORM: pairs (2i, 2i+1) of the last axis rotate. x [T, ..., p], pos [T]."""
        p = x.shape[-1]
        i0 = np.arange(0, p, 2)
        theta_extrap = pos[:, None].astype(np.float64) * self.freq_base ** (-i0 / p)[None, :]  # [T, p/2]
        theta_interp = self.freq_scale * theta_extrap
        mscale = self.attn_factor
        if self.ext_factor != 0.0:
            def corr_dim(n_rot):
                return p * math.log(self.n_ctx_orig / (n_rot * 2 * math.pi)) / (2 * math.log(self.freq_base))
            low = max(0.0, math.floor(corr_dim(self.beta_fast)))
            high = min(p - 1.0, math.ceil(corr_dim(self.beta_slow)))
            y = ((i0 // 2) - low) / max(0.001, high - low)
            ramp_mix = (1 - np.clip(y, 0, 1)) * self.ext_factor
            theta = theta_interp * (1 - ramp_mix) + theta_extrap * ramp_mix
            mscale *= 1.0 + 0.1 * math.log(1.0 / self.freq_scale)
        else:
            theta = theta_interp
        shape = (x.shape[0],) + (1,) * (x.ndim - 2) + (p // 2,)
        cos, sin = (np.cos(theta) * mscale).reshape(shape), (np.sin(theta) * mscale).reshape(shape)
        x0, x1 = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2] = x0 * cos - x1 * sin
        out[..., 1::2] = x0 * sin + x1 * cos
        return out

    @staticmethod
    def _silu(x):
        return x / (1 + np.exp(-x))

    def _attention(self, il, h, pos):
        w, b = self.w, f"blk.{il}."
        T, H = h.shape[0], self.n_head
        if b + "attn_q_a.weight" in w:
            q = self._rms(h @ w[b + "attn_q_a.weight"].T, w[b + "attn_q_a_norm.weight"]) @ w[b + "attn_q_b.weight"].T
        else:
            q = h @ w[b + "attn_q.weight"].T
        q = q.reshape(T, H, self.dk)
        q_nope, q_pe = q[..., : self.n_nope], self._rope(q[..., self.n_nope:], pos)  # [T, H, n], [T, H, p]
        kv_pe = h @ w[b + "attn_kv_a_mqa.weight"].T  # [T, r + p]
        latent = self._rms(kv_pe[:, : self.r], w[b + "attn_kv_a_norm.weight"])  # [T, r]
        k_pe = self._rope(kv_pe[:, self.r:], pos)  # [T, p]: one shared roped key
        q_lat = np.einsum("thn,hrn->thr", q_nope, w[b + "attn_k_b.weight"])  # attn_k_b [H, r, n]
        scores = (np.einsum("thr,sr->hts", q_lat, latent) + np.einsum("thp,sp->hts", q_pe, k_pe)) * self.kq_scale
        scores = np.where(np.tril(np.ones((T, T), dtype=bool))[None], scores, -np.inf)
        scores -= scores.max(-1, keepdims=True)
        probs = np.exp(scores)
        probs /= probs.sum(-1, keepdims=True)
        out_lat = np.einsum("hts,sr->thr", probs, latent)
        out = np.einsum("thr,hvr->thv", out_lat, w[b + "attn_v_b.weight"]).reshape(T, H * self.dv)  # [H, v, r]
        return out @ w[b + "attn_output.weight"].T

    def _ffn(self, h, gate, up, down):
        return (self._silu(h @ gate.T) * (h @ up.T)) @ down.T

    def _moe(self, il, h):
        w, b = self.w, f"blk.{il}."
        logits = h @ w[b + "ffn_gate_inp.weight"].T  # [T, E]
        if self.gating == 2:
            probs = 1 / (1 + np.exp(-logits))
        else:
            e = np.exp(logits - logits.max(-1, keepdims=True))
            probs = e / e.sum(-1, keepdims=True)
        select = probs + w[b + "exp_probs_b.bias"] if b + "exp_probs_b.bias" in w else probs.copy()
        T, E = probs.shape
        if self.n_groups > 1:
            groups = select.reshape(T, self.n_groups, E // self.n_groups)
            top2 = np.sort(groups, axis=-1)[..., -2:].sum(-1)  # [T, G]
            keep = np.argsort(-top2, axis=-1, kind="stable")[:, : self.n_group_used]
            mask = np.zeros_like(top2, dtype=bool)
            np.put_along_axis(mask, keep, True, axis=-1)
            select = np.where(np.repeat(mask, E // self.n_groups, axis=-1), select, -np.inf)
        chosen = np.argsort(-select, axis=-1, kind="stable")[:, : self.n_used]  # [T, k]
        weights = np.take_along_axis(probs, chosen, axis=-1)
        if self.w_norm:
            weights = weights / np.maximum(weights.sum(-1, keepdims=True), 6.103515625e-5)
        if self.w_scale not in (0.0, 1.0):
            weights = weights * self.w_scale
        out = np.zeros_like(h)
        gate, up, down = (w[b + f"ffn_{p}_exps.weight"] for p in ("gate", "up", "down"))  # [E, I, D] / [E, D, I]
        for t in range(T):
            for j, e in enumerate(chosen[t]):
                out[t] += weights[t, j] * self._ffn(h[t:t + 1], gate[e], up[e], down[e])[0]
        if b + "ffn_gate_shexp.weight" in w:
            out += self._ffn(h, w[b + "ffn_gate_shexp.weight"], w[b + "ffn_up_shexp.weight"],
                             w[b + "ffn_down_shexp.weight"])
        return out

    # --------------------------------------------------------------------------------------------- forward
    def logits(self, tokens) -> np.ndarray:
        """Next-token logits [T, V] for token ids `tokens` [T] at positions 0..T-1."""
        w = self.w
        tokens = np.asarray(tokens)
        pos = np.arange(len(tokens))
        x = w["token_embd.weight"][tokens]  # [T, D]
        for il in range(self.n_layer):
            b = f"blk.{il}."
            x = x + self._attention(il, self._rms(x, w[b + "attn_norm.weight"]), pos)
            h = self._rms(x, w[b + "ffn_norm.weight"])
            if il < self.dense_lead:
                x = x + self._ffn(h, w[b + "ffn_gate.weight"], w[b + "ffn_up.weight"], w[b + "ffn_down.weight"])
            else:
                x = x + self._moe(il, h)
        head = w.get("output.weight", w["token_embd.weight"])
        return self._rms(x, w["output_norm.weight"]) @ head.T
