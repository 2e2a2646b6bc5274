"""Log-probabilities from the engine: generated tokens' and prompt tokens' equal the model's own log-softmax over a
full forward; the same through chunked prefill and speculation; scoring a prompt without generating."""

import pytest
import torch

import dsv3
from dsv3.infer import Engine, GenerationError, SamplingParams
from dsv3.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def trained(trained_run):
    ckpt = dsv3.resolve_checkpoint(trained_run)
    return dsv3.load_pretrained(ckpt).eval(), load_tokenizer(ckpt)


def reference(model, ids):
    """log-softmax [T, V] of one full forward over ids (no cache)."""
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids]), mtp=False).logits[0].float(), dim=-1)


@pytest.mark.parametrize("speculative", [False, True])
def test_generated_token_logprobs_equal_the_models(trained, speculative):
    model, tok = trained
    prompt = tok.encode("KING.\nmy good lord, what").ids
    engine = Engine(model, tok, max_batch=2, max_len=64, speculative=speculative)
    req = engine.generate([prompt], SamplingParams(max_new_tokens=10, temperature=0, logprobs=3))[0]
    ref = reference(model, prompt + req.output)
    assert [lp.token for lp in req.logprobs] == req.output
    for i, lp in enumerate(req.logprobs):
        row = ref[len(prompt) - 1 + i]
        assert lp.logprob == pytest.approx(float(row[lp.token]), abs=1e-5)
        assert list(lp.top) == row.topk(3).indices.tolist()
        assert lp.top[lp.token] == lp.logprob  # greedy: the chosen token is the top-1, the same float


@pytest.mark.parametrize("chunk", [None, 7])
def test_prompt_logprobs_score_a_prompt(trained, chunk):
    """prompt_logprobs with max_new_tokens 0: nothing generated; the first entry is None, every other equals the
    full forward's log-softmax at the position before it, whole or in chunks; the prefix store is bypassed."""
    model, tok = trained
    prompt = tok.encode("LORD.\nsweet gentle friend, the night is cold and the king is come").ids
    engine = Engine(model, tok, max_batch=1, max_len=64, prefill_chunk=chunk, prefix_cache_bytes=2**20)
    params = SamplingParams(max_new_tokens=0, temperature=0, prompt_logprobs=2)
    for _ in range(2):  # the second time the prompt is in the store, and must be recomputed anyway
        req = engine.generate([prompt], params)[0]
        assert req.output == [] and req.finish_reason == "length"
        assert len(req.prompt_logprobs) == len(prompt) and req.prompt_logprobs[0] is None
        ref = reference(model, prompt)
        for i, lp in enumerate(req.prompt_logprobs[1:], start=1):
            assert lp.token == prompt[i]
            assert lp.logprob == pytest.approx(float(ref[i - 1, prompt[i]]), abs=1e-5)
            assert len(lp.top) == 2
    assert engine.stats["reused_tokens"] == 0


def test_logprob_fields_are_checked(trained):
    model, tok = trained
    engine = Engine(model, tok, max_batch=1, max_len=32)
    for bad in (dict(logprobs=21), dict(logprobs=-1), dict(prompt_logprobs=True), dict(max_new_tokens=0)):
        with pytest.raises(GenerationError, match="logprobs|max_new_tokens"):
            engine.submit([1, 2, 3], SamplingParams(**bad))


# ------------------------------------------------------------------------------------------------ the server
@pytest.fixture(scope="module")
def served(trained_run):
    """(base url, model, tokenizer) of a live server over the tiny trained model, with an API key."""
    from conftest import live_server
    from dsv3.infer.server import Server

    ckpt = dsv3.resolve_checkpoint(trained_run)
    model, tok = dsv3.load_pretrained(ckpt).eval(), load_tokenizer(ckpt)
    engine = Engine(model, tok, max_batch=4, max_len=128, prefill_chunk=16, prefix_cache_bytes=2**20)
    with live_server(Server(engine, tok, model_name="tiny", checkpoint=ckpt, api_key="k")) as port:
        yield f"http://127.0.0.1:{port}", model, tok


def post(url, path, body, key="k"):
    import http.client
    import json

    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    conn.request("POST" if body is not None else "GET", path, body=None if body is None else json.dumps(body),
                 headers=headers)
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, json.loads(data) if data else None


def test_echo_logprobs_as_lm_eval_asks_for_them(served):
    """lm-eval's log-likelihood request: token-id prompts (an array of arrays), echo, logprobs 1, max_tokens 1.
    Each choice holds prompt + 1 entries, the first null; the prompt's values equal the model's own log-softmax
    and each top-1 entry is the same float as the token's value when the token is the argmax."""
    url, model, tok = served
    prompts = [tok.encode("KING.\nmy good lord").ids, tok.encode("FOOL.\nwhat shall we do now").ids]
    status, body = post(url, "/v1/completions", {"model": "tiny", "prompt": prompts, "echo": True, "logprobs": 1,
                                                 "max_tokens": 1, "temperature": 0})
    assert status == 200, body
    assert [c["index"] for c in body["choices"]] == [0, 1]
    for ids, choice in zip(prompts, body["choices"]):
        lp = choice["logprobs"]
        assert len(lp["token_logprobs"]) == len(ids) + 1 and lp["token_logprobs"][0] is None
        assert lp["top_logprobs"][0] is None and lp["text_offset"][0] == 0
        ref = reference(model, ids)
        for i in range(1, len(ids)):
            assert lp["token_logprobs"][i] == pytest.approx(float(ref[i - 1, ids[i]]), abs=1e-5)
            greedy = int(ref[i - 1].argmax()) == ids[i]
            assert (max(lp["top_logprobs"][i].values()) == lp["token_logprobs"][i]) == greedy
        assert choice["text"].startswith(tok.decode(ids))
    assert body["usage"]["prompt_tokens"] == sum(map(len, prompts))


