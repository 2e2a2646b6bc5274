"""The page `dsv3 serve` serves at / (dsv3/web.py, dsv3/web_static/), in a real browser, and what feeds it.

Browser tests drive the system Chromium headless through Selenium (the Debian packages `chromium` and
`chromium-driver`: `.ci/run` installs them; without them these tests are skipped with the install command as the
reason, and fail instead when DSV3_REQUIRE_BROWSER=1, as in CI) against a live server of a tiny random-weight model
(an API key set, so the page must send it; each engine step slowed by STEP_DELAY so that a reply streams long
enough to watch and stop). They check: the page loads with no console error and no request leaving loopback; a
chat reply streams and the stop button ends it (and frees the server's slot); the expert heatmap updates while it
streams; model output holding HTML is shown as text; the simulator's numbers are `train.simulate.simulate`'s for the
same settings (MaxVio falls with the aux-loss-free update, stays high with the bias frozen). The rest (expert
counts, the JSON routes' security, the CLI wiring) needs no browser.
"""

from __future__ import annotations

import json
import os
import shutil
import time

import pytest
import torch
import uvicorn

import dsv3
from dsv3.infer import Engine, SamplingParams
from dsv3.infer.server import Server, serve_in_thread
from dsv3.train.simulate import simulate
from dsv3.web import create_web_app

INSTALL = "apt-get install chromium chromium-driver (Debian/Ubuntu; .ci/run does it)"
KEY = "web-test-key"
STEP_DELAY = 0.03  # seconds added to every engine step: a 200-token reply streams for several seconds
PAYLOAD = '<script>window.__dsv3_pwned = 1</script><img src="x" onerror="window.__dsv3_pwned = 2"><b>bold</b>'
SIM = {"experts": 16, "groups": 4, "topk_groups": 2, "top_k": 4, "steps": 120, "gamma": 0.002, "skew": 1.5,
       "aux_alpha": 0.003, "tokens": 1024, "seed": 3}


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def tiny(tiny_random):
    return tiny_random  # conftest.py


@pytest.fixture(scope="module")
def site(tiny):
    """(server, port) of the page's app: max_batch 2, a 256-token context, expert statistics over 64 steps, an API
    key, no end-of-text (replies run to max_tokens), every step slowed by STEP_DELAY."""
    model, tok = tiny
    engine = Engine(model, tok, max_batch=2, max_len=256, expert_stats=64)
    step = engine.step

    def slow_step():
        time.sleep(STEP_DELAY)
        step()

    engine.step = slow_step
    server = Server(engine, tok, model_name="tiny", api_key=KEY)
    server.stop_ids = ()
    with serve_in_thread(server, app=create_web_app(server)) as port:
        yield server, port


