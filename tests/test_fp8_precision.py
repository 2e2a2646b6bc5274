"""The two "stays out of FP8" lists of `dsv3.quant.precision` are the ones applied: MTP's eh_proj trains in FP8
(TRAINING_HIGH_PRECISION) but is stored in BF16 (STORAGE_HIGH_PRECISION)."""

import json

import torch
from safetensors import safe_open
from torch import nn

import dsv3
from dsv3.quant import FP8Linear, convert_to_fp8
from dsv3.quant.precision import STORAGE_HIGH_PRECISION, TRAINING_HIGH_PRECISION, keeps_high_precision


def test_patterns_match_module_names_not_prefixes():
    assert keeps_high_precision("model.layers.3.mlp.gate", TRAINING_HIGH_PRECISION)
    assert not keeps_high_precision("model.layers.0.mlp.gate_proj", TRAINING_HIGH_PRECISION)  # a dense FFN
    assert keeps_high_precision("model.layers.2.post_attention_layernorm", TRAINING_HIGH_PRECISION)
    assert keeps_high_precision("model.layers.3.eh_proj", STORAGE_HIGH_PRECISION)
    assert not keeps_high_precision("model.layers.3.eh_proj", TRAINING_HIGH_PRECISION)


def test_converted_model_runs_eh_proj_in_fp8_and_keeps_only_the_head():
    model = convert_to_fp8(dsv3.DeepseekV3(dsv3.get_config("tiny")))
    assert isinstance(model.mtp_modules[0].eh_proj, FP8Linear)
    plain = [n for n, m in model.named_modules() if type(m) is nn.Linear]
    assert plain == ["lm_head"]


def test_fp8_checkpoint_stores_eh_proj_in_bf16(tmp_path):
    model = dsv3.DeepseekV3(dsv3.get_config("tiny"))
    dsv3.save_pretrained(model, tmp_path, dtype=torch.float8_e4m3fn)
    weight_map = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    mtp = f"model.layers.{model.config.num_hidden_layers}"
    with safe_open(str(tmp_path / weight_map[f"{mtp}.eh_proj.weight"]), "pt") as f:
        assert f.get_tensor(f"{mtp}.eh_proj.weight").dtype == torch.bfloat16
    assert f"{mtp}.eh_proj.weight_scale_inv" not in weight_map
    # and the MTP block's own linears are FP8 like the main layers'
    assert f"{mtp}.self_attn.o_proj.weight_scale_inv" in weight_map
    assert "model.layers.1.mlp.gate.weight_scale_inv" not in weight_map
