"""GGUF export: a dsv3 checkpoint as the file llama.cpp runs, in its `deepseek2` architecture's conventions.

GGUF (ggml's single-file format, github.com/ggml-org/ggml/blob/master/docs/gguf.md) holds key-value metadata and
named tensors. llama.cpp runs DeepSeek-V2/V3 as one architecture, `deepseek2`; its converter
(`convert_hf_to_gguf.py`, class `DeepseekV2Model`, read at llama.cpp commit
0c1e57098bba43ac29e6e3b677cdceebdd22334f, the one llama-cpp-python 0.3.36 vendors) and its loader
(`src/models/deepseek2.cpp`) fix what is written here:

- names: `model.layers.{i}.self_attn.q_a_proj.weight` -> `blk.{i}.attn_q_a.weight` and so on (`GGUF_NAMES`); the
  routed experts of a layer are stacked into one tensor per projection (`blk.{i}.ffn_gate_exps.weight`,
  [E, I, D] in numpy order), the selection bias `e_score_correction_bias` is `blk.{i}.exp_probs_b.bias`;
- MLA is stored for the absorbed form: `kv_b_proj` ([H (n + v), r]) is split per head into
  `attn_k_b` = the key part transposed ([H, r, n]) and `attn_v_b` = the value part ([H, v, r]); llama.cpp then
  caches the latent (r + rope dims per token, one "KV head") and attends in latent space, as `dsv3.model.mla`'s
  absorbed form does;
- shapes in the file are numpy order (row-major, outermost first): ggml's `ne` is the reverse;
- 1-D tensors (norms, the routing bias) and the router stay float32 whatever the storage type, as llama.cpp's
  converter keeps them;
- the MTP modules are left out (llama.cpp's `deepseek2` converter skips them; they are a training signal and a
  draft model, not part of the next-token forward);
- metadata: `deepseek2.*` hyper-parameters (sigmoid gating, weight normalisation and scale, expert groups,
  q/kv LoRA ranks, MLA head sizes, YaRN), the byte-level BPE tokenizer (`gpt2` model,
  `gpt-2` pre-tokenizer, merges), BOS/EOS ids and `tokenizer.chat_template`.

Where llama.cpp cannot compute what the checkpoint means, `export_gguf` refuses with the field named
(`GGUFExportError`) instead of writing a file that runs differently.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from .config import ModelConfig
from .errors import Dsv3Error

ARCH = "deepseek2"
LLAMA_CPP_COMMIT = "0c1e57098bba43ac29e6e3b677cdceebdd22334f"  # the llama.cpp these conventions were read from
STORAGE = ("f32", "f16", "bf16")

# official per-layer suffix -> GGUF per-layer name (`blk.{i}.` + this)
_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.q_a_proj.weight": "attn_q_a.weight",
    "self_attn.q_a_layernorm.weight": "attn_q_a_norm.weight",
    "self_attn.q_b_proj.weight": "attn_q_b.weight",
    "self_attn.kv_a_proj_with_mqa.weight": "attn_kv_a_mqa.weight",
    "self_attn.kv_a_layernorm.weight": "attn_kv_a_norm.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "mlp.gate.weight": "ffn_gate_inp.weight",
    "mlp.gate.e_score_correction_bias": "exp_probs_b.bias",
    "mlp.shared_experts.gate_proj.weight": "ffn_gate_shexp.weight",
    "mlp.shared_experts.up_proj.weight": "ffn_up_shexp.weight",
    "mlp.shared_experts.down_proj.weight": "ffn_down_shexp.weight",
}
_GLOBAL_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                 "lm_head.weight": "output.weight"}
_EXPERT_PROJ = {"gate_proj": "ffn_gate_exps.weight", "up_proj": "ffn_up_exps.weight",
                "down_proj": "ffn_down_exps.weight"}
_ALWAYS_F32 = ("ffn_gate_inp.weight",)  # the router: llama.cpp's converter keeps it float32


class GGUFExportError(Dsv3Error, ValueError):
    """A checkpoint llama.cpp's `deepseek2` cannot run as dsv3 does (the message names the config field), an
    unknown storage type, or a target that exists."""


def llama_cpp_limits(cfg: ModelConfig) -> None:
    """Refuse configs whose meaning llama.cpp's `deepseek2` would change.

    Raises:
        GGUFExportError: naming the field: `moe_layer_freq` != 1 (llama.cpp makes every layer after
            `first_k_dense_replace` MoE), softmax scoring with a real group limit (llama.cpp ranks groups by the sum
            of their top two scores, V3's rule, where V2 used the group maximum), YaRN with `mscale` !=
            `mscale_all_dim` or without `mscale_all_dim` (llama.cpp derives both softmax and RoPE magnitude
            corrections from one value), linear RoPE scaling (its graph would add YaRN's softmax correction), a
            `hidden_act` other than silu.
    """
    def refuse(field: str, why: str):
        raise GGUFExportError(f"cannot export to GGUF: {field} {why}")

    if cfg.hidden_act != "silu":
        refuse("hidden_act", f"= {cfg.hidden_act!r}: llama.cpp's deepseek2 uses SiLU")
    if cfg.n_routed_experts and cfg.moe_layer_freq != 1:
        refuse("moe_layer_freq", f"= {cfg.moe_layer_freq}: llama.cpp's deepseek2 makes every layer after "
               "first_k_dense_replace a MoE layer")
    if cfg.n_routed_experts and cfg.scoring_func == "softmax" and 1 < cfg.topk_group < cfg.n_group:
        refuse("scoring_func", "= 'softmax' with topk_group < n_group: llama.cpp ranks expert groups by the sum of "
               "their top two scores (V3's rule), not by the group maximum (V2's)")
    if cfg.rope_kind == "linear":
        refuse("rope_scaling.type", "= 'linear': llama.cpp's deepseek2 graph applies YaRN's softmax correction "
               "(1 + 0.1 ln factor)^2 whenever positions are scaled, which linear interpolation does not have")
    yarn = cfg.yarn
    if yarn is not None:
        mscale, mscale_all = yarn.get("mscale", 1.0), yarn.get("mscale_all_dim")
        if mscale_all is None or float(mscale) != float(mscale_all):
            refuse("rope_scaling.mscale", f"= {mscale!r} with mscale_all_dim = {mscale_all!r}: llama.cpp's "
                   "deepseek2 assumes mscale == mscale_all_dim (the released DeepSeek-V3 config: both 1.0)")


def gguf_name(official: str, cfg: ModelConfig) -> str | None:
    """The GGUF name of a non-expert official tensor, or None for one that is not exported (MTP layers).

    `kv_b_proj` is split in two (`attn_k_b` / `attn_v_b`, see `split_kv_b`); this returns its `attn_kv_b` stem.

    Raises:
        GGUFExportError: a name with no GGUF counterpart.
    """
    if official in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[official]
    parts = official.split(".", 3)
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[2].isdigit():
        layer, rest = int(parts[2]), parts[3]
        if layer >= cfg.num_hidden_layers:
            return None  # an MTP module
        if rest == "self_attn.kv_b_proj.weight":
            return f"blk.{layer}.attn_kv_b.weight"
        if rest in _LAYER_NAMES:
            return f"blk.{layer}.{_LAYER_NAMES[rest]}"
    raise GGUFExportError(f"cannot export to GGUF: tensor {official} has no deepseek2 counterpart")


def split_kv_b(kv_b: np.ndarray, cfg: ModelConfig) -> tuple[np.ndarray, np.ndarray]:
    """`kv_b_proj.weight` [H (n + v), r] -> (`attn_k_b` [H, r, n], `attn_v_b` [H, v, r]), llama.cpp's absorbed-MLA
    layout: per head the key rows transposed (so that q_nope [n] maps to the latent [r]) and the value rows."""
    h, n, v = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.v_head_dim
    per_head = kv_b.reshape(h, n + v, kv_b.shape[-1])  # [H, n + v, r]
    return np.ascontiguousarray(per_head[:, :n].transpose(0, 2, 1)), np.ascontiguousarray(per_head[:, n:])


def _tokenizer_metadata(writer, ckpt: Path, vocab_size: int, cfg: ModelConfig) -> None:
    """Byte-level BPE vocabulary, merges, special ids and the chat template (llama.cpp's `gpt2` tokenizer)."""
    import gguf

    from .tokenizer import EOT, PLAIN_CHAT_TEMPLATE, ChatTemplate, TokenizerError

    file = ckpt / "tokenizer.json"
    if not file.is_file():
        raise GGUFExportError(f"cannot export to GGUF: {ckpt} has no tokenizer.json (llama.cpp needs the vocabulary)")
    try:
        spec = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerError(f"cannot read {file}: {e}") from None
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise GGUFExportError(f"cannot export to GGUF: {file} holds a {model.get('type')!r} model; only byte-level "
                              "BPE is exported")
    pre = spec.get("pre_tokenizer") or {}
    if pre.get("type") != "ByteLevel" or not pre.get("use_regex", True):
        # llama.cpp's "gpt-2" pre-tokenizer is exactly ByteLevel's GPT-2 split; anything else (a digit split in a
        # Sequence, no regex) would tokenize differently there
        raise GGUFExportError(f"cannot export to GGUF: {file}'s pre-tokenizer is {json.dumps(pre)[:120]}; only a "
                              "plain byte-level one (GPT-2's split, llama.cpp's 'gpt-2') is exported")
    by_id = {i: t for t, i in model["vocab"].items()}
    special = {}
    for added in spec.get("added_tokens") or []:
        by_id[added["id"]] = added["content"]
        if added.get("special"):
            special[added["id"]] = added["content"]
    if by_id and max(by_id) >= vocab_size:
        raise GGUFExportError(f"cannot export to GGUF: {file} has token id {max(by_id)} but the model's vocab_size "
                              f"is {vocab_size}")
    tokens, types = [], []
    for i in range(vocab_size):
        if i in by_id:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL)
        else:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")  # ByteLevel(use_regex=True): the GPT-2 split pattern
    writer.add_token_list(tokens)
    writer.add_token_types([int(t) for t in types])
    writer.add_token_merges(merges)
    eot = model["vocab"].get(EOT, next((i for i, t in special.items() if t == EOT), None))
    bos = cfg.bos_token_id if cfg.bos_token_id is not None else eot
    eos = cfg.eos_token_id[0] if isinstance(cfg.eos_token_id, list) and cfg.eos_token_id else cfg.eos_token_id
    eos = eos if eos is not None else eot
    if bos is not None:
        writer.add_bos_token_id(int(bos))
    if eos is not None:
        writer.add_eos_token_id(int(eos))
    writer.add_add_bos_token(False)  # dsv3's tokenizers add nothing: documents start with EOT in the data itself
    template = ChatTemplate(ckpt).template
    writer.add_chat_template(template if template is not None else PLAIN_CHAT_TEMPLATE)


def export_gguf(checkpoint: str | Path, out: str | Path, storage: str = "f32", progress: bool = False) -> Path:
    """Write `checkpoint` (a dsv3 / HF-format DeepSeek-V3 directory, FP8 ones included) as one GGUF file `out`.

    storage: "f32", "f16" or "bf16" for the matrices (1-D tensors and the router stay f32).
    The file is written beside `out` under a temporary name and renamed into place at the end; `out` must not
    exist (the caller moves an old one aside first). The whole model is loaded in fp32 first (FP8 dequantized), so
    this is for models that fit in memory.

    Raises:
        GGUFExportError: `out` exists, `storage` unknown, no tokenizer, or a config llama.cpp cannot run as dsv3
            does (`llama_cpp_limits`).
        dsv3.checkpoint.CheckpointError: an unreadable checkpoint.
    """
    import gguf
    import torch

    from .checkpoint import checkpoint_tensors, load_pretrained

    ckpt, out = Path(checkpoint), Path(out)
    if storage not in STORAGE:
        raise GGUFExportError(f"unknown GGUF storage type {storage!r}: use one of {', '.join(STORAGE)}")
    if out.exists() or out.is_symlink():
        raise GGUFExportError(f"{out} exists; choose another path or move it aside")
    if (ckpt / "config.json").is_file():  # (without one, load_pretrained names the problem)
        llama_cpp_limits(ModelConfig.from_json(ckpt / "config.json"))  # refuse before the (long) load
    model = load_pretrained(ckpt, dtype=torch.float32)
    cfg = model.config
    qtype = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
             "bf16": gguf.GGMLQuantizationType.BF16}[storage]
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    if tmp.exists() or tmp.is_symlink():
        raise GGUFExportError(f"{tmp} exists (an interrupted export?); remove it or choose another path")
    writer = gguf.GGUFWriter(str(tmp), ARCH)
    try:
        _metadata(writer, cfg, ckpt.name, storage)
        _tokenizer_metadata(writer, ckpt, cfg.vocab_size, cfg)
        for name, array in _tensors(checkpoint_tensors(model), cfg):
            if array.ndim <= 1 or name.endswith(_ALWAYS_F32) or qtype == gguf.GGMLQuantizationType.F32:
                writer.add_tensor(name, array.astype(np.float32))
            elif qtype == gguf.GGMLQuantizationType.F16:
                writer.add_tensor(name, array.astype(np.float16))
            else:
                writer.add_tensor(name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)  # shape from the bytes
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=progress)
        writer.close()
        if out.exists() or out.is_symlink():
            raise GGUFExportError(f"{out} appeared while exporting; nothing was replaced")
        os.replace(tmp, out)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)  # our own temporary file (refused above if it was there before)
        raise
    return out


