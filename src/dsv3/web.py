"""The page `dsv3 serve` serves at `/`: chat with the model, watch its experts live, run the routing simulator.

The page is three static files shipped in the package (`web_static/`: index.html, app.js, style.css; plain
JavaScript and canvas, nothing fetched from anywhere but this server, so it works offline). It talks only to the
server's own routes:
- POST /v1/chat/completions (streamed) for the chat; GET /health for the live acceptance rate and tokens/s;
- GET /web/info: the model, the server's speculation and expert-statistics settings, the simulator's limits;
- GET /web/experts: per main MoE layer, the tokens each routed expert received over the engine's last N decode
  steps (`infer.expert_stats`) and each router's current `e_score_correction_bias`;
- GET /web/simulate?...: the routing simulator (`train.simulate.simulation`, the project's own router and bias
  update) streamed one step per line (NDJSON) as it computes, in a thread of its own; one runs at a time (one more
  waits, beyond that 429), ended when the client hangs up or after the server's request timeout.

Security (the server's rules, infer/DESIGN.md): the /web JSON routes sit behind the API key like /v1 (the page
keeps the key in sessionStorage and sends it as a bearer token); the page and its two assets are open, as they
hold no data. Model output and anything else from the server is put into the page as text (textContent), never
as HTML, and a Content-Security-Policy allowing only this origin's own scripts, styles and connections backs that
up (no inline script can run). Simulator settings are checked against explicit ranges (400 naming the field).

This module sits above both `infer` and `train` (they must not import each other): it adds these routes to the
app `infer.server.create_app` builds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import re
import threading
import time
from importlib import resources

from fastapi import Depends, FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from starlette.background import BackgroundTask

from .infer.expert_stats import router_biases
from .infer.server import RequestError, Server, create_app
from .train.simulate import MODES, SimulationError, check_settings, simulation

STATIC = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
          "style.css": "text/css; charset=utf-8"}
# only this origin's own files and connections; no inline script, no plugins, no framing
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
PAGE_HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
                "Cache-Control": "no-cache"}

# the simulator's settings: name -> (type, default, low, high); the defaults are `dsv3 simulate-routing`'s
SIM_FIELDS: dict[str, tuple[type, float, float, float]] = {
    "experts": (int, 64, 2, 256),
    "groups": (int, 8, 1, 64),
    "topk_groups": (int, 4, 1, 64),
    "top_k": (int, 8, 1, 64),
    "steps": (int, 400, 1, 1000),
    "tokens": (int, 4096, 16, 8192),
    "gamma": (float, 0.001, 0.0, 1.0),
    "skew": (float, 1.5, 0.0, 20.0),
    "aux_alpha": (float, 0.003, 0.0, 10.0),
    "seed": (int, 0, 0, 2**31 - 1),
}
SIM_NAMES = {"n_group": "groups", "topk_group": "topk_groups"}  # simulate()'s argument -> the query field
MAX_SIMULATIONS = 2  # running + waiting; beyond, 429
_NUMBER = re.compile(r"-?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def static_file(name: str) -> bytes:
    """The bytes of one of the page's files (package data: present in a non-editable install too)."""
    return (resources.files("dsv3") / "web_static" / name).read_bytes()


def simulation_settings(query) -> dict:
    """The simulator's settings from a query string mapping (absent: the default), each checked against its range,
    plus `modes` (comma-separated, default all three).

    Raises:
        RequestError: 400 naming the field (a value out of range or not a number; inconsistent experts, groups
            and top-k).
    """
    out: dict = {}
    for name, (kind, default, low, high) in SIM_FIELDS.items():
        text = query.get(name)
        if text is None or text == "":
            out[name] = default
            continue
        if not _NUMBER.fullmatch(text) or (kind is int and not re.fullmatch(r"-?\d+", text)):
            raise RequestError(f"'{name}' must be {'an integer' if kind is int else 'a number'}, got {text[:40]!r}",
                               name)
        value = kind(text)
        if not (math.isfinite(value) and low <= value <= high):
            raise RequestError(f"'{name}' must be in [{low:g}, {high:g}], got {text[:40]}", name)
        out[name] = value
    modes = tuple(m for m in (query.get("modes") or ",".join(MODES)).split(",") if m)
    out["modes"] = modes
    try:
        check_settings(out["experts"], out["groups"], out["topk_groups"], out["top_k"], modes)
    except SimulationError as e:
        raise RequestError(str(e), SIM_NAMES.get(e.field, e.field)) from None
    return out


def _step_json(i: int, step: dict) -> str:
    modes = {m: {"load": s["load"].tolist(), "bias": s["bias"].tolist(), "max_vio": s["max_vio"]}
             for m, s in step.items()}
    return json.dumps({"step": i + 1, "modes": modes}) + "\n"


