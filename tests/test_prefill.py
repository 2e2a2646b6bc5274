"""Chunked prefill and prefix reuse in the engine: both equal one-shot prefill (logits, cache rows, greedy tokens);
the prefix store keeps its memory bound and its lookups exact."""

import pytest
import torch

import dsv3
from dsv3.infer import Engine, SamplingParams
from dsv3.infer.prefix import PrefixStore
from dsv3.tokenizer import load_tokenizer

TEXT = ("KING.\nMy lord, what news from the north? The army of the king is come to the town, and we must go. "
        "LORD.\nSweet gentle friend, the night is cold and the sea is high; let us stay and speak of the war. ")


@pytest.fixture(scope="module")
def trained(trained_run):
    ckpt = dsv3.resolve_checkpoint(trained_run)
    return dsv3.load_pretrained(ckpt).eval(), load_tokenizer(ckpt)


def long_prompt(tok, n):
    ids = tok.encode(TEXT * 20).ids
    assert len(ids) >= n
    return ids[:n]


def greedy(n):
    return SamplingParams(max_new_tokens=n, temperature=0)


def rows(engine, row, n):
    """Every cache layer's first n positions of one row (main layers, then MTP)."""
    return [t[row, :n].clone() for t in engine.cache.layers]


@pytest.mark.parametrize("chunk", [1, 16, 37])
def test_prefill_in_pieces_equals_one_shot_logits(trained, chunk):
    """The model prefilled piece by piece through its cache (naive attention, a chunk boundary inside the
    prompt) gives the one-shot forward's logits at every position within 1e-5."""
    model, tok = trained
    ids = torch.tensor([long_prompt(tok, 90)])
    with torch.no_grad():
        want = model(ids, mtp=False).logits
        cache = model.new_cache(1, 96)
        got = torch.cat([model(ids[:, s:s + chunk], cache=cache, start_pos=s, absorb=False, mtp=False).logits
                         for s in range(0, ids.shape[1], chunk)], dim=1)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("speculative", [False, True])
@pytest.mark.parametrize("chunk", [7, 32, 64])
def test_chunked_prefill_equals_one_shot(trained, chunk, speculative):
    """The engine's chunked prefill writes the same latent rows (main and MTP layers, 1e-5) and then decodes the
    same greedy tokens as one-shot prefill."""
    model, tok = trained
    p = long_prompt(tok, 100)
    one = Engine(model, tok, max_batch=2, max_len=128, speculative=speculative)
    chunked = Engine(model, tok, max_batch=2, max_len=128, speculative=speculative, prefill_chunk=chunk)
    a = one.generate([p], greedy(1))[0]
    b = chunked.generate([p], greedy(1))[0]
    assert a.output == b.output
    assert chunked.stats["prefill_tokens"] == len(p)
    for got, want in zip(rows(chunked, 0, len(p)), rows(one, 0, len(p))):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert one.generate([p], greedy(12))[0].output == chunked.generate([p], greedy(12))[0].output


