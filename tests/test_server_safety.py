"""The server stays up whatever a client sends: ranges checked at admission, failures contained, slots freed on
hang-up and timeout, bounded queue and body, API key. A random-weight tiny model on a live loopback uvicorn (no
training), so the whole file takes seconds of CPU.
"""

import contextlib
import http.client
import json
import random
import socket
import time

import pytest
import uvicorn

from conftest import live_server
from dsv3.infer import Engine
from dsv3.infer import server as server_mod


@pytest.fixture(scope="module")
def tiny(tiny_random):
    return tiny_random  # conftest.py


def make_server(tiny, max_batch=2, max_len=128, step_delay=0.0, **kw):
    """A server over the tiny model; `step_delay` seconds are slept after each engine step, so a long generation
    outlasts a timeout or a hang-up however fast the machine (CI once finished 240 tokens inside 0.5 s)."""
    model, tok = tiny
    engine = Engine(model, tok, max_batch=max_batch, max_len=max_len)
    server = server_mod.Server(engine, tok, model_name="tiny", **kw)
    server.stop_ids = ()  # no end-of-text: every generation runs to its max_tokens, so durations are predictable
    if step_delay:
        step = engine.step

        def slow_step():
            step()
            time.sleep(step_delay)

        engine.step = slow_step
    return server


