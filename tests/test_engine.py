"""Generation engine: cached decode vs recompute, batching, MTP speculation, the acceptance rule, errors."""

import pytest
import torch

import dsv3
from dsv3.infer import Engine, GenerationError, SamplingParams, speculative_accept
from dsv3.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def trained(trained_run):
    ckpt = dsv3.resolve_checkpoint(trained_run)
    return dsv3.load_pretrained(ckpt).eval(), load_tokenizer(ckpt)


def prompts(tok):
    texts = ["KING.\nthe", "LORD.\nwhat shall we do now", "FOOL", "KING.\nmy good lord, sweet gentle friend"]
    return [tok.encode(t).ids for t in texts]


def recompute_greedy(model, prompt, n):
    """Reference: no cache, the full sequence re-run for every new token."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]), mtp=False).logits[0, -1].argmax()))
    return ids[len(prompt):]


def test_per_row_positions_match_separate_sequences(trained):
    """Rows of different lengths in one decode step (per-row positions) equal each sequence run alone."""
    model, tok = trained
    ps = prompts(tok)[:3]
    cache = model.new_cache(3, 64)
    with torch.no_grad():
        for i, p in enumerate(ps):
            model(torch.tensor([p]), cache=cache.rows(i, i + 1))
        nxt = torch.tensor([[5], [6], [7]])
        batched = model(nxt, cache=cache, start_pos=torch.tensor([len(p) for p in ps]), mtp=False).logits[:, 0]
        for i, p in enumerate(ps):
            alone = model(torch.tensor([p + [5 + i]]), mtp=False).logits[0, -1]
            torch.testing.assert_close(batched[i], alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("batch", [1, 4])
def test_cached_greedy_equals_full_recompute(trained, batch):
    model, tok = trained
    ps = prompts(tok)[:batch]
    engine = Engine(model, tok, max_batch=batch, max_len=128)
    reqs = engine.generate(ps, SamplingParams(max_new_tokens=12, temperature=0))
    for r, p in zip(reqs, ps):
        assert r.output == recompute_greedy(model, p, 12)
        assert r.finish_reason == "length"


@pytest.mark.parametrize("batch", [1, 4])
def test_speculative_greedy_equals_plain_greedy(trained, batch):
    model, tok = trained
    ps = prompts(tok)[:batch]
    params = SamplingParams(max_new_tokens=24, temperature=0)
    plain = Engine(model, tok, max_batch=batch, max_len=128).generate(ps, params)
    spec_engine = Engine(model, tok, max_batch=batch, max_len=128, speculative=True)
    spec = spec_engine.generate(ps, params)
    for a, b in zip(plain, spec):
        assert a.output == b.output
    assert spec_engine.stats["drafted"] > 0
    assert spec_engine.acceptance_rate > 0.2  # the trained MTP module drafts usefully
    # fewer main-model forwards than tokens: speculation did save steps
    assert spec_engine.stats["decode_steps"] < plain[0].params.max_new_tokens - 1


def test_continuous_batching_with_joins_and_leaves(trained):
    """More requests than slots, different lengths: each result equals running that request alone."""
    model, tok = trained
    ps = prompts(tok)
    lengths = [3, 17, 9, 25, 5, 11]
    engine = Engine(model, tok, max_batch=2, max_len=128, speculative=True)
    reqs = [engine.submit(ps[i % 4], SamplingParams(max_new_tokens=n, temperature=0)) for i, n in enumerate(lengths)]
    while not all(r.done for r in reqs):
        engine.step()
        assert len(engine.running) <= 2
    for i, r in enumerate(reqs):
        alone = Engine(model, tok, max_batch=1, max_len=128).generate(
            [ps[i % 4]], SamplingParams(max_new_tokens=lengths[i], temperature=0))[0]
        assert r.output == alone.output and len(r.output) == lengths[i]


def test_sampling_is_seeded_and_speculation_keeps_it_valid(trained):
    model, tok = trained
    p = prompts(tok)[1]
    params = SamplingParams(max_new_tokens=20, temperature=0.9, top_k=20, top_p=0.95, seed=7)
    a = Engine(model, tok, max_batch=1, max_len=128).generate([p], params)[0].output
    b = Engine(model, tok, max_batch=1, max_len=128).generate([p], params)[0].output
    assert a == b
    c = Engine(model, tok, max_batch=1, max_len=128, speculative=True).generate([p], params)[0].output
    assert len(c) == 20 and all(0 <= t < model.config.vocab_size for t in c)


def test_speculative_acceptance_rule_keeps_the_distribution():
    """Draft from q, accept/resample with the rule: the kept token must follow p (vocabulary of 5)."""
    p = torch.tensor([0.05, 0.4, 0.25, 0.2, 0.1])
    q = torch.tensor([0.3, 0.1, 0.1, 0.4, 0.1])
    gen = torch.Generator().manual_seed(0)
    n = 40_000
    counts = torch.zeros(5)
    accepted = 0
    for _ in range(n):
        d = int(torch.multinomial(q, 1, generator=gen))
        ok, tok = speculative_accept(p, q, d, gen)
        counts[tok] += 1
        accepted += ok
    freq = counts / n
    # standard error <= 0.0025 per cell; 0.012 is ~5 sigma
    assert (freq - p).abs().max() < 0.012, freq
    # acceptance probability is sum_x min(p, q) = 0.05+0.1+0.1+0.2+0.1 = 0.55
    assert abs(accepted / n - 0.55) < 0.012


def test_stop_ids_and_strings(trained):
    model, tok = trained
    p = prompts(tok)[0]
    free = Engine(model, tok, max_batch=1, max_len=128).generate([p], SamplingParams(max_new_tokens=30,
                                                                                      temperature=0))[0]
    stop_tok = free.output[4]
    r = Engine(model, tok, max_batch=1, max_len=128).generate(
        [p], SamplingParams(max_new_tokens=30, temperature=0, stop_ids=(stop_tok,)))[0]
    assert r.finish_reason == "stop" and r.output == free.output[: free.output.index(stop_tok)]
    needle = free.text[8:11]
    r = Engine(model, tok, max_batch=1, max_len=128).generate(
        [p], SamplingParams(max_new_tokens=30, temperature=0, stop_strings=(needle,)))[0]
    assert r.finish_reason == "stop" and r.text == free.text[: free.text.index(needle)]


def test_streamed_text_equals_final_text(trained):
    model, tok = trained
    pieces = []
    engine = Engine(model, tok, max_batch=1, max_len=128, speculative=True)
    req = engine.submit(prompts(tok)[1], SamplingParams(max_new_tokens=25, temperature=0),
                        on_update=lambda r, delta: pieces.append(delta))
    while not req.done:
        engine.step()
    assert "".join(pieces) == req.text and len(pieces) > 3


def test_errors_name_the_problem(trained):
    model, tok = trained
    engine = Engine(model, tok, max_batch=1, max_len=32)
    with pytest.raises(GenerationError, match="exceeds the context of 32"):
        engine.submit([1] * 20, SamplingParams(max_new_tokens=20))
    with pytest.raises(GenerationError, match="max_new_tokens"):
        engine.submit([1], SamplingParams(max_new_tokens=0))
    with pytest.raises(GenerationError, match="empty"):
        engine.submit([], SamplingParams())
    with pytest.raises(GenerationError, match="top_p"):
        engine.submit([1], SamplingParams(top_p=1.5))
    no_mtp = dsv3.DeepseekV3(dsv3.get_config("tiny").replace(num_nextn_predict_layers=0))
    with pytest.raises(GenerationError, match="MTP"):
        Engine(no_mtp, speculative=True)