def _browser_binaries() -> tuple[str | None, str | None]:
    chromium = next((p for p in map(shutil.which, ("chromium", "chromium-browser")) if p), None)
    return chromium, shutil.which("chromedriver")


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium through Selenium and the system chromedriver (no driver or browser downloads: the path is
    given and Selenium Manager is told to stay offline), logging the console and the network."""
    chromium, driver = _browser_binaries()
    missing = [name for name, path in (("chromium", chromium), ("chromedriver", driver)) if path is None]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium (pip install -e '.[test]')")
    if missing:
        reason = f"the browser test needs {', '.join(missing)}: {INSTALL}"
        if os.environ.get("DSV3_REQUIRE_BROWSER") == "1":
            pytest.fail(reason + " (DSV3_REQUIRE_BROWSER=1)")
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ["SE_OFFLINE"] = "true"
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,900",
                "--no-first-run", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--disable-default-apps"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    d = webdriver.Chrome(service=Service(executable_path=driver), options=options)
    d.set_page_load_timeout(30)
    yield d
    d.quit()


def open_page(d, port: int, key: str | None = KEY, view: str = "chat"):
    """Load the page with `key` in this tab's sessionStorage (set on a same-origin page first, as the page's key
    field would), wait until it has started (and read /web/info when it has a key)."""
    from selenium.webdriver.support.ui import WebDriverWait

    d.get(f"http://127.0.0.1:{port}/health")
    d.execute_script("sessionStorage.clear(); if (arguments[0]) sessionStorage.setItem('dsv3-api-key', arguments[0]);",
                     key)
    d.get(f"http://127.0.0.1:{port}/#{view}")
    wait = WebDriverWait(d, 20)
    wait.until(lambda d: d.execute_script("return document.body.dataset.ready === '1'"))
    if key:
        wait.until(lambda d: d.find_element("id", "model-name").text != "")
    return wait


def assert_clean(d, port: int) -> None:
    """No console message at error level, and every request the browser made went to this server (or was data:)."""
    errors = [e for e in d.get_log("browser") if e["level"] == "SEVERE"]
    assert errors == [], errors
    urls = []
    for entry in d.get_log("performance"):
        msg = json.loads(entry["message"])["message"]
        if msg["method"] == "Network.requestWillBeSent":
            urls.append(msg["params"]["request"]["url"])
    urls += d.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    outside = [u for u in urls if not (u.startswith(f"http://127.0.0.1:{port}/") or u.startswith("data:"))]
    assert urls and outside == [], outside


def text_of(d, css: str) -> str:
    return d.execute_script("const e = document.querySelector(arguments[0]); return e ? e.textContent : null", css)


# ------------------------------------------------------------------------------------------------ in the browser
def test_page_loads_offline_without_errors(browser, site):
    server, port = site
    open_page(browser, port)
    assert browser.title == "dsv3"
    assert "tiny" in browser.find_element("id", "model-name").text
    assert "off on this server" in browser.find_element("id", "spec-setting").text  # no MTP speculation here
    for view in ("experts", "simulator", "chat"):
        browser.find_element("id", f"tab-{view}").click()
        assert browser.find_element("id", f"view-{view}").is_displayed()
    assert_clean(browser, port)


def test_chat_streams_the_stop_button_ends_it_and_the_heatmap_follows(browser, site):
    server, port = site
    wait = open_page(browser, port)
    heat = browser.find_element("id", "mini-heatmap")
    before = int(heat.get_attribute("data-steps") or 0)
    generated = server.engine.stats["generated"]
    browser.find_element("id", "max-tokens").clear()
    browser.find_element("id", "max-tokens").send_keys("200")
    browser.find_element("id", "prompt").send_keys("the king")
    browser.find_element("id", "send").click()
    wait.until(lambda d: text_of(d, ".msg.assistant .content"))
    reply = browser.find_element("css selector", ".msg.assistant")
    assert reply.get_attribute("data-state") == "streaming"
    seen, lengths = [], []
    deadline = time.monotonic() + 15
    while len(set(seen)) < 3 and time.monotonic() < deadline:  # the heatmap's step count moves while text streams
        seen.append(int(heat.get_attribute("data-steps") or 0))
        lengths.append(len(text_of(browser, ".msg.assistant .content")))
        time.sleep(0.1)
    assert reply.get_attribute("data-state") == "streaming", "the reply ended before the heatmap was seen to update"
    assert len(set(seen)) >= 3 and seen == sorted(seen) and seen[-1] > before, seen
    assert lengths[-1] > lengths[0], "the reply did not grow while streaming"
    browser.find_element("id", "stop").click()
    wait.until(lambda d: reply.get_attribute("data-state") == "stopped")
    assert "stopped" in text_of(browser, ".msg.assistant .meta")
    deadline = time.monotonic() + 10  # the server sees the hang-up and frees the slot
    while (server.engine.running or server.runner.pending) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not server.engine.running and server.runner.pending == 0
    assert server.engine.stats["generated"] - generated < 200  # it really was cut short
    assert browser.find_element("id", "send").is_enabled()
    assert int(browser.find_element("id", "generated").text) > 0  # /health's counters reach the page
    assert_clean(browser, port)


class _HostileText:
    """A tokenizer whose decoded text starts with HTML (what a model could emit), for the engine's output only."""

    def __init__(self, tok):
        self.tok = tok

    def decode(self, ids, **kw):
        return PAYLOAD + self.tok.decode(ids, **kw)

    def __getattr__(self, name):
        return getattr(self.tok, name)