def test_max_tokens_zero_scores_the_prompt(served):
    url, model, tok = served
    ids = tok.encode("LORD.\nsweet gentle friend").ids
    status, body = post(url, "/v1/completions", {"prompt": ids, "echo": True, "logprobs": 0, "max_tokens": 0})
    assert status == 200, body
    (choice,) = body["choices"]
    assert choice["text"] == tok.decode(ids) and choice["finish_reason"] == "length"
    assert len(choice["logprobs"]["token_logprobs"]) == len(ids) and body["usage"]["completion_tokens"] == 0
    assert all(t == {} for t in choice["logprobs"]["top_logprobs"][1:])
    # a prompt that fills the whole context can still be scored (no position is needed for a new token)
    full = [ids[i % len(ids)] for i in range(128)]
    status, body = post(url, "/v1/completions", {"prompt": full, "echo": True, "logprobs": 0, "max_tokens": 0})
    assert status == 200, body
    assert len(body["choices"][0]["logprobs"]["token_logprobs"]) == 128
    status, body = post(url, "/v1/completions", {"prompt": full, "echo": True, "logprobs": 0, "max_tokens": 1})
    assert status == 400 and "context" in body["error"]["message"]


def test_the_openai_client_reads_logprobs_from_both_endpoints(served):
    import openai

    url, model, tok = served
    client = openai.OpenAI(base_url=url + "/v1", api_key="k", timeout=60, max_retries=0)
    r = client.completions.create(model="tiny", prompt="KING.\n", max_tokens=5, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.token_logprobs) == r.usage.completion_tokens == len(lp.top_logprobs)
    assert all(len(t) <= 3 and max(t.values()) == v for t, v in zip(lp.top_logprobs, lp.token_logprobs))
    assert "".join(lp.tokens) == r.choices[0].text
    c = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "speak"}], max_tokens=5,
                                       temperature=0, logprobs=True, top_logprobs=2)
    content = c.choices[0].logprobs.content
    assert len(content) == c.usage.completion_tokens
    assert all(len(x.top_logprobs) == 2 and x.top_logprobs[0].logprob == x.logprob for x in content)
    stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "speak"}],
                                            max_tokens=5, temperature=0, logprobs=True, stream=True)
    streamed = [x for chunk in stream if chunk.choices and chunk.choices[0].logprobs
                for x in chunk.choices[0].logprobs.content]
    # the same tokens; values to rounding (this second request reuses the first's prefix rows)
    assert [x.token for x in streamed] == [x.token for x in content]
    assert [x.logprob for x in streamed] == pytest.approx([x.logprob for x in content], abs=1e-5)


@pytest.mark.parametrize(("body", "param"), [
    ({"prompt": "a", "logprobs": 21}, "logprobs"),
    ({"prompt": "a", "echo": True, "stream": True}, "echo"),
    ({"prompt": [[1, 2], [3, 10**6]]}, "prompt"),
    ({"prompt": [1, "a"]}, "prompt"),
    ({"prompt": [[]]}, "prompt"),
    ({"prompt": [[1, 2]] * 33}, "prompt"),
    ({"prompt": "a", "max_tokens": 0}, "max_tokens"),
    ({"prompt": [[1], [2]], "stream": True}, "prompt"),
])
def test_bad_logprob_requests_name_the_field(served, body, param):
    url, _, _ = served
    status, answer = post(url, "/v1/completions", body)
    assert status == 400 and answer["error"]["param"] == param, answer


def test_bad_chat_logprobs_name_the_field(served):
    url, _, _ = served
    messages = [{"role": "user", "content": "hi"}]
    for body, param in (({"top_logprobs": 2}, "top_logprobs"), ({"logprobs": 1}, "logprobs"),
                        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs")):
        status, answer = post(url, "/v1/chat/completions", {"messages": messages, **body})
        assert status == 400 and answer["error"]["param"] == param, answer


def test_tokenizer_endpoints(served):
    url, _, tok = served
    status, info = post(url, "/tokenizer_info", None)
    assert status == 200 and info["eos_token"] == "<|endoftext|>" and info["model_max_length"] == 128
    status, body = post(url, "/tokenize", {"prompt": "KING.\nmy lord", "add_special_tokens": False})
    assert status == 200 and body["tokens"] == tok.encode("KING.\nmy lord").ids
    status, back = post(url, "/detokenize", {"tokens": body["tokens"]})
    assert status == 200 and back["prompt"] == "KING.\nmy lord"
    assert post(url, "/detokenize", {"tokens": [10**6]})[0] == 400
    assert post(url, "/tokenize", {"prompt": "x"}, key=None)[0] == 401  # behind the API key like /v1