def add_web_routes(app: FastAPI, server: Server) -> FastAPI:
    """Add the page (`/`, `/web/app.js`, `/web/style.css`) and its JSON routes to `app` (built by
    `infer.server.create_app` for `server`). Returns `app`."""
    check_api_key = app.state.check_api_key
    files = {name: static_file(name) for name in STATIC}  # read once: a missing file fails at startup
    guarded = [Depends(check_api_key)]
    engine = server.engine
    sims = {"in": 0}  # simulations running or waiting
    sim_lock = asyncio.Lock()

    def page(name: str) -> Response:
        return Response(files[name], media_type=STATIC[name], headers=PAGE_HEADERS)

    @app.get("/", include_in_schema=False)
    async def index():
        return page("index.html")

    @app.get("/web/app.js", include_in_schema=False)
    async def script():
        return page("app.js")

    @app.get("/web/style.css", include_in_schema=False)
    async def style():
        return page("style.css")

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon():  # browsers ask for it on every page of the origin (a JSON one too): none, without a 404
        return Response(status_code=204)

    @app.get("/web/info", dependencies=guarded)
    async def info():
        cfg = engine.model.config
        stats = engine.expert_stats
        return {"model": server.model_name, "speculative": engine.speculative, "draft_tokens": engine.draft_tokens,
                "compiled": engine.compiled, "max_len": engine.max_len, "max_batch": engine.max_batch,
                "expert_stats_window": stats.window if stats is not None else 0,
                "n_routed_experts": cfg.n_routed_experts, "top_k": cfg.num_experts_per_tok,
                "simulator": {"fields": {n: {"default": d, "min": lo, "max": hi, "integer": k is int}
                                         for n, (k, d, lo, hi) in SIM_FIELDS.items()}, "modes": list(MODES)}}

    @app.get("/web/experts", dependencies=guarded)
    async def experts():
        stats = engine.expert_stats
        counters = {k: engine.stats[k] for k in ("generated", "decode_steps", "decode_time", "drafted", "accepted")}
        if stats is None:
            moe = [layer for layer in engine.model.main_layers if layer.is_moe]
            return {"enabled": False, "layers": [layer.layer_idx for layer in moe],
                    "bias": router_biases([layer.mlp.gate for layer in moe]), "engine": counters}
        return {"enabled": True, **await asyncio.to_thread(stats.snapshot), "engine": counters}

    @app.get("/web/simulate", dependencies=guarded)
    async def simulate(request: Request):
        settings = simulation_settings(request.query_params)
        if sims["in"] >= MAX_SIMULATIONS:
            raise RequestError("a routing simulation is already running; retry when it ends", status=429,
                               code="server_busy", headers={"Retry-After": "1"})
        sims["in"] += 1
        held = {"released": False}

        def release() -> None:  # once, from the stream's end or (a stream that never started) the background task
            if not held["released"]:
                held["released"] = True
                sims["in"] -= 1

        return StreamingResponse(_stream(settings, release), media_type="application/x-ndjson",
                                 headers={"Cache-Control": "no-store"}, background=BackgroundTask(release))

    async def _stream(settings: dict, release):
        """NDJSON: {"settings"}, then one {"step", "modes"} line per step, then {"done", "seconds"} (or an
        {"error"} line when the server's request timeout ends it)."""
        stop = threading.Event()
        try:
            async with sim_lock:
                loop = asyncio.get_running_loop()
                lines: asyncio.Queue = asyncio.Queue()
                thread = threading.Thread(target=_produce, args=(settings, lines, loop, stop), daemon=True,
                                          name="dsv3-simulate")
                t0 = time.monotonic()
                thread.start()
                yield json.dumps({"settings": settings}) + "\n"
                while True:
                    try:
                        line = await asyncio.wait_for(lines.get(), max(server.request_timeout - (time.monotonic()
                                                                                                  - t0), 0.001))
                    except TimeoutError:
                        err = RequestError(f"the simulation did not finish within this server's limit of "
                                           f"{server.request_timeout:g} s (--request-timeout)", status=504,
                                           code="timeout")
                        yield json.dumps(err.body()) + "\n"
                        return
                    if line is None:
                        yield json.dumps({"done": True, "seconds": round(time.monotonic() - t0, 3)}) + "\n"
                        return
                    yield line
        finally:
            stop.set()  # the client hung up, the stream ended or timed out: the thread stops at its next step
            release()

    def _produce(settings: dict, lines: asyncio.Queue, loop: asyncio.AbstractEventLoop, stop: threading.Event):
        """(simulation thread) Run the simulation, posting each step's line, then None (after an error line if it
        failed)."""
        s = settings

        def post(item) -> None:
            if not stop.is_set():
                with contextlib.suppress(RuntimeError):  # the event loop is closed: nobody is listening
                    loop.call_soon_threadsafe(lines.put_nowait, item)

        try:
            steps = simulation(n_experts=s["experts"], n_group=s["groups"], topk_group=s["topk_groups"],
                               top_k=s["top_k"], tokens_per_step=s["tokens"], steps=s["steps"], gamma=s["gamma"],
                               skew=s["skew"], seed=s["seed"], modes=s["modes"], aux_alpha=s["aux_alpha"])
            for i, step in enumerate(steps):
                if stop.is_set():
                    return
                post(_step_json(i, step))
            post(None)
        except Exception as e:  # noqa: BLE001 - reported on the stream, never a silent hang
            err = RequestError(f"the simulation failed ({type(e).__name__}: {e})", status=500, code="internal_error")
            post(json.dumps(err.body()) + "\n")
            post(None)

    return app


def create_web_app(server: Server) -> FastAPI:
    """`infer.server.create_app(server)` with the page and its routes (what `dsv3 serve` runs)."""
    return add_web_routes(create_app(server), server)
