"""GGUF export (`dsv3.gguf_export`, `dsv3 convert --format gguf`) held to llama.cpp's `deepseek2` conventions.

Three independent checks: every tensor name is one the `gguf` package lists for DEEPSEEK2; every shape is the one
llama.cpp's loader asks for (`llama_model_deepseek2::load_arch_tensors`, written out below in ggml's `ne` order);
and a numpy forward pass written from llama.cpp's graph (`tests/gguf_reference.py`), reading only the file, gives
dsv3's logits.
"""

from __future__ import annotations

import json
import re

import gguf
import numpy as np
import pytest
import torch

import dsv3
from dsv3.cli import main
from dsv3.gguf_export import GGUFExportError, export_gguf, llama_cpp_limits
from dsv3.tokenizer import PLAIN_CHAT_TEMPLATE, ChatTemplate
from gguf_reference import GGUFReference  # tests/ is on sys.path (pytest rootdir-relative import)


def _checkpoint(tmp_path, dataset, name="c", bias=True, **overrides):
    """A random tiny model (selection bias made non-zero so that it matters) saved with the dataset's tokenizer."""
    cfg = dsv3.get_config("tiny").replace(vocab_size=320, **overrides).validate()
    torch.manual_seed(1)
    model = dsv3.DeepseekV3(cfg).eval()
    if bias:
        for layer in model.model.layers:
            if layer.is_moe:
                layer.mlp.gate.e_score_correction_bias.copy_(torch.randn_like(layer.mlp.gate.e_score_correction_bias)
                                                             * 0.05)
    path = tmp_path / name
    dsv3.save_pretrained(model, path, extra_files={"tokenizer.json": (dataset / "tokenizer.json").read_bytes()})
    return path, model


def _logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].double().numpy()


def _ne(shape):
    return [int(d) for d in shape]


def _expected_ne(meta: dict, name: str) -> list[int]:
    """The dims llama.cpp's deepseek2 loader creates `name` with (ggml ne order), from the file's own metadata."""
    a = "deepseek2."
    d, v, h = meta[a + "embedding_length"], meta[a + "vocab_size"], meta[a + "attention.head_count"]
    r, q = meta[a + "attention.kv_lora_rank"], meta[a + "attention.q_lora_rank"]
    dk, dv = meta[a + "attention.key_length_mla"], meta[a + "attention.value_length_mla"]
    p, e = meta[a + "rope.dimension_count"], meta.get(a + "expert_count", 0)
    ff, ffe = meta[a + "feed_forward_length"], meta[a + "expert_feed_forward_length"]
    shared = meta[a + "expert_shared_count"]
    table = {
        "token_embd.weight": [d, v], "output_norm.weight": [d], "output.weight": [d, v],
        "attn_norm.weight": [d], "attn_q_a_norm.weight": [q], "attn_kv_a_norm.weight": [r],
        "attn_q_a.weight": [d, q], "attn_q_b.weight": [q, h * dk], "attn_q.weight": [d, h * dk],
        "attn_kv_a_mqa.weight": [d, r + p], "attn_k_b.weight": [dk - p, r, h], "attn_v_b.weight": [r, dv, h],
        "attn_output.weight": [h * dv, d], "ffn_norm.weight": [d],
        "ffn_gate.weight": [d, ff], "ffn_down.weight": [ff, d], "ffn_up.weight": [d, ff],
        "ffn_gate_inp.weight": [d, e], "exp_probs_b.bias": [e],
        "ffn_down_exps.weight": [ffe, d, e], "ffn_gate_exps.weight": [d, ffe, e], "ffn_up_exps.weight": [d, ffe, e],
        "ffn_gate_shexp.weight": [d, ffe * shared], "ffn_down_shexp.weight": [ffe * shared, d],
        "ffn_up_shexp.weight": [d, ffe * shared],
    }
    return table[re.sub(r"^blk\.\d+\.", "", name)]


