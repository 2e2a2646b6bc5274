"""MLA: the naive and absorbed forms against each other and against a from-scratch reference."""

import math

import pytest
import torch

import dsv3
from dsv3.model.mla import MLA
from dsv3.model.rope import RotaryEmbedding


def cfg_for(**kw):
    base = dsv3.get_config("tiny")
    return base.replace(**kw)


def reference_mla(attn: MLA, cfg, x: torch.Tensor) -> torch.Tensor:
    """Textbook MLA for one full causal sequence: per-head K/V expanded, complex-number RoPE, explicit mask."""
    b, t, _ = x.shape
    h, n, p, v = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim

    def rms(z, w):
        return z / torch.sqrt(z.pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps) * w

    if cfg.q_lora_rank is None:
        q = x @ attn.q_proj.weight.T
    else:
        q = rms(x @ attn.q_a_proj.weight.T, attn.q_a_layernorm.weight) @ attn.q_b_proj.weight.T
    q = q.view(b, t, h, n + p)
    kv_a = x @ attn.kv_a_proj_with_mqa.weight.T
    c, k_pe = kv_a[..., : cfg.kv_lora_rank], kv_a[..., cfg.kv_lora_rank :]
    kv = (rms(c, attn.kv_a_layernorm.weight) @ attn.kv_b_proj.weight.T).view(b, t, h, n + v)

    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, p, 2).double() / p))
    rot = torch.polar(torch.ones(t, p // 2, dtype=torch.float64), torch.arange(t).double()[:, None] * inv_freq)

    def rope(z):  # z [..., t, (h,) p] interleaved pairs as complex numbers
        zc = torch.view_as_complex(z.double().reshape(*z.shape[:-1], p // 2, 2).contiguous())
        r = rot if z.dim() == 3 else rot[:, None, :]
        return torch.view_as_real(zc * r).flatten(-2).to(z.dtype)

    q_full = torch.cat([q[..., :n], rope(q[..., n:])], -1)
    k_full = torch.cat([kv[..., :n], rope(k_pe)[:, :, None, :].expand(b, t, h, p)], -1)
    out = torch.empty(b, t, h, v)
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    for head in range(h):
        s = q_full[:, :, head] @ k_full[:, :, head].transpose(1, 2) / math.sqrt(n + p)
        s = s.masked_fill(~causal, float("-inf")).softmax(-1)
        out[:, :, head] = s @ kv[:, :, head, n:]
    return out.flatten(2) @ attn.o_proj.weight.T


@pytest.mark.parametrize("q_lora_rank", [32, None])
def test_naive_and_absorbed_match_reference(q_lora_rank):
    cfg = cfg_for(q_lora_rank=q_lora_rank)
    attn = MLA(cfg)
    for prm in attn.parameters():
        torch.nn.init.normal_(prm, 0, 0.2) if prm.dim() > 1 else torch.nn.init.normal_(prm, 1, 0.1)
    rope = RotaryEmbedding(cfg)
    x = torch.randn(2, 12, cfg.hidden_size)
    cs = rope(torch.arange(12), x.dtype)
    ref = reference_mla(attn, cfg, x)
    naive = attn(x, cs, absorb=False)
    absorbed = attn(x, cs, absorb=True)
    torch.testing.assert_close(naive, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(absorbed, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("yarn", [False, True])
def test_prefill_then_decode_absorbed_equals_naive_full_forward(yarn):
    """Prefill (naive) 7 tokens, then decode 9 more one at a time with the absorbed form over the latent cache:
    every step's logits equal the full naive forward over the whole sequence."""
    cfg = cfg_for(rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8,
                                "mscale": 1.0, "mscale_all_dim": 1.0} if yarn else None)
    model = dsv3.DeepseekV3(cfg).eval()
    model.init_weights(seed=3)
    with torch.no_grad():
        for prm in model.parameters():  # larger weights: attention patterns far from uniform
            prm.mul_(4 if prm.dim() > 1 else 1)
    ids = torch.randint(0, cfg.vocab_size, (3, 16))
    with torch.no_grad():
        full = model(ids, mtp=False).logits
        cache = model.new_cache(batch_size=3, max_len=16)
        steps = [model(ids[:, :7], cache=cache, start_pos=0).logits]
        for pos in range(7, 16):
            steps.append(model(ids[:, pos : pos + 1], cache=cache, start_pos=pos).logits)  # absorbed by default
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=0)
    assert full.std() > 0.5


def test_cached_naive_decode_and_chunked_prefill_match():
    cfg = dsv3.get_config("tiny")
    model = dsv3.DeepseekV3(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 12))
    with torch.no_grad():
        full = model(ids, mtp=False).logits
        cache = model.new_cache(2, 12)
        a = model(ids[:, :5], cache=cache).logits
        b = model(ids[:, 5:9], cache=cache, start_pos=5, absorb=False).logits  # chunk, naive over the cache
        c = model(ids[:, 9:], cache=cache, start_pos=9, absorb=True).logits  # chunk, absorbed
    torch.testing.assert_close(torch.cat([a, b, c], 1), full, atol=1e-5, rtol=0)


def test_cache_holds_only_latent_and_rope_key():
    cfg = dsv3.get_config("tiny")
    cache = dsv3.DeepseekV3(cfg).new_cache(batch_size=2, max_len=10)
    per_token = (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4  # fp32
    assert cache.nbytes == 2 * 10 * per_token * (cfg.num_hidden_layers + cfg.num_nextn_predict_layers)


def test_errors_name_the_problem():
    cfg = dsv3.get_config("tiny")
    model = dsv3.DeepseekV3(cfg)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(torch.zeros(1, cfg.max_position_embeddings + 1, dtype=torch.long))
    with pytest.raises(ValueError, match="cache"):
        model(torch.zeros(1, 4, dtype=torch.long), start_pos=3)


def test_the_cheaper_attention_form_follows_the_flop_count():
    """absorbed iff t(2r - n - v) < r(n + v): decode and short chunks absorbed, long prompts naive."""
    from dsv3.config import get_config
    from dsv3.model.mla import absorbed_is_cheaper

    small, big = get_config("small"), get_config("deepseek-v3-671b")
    assert absorbed_is_cheaper(small, 63) and not absorbed_is_cheaper(small, 64)
    assert absorbed_is_cheaper(big, 170) and not absorbed_is_cheaper(big, 171)
    assert absorbed_is_cheaper(big, 1) and not absorbed_is_cheaper(big, 4096)


def test_fused_absorbed_attention_under_compile_equals_eager():
    """Under torch.compile, with few query rows, `_absorbed` writes its two contractions over the latent as
    broadcast products summed (`FUSED_QUERY_ROWS`); the result equals the eager batched GEMMs for a batch of three
    rows at different positions, two new tokens each (a [B, 1, T, S] mask, as in speculative verification)."""
    from dsv3.model.mla import FUSED_QUERY_ROWS

    torch.manual_seed(0)
    cfg = cfg_for()
    attn = MLA(cfg)
    for prm in attn.parameters():
        torch.nn.init.normal_(prm, 0, 0.2)
    b, t, s = 3, 2, 10
    assert cfg.num_attention_heads * t <= FUSED_QUERY_ROWS
    q_nope = torch.randn(b, t, cfg.num_attention_heads, cfg.qk_nope_head_dim)
    q_pe = torch.randn(b, t, cfg.num_attention_heads, cfg.qk_rope_head_dim)
    latent = torch.randn(b, s, cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    cols = torch.tensor([3, 6, 8])[:, None] + torch.arange(t)  # [B, T] positions of the new tokens
    mask = (torch.arange(s) <= cols[:, :, None])[:, None]  # [B, 1, T, S]
    with torch.no_grad():
        want = attn._absorbed(q_nope, q_pe, latent, mask)
        got = torch.compile(attn._absorbed, fullgraph=True, dynamic=False)(q_nope, q_pe, latent, mask)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("packed", [False, True], ids=["causal", "packed"])
@pytest.mark.parametrize("t, s", [(1, 1), (5, 5), (64, 64), (70, 70), (200, 200), (1, 9), (3, 10), (70, 100)])
def test_block_causal_attention_equals_textbook_attention_and_its_gradients(t, s, packed):
    """`block_causal_attention` (query blocks of 64 rows, each against the keys it sees, own backward) against
    softmax(q k^T * scale + mask) v written out per head in fp64, query i seeing keys 0..s - t + i: output and the
    q, k, v gradients, for whole sequences inside one block, on a block boundary and across a partial last block,
    and for new tokens after s - t cached ones; packed: also a [B, 1, t, s] mask of documents (runs of keys, a
    different split per row), each query seeing only its own document's earlier keys."""
    from dsv3.model.mla import block_causal_attention

    g = torch.Generator().manual_seed(t * 1000 + s)
    q = torch.randn(2, t, 3, 12, generator=g, requires_grad=True)
    k = torch.randn(2, s, 3, 12, generator=g, requires_grad=True)
    v = torch.randn(2, s, 3, 7, generator=g, requires_grad=True)
    d_out = torch.randn(2, t, 3, 7, generator=g)
    visible = torch.arange(s) <= torch.arange(s - t, s)[:, None]  # [t, s] causal
    mask = None
    if packed:  # row 0: documents start at keys s // 3 and s // 2; row 1: one document starting at 2s // 3
        starts = torch.tensor([[0, s // 3, s // 2], [0, 2 * s // 3, 2 * s // 3]])
        doc = (torch.arange(s)[None, :, None] >= starts[:, None, :]).sum(-1)  # [2, s] each key's document
        mask = (doc[:, s - t :, None] == doc[:, None, :])[:, None]  # [2, 1, t, s]: the same document
        visible = visible & mask
    out = block_causal_attention(q, k, v, 0.3, mask)
    grads = torch.autograd.grad(out, (q, k, v), d_out, retain_graph=True)
    again = torch.autograd.grad(out, (q, k, v), d_out)  # a retained graph (zero-bubble schedules) gives the same
    for a, b in zip(grads, again):
        assert torch.equal(a, b)
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    scores = torch.einsum("bthd,bshd->bhts", q64, k64) * 0.3
    ref = torch.einsum("bhts,bshd->bthd", scores.masked_fill(~visible, float("-inf")).softmax(-1), v64)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), d_out.double())
    torch.testing.assert_close(out, ref.float(), atol=2e-6, rtol=0)
    for ours, expect in zip(grads, ref_grads):
        torch.testing.assert_close(ours, expect.float(), atol=1e-5, rtol=0)


def test_training_attention_paths_agree(monkeypatch):
    """MLA's causal forward without a cache takes `block_causal_attention` up to BLOCK_CAUSAL_MAX_LEN tokens on CPU
    and SDPA's flash kernel beyond: the same output and parameter gradients either way (to fp32 rounding); so does
    a prompt's chunk after cached tokens, and packed documents with their mask; per-row cache positions take SDPA."""
    from dsv3.model import mla

    calls = []
    blocks_fn = mla.block_causal_attention
    monkeypatch.setattr(mla, "block_causal_attention", lambda *a: calls.append(1) or blocks_fn(*a))
    cfg = cfg_for()
    attn = MLA(cfg)
    for prm in attn.parameters():
        torch.nn.init.normal_(prm, 0, 0.2) if prm.dim() > 1 else torch.nn.init.normal_(prm, 1, 0.1)
    x = torch.randn(2, 80, cfg.hidden_size)
    cs = RotaryEmbedding(cfg)(torch.arange(80), x.dtype)
    monkeypatch.setattr(mla, "BLOCK_CAUSAL_MAX_LEN", 80)
    out = attn(x, cs)
    g_blocks = torch.autograd.grad(out.square().sum(), list(attn.parameters()))
    assert len(calls) == 1
    monkeypatch.setattr(mla, "BLOCK_CAUSAL_MAX_LEN", 79)
    sdpa = attn(x, cs)
    g_sdpa = torch.autograd.grad(sdpa.square().sum(), list(attn.parameters()))
    assert len(calls) == 1
    torch.testing.assert_close(out, sdpa, atol=1e-5, rtol=0)
    for a, b in zip(g_blocks, g_sdpa):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-5)
    monkeypatch.setattr(mla, "BLOCK_CAUSAL_MAX_LEN", 80)
    with torch.no_grad():
        torch.testing.assert_close(attn(x, cs), out, atol=0, rtol=0)
        assert len(calls) == 2
        cache = torch.zeros(2, 80, cfg.kv_lora_rank + cfg.qk_rope_head_dim)
        attn(x[:, :50], RotaryEmbedding(cfg)(torch.arange(50), x.dtype), cache)
        chunk = attn(x[:, 50:], RotaryEmbedding(cfg)(torch.arange(50, 80), x.dtype), cache, start_pos=50)
        assert len(calls) == 4  # a prompt's chunk after cached tokens is bottom-right causal too
        torch.testing.assert_close(chunk, out[:, 50:], atol=1e-5, rtol=0)
        packed = mla.packed_attention(torch.tensor([[0] * 30 + [1] * 50, [0] * 64 + [1] * 16]))[1]
        in_blocks = attn(x, cs, mask=packed)  # packed documents: the blocks with their mask
        assert len(calls) == 5
        rows = RotaryEmbedding(cfg)(torch.tensor([[50, 51], [40, 41]]), x.dtype)
        attn(x[:, 50:52], rows, cache, start_pos=torch.tensor([50, 40]))  # per-row positions: SDPA with their mask
        assert len(calls) == 5
        monkeypatch.setattr(mla, "BLOCK_CAUSAL_MAX_LEN", 79)
        torch.testing.assert_close(in_blocks, attn(x, cs, mask=packed), atol=1e-5, rtol=0)  # SDPA with the mask
        assert len(calls) == 5
        heads = x.view(2, 80, 4, -1)
        with pytest.raises(ValueError, match="at least as many keys"):
            mla.block_causal_attention(heads, x[:, :10].view(2, 10, 4, -1), heads, 1.0)
        for bad in (packed.repeat(2, 1, 1, 1), packed.float(), packed[:, :, :40], packed[0]):  # batch 4, float, T, 3-D
            with pytest.raises(ValueError, match="the mask must be bool"):
                mla.block_causal_attention(heads, heads, heads, 1.0, bad)