def _tensors(named, cfg: ModelConfig):
    """(GGUF name, float32 numpy array) for every exported tensor: experts stacked per layer, kv_b split."""
    experts: dict[int, dict[str, dict[int, np.ndarray]]] = {}
    for official, t in named:
        array = t.detach().float().cpu().numpy()
        parts = official.split(".")
        if ".mlp.experts." in official:  # model.layers.{i}.mlp.experts.{j}.{proj}.weight
            layer, expert, proj = int(parts[2]), int(parts[5]), parts[6]
            if layer >= cfg.num_hidden_layers:
                continue
            by_proj = experts.setdefault(layer, {})
            by_proj.setdefault(proj, {})[expert] = array
            if all(len(by_proj.get(p, {})) == cfg.n_routed_experts for p in _EXPERT_PROJ):
                for p, stem in _EXPERT_PROJ.items():
                    yield f"blk.{layer}.{stem}", np.stack([by_proj[p][j] for j in range(cfg.n_routed_experts)])
                del experts[layer]
            continue
        name = gguf_name(official, cfg)
        if name is None:
            continue
        if name.endswith("attn_kv_b.weight"):
            k_b, v_b = split_kv_b(array, cfg)
            yield name.replace("attn_kv_b", "attn_k_b"), k_b
            yield name.replace("attn_kv_b", "attn_v_b"), v_b
        else:
            yield name, array
    if experts:
        raise GGUFExportError(f"cannot export to GGUF: layers {sorted(experts)} lack some routed experts")