def test_model_output_is_shown_as_text_never_as_html(browser, site):
    server, port = site
    wait = open_page(browser, port)
    real = server.engine.tokenizer
    server.engine.tokenizer = _HostileText(real)  # the engine thread reads it at each emitted token
    try:
        browser.find_element("id", "max-tokens").clear()
        browser.find_element("id", "max-tokens").send_keys("3")
        browser.find_element("id", "prompt").send_keys(PAYLOAD)  # the user's own text too
        browser.find_element("id", "send").click()
        wait.until(lambda d: d.find_element("css selector", ".msg.assistant").get_attribute("data-state") == "done")
    finally:
        server.engine.tokenizer = real
    assert text_of(browser, ".msg.assistant .content").startswith(PAYLOAD)
    assert text_of(browser, ".msg.user .content") == PAYLOAD
    assert PAYLOAD in browser.find_element("css selector", ".msg.assistant .content").text  # visible, literally
    assert browser.execute_script("return window.__dsv3_pwned === undefined")
    assert browser.execute_script("return document.querySelectorAll('#messages script, #messages img, "
                                  "#messages b').length") == 0
    assert_clean(browser, port)


def test_simulator_runs_the_real_code_with_the_same_numbers(browser, site):
    server, port = site
    wait = open_page(browser, port, view="simulator")
    for name, value in SIM.items():
        field = browser.find_element("id", f"sim-{name}")
        field.clear()
        field.send_keys(str(value))
    browser.find_element("id", "sim-run").click()
    wait.until(lambda d: d.find_element("id", "sim-status").get_attribute("data-state") in ("done", "error"))
    status = browser.find_element("id", "sim-status")
    assert status.get_attribute("data-state") == "done", status.text
    want = simulate(n_experts=SIM["experts"], n_group=SIM["groups"], topk_group=SIM["topk_groups"],
                    top_k=SIM["top_k"], tokens_per_step=SIM["tokens"], steps=SIM["steps"], gamma=SIM["gamma"],
                    skew=SIM["skew"], seed=SIM["seed"], modes=("frozen", "aux_free", "aux_loss"),
                    aux_alpha=SIM["aux_alpha"])
    lines = browser.find_elements("css selector", "#sim-summary .sim-line")
    assert [line.get_attribute("data-mode") for line in lines] == ["frozen", "aux_free", "aux_loss"]
    for line in lines:
        vio = want[line.get_attribute("data-mode")]["max_vio"]
        tail = sum(vio[-20:]) / len(vio[-20:])
        assert int(line.get_attribute("data-steps")) == SIM["steps"]
        # the same floats (JavaScript and Python print a double's shortest round-trip form alike) ...
        assert float(line.get_attribute("data-first")) == vio[0]
        assert float(line.get_attribute("data-last")) == vio[-1]
        assert float(line.get_attribute("data-tail")) == pytest.approx(tail, rel=1e-12)  # Python >= 3.12 sums exactly
        # ... and `dsv3 simulate-routing`'s line
        mode = line.get_attribute("data-mode")
        assert line.text.strip() == (f"{mode:>9}: MaxVio {vio[0]:.3f} at step 1 -> {tail:.3f} (mean of the last 20 "
                                     f"steps)").strip()
    tails = {line.get_attribute("data-mode"): float(line.get_attribute("data-tail")) for line in lines}
    first = float(lines[0].get_attribute("data-first"))
    assert first > 1.0 and tails["frozen"] > 1.0  # skewed, and the frozen bias leaves it so
    assert tails["aux_free"] < 0.4 and tails["aux_free"] < first / 3  # the bias update balances the experts
    # the biases the page shows for aux-loss-free are the simulation's
    shown = browser.execute_script("return state.sim.modes.aux_free.bias[state.sim.modes.aux_free.bias.length - 1]")
    torch.testing.assert_close(torch.tensor(shown), want["aux_free"]["bias"][-1], rtol=0, atol=0)
    assert_clean(browser, port)


