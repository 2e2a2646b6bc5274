"""ModelConfig: field names, both config.json dialects, presets and the refusal of invalid combinations."""

import json

import pytest

import dsv3
from dsv3 import ConfigError, ModelConfig
from dsv3.config import PRESETS

# deepseek-ai/DeepSeek-V3 config.json as published (original DeepSeek dialect)
OFFICIAL_CONFIG = {
    "architectures": ["DeepseekV3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV3Config",
                 "AutoModel": "modeling_deepseek.DeepseekV3Model",
                 "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM"},
    "aux_loss_alpha": 0.001, "bos_token_id": 0, "eos_token_id": 1, "ep_size": 1, "first_k_dense_replace": 3,
    "hidden_act": "silu", "hidden_size": 7168, "initializer_range": 0.02, "intermediate_size": 18432,
    "kv_lora_rank": 512, "max_position_embeddings": 163840, "model_type": "deepseek_v3",
    "moe_intermediate_size": 2048, "moe_layer_freq": 1, "n_group": 8, "n_routed_experts": 256,
    "n_shared_experts": 1, "norm_topk_prob": True, "num_attention_heads": 128, "num_experts_per_tok": 8,
    "num_hidden_layers": 61, "num_key_value_heads": 128, "num_nextn_predict_layers": 1, "q_lora_rank": 1536,
    "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "weight_block_size": [128, 128]},
    "rms_norm_eps": 1e-06, "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0,
                                            "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096,
                                            "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "seq_aux": True,
    "tie_word_embeddings": False, "topk_group": 4, "topk_method": "noaux_tc", "torch_dtype": "bfloat16",
    "transformers_version": "4.33.1", "use_cache": True, "v_head_dim": 128, "vocab_size": 129280,
}


def test_reads_the_official_config_and_round_trips_unknown_fields(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(OFFICIAL_CONFIG))
    cfg = dsv3.get_config(tmp_path)
    assert cfg.yarn["factor"] == 40 and cfg.q_lora_rank == 1536 and cfg.topk_method == "noaux_tc"
    assert cfg.extra["quantization_config"]["weight_block_size"] == [128, 128]
    out = cfg.to_dict()
    for key, value in OFFICIAL_CONFIG.items():
        assert out[key] == value, key


def test_official_config_equals_the_671b_preset():
    official = ModelConfig.from_dict(OFFICIAL_CONFIG)
    preset = dsv3.get_config("deepseek-v3-671b")
    for field in ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
                  "num_attention_heads", "n_routed_experts", "n_shared_experts", "num_experts_per_tok", "n_group",
                  "topk_group", "routed_scaling_factor", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim",
                  "qk_rope_head_dim", "v_head_dim", "rope_theta", "rope_scaling", "first_k_dense_replace",
                  "num_nextn_predict_layers", "scoring_func", "norm_topk_prob", "max_position_embeddings"):
        assert getattr(official, field) == getattr(preset, field), field


def test_reads_the_transformers_dialect():
    d = {"hidden_size": 64, "rope_parameters": {"rope_type": "yarn", "rope_theta": 5000.0, "factor": 4.0,
                                                "original_max_position_embeddings": 32}, "num_mtp_layers": 0,
         "q_lora_rank": None, "vocab_size": 100, "num_hidden_layers": 2, "first_k_dense_replace": 1,
         "n_routed_experts": 8, "n_group": 2, "topk_group": 1, "num_experts_per_tok": 2}
    cfg = ModelConfig.from_dict(d)
    assert cfg.rope_theta == 5000.0 and cfg.yarn["factor"] == 4.0 and cfg.num_nextn_predict_layers == 0


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_keep_v3_structure(name):
    cfg = dsv3.get_config(name)
    assert cfg.first_k_dense_replace >= 1 and cfg.num_moe_layers >= 1
    assert cfg.n_group > 1 and cfg.topk_group < cfg.n_group
    assert cfg.num_nextn_predict_layers == 1 and cfg.scoring_func == "sigmoid"


def test_small_preset_is_tens_of_millions():
    from dsv3.params import count_parameters

    total = count_parameters(dsv3.get_config("small")).total
    assert 10e6 <= total <= 100e6


@pytest.mark.parametrize("change, field, rule", [
    ({"n_routed_experts": 10, "n_group": 4}, "n_routed_experts", "divisible by n_group"),
    ({"topk_group": 5, "n_group": 4}, "topk_group", "between 1 and n_group"),
    ({"num_experts_per_tok": 5, "n_group": 4, "topk_group": 2}, "num_experts_per_tok", "reachable"),
    ({"scoring_func": "relu"}, "scoring_func", "'sigmoid' or 'softmax'"),
    ({"qk_rope_head_dim": 7}, "qk_rope_head_dim", "even"),
    ({"q_lora_rank": -3}, "q_lora_rank", "null"),
    ({"first_k_dense_replace": 9}, "first_k_dense_replace", "num_hidden_layers"),
    ({"hidden_size": 0}, "hidden_size", "positive"),
    ({"rope_scaling": {"type": "yarn", "factor": 4}}, "rope_scaling.original_max_position_embeddings", "required"),
])
def test_invalid_combinations_name_field_and_rule(change, field, rule):
    with pytest.raises(ConfigError) as e:
        dsv3.get_config("tiny").replace(**change)
    assert field in str(e.value) and rule in str(e.value)


def test_unknown_preset_and_bad_json(tmp_path):
    with pytest.raises(ConfigError, match="not a preset"):
        dsv3.get_config("deepseek-v9")
    (tmp_path / "config.json").write_text("{oops")
    with pytest.raises(ConfigError, match="not valid JSON"):
        dsv3.get_config(tmp_path)
