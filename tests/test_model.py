"""Whole-model behaviour: output shapes, MTP wiring and causality, dtype handling."""

import pytest
import torch

import dsv3


@pytest.fixture
def model():
    cfg = dsv3.get_config("tiny").replace(num_nextn_predict_layers=2)
    m = dsv3.DeepseekV3(cfg).eval()
    m.init_weights(seed=1)
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(5 if p.dim() > 1 else 1)
    return m


def test_output_shapes_and_routing(model):
    ids = torch.randint(0, 256, (2, 11))
    out = model(ids)
    assert out.logits.shape == (2, 11, 256) and out.hidden_states.shape == (2, 11, 64)
    assert [t.shape for t in out.mtp_logits] == [(2, 10, 256), (2, 9, 256)]
    # main MoE layers (1, 2) then the two MTP blocks; loads count K choices per token
    assert len(out.routing) == 4
    assert [int(r.load.sum()) for r in out.routing] == [22 * 2, 22 * 2, 20 * 2, 18 * 2]


def test_mtp_depths_follow_the_paper(model):
    """h^k_i = Block_k(eh_proj([enorm(Emb(t_{i+k})); hnorm(h^{k-1}_i)])), logits via shared_head.norm + head."""
    ids = torch.randint(0, 256, (1, 9))
    with torch.no_grad():
        out = model(ids)
        emb = model.model.embed_tokens(ids)
        h = out.hidden_states
        rope = model.model.rotary_emb(torch.arange(9), h.dtype)
        for k, mod in enumerate(model.mtp_modules, start=1):
            n = 9 - k
            x = mod.eh_proj(torch.cat([mod.enorm(emb[:, k:]), mod.hnorm(h[:, :n])], -1))
            h, _ = mod(h[:, :n], emb[:, k:], rope.narrow(0, n))
            block, _ = dsv3.model.DecoderLayer.forward(mod, x, rope.narrow(0, n))
            torch.testing.assert_close(h, block)
            torch.testing.assert_close(out.mtp_logits[k - 1], model.lm_head(mod.shared_head.norm(h)))


def test_mtp_logits_are_causal(model):
    """Depth-k logits at position i may see tokens up to i+k and nothing later."""
    ids = torch.randint(0, 256, (1, 12))
    changed = ids.clone()
    changed[0, 8] = (ids[0, 8] + 1) % 256
    with torch.no_grad():
        a, b = model(ids), model(changed)
    for k, (la, lb) in enumerate(zip(a.mtp_logits, b.mtp_logits), start=1):
        first_affected = 8 - k
        # (not bit-equal: rows are regrouped by expert, which changes GEMM blocking)
        torch.testing.assert_close(la[:, :first_affected], lb[:, :first_affected], atol=1e-5, rtol=0)
        assert not torch.allclose(la[:, first_affected], lb[:, first_affected], atol=1e-2)
    torch.testing.assert_close(a.logits[:, :8], b.logits[:, :8], atol=1e-5, rtol=0)


def test_bf16_model_runs_and_keeps_fp32_bias():
    model = dsv3.DeepseekV3(dsv3.get_config("tiny"), dtype=torch.bfloat16)
    out = model(torch.randint(0, 256, (1, 5)))
    assert out.logits.dtype == torch.bfloat16
    assert model.model.layers[1].mlp.gate.e_score_correction_bias.dtype == torch.float32


def test_tied_embeddings_round_trip(tmp_path):
    cfg = dsv3.get_config("tiny").replace(tie_word_embeddings=True, num_nextn_predict_layers=0)
    model = dsv3.DeepseekV3(cfg)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    dsv3.save_pretrained(model, tmp_path)
    back = dsv3.load_pretrained(tmp_path)
    ids = torch.randint(0, 256, (1, 6))
    assert torch.equal(back(ids).logits, model(ids).logits)


def test_head_at_positions_equals_the_full_head_at_those_positions(model):
    """`forward(head=False)` then the head on one position per row (`at_positions`, what the engine's prefill
    does): those rows of the full logits."""
    from dsv3.model.transformer import at_positions

    ids = torch.randint(0, 256, (3, 9))
    at = torch.tensor([8, 0, 4])
    with torch.no_grad():
        full = model(ids, mtp=False)
        headless = model(ids, mtp=False, head=False)
        picked = model.lm_head(at_positions(headless.hidden_states, at))
    assert headless.logits is None and picked.shape == (3, model.config.vocab_size)
    torch.testing.assert_close(picked, full.logits[torch.arange(3), at], atol=1e-6, rtol=0)
    assert torch.equal(headless.hidden_states, full.hidden_states)