def test_page_without_the_key_says_it_needs_one(browser, site):
    server, port = site
    wait = open_page(browser, port, key=None)
    notice = browser.find_element("id", "notice")
    wait.until(lambda d: notice.is_displayed())
    assert "needs an API key" in notice.text
    key = browser.find_element("id", "api-key")
    key.send_keys(KEY + "\n")  # the key field: kept in sessionStorage, the page retries
    wait.until(lambda d: d.find_element("id", "model-name").text != "")
    assert browser.execute_script("return sessionStorage.getItem('dsv3-api-key')") == KEY
    browser.get_log("browser")  # the 401s before the key was given are expected console errors


# ------------------------------------------------------------------------------------------------ no browser
def _get(port, path, key=None):
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("GET", path, headers={"Authorization": f"Bearer {key}"} if key else {})
    resp = conn.getresponse()
    body = resp.read().decode()
    conn.close()
    return resp.status, dict(resp.getheaders()), body


def test_routes_follow_the_servers_security_rules(site):
    server, port = site
    status, headers, body = _get(port, "/")
    assert status == 200 and "script-src 'self'" in headers["content-security-policy"] and "<canvas" in body
    assert "default-src 'none'" in headers["content-security-policy"]
    assert headers["x-content-type-options"] == "nosniff"
    for asset in ("/web/app.js", "/web/style.css"):
        assert _get(port, asset)[0] == 200
    for path in ("/web/info", "/web/experts", "/web/simulate?steps=1"):
        status, _, body = _get(port, path)
        assert status == 401 and json.loads(body)["error"]["code"] == "invalid_api_key", (path, body)
        assert _get(port, path, "wrong")[0] == 401
    status, _, body = _get(port, "/web/info", KEY)
    info = json.loads(body)
    assert status == 200 and info["model"] == "tiny" and info["expert_stats_window"] == 64
    status, _, body = _get(port, "/web/experts", KEY)
    experts = json.loads(body)
    assert status == 200 and experts["enabled"] and experts["layers"] == [1, 2] and len(experts["bias"][0]) == 8
    for query, field in (("experts=1000", "experts"), ("steps=0", "steps"), ("gamma=nan", "gamma"),
                         ("top_k=1.5", "top_k"), ("experts=10&groups=3", "groups"), ("top_k=40", "top_k"),
                         ("modes=frozen,bogus", "modes"), ("seed=-1", "seed"), ("tokens=1e9", "tokens")):
        status, _, body = _get(port, "/web/simulate?" + query, KEY)
        err = json.loads(body)["error"]
        assert status == 400 and err["param"] == field, (query, body)
    assert _get(port, "/web/../etc/passwd")[0] == 404
    status, _, body = _get(port, "/web/simulate?experts=8&groups=2&topk_groups=1&top_k=2&steps=3&tokens=64&"
                                 "modes=frozen", KEY)
    lines = [json.loads(x) for x in body.splitlines()]
    assert status == 200 and lines[0]["settings"]["steps"] == 3 and lines[-1]["done"]
    assert [x["step"] for x in lines[1:-1]] == [1, 2, 3] and set(lines[1]["modes"]) == {"frozen"}


