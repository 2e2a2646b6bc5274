"""Model configuration with the Hugging Face / DeepSeek `config.json` field names.

One dataclass, `ModelConfig`, describes every DeepSeek-V3-shaped model dsv3 builds: the tiny test models, the
CPU training demo and the real 671B checkpoint. Field names are exactly those of DeepSeek-V3's `config.json`, so
a checkpoint's config reads straight in and is written back out unchanged. Both spellings of the RoPE settings
are understood: the original DeepSeek file (`rope_theta` + `rope_scaling: {"type": "yarn", ...}`) and the one
transformers >= 5 writes (`rope_parameters: {"rope_type": "yarn", "rope_theta": ..., ...}`).

`validate()` refuses impossible combinations with a `ConfigError` that names the field and the rule broken.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import Dsv3Error


class ConfigError(Dsv3Error, ValueError):
    """An invalid model configuration; the message names the field and the rule."""


@dataclass
class ModelConfig:
    """The shape of a DeepSeek-V3-style model; defaults are the 671B release (HF `deepseek-ai/DeepSeek-V3`
    config.json). Sizes are counts (dims, heads, experts, layers), not bytes. The letters used in the model's
    shape legends: D hidden_size, H num_attention_heads, r kv_lora_rank, n qk_nope_head_dim,
    p qk_rope_head_dim, v v_head_dim, E n_routed_experts, K num_experts_per_tok, I moe_intermediate_size,
    G n_group. Build with `get_config`, `from_dict` / `from_json` or directly, then `validate()`.
    """

    # --- sizes ---
    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432  # dense SwiGLU FFN of the first `first_k_dense_replace` layers
    moe_intermediate_size: int = 2048  # each routed / shared expert
    num_hidden_layers: int = 61
    num_attention_heads: int = 128
    max_position_embeddings: int = 163840
    # --- MLA ---
    q_lora_rank: int | None = 1536  # None: a single full-rank q_proj (V2-Lite style)
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # YaRN: {"type": "yarn", "factor", "original_max_position_embeddings", ...}
    rope_interleave: bool = True  # DeepSeek checkpoints store rotary dims as interleaved pairs
    attention_bias: bool = False
    # --- DeepSeekMoE ---
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    num_experts_per_tok: int = 8
    n_group: int = 8
    topk_group: int = 4
    routed_scaling_factor: float = 2.5
    norm_topk_prob: bool = True
    scoring_func: str = "sigmoid"  # "sigmoid" (V3) or "softmax" (V2)
    topk_method: str = "noaux_tc"  # V3: selection uses the bias-corrected scores ("noaux_tc")
    first_k_dense_replace: int = 3
    moe_layer_freq: int = 1
    # --- MTP ---
    num_nextn_predict_layers: int = 1
    # --- misc ---
    rms_norm_eps: float = 1e-6
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    initializer_range: float = 0.006  # the paper's init std
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    # Fields of the original config.json that dsv3 does not interpret but must round-trip
    # (e.g. `quantization_config`, `auto_map`, `torch_dtype`).
    extra: dict = field(default_factory=dict, repr=False, compare=False)

    # ------------------------------------------------------------------ derived
    @property
    def qk_head_dim(self) -> int:
        """n + p: the width of one query / key head."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def rope_kind(self) -> str:
        """`rope_scaling`'s type ("type", or transformers' "rope_type"): "yarn", "linear", or "default" when none."""
        rs = self.rope_scaling or {}
        kind = rs.get("type", rs.get("rope_type"))
        return "default" if kind is None else kind

    @property
    def linear_rope_factor(self) -> float:
        """Linear position interpolation (`rope_scaling: {"type": "linear", "factor": f}`, Chen et al. 2023): every
        RoPE frequency divided by f; 1.0 when not used."""
        return float(self.rope_scaling["factor"]) if self.rope_kind == "linear" else 1.0

    @property
    def yarn(self) -> dict | None:
        """The YaRN parameters, or None when plain RoPE is used."""
        return self.rope_scaling if self.rope_kind == "yarn" else None

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Whether layer `layer_idx` (0-based; MTP blocks continue the count) has a MoE FFN (else dense)."""
        return layer_idx >= self.first_k_dense_replace and layer_idx % self.moe_layer_freq == 0

    @property
    def num_moe_layers(self) -> int:
        """MoE layers among the main layers (MTP blocks not counted)."""
        return sum(self.is_moe_layer(i) for i in range(self.num_hidden_layers))

    def moe_layer_names(self) -> list[str]:
        """Names of the MoE layers in metric order: main layers by index ("layer i"), then the MTP modules whose
        layer (stored as `model.layers.{num_hidden_layers + k - 1}`) is an MoE one ("MTP k")."""
        n = self.num_hidden_layers
        names = [f"layer {i}" for i in range(n) if self.is_moe_layer(i)]
        return names + [f"MTP {k + 1}" for k in range(self.num_nextn_predict_layers) if self.is_moe_layer(n + k)]

    # --------------------------------------------------------------- validation
    def validate(self) -> ModelConfig:
        """Check the fields against each other; returns self.

        Raises:
            ConfigError: the first broken rule, naming the field, its value and the rule.
        """

        def need(ok: bool, name: str, rule: str) -> None:
            if not ok:
                raise ConfigError(f"invalid config: {name} = {getattr(self, name, None)!r}: {rule}")

        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "kv_lora_rank",
                     "qk_rope_head_dim", "v_head_dim", "max_position_embeddings", "intermediate_size",
                     "moe_intermediate_size"):
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool) and v > 0, name, "must be a positive integer")
        need(isinstance(self.qk_nope_head_dim, int) and self.qk_nope_head_dim >= 0, "qk_nope_head_dim",
             "must be a non-negative integer")
        need(self.q_lora_rank is None or (isinstance(self.q_lora_rank, int) and self.q_lora_rank > 0),
             "q_lora_rank", "must be null (no query compression) or a positive integer")
        need(self.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim", "must be even (RoPE rotates pairs)")
        need(self.scoring_func in ("sigmoid", "softmax"), "scoring_func", "must be 'sigmoid' or 'softmax'")
        need(self.hidden_act == "silu", "hidden_act", "only 'silu' (SwiGLU experts) is supported")
        need(0 <= self.first_k_dense_replace <= self.num_hidden_layers, "first_k_dense_replace",
             f"must be between 0 and num_hidden_layers ({self.num_hidden_layers})")
        need(isinstance(self.moe_layer_freq, int) and self.moe_layer_freq >= 1, "moe_layer_freq", "must be >= 1")
        need(isinstance(self.num_nextn_predict_layers, int) and self.num_nextn_predict_layers >= 0,
             "num_nextn_predict_layers", "must be a non-negative integer")
        need(self.rms_norm_eps > 0, "rms_norm_eps", "must be positive")
        need(self.rope_theta > 0, "rope_theta", "must be positive")
        if self.num_moe_layers > 0:
            need(self.n_routed_experts >= 1, "n_routed_experts", "must be >= 1 when the model has MoE layers")
            need(self.n_shared_experts >= 0, "n_shared_experts", "must be >= 0")
            need(self.n_group >= 1, "n_group", "must be >= 1")
            need(self.n_routed_experts % self.n_group == 0, "n_routed_experts",
                 f"must be divisible by n_group ({self.n_group})")
            need(1 <= self.topk_group <= self.n_group, "topk_group", f"must be between 1 and n_group ({self.n_group})")
            per_group = self.n_routed_experts // self.n_group
            reachable = self.topk_group * per_group
            need(1 <= self.num_experts_per_tok <= reachable, "num_experts_per_tok",
                 f"must be between 1 and the experts reachable in topk_group groups "
                 f"(topk_group {self.topk_group} x {per_group} experts per group = {reachable})")
            if self.n_group > 1 and self.scoring_func == "sigmoid":
                need(per_group >= 2, "n_group",
                     "each group needs >= 2 experts (a group's score is the sum of its top-2 affinities)")
            need(self.routed_scaling_factor > 0, "routed_scaling_factor", "must be positive")
        rs = self.rope_scaling
        if rs:
            kind = self.rope_kind
            if kind not in ("yarn", "linear", "default"):
                raise ConfigError(f"invalid config: rope_scaling.type = {kind!r}: 'yarn' and 'linear' are supported")
            if kind == "linear" and not rs.get("factor", 0) >= 1:
                raise ConfigError(f"invalid config: rope_scaling.factor = {rs.get('factor')!r}: linear position "
                                  "interpolation needs a factor >= 1")
            if kind == "yarn":
                for key in ("factor", "original_max_position_embeddings"):
                    if key not in rs:
                        raise ConfigError(f"invalid config: rope_scaling.{key} is required for YaRN")
                if not rs["factor"] >= 1:
                    raise ConfigError(f"invalid config: rope_scaling.factor = {rs['factor']!r}: must be >= 1")
        return self

    # ------------------------------------------------------------ (de)serialise
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Build from a DeepSeek or transformers `config.json` dictionary (unknown keys kept in `extra`).

        Raises:
            ConfigError: from `validate()`.
        """
        d = dict(d)
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        # transformers >= 5 folds rope_theta and the scaling into `rope_parameters`.
        rp = d.pop("rope_parameters", None)
        if rp:
            rp = dict(rp)
            if "rope_theta" in rp:
                d.setdefault("rope_theta", rp.pop("rope_theta"))
            kind = rp.pop("rope_type", rp.pop("type", "default"))
            if kind != "default" and not d.get("rope_scaling"):
                d["rope_scaling"] = {"type": kind, **rp}
        # transformers' alias
        if "num_mtp_layers" in d:
            d.setdefault("num_nextn_predict_layers", d.pop("num_mtp_layers"))
        kwargs = {k: d.pop(k) for k in list(d) if k in known}
        if kwargs.get("q_lora_rank") == 0:  # the official ModelArgs spells "no q compression" as 0
            kwargs["q_lora_rank"] = None
        for k in ("n_group", "topk_group"):
            if kwargs.get(k) is None and k in kwargs:
                kwargs[k] = 1
        if kwargs.get("rope_scaling"):
            kwargs["rope_scaling"] = dict(kwargs["rope_scaling"])
        if kwargs.get("rope_interleave") is None and "rope_interleave" in kwargs:
            kwargs["rope_interleave"] = True
        return cls(**kwargs, extra=d).validate()

    def to_dict(self) -> dict[str, Any]:
        """A `config.json` dictionary readable by the DeepSeek code and by transformers."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        d.update({k: v for k, v in self.extra.items() if k not in d})
        d.setdefault("architectures", ["DeepseekV3ForCausalLM"])
        d.setdefault("model_type", "deepseek_v3")
        d.setdefault("num_key_value_heads", self.num_attention_heads)
        if self.rope_scaling is None:
            d.pop("rope_parameters", None)
        return d

    @classmethod
    def from_json(cls, path: str | Path) -> ModelConfig:
        """Read a `config.json` (either dialect, see the module doc).

        Raises:
            ConfigError: a missing file, invalid JSON, a value of the wrong type, or a config `validate()` refuses.
        """
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
        if not isinstance(d, dict):
            raise ConfigError(f"{path}: a config.json must hold a JSON object")
        try:
            return cls.from_dict(d)
        except TypeError as e:  # wrong types for known fields surface here
            raise ConfigError(f"{path}: {e}") from None

    def save_json(self, path: str | Path) -> None:
        """Write `to_dict()` as indented JSON."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    def replace(self, **changes: Any) -> ModelConfig:
        """A validated copy with `changes` applied. Raises `ConfigError` like `validate()`."""
        return dataclasses.replace(self, **changes).validate()