def _required(meta: dict) -> set[str]:
    """The tensors llama.cpp's deepseek2 loader requires (created without TENSOR_NOT_REQUIRED) for this metadata."""
    a = "deepseek2."
    names = {"token_embd.weight", "output_norm.weight", "output.weight"}
    for i in range(meta[a + "block_count"]):
        b = f"blk.{i}."
        names |= {b + s for s in ("attn_norm.weight", "attn_kv_a_norm.weight", "attn_kv_a_mqa.weight",
                                   "attn_k_b.weight", "attn_v_b.weight", "attn_output.weight", "ffn_norm.weight")}
        q = ("attn_q_a_norm.weight", "attn_q_a.weight", "attn_q_b.weight") if meta[a + "attention.q_lora_rank"] else (
            "attn_q.weight",)
        names |= {b + s for s in q}
        if i < meta[a + "leading_dense_block_count"]:
            names |= {b + s for s in ("ffn_gate.weight", "ffn_down.weight", "ffn_up.weight")}
        else:
            names |= {b + s for s in ("ffn_gate_inp.weight", "ffn_down_exps.weight", "ffn_gate_exps.weight",
                                       "ffn_up_exps.weight", "ffn_gate_shexp.weight", "ffn_down_shexp.weight",
                                       "ffn_up_shexp.weight")}
    return names


def test_names_and_shapes_are_llama_cpp_deepseek2(tmp_path, dataset):
    path, _ = _checkpoint(tmp_path, dataset)
    out = export_gguf(path, tmp_path / "m.gguf")
    reader = gguf.GGUFReader(str(out))
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert meta["general.architecture"] == "deepseek2"
    allowed = [gguf.TENSOR_NAMES[t] for t in gguf.MODEL_TENSORS[gguf.MODEL_ARCH.DEEPSEEK2]]
    patterns = [re.compile(re.escape(n).replace(r"\{bid\}", r"\d+") + r"\.(weight|bias)$") for n in allowed]
    names = set()
    for t in reader.tensors:
        assert any(p.match(t.name) for p in patterns), f"{t.name} is not a DEEPSEEK2 tensor in gguf's tables"
        assert _ne(t.shape) == _expected_ne(meta, t.name), t.name
        names.add(t.name)
        if len(t.shape) == 1 or "ffn_gate_inp" in t.name:
            assert t.tensor_type == gguf.GGMLQuantizationType.F32, t.name
    assert _required(meta) <= names, sorted(_required(meta) - names)
    cfg = dsv3.get_config(path)
    assert meta["deepseek2.block_count"] == cfg.num_hidden_layers  # the MTP module is left out
    assert not any(n.startswith(f"blk.{cfg.num_hidden_layers}.") for n in names)
    assert meta["deepseek2.expert_gating_func"] == int(gguf.ExpertGatingFuncType.SIGMOID)
    assert meta["deepseek2.expert_group_count"] == cfg.n_group
    assert meta["deepseek2.expert_group_used_count"] == cfg.topk_group
    assert meta["deepseek2.expert_weights_scale"] == pytest.approx(cfg.routed_scaling_factor)
    assert meta["deepseek2.attention.head_count_kv"] == 1
    # the tokenizer: byte-level BPE with its merges, ids and a chat template llama.cpp can render
    tok = json.loads((dataset / "tokenizer.json").read_text())
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "gpt-2"
    tokens = meta["tokenizer.ggml.tokens"]
    assert len(tokens) == cfg.vocab_size
    assert all(tokens[i] == t for t, i in tok["model"]["vocab"].items())
    assert tokens[-1] == f"[PAD{cfg.vocab_size - 1}]"  # vocab_size 320 > the tokenizer's 300
    assert len(meta["tokenizer.ggml.merges"]) == len(tok["model"]["merges"])
    assert meta["tokenizer.chat_template"] == PLAIN_CHAT_TEMPLATE


@pytest.mark.parametrize("overrides", [
    {},  # tiny: 2 layers (1 dense, 1 MoE), 8 experts in 4 groups, top-2 groups, q_lora
    {"q_lora_rank": None, "n_group": 1, "topk_group": 1, "num_nextn_predict_layers": 0},
    {"rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "beta_fast": 32,
                      "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707}, "max_position_embeddings": 64},
    {"scoring_func": "softmax", "topk_method": "greedy", "n_group": 1, "topk_group": 1, "norm_topk_prob": False,
     "routed_scaling_factor": 1.0, "tie_word_embeddings": True},
], ids=["tiny", "full-rank-q-no-groups", "yarn", "softmax-tied"])
def test_numpy_forward_over_the_file_equals_dsv3(tmp_path, dataset, overrides):
    """A forward pass over the GGUF tensors with llama.cpp's conventions gives dsv3's logits (fp32 file)."""
    path, model = _checkpoint(tmp_path, dataset, bias=overrides.get("scoring_func") != "softmax", **overrides)
    ids = [int(i) for i in torch.randint(0, 300, (40 if "rope_scaling" not in overrides else 60,))]
    ref = GGUFReference(export_gguf(path, tmp_path / "m.gguf"))
    want = _logits(model, ids)
    got = ref.logits(ids)
    assert np.abs(want).max() > 0.5  # logits that carry signal, so that the tolerance means something
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)