def test_chunks_interleave_with_decode_steps(trained):
    """A long prompt arriving while two requests decode is prefilled a chunk per step: the running requests get
    a token every step meanwhile, its row follows theirs when one leaves, and every output equals the request
    run alone."""
    model, tok = trained
    short = [tok.encode("KING.\nthe").ids, tok.encode("FOOL").ids]
    long = long_prompt(tok, 100)
    engine = Engine(model, tok, max_batch=3, max_len=160, prefill_chunk=16)
    reqs = [engine.submit(short[0], greedy(3)), engine.submit(short[1], greedy(30))]
    engine.step()
    assert len(engine.running) == 2
    late = engine.submit(long, greedy(10))
    steps = 0
    while not late.output:
        before = [len(r.output) for r in reqs]
        engine.step()
        steps += 1
        assert [len(r.output) for r in reqs] == [min(n + 1, r.params.max_new_tokens) for n, r in
                                                 zip(before, reqs)]
    assert steps == -(-len(long) // 16)  # one chunk per step
    assert reqs[0].done  # it left during the long prefill: the long prompt's row moved down
    one = Engine(model, tok, max_batch=1, max_len=160)
    one.generate([long], greedy(1))
    for got, want in zip(rows(engine, late.slot.row, len(long)), rows(one, 0, len(long))):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    while not all(r.done for r in [*reqs, late]):
        engine.step()
    for r in [*reqs, late]:
        alone = Engine(model, tok, max_batch=1, max_len=160).generate([r.prompt], r.params)[0]
        assert r.output == alone.output


def test_short_prompts_are_prefilled_together_within_a_chunk(trained):
    model, tok = trained
    ps = [tok.encode(t).ids for t in ["KING.\nthe", "FOOL", "LORD.\nwhat"]]
    engine = Engine(model, tok, max_batch=4, max_len=64, prefill_chunk=3 * max(map(len, ps)))
    for p in ps:
        engine.submit(p, greedy(5))
    engine.step()
    assert len(engine.running) == 3 and engine.prefilling is None
    assert engine.stats["prefill_tokens"] == sum(map(len, ps)) and all(len(r.output) == 2 for r in engine.running)


@pytest.mark.parametrize("speculative", [False, True])
def test_prefix_reuse_equals_recompute(trained, speculative):
    """The next turn of a conversation (prompt + answer + more) copies the stored rows instead of prefilling
    them: rows within 1e-5 of a full prefill, the same greedy tokens, the hit counted."""
    model, tok = trained
    first = long_prompt(tok, 60)
    kw = dict(max_batch=2, max_len=200, speculative=speculative)
    reuse = Engine(model, tok, prefix_cache_bytes=2**20, **kw)
    plain = Engine(model, tok, **kw)
    a = reuse.generate([first], greedy(10))[0]
    assert a.output == plain.generate([first], greedy(10))[0].output
    (stored,) = [e.tokens for e in reuse.prefix.entries.values()]
    # the tokens the cache holds: all but the last output token, which plain decoding samples and never reads
    assert stored == (first + a.output)[: len(stored)] and len(stored) >= len(first) + len(a.output) - 1
    second = first + a.output + tok.encode(" LORD.\nand now the king").ids
    for t in reuse.cache.layers:
        t.zero_()  # the rows must come from the store, not from what the first turn left in its slot
    b = reuse.generate([second], greedy(12))[0]
    c = plain.generate([second], greedy(12))[0]
    assert b.output == c.output
    assert reuse.prefix.stats["hit_tokens"] == len(stored)
    assert reuse.stats["reused_tokens"] == len(stored) - 1  # the match's last token is recomputed
    assert reuse.stats["prefill_tokens"] == len(first) + len(second) - reuse.stats["reused_tokens"]
    assert len(reuse.prefix.entries) == 1  # the first turn's entry was dropped as a prefix of the second's
    check = Engine(model, tok, **kw)
    check.generate([second], greedy(1))
    for got, want in zip(rows(reuse, 0, len(second)), rows(check, 0, len(second))):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_a_shared_prefix_is_reused_by_a_different_question(trained):
    model, tok = trained
    system = long_prompt(tok, 40)
    engine = Engine(model, tok, max_batch=1, max_len=100, prefix_cache_bytes=2**20, prefill_chunk=16)
    engine.generate([system + tok.encode("FOOL").ids], greedy(4))
    q = system + tok.encode("KING.\nthe").ids
    got = engine.generate([q], greedy(6))[0].output
    assert engine.stats["reused_tokens"] >= len(system) - 1
    assert got == Engine(model, tok, max_batch=1, max_len=100).generate([q], greedy(6))[0].output


def fake_rows(n, width=8, layers=2):
    return [torch.full((n, width), float(n)) for _ in range(layers)]


def test_prefix_store_lookup_is_exact_and_lru_bounded():
    per_token = 2 * 8 * 4  # bytes: 2 layers x 8 floats
    store = PrefixStore(capacity_bytes=100 * per_token, block=4)
    a, b = list(range(40)), list(range(100, 150))
    assert store.put(a, fake_rows(40)) and store.put(b, fake_rows(50))
    entry, n = store.lookup(a[:23] + [999, 1])
    assert entry.tokens == a and n == 23  # not rounded to a block
    assert store.lookup([5, 6, 7, 8, 9])[1] == 0  # no shared first block
    assert store.lookup(a[:3])[1] == 0  # shorter than one block
    c = list(range(200, 230))
    assert store.put(c, fake_rows(30))  # 120 tokens > 100: evicts the least recently used (b; a was looked up)
    assert store.lookup(b)[1] == 0 and store.lookup(a)[1] == 40 and store.lookup(c)[1] == 30
    assert store.nbytes == 70 * per_token <= store.capacity_bytes
    assert not store.put(list(range(500, 620)), fake_rows(120))  # larger than the whole store
    for i in range(30):  # many puts: the bound always holds
        store.put(list(range(1000 * i, 1000 * i + 20 + i)), fake_rows(20 + i))
        assert store.nbytes <= store.capacity_bytes
        assert store.nbytes == sum(e.nbytes for e in store.entries.values())


def test_prefix_store_drops_prefixes_and_survives_hash_collisions(monkeypatch):
    store = PrefixStore(capacity_bytes=2**20, block=4)
    turn1 = list(range(20))
    store.put(turn1, fake_rows(20))
    store.put(turn1 + [7, 7, 7], fake_rows(23))
    assert len(store.entries) == 1 and store.lookup(turn1 + [7, 7, 7, 7])[1] == 23
    import hashlib

    class Same:  # every block hashes alike: a lookup must compare the tokens, not trust the hash
        def __init__(self, *a, **k):
            pass

        def digest(self):
            return b"x" * 16

    monkeypatch.setattr(hashlib, "blake2b", Same)
    store = PrefixStore(capacity_bytes=2**20, block=4)
    store.put(list(range(20)), fake_rows(20))
    assert store.lookup(list(range(50, 70))) == (None, 0)


def test_the_next_chat_turn_reuses_the_first_through_the_server(trained_run):
    """Through `/v1/chat/completions`: the second turn (the first answer re-sent as the assistant message) finds
    the first turn's rows — the whole first prompt at least — and answers as a server without the store does."""
    import openai

    from conftest import live_server
    from dsv3.infer.server import Server

    ckpt = dsv3.resolve_checkpoint(trained_run)
    model, tok = dsv3.load_pretrained(ckpt).eval(), load_tokenizer(ckpt)
    first = [{"role": "user", "content": TEXT}]
    answers = {}
    for store_mb in (1, 0):
        engine = Engine(model, tok, max_batch=2, max_len=256, prefix_cache_bytes=store_mb << 20)
        server = Server(engine, tok, model_name="tiny", checkpoint=ckpt)
        with live_server(server) as port:
            client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="-", timeout=60, max_retries=0)
            a = client.chat.completions.create(model="tiny", messages=first, max_tokens=12, temperature=0)
            answer = a.choices[0].message.content
            second = [*first, {"role": "assistant", "content": answer}, {"role": "user", "content": "FOOL"}]
            b = client.chat.completions.create(model="tiny", messages=second, max_tokens=12, temperature=0)
            answers[store_mb] = (answer, b.choices[0].message.content)
        if store_mb:
            prompt1 = server.template.encode(tok, first, sanitize_control_tokens=True)
            assert engine.prefix.stats["hits"] == 1 and engine.prefix.stats["hit_tokens"] >= len(prompt1)
            assert engine.stats["reused_tokens"] == engine.prefix.stats["hit_tokens"] - 1
        else:
            assert engine.prefix is None and engine.stats["reused_tokens"] == 0
    assert answers[1] == answers[0]