# --------------------------------------------------------------------------- presets
def _preset_671b() -> ModelConfig:
    """The official DeepSeek-V3 config (HF `config.json` of deepseek-ai/DeepSeek-V3)."""
    return ModelConfig(
        rope_scaling={"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                      "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
        extra={"quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                       "weight_block_size": [128, 128]}},
    )


def _preset_small() -> ModelConfig:
    """~tens of millions of parameters: trains on a laptop CPU, keeps every structural feature of V3."""
    return ModelConfig(
        vocab_size=8192, hidden_size=256, intermediate_size=768, moe_intermediate_size=128,
        num_hidden_layers=6, num_attention_heads=4, max_position_embeddings=1024,
        q_lora_rank=128, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
        n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=4, n_group=4, topk_group=2,
        routed_scaling_factor=2.5, first_k_dense_replace=1, num_nextn_predict_layers=1,
        initializer_range=0.02,  # 0.006 (the paper's, for d=7168) trains too slowly at d=256
    )


def _preset_tiny() -> ModelConfig:
    """For tests: seconds to build, every code path present (dense + MoE layers, groups, MTP)."""
    return ModelConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=256,
        q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
        n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=4, topk_group=2,
        routed_scaling_factor=2.5, first_k_dense_replace=1, num_nextn_predict_layers=1,
        initializer_range=0.02,
    )


PRESETS = {"tiny": _preset_tiny, "small": _preset_small, "deepseek-v3-671b": _preset_671b}


def get_config(name_or_path: str | Path) -> ModelConfig:
    """A preset name (`PRESETS`), a `config.json` path, or a directory holding one.

    Raises:
        ConfigError: neither a preset nor an existing file, or an invalid config.
    """
    name = str(name_or_path)
    if name in PRESETS:
        return PRESETS[name]().validate()
    path = Path(name)
    if path.is_dir():
        path = path / "config.json"
    if not path.exists():
        raise ConfigError(f"unknown config {name!r}: not a preset ({', '.join(PRESETS)}) and no such file")
    return ModelConfig.from_json(path)


def extended_rope_scaling(kind: str, factor: float, original: int) -> dict | None:
    """The `rope_scaling` entry of a context extension by `factor` from a model trained at `original` tokens:
    "yarn" as the released DeepSeek-V3 config writes it ({"type": "yarn", "factor", "original_max_position_embeddings",
    "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}; report section 4.3: alpha = 1, beta = 32,
    the mscale correction of the softmax), "linear" ({"type": "linear", "factor"}, position interpolation, Chen et
    al. 2023) or "none" (None: plain RoPE, the baseline).

    Raises:
        ValueError: another kind.
    """
    if kind == "yarn":
        return {"type": "yarn", "factor": float(factor), "original_max_position_embeddings": int(original),
                "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}
    if kind == "linear":
        return {"type": "linear", "factor": float(factor)}
    if kind == "none":
        return None
    raise ValueError(f"unknown context extension {kind!r}: yarn, linear or none")


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature correction (0.1·m·ln s + 1, and 1 when not extrapolating)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0