def call(port, method, path, body=None, headers=None, timeout=60):
    """(status, headers, parsed JSON or raw text) of one request."""
    if body is not None and not isinstance(body, bytes):
        body = json.dumps(body).encode()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    conn.request(method, path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
    resp = conn.getresponse()
    data = resp.read().decode()
    conn.close()
    try:
        data = json.loads(data)
    except ValueError:
        pass
    return resp.status, dict(resp.getheaders()), data


def open_raw(port, body: dict) -> socket.socket:
    """A socket that has sent a POST /v1/completions with `body` (the caller reads or hangs up)."""
    data = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: " + str(len(data)).encode() + b"\r\n\r\n" + data)
    return sock


def wait_for(cond, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.01)
    return cond()


def ok(port, chat=False):
    """A normal request succeeds."""
    if chat:
        body = {"model": "tiny", "messages": [{"role": "user", "content": "good lord"}], "max_tokens": 2}
    else:
        body = {"model": "tiny", "prompt": "the king", "max_tokens": 2}
    status, _, data = call(port, "POST", "/v1/chat/completions" if chat else "/v1/completions", body)
    assert status == 200, data
    return data


@pytest.fixture(scope="module")
def main(tiny):
    """(server, port): max_batch 2, a 128-token context, no API key."""
    server = make_server(tiny)
    with live_server(server) as port:
        yield server, port


# ------------------------------------------------------------------------------------------------ admission
BASES = {"/v1/completions": {"model": "tiny", "prompt": "the king", "max_tokens": 1},
         "/v1/chat/completions": {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}}

OUT_OF_RANGE = [  # field, raw JSON value
    ("seed", "18446744073709551616"), ("seed", "-1"), ("seed", "1.5"), ("seed", '"7"'),
    ("n", "2"), ("n", "18446744073709551616"), ("n", "0"),
    ("top_k", "0"), ("top_k", "100000000000000000000"), ("top_k", "100000"),
    ("top_p", "0"), ("top_p", "1.5"), ("top_p", "NaN"),
    ("temperature", "-0.5"), ("temperature", "1e400"), ("temperature", "NaN"), ("temperature", '"1"'),
    ("temperature", "true"),
    ("max_tokens", "0"), ("max_tokens", "18446744073709551616"), ("max_tokens", "2.0"), ("max_tokens", "-1"),
    ("max_completion_tokens", "0"),
    ("stop", '""'), ("stop", '[""]'), ("stop", json.dumps(list("abcdefghijklmnopq"))), ("stop", json.dumps("x" * 300)),
    ("stop", "[1]"), ("stream", "1"), ("model", "3"),
]


@pytest.mark.parametrize("path", list(BASES))
@pytest.mark.parametrize("field, value", OUT_OF_RANGE)
def test_values_out_of_range_get_400_naming_the_field(main, path, field, value):
    server, port = main
    base = {k: v for k, v in BASES[path].items() if k != field}
    body = json.dumps(base)[:-1] + f', "{field}": {value}}}'
    status, _, data = call(port, "POST", path, body.encode())
    assert status == 400, data
    assert data["error"]["param"] == field and data["error"]["message"]
    assert server.runner.alive


def test_edge_values_are_accepted(main):
    _, port = main
    for extra in ({"seed": 2**64 - 1}, {"seed": 0}, {"top_k": 1}, {"top_p": 1}, {"temperature": 0},
                  {"temperature": 2}, {"stop": list("abcdefghijklmnop")}, {"max_tokens": 120}, {"n": 1}):
        status, _, data = call(port, "POST", "/v1/completions", {**BASES["/v1/completions"], **extra})
        assert status == 200, (extra, data)
    ok(port)


def test_the_reported_seed_no_longer_kills_the_engine(main):
    server, port = main
    status, _, data = call(port, "POST", "/v1/completions", {**BASES["/v1/completions"], "seed": 2**64})
    assert status == 400 and data["error"]["param"] == "seed"
    assert server.runner.alive
    ok(port)


MALFORMED = [b"", b"{not json", b'\xff\xfe{"prompt": "x"}', b'{"prompt": "\xff"}', b"[1, 2]", b"3", b"null",
             b'"a string"', b"[" * 100_000, b'{"a": ' * 50_000 + b"1" + b"}" * 50_000,
             json.dumps({"prompt": "x", "max_tokens": 1, "extra": json.loads("[" * 100 + "]" * 100)}).encode(),
             b'{"prompt": "x", "seed": 1' + b"0" * 5000 + b"}", b'{"prompt": "x", "max_tokens": 1,}']


@pytest.mark.parametrize("path", list(BASES))
@pytest.mark.parametrize("body", MALFORMED, ids=range(len(MALFORMED)))
def test_malformed_bodies_get_400(main, path, body):
    server, port = main
    status, _, data = call(port, "POST", path, body)
    assert status == 400, data
    assert data["error"]["message"] and data["error"]["type"] == "invalid_request_error"
    assert server.runner.alive


def test_overlong_prompt_names_the_prompt_and_both_lengths(main, tiny):
    server, port = main
    _, tok = tiny
    prompt = "the king " * 100
    n = len(tok.encode(prompt).ids)
    assert n > 128
    status, _, data = call(port, "POST", "/v1/completions", {"model": "tiny", "prompt": prompt})
    assert status == 400 and data["error"]["param"] == "prompt", data
    assert data["error"]["code"] == "context_length_exceeded"
    assert str(n) in data["error"]["message"] and "128" in data["error"]["message"]
    status, _, data = call(port, "POST", "/v1/chat/completions",
                           {"model": "tiny", "messages": [{"role": "user", "content": prompt}]})
    assert status == 400 and data["error"]["param"] == "messages", data
    assert "128" in data["error"]["message"]
    # a prompt that fits with a max_tokens that does not: max_tokens is to blame
    status, _, data = call(port, "POST", "/v1/completions", {"model": "tiny", "prompt": "the king", "max_tokens": 128})
    assert status == 400 and data["error"]["param"] == "max_tokens", data
    assert "128" in data["error"]["message"]
    # without max_tokens, a prompt that fits gets the room that is left
    n = len(tok.encode("the king " * 60).ids)
    status, _, data = call(port, "POST", "/v1/completions", {"model": "tiny", "prompt": "the king " * 60})
    assert status == 200 and data["usage"]["completion_tokens"] == min(16, 128 - n)


def test_chat_template_errors_are_400_with_the_templates_message(tiny, tmp_path):
    (tmp_path / "chat_template.jinja").write_text(
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('the chat must start with a user message') }}"
        "{% endif %}{% for m in messages %}{{ m['content'] }}\n{% endfor %}")
    server = make_server(tiny, checkpoint=tmp_path)
    with live_server(server) as port:
        status, _, data = call(port, "POST", "/v1/chat/completions",
                               {"messages": [{"role": "system", "content": "be brief"}], "max_tokens": 1})
        assert status == 400 and data["error"]["param"] == "messages", data
        assert data["error"]["message"] == "the chat must start with a user message"
        ok(port, chat=True)


def test_body_size_limit_is_checked_before_parsing(tiny):
    server = make_server(tiny, max_body_bytes=64 * 1024)
    with live_server(server) as port:
        # a declared 10 MB body: refused from the header, without waiting for the bytes
        t = time.monotonic()
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 10000000\r\n\r\n" + b'{"prompt": "' + b"a" * 1000)
            head = sock.recv(65536)
        assert head.startswith(b"HTTP/1.1 413"), head[:200]
        assert time.monotonic() - t < 2
        # a chunked body without a length: refused once it runs past the limit
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n")
            with contextlib.suppress(OSError):  # the server may answer and close while we still send
                for _ in range(6):
                    sock.sendall(b"4000\r\n" + b" " * 0x4000 + b"\r\n")
            head = sock.recv(65536)
        assert head.startswith(b"HTTP/1.1 413"), head[:200]
        # a body under the limit is served
        ok(port)


