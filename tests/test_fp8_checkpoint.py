"""FP8 block dequantization (ragged edges included) and loading FP8 checkpoints in the official format."""

import json

import pytest
import torch
from safetensors.torch import load_file

import dsv3
from dsv3.checkpoint import checkpoint_slots
from dsv3.quant import dequantize_blockwise, quantize_blockwise


def reference_dequant(q, scale, block=128):
    """Block by block, the obvious way."""
    out = torch.empty(q.shape, dtype=torch.float32)
    for bi in range(scale.shape[0]):
        for bj in range(scale.shape[1]):
            rows = slice(bi * block, min((bi + 1) * block, q.shape[0]))
            cols = slice(bj * block, min((bj + 1) * block, q.shape[1]))
            out[rows, cols] = q[rows, cols].float() * scale[bi, bj].item()
    return out


@pytest.mark.parametrize("shape", [(192, 300), (576, 200), (576, 7168 // 4), (128, 128), (100, 50), (1, 129)])
def test_dequant_equals_per_block_reference_on_ragged_shapes(shape):
    w = torch.randn(shape) * torch.rand(shape[0], 1) * 3
    q, scale = quantize_blockwise(w)
    assert q.dtype == torch.float8_e4m3fn
    assert tuple(scale.shape) == (-(-shape[0] // 128), -(-shape[1] // 128))
    deq = dequantize_blockwise(q, scale)
    assert torch.equal(deq, reference_dequant(q, scale))  # bit-exact
    # and quantization error per block is within e4m3's half-ulp (2^-4 relative) of each block's amax
    err = (deq - w).abs()
    assert (err <= reference_dequant(torch.ones(shape, dtype=torch.float8_e4m3fn), scale) * 448 * 2**-4).all()


def test_dequant_rejects_mis_shaped_scale():
    q, scale = quantize_blockwise(torch.randn(192, 256))
    with pytest.raises(ValueError, match=r"expected \(2, 2\)"):
        dequantize_blockwise(q, scale[:1])


def fp8_cfg():
    # kv_a_proj_with_mqa is [576, 192] (4.5 x 1.5 blocks), q_b_proj / kv_b_proj ragged too
    return dsv3.get_config("tiny").replace(
        hidden_size=192, q_lora_rank=96, kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=32,
        v_head_dim=48, num_attention_heads=3, intermediate_size=200, moe_intermediate_size=72,
        num_hidden_layers=2, n_routed_experts=4, n_group=2, topk_group=1, num_experts_per_tok=2)


def write_fp8_checkpoint(src, dst):
    """The official FP8 layout, written by dsv3's own writer (the reader is checked independently below)."""
    dsv3.save_pretrained(dsv3.load_pretrained(src), dst, dtype=torch.float8_e4m3fn, max_shard_bytes=1 << 20)


def test_fp8_checkpoint_loads_dequantized_exactly(tmp_path):
    model = dsv3.DeepseekV3(fp8_cfg())
    with torch.no_grad():
        model.model.layers[1].mlp.gate.e_score_correction_bias.normal_(0, 0.01)
    dsv3.save_pretrained(model, tmp_path / "fp32", max_shard_bytes=1 << 20)
    write_fp8_checkpoint(tmp_path / "fp32", tmp_path / "fp8")
    loaded = dsv3.load_pretrained(tmp_path / "fp8", dtype=torch.float32)

    # reference: every tensor of the FP8 files decoded independently (per-block loop for FP8 ones)
    index = json.loads((tmp_path / "fp8" / "model.safetensors.index.json").read_text())["weight_map"]
    stored = {}
    for file in set(index.values()):
        stored.update(load_file(tmp_path / "fp8" / file))
    slots = checkpoint_slots(loaded)
    n_fp8 = 0
    for name, t in stored.items():
        if name.endswith("_scale_inv") or ".layers.2.embed_tokens" in name or "shared_head.head" in name:
            continue
        expect = reference_dequant(t, stored[name + "_scale_inv"]) if t.dtype == torch.float8_e4m3fn else t.float()
        n_fp8 += t.dtype == torch.float8_e4m3fn
        got = slots[name].view  # an expert's row of a stacked tensor, a gate / up half of a fused gate_up_proj
        assert torch.equal(got, expect), name
    assert n_fp8 > 20
    kv_a = stored["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"]
    assert tuple(kv_a.shape) == (576, 192) and kv_a.dtype == torch.float8_e4m3fn

    ids = torch.randint(0, 256, (2, 10))
    with torch.no_grad():
        rel = (loaded(ids).logits - model(ids).logits).norm() / model(ids).logits.norm()
    assert rel < 0.1  # FP8 weights: close to, not equal to, the original model


def test_fp8_tensor_without_scale_is_an_error(tmp_path):
    model = dsv3.DeepseekV3(fp8_cfg())
    dsv3.save_pretrained(model, tmp_path / "fp32")
    write_fp8_checkpoint(tmp_path / "fp32", tmp_path / "fp8")
    index_file = tmp_path / "fp8" / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    del index["weight_map"]["model.layers.0.self_attn.o_proj.weight_scale_inv"]
    index_file.write_text(json.dumps(index))
    with pytest.raises(dsv3.CheckpointError, match=r"model\.layers\.0\.self_attn\.o_proj\.weight .*scale_inv"):
        dsv3.load_pretrained(tmp_path / "fp8")


def test_fp8_checkpoint_keeps_the_official_high_precision_tensors(tmp_path):
    model = dsv3.DeepseekV3(fp8_cfg())
    dsv3.save_pretrained(model, tmp_path, dtype=torch.float8_e4m3fn)
    stored = {}
    for f in tmp_path.glob("*.safetensors"):
        stored.update(load_file(f))
    assert stored["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert stored["lm_head.weight"].dtype == torch.bfloat16
    assert stored["model.layers.1.mlp.gate.weight"].dtype == torch.bfloat16
    assert stored["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    assert stored["model.layers.0.input_layernorm.weight"].dtype == torch.bfloat16
    assert stored["model.layers.2.eh_proj.weight"].dtype == torch.bfloat16
    assert stored["model.layers.1.mlp.experts.3.up_proj.weight"].dtype == torch.float8_e4m3fn
    assert stored["model.layers.1.mlp.experts.3.up_proj.weight_scale_inv"].shape == (1, 2)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["quantization_config"]["weight_block_size"] == [128, 128]
    # converting back to bf16 drops the quantization_config (the weights are no longer FP8)
    dsv3.save_pretrained(dsv3.load_pretrained(tmp_path), tmp_path / "bf16", dtype=torch.bfloat16)
    assert "quantization_config" not in json.loads((tmp_path / "bf16" / "config.json").read_text())


def test_fp8_checkpoint_loads_in_transformers(tmp_path):
    """transformers 5.23 dequantizes FP8 checkpoints on CPU with block = rows // scale_rows, which is wrong for
    ragged shapes (192 / 576 rows); so this model has every matrix dimension a multiple of 128."""
    import accelerate  # noqa: F401  (transformers needs it to load FP8 checkpoints)
    import transformers

    cfg = dsv3.get_config("tiny").replace(
        hidden_size=256, q_lora_rank=128, kv_lora_rank=128, qk_rope_head_dim=128, qk_nope_head_dim=64,
        v_head_dim=128, num_attention_heads=2, intermediate_size=256, moe_intermediate_size=128,
        num_hidden_layers=2, num_nextn_predict_layers=0)
    dsv3.save_pretrained(dsv3.DeepseekV3(cfg), tmp_path, dtype=torch.float8_e4m3fn)
    # on CPU transformers dequantizes to bf16; load ours the same way to compare like with like
    ours = dsv3.load_pretrained(tmp_path, dtype=torch.bfloat16).float().eval()
    hf = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).float().eval()
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids).logits, ours(ids).logits, atol=1e-4, rtol=0)
