"""The OpenAI-compatible server, live on loopback, against the official `openai` client and raw bad requests."""

import http.client
import json
import threading

import openai
import pytest

import dsv3
from conftest import live_server
from dsv3.infer import Engine
from dsv3.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def server_url(trained_run):
    from dsv3.infer.server import Server

    ckpt = dsv3.runs.resolve_checkpoint(trained_run)
    model = dsv3.load_pretrained(ckpt)
    tok = load_tokenizer(ckpt)
    engine = Engine(model, tok, max_batch=4, max_len=128, speculative=True)
    with live_server(Server(engine, tok, model_name="tiny-v3", checkpoint=ckpt)) as port:
        yield f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def client(server_url):
    return openai.OpenAI(base_url=server_url + "/v1", api_key="unused", timeout=60, max_retries=0)


def raw(url, method, path, body: bytes | None = None):
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, json.loads(data) if data else None


def test_models_and_health(client, server_url):
    assert [m.id for m in client.models.list().data] == ["tiny-v3"]
    status, body = raw(server_url, "GET", "/health")
    assert status == 200 and body["status"] == "ok"


def test_completion(client):
    r = client.completions.create(model="tiny-v3", prompt="KING.\n", max_tokens=12, temperature=0)
    assert r.choices[0].finish_reason in ("length", "stop")
    assert r.usage.completion_tokens <= 12 and r.usage.prompt_tokens > 0
    again = client.completions.create(model="tiny-v3", prompt="KING.\n", max_tokens=12, temperature=0)
    assert again.choices[0].text == r.choices[0].text  # greedy is deterministic


def test_chat_and_streaming_agree(client):
    messages = [{"role": "user", "content": "speak, good lord"}]
    full = client.chat.completions.create(model="tiny-v3", messages=messages, max_tokens=16, temperature=0)
    assert full.choices[0].message.role == "assistant"
    pieces, finish = [], None
    for chunk in client.chat.completions.create(model="tiny-v3", messages=messages, max_tokens=16,
                                                temperature=0, stream=True):
        delta = chunk.choices[0].delta
        if delta.content:
            pieces.append(delta.content)
        finish = chunk.choices[0].finish_reason or finish
    assert "".join(pieces) == full.choices[0].message.content
    assert finish == full.choices[0].finish_reason


def test_streaming_completion(client):
    text = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny-v3", prompt="LORD.\n", max_tokens=10, temperature=0, stream=True))
    plain = client.completions.create(model="tiny-v3", prompt="LORD.\n", max_tokens=10, temperature=0)
    assert text == plain.choices[0].text


def test_concurrent_requests_share_the_batch(client):
    results = {}

    def ask(i):
        r = client.completions.create(model="tiny-v3", prompt=["KING.\n", "FOOL.\n", "LORD.\n"][i % 3],
                                      max_tokens=8 + i, temperature=0)
        results[i] = r.choices[0].text

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 8
    alone = client.completions.create(model="tiny-v3", prompt="KING.\n", max_tokens=8, temperature=0)
    assert results[0] == alone.choices[0].text


@pytest.mark.parametrize("body, status, param", [
    (b"{not json", 400, None),
    (b"[1, 2]", 400, None),
    (json.dumps({"model": "gpt-9", "prompt": "x"}).encode(), 404, "model"),
    (json.dumps({"model": "tiny-v3", "prompt": "x", "max_tokens": -1}).encode(), 400, "max_tokens"),
    (json.dumps({"model": "tiny-v3", "prompt": "x", "max_tokens": 10**6}).encode(), 400, "max_tokens"),
    (json.dumps({"model": "tiny-v3", "prompt": "x", "max_tokens": "10"}).encode(), 400, "max_tokens"),
    (json.dumps({"model": "tiny-v3", "prompt": 42}).encode(), 400, "prompt"),
    (json.dumps({"model": "tiny-v3", "prompt": "the " * 200}).encode(), 400, "prompt"),  # blames the prompt
    (json.dumps({"model": "tiny-v3", "prompt": "x", "seed": 2**64}).encode(), 400, "seed"),
    (json.dumps({"model": "tiny-v3", "prompt": "x", "stop": ""}).encode(), 400, "stop"),
    (json.dumps({"model": "tiny-v3", "prompt": "x", "temperature": True}).encode(), 400, "temperature"),
    (json.dumps({"model": "tiny-v3", "prompt": "x", "stop": [1]}).encode(), 400, "stop"),
])
def test_malformed_completions_get_4xx(server_url, client, body, status, param):
    got, err = raw(server_url, "POST", "/v1/completions", body)
    assert got == status and err["error"]["param"] == param and err["error"]["message"]
    # and the server still works
    assert client.completions.create(model="tiny-v3", prompt="KING.\n", max_tokens=2).choices


def test_malformed_chat_gets_4xx(server_url):
    got, err = raw(server_url, "POST", "/v1/chat/completions",
                   json.dumps({"model": "tiny-v3", "messages": [{"role": "user"}]}).encode())
    assert got == 400 and err["error"]["param"] == "messages[0]"
    got, err = raw(server_url, "POST", "/v1/chat/completions", json.dumps({"model": "tiny-v3"}).encode())
    assert got == 400 and err["error"]["param"] == "messages"
    got, _ = raw(server_url, "GET", "/v1/nothing")
    assert got == 404
