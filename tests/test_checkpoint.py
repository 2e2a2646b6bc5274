"""Checkpoint round trips and the errors a bad checkpoint must produce (naming the tensor and the file)."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import dsv3
from dsv3 import checkpoint as ckpt


@pytest.fixture
def model():
    m = dsv3.DeepseekV3(dsv3.get_config("tiny")).eval()
    with torch.no_grad():
        for layer in m.main_layers[1:]:
            layer.mlp.gate.e_score_correction_bias.normal_(0, 0.01)
    return m


def test_round_trip_is_exact_including_mtp_and_bias(tmp_path, model):
    dsv3.save_pretrained(model, tmp_path / "c", max_shard_bytes=100_000)
    back = dsv3.load_pretrained(tmp_path / "c")
    assert back.config == model.config
    for (name, a), b in zip(model.state_dict().items(), back.state_dict().values()):
        assert torch.equal(a, b), name
    ids = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        out, out2 = model(ids), back(ids)
    assert torch.equal(out.logits, out2.logits)
    assert torch.equal(out.mtp_logits[0], out2.mtp_logits[0])


def test_fused_gate_up_is_stored_as_the_official_gate_and_up_tensors(tmp_path, model):
    """The in-memory `gate_up_proj` ([2I, D], [E, 2I, D] for routed experts) is written as the official
    `gate_proj` (its first I rows) and `up_proj` (the last I), per expert; nothing fused reaches the files; and a
    checkpoint whose gate and up tensors are replaced by new ones loads each into its own half."""
    cfg = model.config
    dsv3.save_pretrained(model, tmp_path / "c")
    stored = {}
    for f in (tmp_path / "c").glob("*.safetensors"):
        stored.update(load_file(f))
    assert not [n for n in stored if "gate_up" in n]
    dense, moe = model.model.layers[0].mlp, model.model.layers[1].mlp
    i, i_sh, i_dense = cfg.moe_intermediate_size, cfg.moe_intermediate_size * cfg.n_shared_experts, \
        cfg.intermediate_size
    expect = {"model.layers.0.mlp.gate_proj.weight": dense.gate_up_proj.weight[:i_dense],
              "model.layers.0.mlp.up_proj.weight": dense.gate_up_proj.weight[i_dense:],
              "model.layers.1.mlp.shared_experts.gate_proj.weight": moe.shared_experts.gate_up_proj.weight[:i_sh],
              "model.layers.1.mlp.shared_experts.up_proj.weight": moe.shared_experts.gate_up_proj.weight[i_sh:]}
    for j in range(cfg.n_routed_experts):
        expect[f"model.layers.1.mlp.experts.{j}.gate_proj.weight"] = moe.experts.gate_up_proj[j, :i]
        expect[f"model.layers.1.mlp.experts.{j}.up_proj.weight"] = moe.experts.gate_up_proj[j, i:]
        expect[f"model.layers.1.mlp.experts.{j}.down_proj.weight"] = moe.experts.down_proj[j]
    for name, t in expect.items():
        assert torch.equal(stored[name], t.detach()), name

    new = {n: torch.randn_like(stored[n]) for n in expect}
    _edit(tmp_path / "c", lambda t: t.update({n: v for n, v in new.items() if n in t}))
    back = dsv3.load_pretrained(tmp_path / "c")
    slots = ckpt.checkpoint_slots(back)
    for name, t in new.items():
        assert torch.equal(slots[name].view, t), name
    b_moe = back.model.layers[1].mlp
    assert torch.equal(b_moe.experts.gate_up_proj[3], torch.cat([new["model.layers.1.mlp.experts.3.gate_proj.weight"],
                                                                new["model.layers.1.mlp.experts.3.up_proj.weight"]]))
    assert torch.equal(back.model.layers[0].mlp.gate_up_proj.weight[i_dense:], new["model.layers.0.mlp.up_proj.weight"])


def test_bf16_save_keeps_routing_bias_fp32(tmp_path, model):
    dsv3.save_pretrained(model, tmp_path, dtype=torch.bfloat16)
    tensors = {}
    for f in tmp_path.glob("*.safetensors"):
        tensors.update(load_file(f))
    assert tensors["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    assert tensors["model.layers.1.mlp.experts.3.up_proj.weight"].dtype == torch.bfloat16
    back = dsv3.load_pretrained(tmp_path, dtype=torch.bfloat16)
    assert back.model.layers[1].mlp.gate.e_score_correction_bias.dtype == torch.float32
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"


def _edit(path, fn):
    """Apply fn to the dict of tensors of the shard holding layer 1's tensors; return that shard's name."""
    index = json.loads((path / ckpt.INDEX_FILE).read_text())["weight_map"]
    file = index["model.layers.1.self_attn.o_proj.weight"]
    tensors = load_file(path / file)
    fn(tensors)
    save_file(tensors, path / file)
    return file, index


def test_missing_tensor_is_named(tmp_path, model):
    dsv3.save_pretrained(model, tmp_path)

    def drop(t):
        del t["model.layers.1.self_attn.o_proj.weight"]

    file, index = _edit(tmp_path, drop)
    del index["model.layers.1.self_attn.o_proj.weight"]
    (tmp_path / ckpt.INDEX_FILE).write_text(json.dumps({"weight_map": index}))
    with pytest.raises(dsv3.CheckpointError, match=r"missing 1 tensor\(s\): model\.layers\.1\.self_attn\.o_proj"):
        dsv3.load_pretrained(tmp_path)


def test_extra_tensor_is_named_with_its_file(tmp_path, model):
    dsv3.save_pretrained(model, tmp_path)
    file, index = _edit(tmp_path, lambda t: t.update({"model.layers.1.mlp.surprise.weight": torch.ones(2)}))
    index["model.layers.1.mlp.surprise.weight"] = file
    (tmp_path / ckpt.INDEX_FILE).write_text(json.dumps({"weight_map": index}))
    with pytest.raises(dsv3.CheckpointError, match=rf"model\.layers\.1\.mlp\.surprise\.weight \(in {file}\)"):
        dsv3.load_pretrained(tmp_path)


def test_mis_shaped_tensor_is_named(tmp_path, model):
    dsv3.save_pretrained(model, tmp_path)
    file, _ = _edit(tmp_path, lambda t: t.update({"model.layers.1.mlp.experts.2.down_proj.weight": torch.ones(3, 3)}))
    with pytest.raises(dsv3.CheckpointError,
                       match=rf"model\.layers\.1\.mlp\.experts\.2\.down_proj\.weight in {file} has shape \[3, 3\]"):
        dsv3.load_pretrained(tmp_path)


def test_corrupt_file_is_named(tmp_path, model):
    dsv3.save_pretrained(model, tmp_path, max_shard_bytes=100_000)
    victim = sorted(tmp_path.glob("model-*.safetensors"))[1]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])  # truncated download
    with pytest.raises(dsv3.CheckpointError, match=victim.name):
        dsv3.load_pretrained(tmp_path)
    victim.write_bytes(b"\x00garbage")
    with pytest.raises(dsv3.CheckpointError, match=victim.name):
        dsv3.load_pretrained(tmp_path)


def test_missing_config_and_bad_config_are_clear(tmp_path, model):
    with pytest.raises(dsv3.CheckpointError, match="no config.json"):
        dsv3.load_pretrained(tmp_path)
    dsv3.save_pretrained(model, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["topk_group"] = 9
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(dsv3.ConfigError, match="topk_group"):
        dsv3.load_pretrained(tmp_path)


def test_interrupted_save_keeps_previous_checkpoint(tmp_path, model, monkeypatch):
    dsv3.save_pretrained(model, tmp_path / "c", max_shard_bytes=100_000)
    before = {p.name: p.read_bytes() for p in (tmp_path / "c").iterdir()}
    calls = {"n": 0}
    real_save = ckpt.save_file

    def dying_save(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # killed mid-save
        return real_save(*a, **kw)

    monkeypatch.setattr(ckpt, "save_file", dying_save)
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)
    with pytest.raises(KeyboardInterrupt):
        dsv3.save_pretrained(model, tmp_path / "c", max_shard_bytes=100_000, replace=True)
    after = {p.name: p.read_bytes() for p in (tmp_path / "c").iterdir()}
    assert after == before
    assert [p.name for p in tmp_path.iterdir()] == ["c"]  # no temporary directory left behind
    dsv3.load_pretrained(tmp_path / "c")


def test_mtp_loading_modes(tmp_path, model):
    dsv3.save_pretrained(model, tmp_path / "with")
    assert dsv3.load_pretrained(tmp_path / "with", load_mtp=False).config.num_nextn_predict_layers == 0
    # a checkpoint without the MTP tensors (as transformers saves them)
    no_mtp = dsv3.DeepseekV3(model.config.replace(num_nextn_predict_layers=0))
    dsv3.save_pretrained(no_mtp, tmp_path / "without")
    cfg = json.loads((tmp_path / "without" / "config.json").read_text())
    cfg["num_nextn_predict_layers"] = 1
    (tmp_path / "without" / "config.json").write_text(json.dumps(cfg))
    with pytest.warns(UserWarning, match="no MTP tensors"):
        m = dsv3.load_pretrained(tmp_path / "without")
    assert m.config.num_nextn_predict_layers == 0
    with pytest.raises(dsv3.CheckpointError, match="load_mtp=False"):
        dsv3.load_pretrained(tmp_path / "without", load_mtp=True)


def test_mtp_copies_that_differ_warn(tmp_path, model):
    dsv3.save_pretrained(model, tmp_path)
    index = json.loads((tmp_path / ckpt.INDEX_FILE).read_text())["weight_map"]
    name = "model.layers.3.shared_head.head.weight"
    tensors = load_file(tmp_path / index[name])
    tensors[name] = tensors[name] + 1
    save_file(tensors, tmp_path / index[name])
    with pytest.warns(UserWarning, match="shared_head.head.weight .* differs"):
        dsv3.load_pretrained(tmp_path)


def test_reads_a_single_file_checkpoint_and_a_run_directory(tmp_path, model):
    dsv3.save_pretrained(model, tmp_path / "run" / "checkpoints" / "step-00000010")
    d = tmp_path / "run" / "checkpoints" / "step-00000020"
    dsv3.save_pretrained(model, d)
    tensors = {}
    for f in d.glob("model-*.safetensors"):
        tensors.update(load_file(f))
        f.unlink()
    (d / ckpt.INDEX_FILE).unlink()
    save_file(tensors, d / "model.safetensors")
    assert dsv3.resolve_checkpoint(tmp_path / "run") == d
    dsv3.load_pretrained(d)
    with pytest.raises(ckpt.CheckpointError, match="resolve_checkpoint"):  # a run is not a checkpoint
        dsv3.load_pretrained(tmp_path / "run")
