"""Generation engine: cached decode vs recompute, batching, MTP speculation, the acceptance rule, errors."""

import copy

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


def check_speculative_sampling_statistics(model, tok, n_tokens: int = 100, temperature: float = 1.0) -> dict:
    """Speculative sampling at temperature > 0 (sixteen requests, fixed seeds), checked against the model's own
    distributions recomputed without cache over the finished sequences:
    - bookkeeping: every step verified one draft and emitted 1 token (rejected) or 2 (accepted: the draft and
      a bonus); the per-request and engine counts and `acceptance_rate` agree with those steps;
    - acceptance: a draft d ~ q for a token whose main-model distribution is p is kept with probability
      sum_x min(p(x), q(x)) (Leviathan et al. 2023, speculative sampling), so the accepted count must lie
      within 4 sigma of the sum of those probabilities over the steps (a rule keeping too many or too few fails);
    - distribution: every emitted token t_j follows the main model's p_j whatever the draft, so sums of f_j(t_j)
      must lie within 4 sigma of their expectations under p, for f = log p over all tokens and, sensitive to
      the draft leaking into the output, f = q (the draft's probability) over the tokens a verification decided.
    The draft here is deliberately poor (`flattened_draft`), so that a wrong rule shows: keeping every draft,
    accepting with min(1, q/p), or resampling rejections from p instead of max(0, p - q) each fail.
    Raises AssertionError otherwise; returns the statistics (sums, expectations, sigmas)."""
    engine = Engine(model, tok, max_batch=16, max_len=128, speculative=True)
    reqs = [engine.submit(p, SamplingParams(max_new_tokens=n_tokens, temperature=temperature, seed=11 + i))
            for i, p in enumerate(prompts(tok) * 4)]
    steps = {r.id: [] for r in reqs}  # (tokens emitted before the step, tokens it emitted, whether it finished)
    while not all(r.done for r in reqs):
        before = {r.id: max(len(r.output), 1) for r in reqs if not r.done}  # the prefill emits the first token
        engine.step()
        for r in reqs:
            if r.id in before:
                steps[r.id].append((before[r.id], len(r.output) - before[r.id], r.done))
    vocab = model.config.vocab_size
    accepted = expected = variance = 0.0
    log_p = log_p_mean = log_p_var = 0.0
    draft_p = draft_p_mean = draft_p_var = 0.0
    for r in reqs:
        assert len(r.output) == n_tokens and all(0 <= t < vocab for t in r.output)
        assert r.drafted == len(steps[r.id]), (r.drafted, steps[r.id])
        seq = torch.tensor([r.prompt + r.output])
        with torch.no_grad():
            out = model(seq)
        p_all = (out.logits[0].double() / temperature).softmax(-1)  # p_all[j]: distribution of token j + 1
        q_all = (out.mtp_logits[0][0].double() / temperature).softmax(-1)  # q_all[j]: of token j + 2
        n_prompt = len(r.prompt)
        kept = 0
        for emitted_before, emitted, finished in steps[r.id]:
            assert emitted in (1, 2), steps[r.id]
            kept += emitted == 2
            if finished and emitted == 1 and emitted_before + 1 == n_tokens:
                continue  # cut at max_new_tokens: an accepted draft would also have emitted just one token
            j = n_prompt + emitted_before  # index of the verified token in seq
            p, q = p_all[j - 1], q_all[j - 2]
            alpha = float(torch.minimum(p, q).sum())
            accepted += emitted == 2
            expected += alpha
            variance += alpha * (1 - alpha)
            mean = float((p * q).sum())
            draft_p += float(q[seq[0, j]])
            draft_p_mean += mean
            draft_p_var += float((p * q.square()).sum()) - mean**2
        assert r.accepted - kept in (0, 1), (r.accepted, kept)  # 1: the last step's draft, accepted but cut
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


def test_speculative_sampling_keeps_the_main_models_distribution(trained):
    model, tok = trained
    check_speculative_sampling_statistics(flattened_draft(model), tok)


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