def test_cancel_during_a_chunked_prefill_frees_its_row(trained):
    model, tok = trained
    engine = Engine(model, tok, max_batch=1, max_len=160, prefill_chunk=16)
    req = engine.submit(long_prompt(tok, 100), greedy(4))
    engine.step()
    assert engine.prefilling is req and not engine.running
    engine.cancel(req)
    assert req.finish_reason == "cancelled" and engine.prefilling is None and not engine.busy
    again = engine.generate([long_prompt(tok, 50)], greedy(4))[0]  # the one row is usable again
    assert again.output == Engine(model, tok, max_batch=1, max_len=160).generate([long_prompt(tok, 50)],
                                                                                greedy(4))[0].output


@pytest.mark.parametrize(("share", "every"), [(0.5, 3), (0.75, 1), (0.2, 12)])
def test_prefill_share_bounds_the_time_chunks_take(trained, monkeypatch, share, every):
    """On a fake clock where a chunk takes 3 units and a decode step 1: with share s, chunks take at most s of
    the time while others decode — after a chunk, the next waits for 3(1 - s)/s units of decode steps."""
    import types

    import dsv3.infer.engine as engine_mod

    model, tok = trained
    now = [0.0]
    monkeypatch.setattr(engine_mod, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))
    engine = Engine(model, tok, max_batch=2, max_len=200, prefill_chunk=8, prefill_share=share)
    chunk, decode = engine._prefill_chunk, engine._decode_step
    chunks_at = []

    def timed_chunk():
        chunks_at.append(engine.stats["decode_steps"])
        chunk()
        now[0] += 3

    def timed_decode():
        decode()
        now[0] += 1

    monkeypatch.setattr(engine, "_prefill_chunk", timed_chunk)
    monkeypatch.setattr(engine, "_decode_step", timed_decode)
    short = engine.submit(tok.encode("KING.\nthe").ids, greedy(150))
    engine.step()
    late = engine.submit(long_prompt(tok, 80), greedy(2))
    while not late.output:
        engine.step()
    assert len(chunks_at) == 10
    assert [b - a for a, b in zip(chunks_at, chunks_at[1:])] == [every] * 9
    assert not short.done
