"""Parity with Hugging Face transformers' DeepseekV3ForCausalLM (an independent implementation), fp32.

Random tiny models are built and saved by transformers, loaded by dsv3, and the logits compared; then a
dsv3-saved model is loaded by transformers. Weights are re-drawn with a larger std than HF's default and the
routing bias / norm gains are randomised, so that every path (bias-corrected selection, group limits, norms)
moves the logits measurably.
"""

import json

import pytest
import torch
import transformers

import dsv3

BASE = dict(
    vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=4, q_lora_rank=24, kv_lora_rank=32, qk_nope_head_dim=16,
    qk_rope_head_dim=8, v_head_dim=12, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
    n_group=4, topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True, first_k_dense_replace=1,
    max_position_embeddings=256, rms_norm_eps=1e-6, num_mtp_layers=0, tie_word_embeddings=False,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
)
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 8.0, "original_max_position_embeddings": 16,
        "beta_fast": 32, "beta_slow": 1, "mscale": 0.8, "mscale_all_dim": 1.0}

VARIANTS = {
    "base": {},
    "yarn": {"rope_parameters": YARN},
    "q_lora_null": {"q_lora_rank": None},
    "n_group_1": {"n_group": 1, "topk_group": 1, "num_experts_per_tok": 3},
    "deep_mixed": {"num_hidden_layers": 5, "first_k_dense_replace": 2, "n_routed_experts": 16, "n_group": 8,
                   "topk_group": 3, "num_experts_per_tok": 4, "n_shared_experts": 2},
    "no_interleave_norm_off": {"rope_interleave": False, "norm_topk_prob": False, "routed_scaling_factor": 1.0},
}


def make_hf_model(overrides: dict, seed: int = 0):
    cfg = transformers.DeepseekV3Config(**{**BASE, **overrides})
    torch.manual_seed(seed)
    model = transformers.DeepseekV3ForCausalLM._from_config(cfg, attn_implementation="eager").float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0, 0.08)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.05 * torch.randn_like(b))
    return model


def hf_logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_hf_saved_model_loads_into_dsv3_with_equal_logits(tmp_path, variant):
    hf = make_hf_model(VARIANTS[variant])
    hf.save_pretrained(tmp_path)
    model = dsv3.load_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = torch.randint(0, 128, (2, 24))
    ref = hf_logits(hf, ids)
    with torch.no_grad():
        out = model(ids).logits
    assert out.shape == (2, 24, 128)
    assert ref.std() > 0.1  # the comparison is not between two near-constant tensors
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("variant", ["base", "yarn", "q_lora_null"])
def test_dsv3_saved_model_loads_into_hf_with_equal_logits(tmp_path, variant):
    hf = make_hf_model(VARIANTS[variant], seed=1)
    hf.save_pretrained(tmp_path / "hf")
    model = dsv3.load_pretrained(tmp_path / "hf")
    with torch.no_grad():  # change every weight so HF can only match by reading what dsv3 wrote
        for p in model.parameters():
            p.mul_(1.05)
    dsv3.save_pretrained(model, tmp_path / "ours", max_shard_bytes=200_000)  # several shards
    assert len(list((tmp_path / "ours").glob("model-*.safetensors"))) > 1
    back = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp_path / "ours", attn_implementation="eager",
                                                              dtype=torch.float32).eval()
    ids = torch.randint(0, 128, (2, 20))
    with torch.no_grad():
        ours = model(ids).logits
    torch.testing.assert_close(hf_logits(back, ids), ours, atol=1e-4, rtol=0)
    assert not torch.allclose(hf_logits(hf, ids), ours, atol=1e-3)  # the scaled weights really were used


def test_dsv3_checkpoint_with_mtp_loads_into_hf(tmp_path):
    """HF has no MTP module for tiny models: it must still load the main model from our checkpoint."""
    cfg = dsv3.get_config("tiny")
    model = dsv3.DeepseekV3(cfg).eval()
    dsv3.save_pretrained(model, tmp_path)
    names = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    layer = f"model.layers.{cfg.num_hidden_layers}"
    for suffix in ("embed_tokens.weight", "enorm.weight", "hnorm.weight", "eh_proj.weight",
                   "shared_head.norm.weight", "shared_head.head.weight", "self_attn.kv_b_proj.weight",
                   "mlp.gate.e_score_correction_bias", "mlp.experts.0.down_proj.weight"):
        assert f"{layer}.{suffix}" in names
    back = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids).logits, model(ids).logits, atol=1e-4, rtol=0)