def _metadata(writer, cfg: ModelConfig, name: str, storage: str) -> None:
    """The `general.*` and `deepseek2.*` keys llama.cpp's loader reads (`llama_model_deepseek2::load_arch_hparams`
    and the generic ones), with the values its converter derives from a DeepSeek-V3 config.json."""
    import gguf

    writer.add_name(name)
    writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                          "bf16": gguf.LlamaFileType.MOSTLY_BF16}[storage])
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(1)  # MLA runs as MQA over the latent in llama.cpp
    writer.add_rope_freq_base(float(cfg.rope_theta))
    writer.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_leading_dense_block_count(cfg.first_k_dense_replace if cfg.n_routed_experts else cfg.num_hidden_layers)
    writer.add_q_lora_rank(cfg.q_lora_rank or 0)  # 0: a single full-rank q_proj (`attn_q`)
    writer.add_kv_lora_rank(cfg.kv_lora_rank)
    writer.add_key_length(cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    writer.add_value_length(cfg.kv_lora_rank)
    writer.add_key_length_mla(cfg.qk_nope_head_dim + cfg.qk_rope_head_dim)
    writer.add_value_length_mla(cfg.v_head_dim)
    writer.add_rope_dimension_count(cfg.qk_rope_head_dim)
    if cfg.n_routed_experts:
        writer.add_expert_feed_forward_length(cfg.moe_intermediate_size)
        writer.add_expert_count(cfg.n_routed_experts)
        writer.add_expert_used_count(cfg.num_experts_per_tok)
        writer.add_expert_shared_count(cfg.n_shared_experts or 0)
        writer.add_expert_weights_scale(float(cfg.routed_scaling_factor))
        if cfg.norm_topk_prob:
            writer.add_expert_weights_norm(True)
        writer.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID if cfg.scoring_func == "sigmoid"
                                      else gguf.ExpertGatingFuncType.SOFTMAX)
        if 1 < cfg.n_group and cfg.topk_group < cfg.n_group:  # llama.cpp asserts a real limit (used < count)
            writer.add_expert_group_count(cfg.n_group)
            writer.add_expert_group_used_count(cfg.topk_group)
    else:
        writer.add_expert_feed_forward_length(cfg.intermediate_size)
        writer.add_expert_shared_count(0)
    if cfg.yarn is not None:
        yarn = cfg.yarn
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(yarn["factor"]))
        writer.add_rope_scaling_orig_ctx_len(int(yarn["original_max_position_embeddings"]))
        writer.add_rope_scaling_yarn_beta_fast(float(yarn.get("beta_fast", 32)))
        writer.add_rope_scaling_yarn_beta_slow(float(yarn.get("beta_slow", 1)))
        # llama.cpp's loader divides this key by 0.1 (its converter's historical factor; TAG_DEEPSEEK2_YARN_LOG_MUL)
        writer.add_rope_scaling_yarn_log_mul(0.1 * float(yarn["mscale_all_dim"]))
