"""Generation engine: cached decode vs recompute, batching, MTP speculation, the acceptance rule, errors."""

import copy

import pytest
import torch

import dsv3
from dsv3.infer import Engine, GenerationError, SamplingParams, speculative_accept
from dsv3.infer.engine import _probs, _sample
from dsv3.infer.head import DecodeHead, DraftHead
from dsv3.tokenizer import TokenizerError, frequent_token_ids, load_tokenizer


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


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("k", [2, 3])
def test_chained_drafts_greedy_equals_plain_greedy(trained, batch, k):
    """k drafts chained through the one MTP module: the same tokens as plain greedy decoding."""
    model, tok = trained
    ps = prompts(tok)[:batch]
    params = SamplingParams(max_new_tokens=24, temperature=0)
    plain = Engine(model, tok, max_batch=batch, max_len=128).generate(ps, params)
    engine = Engine(model, tok, max_batch=batch, max_len=128, speculative=True, draft_tokens=k)
    for a, b in zip(plain, engine.generate(ps, params)):
        assert a.output == b.output
    assert engine.stats["drafted"] % k == 0 and engine.stats["accepted"] > 0
    assert sum(engine.accepted_at) == engine.stats["accepted"]
    assert engine.accepted_at[0] >= engine.accepted_at[-1]  # a later draft is reached only after the earlier