def test_expert_counts_cover_the_last_window_of_decode_steps(tiny):
    """Every decode step's real token positions are counted once per MoE layer and chosen expert (top_k per
    token); the ring keeps the last `window` steps; prefill is not counted; speculative verify positions are."""
    model, tok = tiny
    engine = Engine(model, tok, max_batch=2, max_len=64, expert_stats=1000)
    engine.generate([[5, 6, 7], [8, 9]], SamplingParams(max_new_tokens=6, temperature=0))
    snap = engine.expert_stats.snapshot()
    k = model.config.num_experts_per_tok
    steps = engine.stats["decode_steps"]
    assert snap["steps"] == steps == 5 and snap["tokens"] == 2 * 5  # the first token of each comes from prefill
    assert [sum(row) for row in snap["counts"]] == [snap["tokens"] * k] * len(snap["layers"])
    small = Engine(model, tok, max_batch=2, max_len=64, expert_stats=2)
    small.generate([[5, 6, 7], [8, 9]], SamplingParams(max_new_tokens=6, temperature=0))
    s = small.expert_stats.snapshot()
    assert s["steps"] == 5 and s["steps_in_window"] == 2 and s["tokens"] == 4
    assert torch.equal(small.expert_stats.counts()[0], engine.expert_stats.counts(last=2)[0])  # the last two
    spec = Engine(model, tok, max_batch=1, max_len=64, speculative=True, draft_tokens=2, expert_stats=100)
    spec.generate([[5, 6, 7]], SamplingParams(max_new_tokens=8, temperature=0))
    s = spec.expert_stats.snapshot()
    assert s["tokens"] == 3 * spec.stats["decode_steps"]  # pending token + 2 drafts per verify step
    assert Engine(model, tok, max_batch=1).expert_stats is None  # off by default
    with pytest.raises(dsv3.infer.GenerationError, match="expert_stats"):
        Engine(model, tok, expert_stats=-1)


@pytest.mark.slow
def test_compiled_decode_counts_the_same_experts_without_the_padding(tiny):
    """The compiled step (fullgraph: no graph break from the statistics) counts what eager decode counts: 3 rows
    run in the batch-4 graph, whose padding row is left out."""
    model, tok = tiny
    params = SamplingParams(max_new_tokens=5, temperature=0)
    counts = []
    for compile_ in (False, True):
        engine = Engine(model, tok, max_batch=4, max_len=32, expert_stats=16, compile=compile_)
        engine.generate([[5, 6, 7], [8, 9], [10, 11, 12, 13]], params)
        snap = engine.expert_stats.snapshot()
        assert snap["tokens"] == 3 * 4
        counts.append(snap["counts"])
    assert counts[0] == counts[1]


def test_cli_serve_runs_the_page_with_expert_statistics(tiny, tmp_path, monkeypatch, capsys):
    import dsv3.cli as cli

    model, tok = tiny
    monkeypatch.setattr(cli, "_load_for_inference", lambda args: (tmp_path, model, tok))
    apps = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: apps.append(app))
    base = ["serve", str(tmp_path), "--max-batch", "1", "--max-len", "64", "--no-compile"]

    def serve(*extra):
        assert cli.main(base + list(extra)) == 0
        app = apps[-1]
        app.state.server.runner.stop()
        return app, capsys.readouterr().err

    app, err = serve()
    paths = {getattr(r, "path", None) for r in app.routes}
    assert {"/", "/web/app.js", "/web/style.css", "/web/info", "/web/experts", "/web/simulate"} <= paths
    assert app.state.server.engine.expert_stats.window == cli.EXPERT_STATS_WINDOW
    assert "http://127.0.0.1:8000/" in err
    app, _ = serve("--expert-stats-window", "32")
    assert app.state.server.engine.expert_stats.window == 32
    app, _ = serve("--no-expert-stats")
    assert app.state.server.engine.expert_stats is None


def test_page_files_are_package_data():
    """pyproject ships web_static/* (a non-editable install has them); the page loads nothing from elsewhere."""
    import re
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    data = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["dsv3"]
    static = root / "src" / "dsv3" / "web_static"
    for f in static.iterdir():
        assert any(f.match(f"web_static/{pattern.split('/')[-1]}") for pattern in data), f.name
        text = f.read_text()
        assert not re.search(r"(src|href)=\"(https?:)?//", text), f"{f.name} loads something from elsewhere"
        assert "innerHTML" not in text and "insertAdjacentHTML" not in text and "document.write" not in text
    assert not re.search(r"fetch\(\s*[\"'`]https?:", (static / "app.js").read_text())