@pytest.mark.parametrize("dtype,storage,tol", [("bf16", gguf.GGMLQuantizationType.BF16, 0.01),
                                               ("fp16", gguf.GGMLQuantizationType.F16, 0.0015)])
def test_half_precision_files_through_the_cli(tmp_path, dataset, dtype, storage, tol):
    path, model = _checkpoint(tmp_path, dataset)
    out = tmp_path / "m.gguf"
    assert main(["convert", str(path), "--out", str(out), "--format", "gguf", "--dtype", dtype]) == 0
    reader = gguf.GGUFReader(str(out))
    kinds = {t.name: t.tensor_type for t in reader.tensors}
    assert kinds["blk.1.ffn_gate_exps.weight"] == storage and kinds["token_embd.weight"] == storage
    assert kinds["blk.1.ffn_gate_inp.weight"] == gguf.GGMLQuantizationType.F32
    ids = list(range(5, 37))
    np.testing.assert_allclose(GGUFReference(out).logits(ids), _logits(model, ids), rtol=0, atol=tol)


def test_existing_target_is_refused_and_untouched(tmp_path, dataset, capsys):
    path, _ = _checkpoint(tmp_path, dataset)
    out = tmp_path / "m.gguf"
    out.write_bytes(b"mine")
    with pytest.raises(GGUFExportError, match="exists"):
        export_gguf(path, out)
    assert main(["convert", str(path), "--out", str(out), "--format", "gguf"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert out.read_bytes() == b"mine"
    assert main(["convert", str(path), "--out", str(out), "--format", "gguf", "--overwrite"]) == 0
    moved = [p for p in tmp_path.iterdir() if p.name.startswith("m.gguf.old-")]
    assert len(moved) == 1 and moved[0].read_bytes() == b"mine"  # moved aside, never deleted
    assert gguf.GGUFReader(str(out)).fields["general.architecture"].contents() == "deepseek2"
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []  # no temporary file left


def test_a_pre_tokenizer_llama_cpp_would_split_differently_is_refused(tmp_path, dataset):
    path, _ = _checkpoint(tmp_path, dataset)
    spec = json.loads((path / "tokenizer.json").read_text())
    spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True}, spec["pre_tokenizer"]]}
    (path / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(GGUFExportError, match="pre-tokenizer"):
        export_gguf(path, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


def test_bad_requests_name_the_culprit(tmp_path, dataset, capsys):
    path, _ = _checkpoint(tmp_path, dataset)
    assert main(["convert", str(path), "--out", str(tmp_path / "x.gguf"), "--format", "gguf", "--dtype", "fp8"]) == 2
    assert "--dtype fp8" in capsys.readouterr().err
    assert main(["convert", str(path), "--out", str(tmp_path), "--format", "gguf"]) == 2
    assert "is a directory" in capsys.readouterr().err
    with pytest.raises(GGUFExportError, match="storage"):
        export_gguf(path, tmp_path / "y.gguf", storage="q4")
    assert not (tmp_path / "x.gguf").exists() and not (tmp_path / "y.gguf").exists()


@pytest.mark.parametrize("overrides,field", [
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling.type"),
    ({"rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "beta_fast": 32,
                       "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 0.0}}, "rope_scaling.mscale"),
    ({"scoring_func": "softmax", "topk_method": "greedy"}, "scoring_func"),  # softmax with a real group limit
])
def test_configs_llama_cpp_would_run_differently_are_refused(overrides, field):
    cfg = dsv3.get_config("tiny").replace(**overrides).validate()
    with pytest.raises(GGUFExportError, match=re.escape(field)):
        llama_cpp_limits(cfg)


@pytest.mark.parametrize("messages", [
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi\nthere"},
     {"role": "assistant", "content": "yo"}, {"role": "user", "content": "again"}],
    [{"role": "USER", "content": ""}],
])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_plain_chat_template_as_jinja_renders_as_the_plain_template(messages, add_generation_prompt):
    """The template written into GGUF files for checkpoints without one renders exactly as dsv3's plain one."""
    want = ChatTemplate(None).render(messages, add_generation_prompt=add_generation_prompt)
    got = ChatTemplate(None, template=PLAIN_CHAT_TEMPLATE).render(messages, add_generation_prompt=add_generation_prompt)
    assert got == want