def test_chained_drafts_up_to_the_context_limit(trained, monkeypatch):
    """Prompts + outputs filling the engine's whole context with k = 3 and every draft accepted (forced: the
    case that moves a row furthest, k + 1 positions in its last step): no write past a cache row or the model's
    context, every request ends at its length."""
    model, tok = trained
    ps = [[1] * n for n in (5, 8, 11, 14)]
    max_len = 40
    monkeypatch.setattr(Engine, "_accept", lambda self, req, logits, greedy: list(req.slot.drafts) + [greedy[-1]])
    engine = Engine(model, tok, max_batch=4, max_len=max_len, speculative=True, draft_tokens=3)
    lengths = [max_len - len(p) - i for p in ps for i in range(4)]  # every residue of the 4-token steps
    reqs = [engine.submit(ps[j // 4], SamplingParams(max_new_tokens=n, temperature=0))
            for j, n in enumerate(lengths)]
    while not all(r.done for r in reqs):
        engine.step()
    assert [len(r.output) for r in reqs] == lengths


def test_same_seed_same_tokens_alone_and_in_a_batch(trained):
    """A request's tokens depend on its seed, not on the requests it shares a batch with, whose sampling
    parameters differ (a greedy row beside sampled ones with their own temperature, top-k or top-p)."""
    model, tok = trained
    ps = prompts(tok)
    params = [SamplingParams(max_new_tokens=16, temperature=0.9, top_k=40, seed=100),
              SamplingParams(max_new_tokens=16, temperature=0),
              SamplingParams(max_new_tokens=16, temperature=0.7, top_p=0.9, seed=102),
              SamplingParams(max_new_tokens=16, temperature=1.2, seed=103)]
    for speculative in (False, True):
        engine = Engine(model, tok, max_batch=4, max_len=128, speculative=speculative)
        batched = [engine.submit(p, sp) for p, sp in zip(ps, params)]
        while not all(r.done for r in batched):
            engine.step()
        for p, sp, r in zip(ps, params, batched):
            alone = Engine(model, tok, max_batch=1, max_len=128, speculative=speculative).generate([p], sp)[0]
            assert alone.output == r.output


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
    spec = [Engine(model, tok, max_batch=1, max_len=128, speculative=True).generate([p], params)[0].output
            for _ in range(2)]
    assert spec[0] == spec[1] and len(spec[0]) == 20 and all(0 <= t < model.config.vocab_size for t in spec[0])


def flattened_draft(model):
    """A copy of `model` whose MTP draft distribution q is flatter than the main model's p (the MTP head's norm
    gain x0.3). Speculative sampling must stay exact for any q; with a poor draft a wrong rule shows plainly
    (with the trained draft most drafts are accepted, and rejections, where wrong rules differ, are rare)."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        model.mtp_modules[0].shared_head.norm.weight.mul_(0.3)
    return model


def check_speculative_sampling_statistics(model, tok, k: int = 1, n_tokens: int = 100, temperature: float = 1.0,
                                          **engine_options) -> dict:
    """Speculative sampling with k chained drafts at temperature > 0 (sixteen requests, fixed seeds), checked
    against the main model's distributions p recomputed without cache over the finished sequences and the draft
    distributions q the engine sampled each draft from (recorded before every decode step):
    - bookkeeping: every step verified k drafts and emitted a + 1 tokens (a accepted, then a correction or a
      bonus); the per-request and engine counts and `acceptance_rate` agree with those steps;
    - acceptance: a draft d_i ~ q_i that is reached (d_1..d_{i-1} accepted) for a token whose main-model
      distribution is p_i is kept with probability sum_x min(p_i(x), q_i(x)) (Leviathan et al. 2023), so the
      accepted count must lie within 4 sigma of the sum of those probabilities over the reached drafts (a rule
      keeping too many or too few fails);
    - distribution: every emitted token t_j follows the main model's p_j whatever the drafts, so sums of
      f_j(t_j) must lie within 4 sigma of their expectations under p, for f = log p over all tokens and, sensitive
      to the draft leaking into the output, f = q_i (the draft's probability) over the tokens a verification
      decided.
    The draft here is deliberately poor (`flattened_draft`), so that a wrong rule shows: keeping every draft,
    accepting with min(1, q/p), or resampling rejections from p instead of max(0, p - q) each fail.
    Raises AssertionError otherwise; returns the statistics (sums, expectations, sigmas)."""
    engine = Engine(model, tok, max_batch=16, max_len=128, speculative=True, draft_tokens=k, **engine_options)
    reqs = [engine.submit(p, SamplingParams(max_new_tokens=n_tokens, temperature=temperature, seed=11 + i))
            for i, p in enumerate(prompts(tok) * 4)]
    # per request and decode step: (tokens emitted before it, the drafts' q, tokens it emitted, whether it finished)
    steps = {r.id: [] for r in reqs}
    decode_step = engine._speculative_step

    def recording_step():  # after the prefills, so a request's first verification is recorded too
        before = {r.id: (len(r.output), list(r.slot.draft_probs)) for r in engine.running}
        decode_step()
        for r in reqs:
            if r.id in before:
                n, qs = before[r.id]
                steps[r.id].append((n, qs, len(r.output) - n, r.done))

    engine._speculative_step = recording_step
    while not all(r.done for r in reqs):
        engine.step()
    vocab = model.config.vocab_size
    accepted = expected = variance = 0.0
    log_p = log_p_mean = log_p_var = 0.0
    draft_p = draft_p_mean = draft_p_var = 0.0
    for r in reqs:
        assert len(r.output) == n_tokens and all(0 <= t < vocab for t in r.output)
        assert r.drafted == k * len(steps[r.id]), (r.drafted, steps[r.id])
        seq = torch.tensor([r.prompt + r.output])
        with torch.no_grad():
            out = model(seq, mtp=False)
        p_all = (out.logits[0].double() / temperature).softmax(-1)  # p_all[j]: distribution of token j + 1
        n_prompt = len(r.prompt)
        kept = 0
        for emitted_before, qs, emitted, finished in steps[r.id]:
            assert 1 <= emitted <= k + 1 and len(qs) == k, steps[r.id]
            kept += emitted - 1
            if finished and emitted_before + emitted == n_tokens:
                continue  # cut at max_new_tokens: how many drafts the rule kept is not seen
            a = emitted - 1
            for i in range(1, min(a + 1, k) + 1):  # the reached drafts
                j = n_prompt + emitted_before - 1 + i  # index in seq of the token draft i proposed
                p, q = p_all[j - 1], qs[i - 1].double()
                alpha = float(torch.minimum(p, q).sum())
                accepted += i <= a
                expected += alpha
                variance += alpha * (1 - alpha)
                mean = float((p * q).sum())
                draft_p += float(q[seq[0, j]])
                draft_p_mean += mean
                draft_p_var += float((p * q.square()).sum()) - mean**2
        assert 0 <= r.accepted - kept <= k, (r.accepted, kept)  # > 0: the last step's drafts, kept but cut
        for j in range(n_prompt, seq.shape[1]):  # every output token, the prefill's first one included
            p = p_all[j - 1]
            lp = p.clamp(min=1e-300).log()
            mean = float((p * lp).sum())
            log_p += float(lp[seq[0, j]])
            log_p_mean += mean
            log_p_var += float((p * lp.square()).sum()) - mean**2
    stats = engine.stats
    assert stats["drafted"] == sum(r.drafted for r in reqs) and stats["accepted"] == sum(r.accepted for r in reqs)
    assert engine.acceptance_rate == stats["accepted"] / stats["drafted"]
    assert 0 <= engine.acceptance_rate <= 1
    assert abs(accepted - expected) < 4 * variance**0.5, \
        f"{accepted:.0f} drafts accepted, the rule keeps {expected:.1f} +- {variance**0.5:.1f}"
    assert abs(log_p - log_p_mean) < 4 * log_p_var**0.5, \
        f"log-likelihood of the output {log_p:.1f}, expected {log_p_mean:.1f} +- {log_p_var**0.5:.1f} under p"
    assert abs(draft_p - draft_p_mean) < 4 * draft_p_var**0.5, \
        f"draft probability of the verified tokens {draft_p:.2f}, expected {draft_p_mean:.2f} " \
        f"+- {draft_p_var**0.5:.2f} under p"
    return {"accepted": (accepted, expected, variance**0.5), "log_p": (log_p, log_p_mean, log_p_var**0.5),
            "draft_p": (draft_p, draft_p_mean, draft_p_var**0.5)}


@pytest.mark.parametrize("k", [1, 3])
def test_speculative_sampling_keeps_the_main_models_distribution(trained, k):
    model, tok = trained
    check_speculative_sampling_statistics(flattened_draft(model), tok, k=k)


def test_draft_head_computes_only_its_tokens():
    """DraftHead: the full head's logits at its ids (the same product up to summation order), -inf elsewhere; a
    bad vocabulary is refused."""
    weight = torch.randn(50, 16)
    ids = [3, 7, 0, 49, 20]
    h = torch.randn(4, 16)
    out = DraftHead(weight, ids)(h)
    assert out.shape == (4, 50)
    torch.testing.assert_close(out[:, sorted(ids)], h @ weight[sorted(ids)].T, atol=1e-5, rtol=1e-5)
    rest = [i for i in range(50) if i not in ids]
    assert torch.isneginf(out[:, rest]).all()
    for bad in ([], [1, 1], [50], [-1]):
        with pytest.raises(ValueError, match="draft vocabulary"):
            DraftHead(weight, bad)


def test_frequent_token_ids_follow_the_merge_order():
    """A hand-made BPE: merges a+b -> ab, then ab+c -> abc. Ranked a, b (before the first merge using them), ab,
    c (before its merge), abc, then z (in no merge); the special token only when kept."""
    from tokenizers import AddedToken, Tokenizer
    from tokenizers.models import BPE, WordLevel

    vocab = {"<eot>": 0, "a": 1, "b": 2, "c": 3, "z": 4, "ab": 5, "abc": 6}
    tok = Tokenizer(BPE(vocab, [("a", "b"), ("ab", "c")]))
    tok.add_special_tokens([AddedToken("<eot>", special=True)])
    assert [frequent_token_ids(tok, n) for n in (1, 2, 3, 4, 5, 6)] == [
        [1], [1, 2], [1, 2, 5], [1, 2, 3, 5], [1, 2, 3, 5, 6], [1, 2, 3, 4, 5, 6]]
    assert frequent_token_ids(tok, 2, keep=(0,)) == [0, 1, 2]
    assert frequent_token_ids(tok, 100) == [1, 2, 3, 4, 5, 6]
    with pytest.raises(TokenizerError, match="at least one"):
        frequent_token_ids(tok, 0)
    with pytest.raises(TokenizerError, match="BPE"):
        frequent_token_ids(Tokenizer(WordLevel({"a": 0}, unk_token="a")), 1)


@pytest.mark.parametrize(("batch", "k"), [(1, 1), (4, 2)])
def test_reduced_draft_vocabulary_keeps_greedy_output(trained, batch, k):
    """Drafts restricted to the 60 most frequent tokens (and end-of-text): plain greedy's tokens, every draft one
    of those tokens, most still accepted."""
    model, tok = trained
    ps = prompts(tok)[:batch]
    params = SamplingParams(max_new_tokens=24, temperature=0)
    plain = Engine(model, tok, max_batch=batch, max_len=128).generate(ps, params)
    vocab = frequent_token_ids(tok, 60, keep=(0,))
    engine = Engine(model, tok, max_batch=batch, max_len=128, speculative=True, draft_tokens=k, draft_vocab=vocab)
    drafted = []
    draft = engine._draft

    def recording_draft(reqs, h, logits):
        draft(reqs, h, logits)
        drafted.extend(d for r in reqs for d in r.slot.drafts)

    engine._draft = recording_draft
    for a, b in zip(plain, engine.generate(ps, params)):
        assert a.output == b.output
    assert drafted and set(drafted) <= set(vocab)
    assert engine.acceptance_rate > 0.2
    with pytest.raises(GenerationError, match="speculative"):
        Engine(model, tok, draft_vocab=vocab)
    with pytest.raises(GenerationError, match="draft vocabulary"):
        Engine(model, tok, speculative=True, draft_vocab=[10**6])


def test_speculative_sampling_with_a_reduced_draft_vocabulary_keeps_the_distribution(trained):
    """Drafts from 40 tokens only (q zero on the rest): the output must still follow p, which puts mass on tokens
    the drafter cannot propose; only resampling a rejection from max(0, p - q) over the whole vocabulary gives
    them their share."""
    model, tok = trained
    check_speculative_sampling_statistics(flattened_draft(model), tok, k=2,
                                          draft_vocab=frequent_token_ids(tok, 40, keep=(0,)))


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


def test_sample_follows_the_distribution_and_its_seed(monkeypatch):
    """`_sample` (inverse transform, one call for all the rows): token frequencies match probs (a zero-probability
    token never comes), the same seed gives the same tokens, a row draws only from its own generator (alone or
    beside others, the same tokens), an unnormalised vector is fine, the ends u = 0 and u x total = total (rounding)
    give the first and the last token that has mass, and a NaN distribution is refused."""
    probs = torch.tensor([0.1, 0.0, 0.35, 0.05, 0.3, 0.2, 0.0])
    n = 40_000
    gen = torch.Generator().manual_seed(0)
    draws = [_sample(probs[None] * 3, [gen])[0] for _ in range(n)]  # unnormalised: the same distribution
    freq = torch.bincount(torch.tensor(draws), minlength=len(probs)).double() / n
    assert freq[1] == 0 and freq[6] == 0
    assert (freq - probs.double()).abs().max() < 0.012, freq  # standard error <= 0.0025 per cell: ~5 sigma
    gens = [torch.Generator().manual_seed(0), torch.Generator().manual_seed(7)]
    other = torch.tensor([0.5, 0.0, 0.0, 0.0, 0.0, 0.0, 0.5])
    batched = [_sample(torch.stack([probs * 3, other]), gens) for _ in range(200)]
    assert [b[0] for b in batched] == draws[:200]
    alone = torch.Generator().manual_seed(7)
    assert [b[1] for b in batched] == [_sample(other[None], [alone])[0] for _ in range(200)]
    for u, dist, want in ((1.0, probs, 5), (0.0, torch.tensor([0.0, 0.5, 0.5]), 1)):  # the two ends of [0, 1]
        monkeypatch.setattr(torch, "rand", lambda *a, u=u, **k: torch.tensor(u, dtype=torch.float64))
        assert _sample(dist[None], [None]) == [want]
    monkeypatch.undo()
    with pytest.raises(GenerationError, match="NaN"):
        _sample(torch.stack([probs, torch.full((7,), float("nan"))]), [gen, gen])


def test_probs_rows_follow_their_own_parameters():
    """`_probs` for several rows at once equals each row alone, with temperature, top-k and top-p per row."""
    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    params = [SamplingParams(temperature=0.7), SamplingParams(temperature=1.3, top_k=5),
              SamplingParams(temperature=1.0, top_p=0.5)]
    together = _probs(logits, params)
    for row, p, got in zip(logits, params, together):
        torch.testing.assert_close(got, _probs(row[None], [p])[0], rtol=0, atol=1e-7)
    torch.testing.assert_close(together[0], (logits[0] / 0.7).softmax(-1))
    assert (together[1] > 0).sum() == 5 and together[1].argmax() == logits[1].argmax()
    kept = together[2] > 0
    ranked = (logits[2].softmax(-1)).sort(descending=True).values
    assert kept.sum() == int(((ranked.cumsum(0) - ranked) < 0.5).sum()) and abs(together[2].sum() - 1) < 1e-6


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


def test_compiled_decode_equals_eager(trained):
    """The compiled decode step (one batch bucket, static shapes, frozen weights): greedy tokens identical to
    eager, logits within 1e-4; with speculation (k = 2) the same tokens as plain decoding."""
    model, tok = trained
    p = prompts(tok)[1]
    params = SamplingParams(max_new_tokens=12, temperature=0)
    eager = Engine(model, tok, max_batch=1, max_len=64)
    compiled = Engine(model, tok, max_batch=1, max_len=64, compile=True)
    a, b = eager.generate([p], params)[0], compiled.generate([p], params)[0]
    assert a.output == b.output
    assert compiled.stats["compile_time"] > 0 and eager.stats["compile_time"] == 0
    pos = len(p) + len(a.output) - 1  # both caches now hold the same positions: one more step on each
    with torch.no_grad():
        want, _ = eager._run_main([[a.output[-1]]], [pos])
        got, _ = compiled._run_main([[a.output[-1]]], [pos])
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    spec = Engine(model, tok, max_batch=1, max_len=64, speculative=True, draft_tokens=2, compile=True)
    assert spec.warmup() > 0
    assert spec.generate([p], params)[0].output == a.output
    assert spec.stats["accepted"] > 0


def test_compiled_batch_of_four_equals_eager_on_small_shapes():
    """A compiled batch-4 bucket on a model of the `small` preset's shapes (random weights): the next step's logits
    equal the eager engine's within 1e-4. Its products have 4 rows, so they go through the few-row pass
    (infer/gemv.py); a version of that pass whose result had another layout gave logits 0.45 off here, while on
    tiny's shapes, and for each of small's products alone, it was right."""
    torch.manual_seed(0)
    model = dsv3.DeepseekV3(dsv3.get_config("small")).eval()
    prompts = [[1, 2, 3, 4, 5], [7, 8, 9], [10, 11, 12, 13], [20, 21]]
    logits = {}
    for compiled in (False, True):
        engine = Engine(model, max_batch=4, max_len=16, compile=compiled)
        engine.generate(prompts, SamplingParams(max_new_tokens=2, temperature=0))
        with torch.no_grad():  # both caches hold the same positions: one more step on each
            logits[compiled], _ = engine._run_main([[p[-1]] for p in prompts], [len(p) + 1 for p in prompts])
    torch.testing.assert_close(logits[True], logits[False], atol=1e-4, rtol=0)


@pytest.mark.parametrize("shape", [(1, 64), (2, 64), (16, 64), (3, 2, 64)])
def test_decode_head_equals_linear(shape):
    """The engine's head (a packed oneDNN copy on CPU) gives F.linear's logits up to summation order, for 1, 2
    and 16 rows and for [B, T, D] states; a torch that cannot pack falls back to F.linear itself."""
    torch.manual_seed(0)
    weight, h = torch.randn(1000, 64), torch.randn(*shape)
    head = DecodeHead(weight)
    assert head.packed == torch.backends.mkldnn.is_available()
    want = torch.nn.functional.linear(h, weight)
    torch.testing.assert_close(head(h), want, atol=1e-5 * want.abs().max().item(), rtol=0)
    assert torch.equal(DecodeHead(weight.double())(h.double()), torch.nn.functional.linear(h.double(),
                                                                                           weight.double()))


def test_decode_head_falls_back_when_packing_fails(monkeypatch):
    def refuse(*args):
        raise RuntimeError("no oneDNN here")

    monkeypatch.setattr(torch.ops.mkldnn, "_reorder_linear_weight", refuse)
    weight, h = torch.randn(100, 16), torch.randn(2, 16)
    head = DecodeHead(weight)
    assert not head.packed and torch.equal(head(h), torch.nn.functional.linear(h, weight))