# ------------------------------------------------------------------------------------------------ serving
def test_engine_failure_fails_the_batch_with_500_and_serving_goes_on(tiny):
    server = make_server(tiny)
    engine = server.engine
    real, faults = engine._decode_step, [2]

    def flaky():
        if faults[0] > 0:
            faults[0] -= 1
            raise RuntimeError("injected fault")
        real()

    engine._decode_step = flaky
    with live_server(server) as port:
        status, _, data = call(port, "POST", "/v1/completions", {**BASES["/v1/completions"], "max_tokens": 5})
        assert status == 500 and "injected fault" in data["error"]["message"], data
        assert data["error"]["type"] == "server_error"
        # streaming: the failure arrives as an error event, then [DONE]
        status, _, text = call(port, "POST", "/v1/completions",
                               {**BASES["/v1/completions"], "max_tokens": 5, "stream": True})
        assert status == 200 and "injected fault" in text and text.rstrip().endswith("data: [DONE]"), text
        assert not engine.running and server.runner.pending == 0
        ok(port)
        ok(port, chat=True)
        status, _, health = call(port, "GET", "/health")
        assert status == 200 and health["status"] == "ok"


def test_health_is_503_and_requests_fail_fast_when_the_engine_thread_stops(tiny):
    server = make_server(tiny)
    with live_server(server) as port:
        assert call(port, "GET", "/health")[0] == 200
        server.runner.stop()
        status, _, data = call(port, "GET", "/health")
        assert status == 503 and data["status"] == "error"
        t = time.monotonic()
        status, _, data = call(port, "POST", "/v1/completions", BASES["/v1/completions"], timeout=10)
        assert status == 503 and data["error"]["code"] == "engine_unavailable"
        assert time.monotonic() - t < 5


@pytest.mark.parametrize("stream", [True, False])
def test_client_hang_up_frees_the_slot(tiny, stream):
    server = make_server(tiny, max_batch=1, max_len=256, step_delay=0.01)
    engine = server.engine
    with live_server(server) as port:
        sock = open_raw(port, {"model": "tiny", "prompt": "the king", "max_tokens": 240, "temperature": 0,
                               "stream": stream})
        if stream:  # hang up after 3 tokens
            got = b""
            while got.count(b"data: ") < 3:
                got += sock.recv(4096)
        else:
            assert wait_for(lambda: engine.running, 10)
            assert wait_for(lambda: engine.stats["generated"] >= 3, 10)
        sock.close()
        assert wait_for(lambda: not engine.running and server.runner.pending == 0, 1.0), engine.stats
        assert engine.stats["generated"] < 240
        t = time.monotonic()
        ok(port)
        assert time.monotonic() - t < 5


def test_full_queue_gets_429_with_retry_after(tiny):
    server = make_server(tiny, max_batch=1, max_len=256, max_queue=1, step_delay=0.01)
    engine = server.engine
    with live_server(server) as port:
        long = open_raw(port, {"model": "tiny", "prompt": "the king", "max_tokens": 240})
        assert wait_for(lambda: engine.running, 10)
        queued = open_raw(port, {"model": "tiny", "prompt": "the lord", "max_tokens": 2})
        assert wait_for(lambda: server.runner.pending == 2, 10)
        status, headers, data = call(port, "POST", "/v1/completions", BASES["/v1/completions"])
        assert status == 429 and headers.get("retry-after") == "1", (status, headers)
        assert data["error"]["code"] == "server_busy"
        long.close()  # the queued request gets the slot and finishes
        queued.settimeout(10)
        answer = b""
        while b'"finish_reason"' not in answer:
            answer += queued.recv(4096)
        assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
        queued.close()
        assert wait_for(lambda: server.runner.pending == 0, 2)
        ok(port)


def test_request_timeout_ends_the_request_and_frees_the_slot(tiny):
    server = make_server(tiny, max_batch=1, max_len=256, request_timeout=0.5, step_delay=0.01)
    engine = server.engine
    with live_server(server) as port:
        t = time.monotonic()
        status, _, data = call(port, "POST", "/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 240})
        assert status == 504 and data["error"]["code"] == "timeout", data
        assert time.monotonic() - t < 3
        assert not engine.running and server.runner.pending == 0
        status, _, text = call(port, "POST", "/v1/completions",
                               {"model": "tiny", "prompt": "x", "max_tokens": 240, "stream": True})
        assert status == 200 and '"code": "timeout"' in text and text.rstrip().endswith("data: [DONE]"), text
        assert not engine.running
        ok(port)


def test_api_key_guards_v1_but_not_health(tiny):
    server = make_server(tiny, api_key="sekret")
    with live_server(server) as port:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekret"}):
            status, _, data = call(port, "GET", "/v1/models", headers=headers)
            assert status == 401 and data["error"]["code"] == "invalid_api_key", data
        status, _, data = call(port, "POST", "/v1/completions", b"{not json")  # refused before the body is read
        assert status == 401
        assert call(port, "GET", "/v1/models", headers={"Authorization": "Bearer sekret"})[0] == 200
        status, _, data = call(port, "POST", "/v1/completions", BASES["/v1/completions"],
                               headers={"Authorization": "Bearer sekret"})
        assert status == 200, data
        assert call(port, "GET", "/health")[0] == 200


def test_bind_warning():
    warn = server_mod.bind_warning
    assert warn("0.0.0.0", None) and "api-key" in warn("0.0.0.0", None)
    assert warn("example.org", None) and warn("::", None)
    assert warn("0.0.0.0", "k") is None
    for host in ("127.0.0.1", "127.0.0.2", "::1", "localhost"):
        assert warn(host, None) is None


# ------------------------------------------------------------------------------------------------ the CLI
@pytest.mark.parametrize("flag", ["--max-batch", "--max-queue", "--request-timeout"])
def test_cli_refuses_nonpositive_serve_settings(flag, capsys):
    from dsv3.cli import build_parser

    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["serve", "ckpt", flag, "0"])
    assert exit_.value.code == 2 and "must be at least 1" in capsys.readouterr().err


def test_cli_serve_passes_the_limits_and_the_key(tiny, tmp_path, monkeypatch, capsys):
    import dsv3.cli as cli

    model, tok = tiny
    monkeypatch.setattr(cli, "_load_for_inference", lambda args: (tmp_path, model, tok))
    apps = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: apps.append((app, kw)))
    base = ["serve", str(tmp_path), "--model-name", "tiny", "--max-batch", "1", "--max-len", "64"]

    def serve(*extra):
        assert cli.main(base + list(extra)) == 0
        server = apps[-1][0].state.server
        server.runner.stop()
        return server, capsys.readouterr().err

    monkeypatch.delenv("DSV3_API_KEY", raising=False)
    server, err = serve("--host", "0.0.0.0", "--max-queue", "3", "--request-timeout", "7")
    assert server.api_key is None and "without an API key" in err
    assert server.runner.capacity == 1 + 3 and server.request_timeout == 7
    monkeypatch.setenv("DSV3_API_KEY", "from-env")
    server, err = serve("--host", "0.0.0.0")
    assert server.api_key == "from-env" and "without an API key" not in err
    server, _ = serve("--api-key", "from-flag")
    assert server.api_key == "from-flag"
    monkeypatch.delenv("DSV3_API_KEY")
    _, err = serve()
    assert "without an API key" not in err  # loopback


# ------------------------------------------------------------------------------------------------ fuzz
def _random_value(rng: random.Random, depth: int = 0):
    kind = rng.randrange(10 if depth < 3 else 7)
    if kind == 0:
        return rng.choice([0, 1, 2, 3, -1, -(2**63), 2**63, 2**64 - 1, 2**64, 10**30, -(10**30), 2**31])
    if kind == 1:
        return rng.choice([0.0, -0.0, 0.5, 1.0, 1.5, 2.0000001, -2.5, 1e-300, 1e308, float("nan"), float("inf"),
                           -float("inf")])
    if kind == 2:
        return rng.choice(["", "x", "NaN", "Infinity", "-1", "1e999", "tiny", "\u0000", "\U0001f642" * 3, "0x10",
                           "user", "assistant", "system", "the king"])
    if kind == 3:
        return None
    if kind == 4:
        return rng.choice([True, False])
    if kind == 5:
        return "w" * rng.choice([1, 255, 256, 257, 5000])
    if kind == 6:
        return rng.randrange(-5, 130)
    if kind == 7:
        return [_random_value(rng, depth + 1) for _ in range(rng.randrange(6))]
    if kind == 8:
        return {"role": _random_value(rng, depth + 1), "content": _random_value(rng, depth + 1)}
    return {rng.choice(["a", "role", "content", "name", ""]): _random_value(rng, depth + 1)
            for _ in range(rng.randrange(4))}


FIELDS = ["model", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "n", "seed", "stop",
          "stream", "user", "logprobs", "echo", "presence_penalty"]


def test_fuzzed_requests_never_get_5xx(main):
    server, port = main
    rng = random.Random(20240611)
    statuses = {}
    for i in range(300):
        path = rng.choice(list(BASES))
        body = dict(BASES[path])
        own = "prompt" if path == "/v1/completions" else "messages"
        for field in rng.sample([*FIELDS, own], rng.randint(1, 3)):
            if rng.random() < 0.1:
                body.pop(field, None)
            else:
                body[field] = _random_value(rng)
        status, _, data = call(port, "POST", path, json.dumps(body).encode())
        statuses[status] = statuses.get(status, 0) + 1
        assert status < 500, (i, body, data)
        if status == 200 and body.get("stream") is True:
            assert data.rstrip().endswith("data: [DONE]"), (i, body, data)
    assert statuses.get(200, 0) > 20 and statuses.get(400, 0) > 100, statuses  # both paths were exercised
    assert server.runner.alive and server.runner.pending == 0
    ok(port)
    ok(port, chat=True)
