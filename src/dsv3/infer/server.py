"""`dsv3 serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over the continuous-batching engine.

Endpoints: POST /v1/completions, POST /v1/chat/completions (both with `stream: true` as server-sent events),
GET /v1/models, GET /health.

One background thread owns the engine. Request handlers validate the body, hand the request to that thread and
await its tokens through an asyncio queue; the thread admits new requests (each prefilled on its own) between
decode steps that serve every running request at once. A request that fails validation gets a 4xx with an
OpenAI-style error body and never reaches the engine, so it cannot disturb the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import queue
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from ..tokenizer import ChatTemplate, stop_token_ids
from .engine import Engine, GenerationError, SamplingParams


class RequestError(Exception):
    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.status, self.code = message, param, status, code

    def body(self) -> dict:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


# ------------------------------------------------------------------------------------------------ engine thread
@dataclass
class _Job:
    prompt: list[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue


class EngineThread:
    """Runs the engine in its own thread; `submit` is safe to call from the event loop."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.inbox: queue.Queue[_Job] = queue.Queue()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name="dsv3-engine", daemon=True)
        self.thread.start()

    def submit(self, job: _Job) -> None:
        self.inbox.put(job)

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join(timeout=5)

    def _run(self) -> None:
        engine = self.engine
        while not self.stopped.is_set():
            idle = not engine.running and not engine.waiting
            try:
                job = self.inbox.get(timeout=0.05 if idle else 0)
            except queue.Empty:
                job = None
            while job is not None:
                self._admit(job)
                try:
                    job = self.inbox.get_nowait()
                except queue.Empty:
                    job = None
            if engine.running or engine.waiting:
                try:
                    engine.step()
                except Exception as e:  # an engine failure fails the running requests, not the server
                    for r in engine.running + list(engine.waiting):
                        r.finish_reason = "error"
                        if r.on_update:
                            r.on_update(r, f"__error__:{e}")
                    engine.running, engine.waiting = [], type(engine.waiting)()

    def _admit(self, job: _Job) -> None:
        def on_update(req, delta):
            job.loop.call_soon_threadsafe(job.out.put_nowait, (delta, req.finish_reason, len(req.output)))

        try:
            self.engine.submit(job.prompt, job.params, on_update=on_update)
        except GenerationError as e:
            job.loop.call_soon_threadsafe(job.out.put_nowait, e)


# ------------------------------------------------------------------------------------------------ validation
def _get(body: dict, key: str, types, default=None, check=None, rule: str = ""):
    """body[key] checked for type (booleans are not numbers here) and rule; `default` when absent or null."""
    value = body.get(key)
    if value is None:
        return default
    types = types if isinstance(types, tuple) else (types,)
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        raise RequestError(f"'{key}' must be of type {_type_name(types)}, got {type(value).__name__}", key)
    if check is not None and not check(value):
        raise RequestError(f"'{key}' {rule} (got {value!r})", key)
    return value


def _type_name(types: tuple) -> str:
    return " or ".join({int: "integer", float: "number", str: "string", list: "array", bool: "boolean",
                        dict: "object"}.get(t, t.__name__) for t in types)


class Server:
    def __init__(self, engine: Engine, tokenizer, model_name: str = "dsv3", checkpoint: str | Path | None = None,
                 default_max_tokens: int = 16):
        self.engine = engine
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.template = ChatTemplate(checkpoint)
        self.default_max_tokens = default_max_tokens
        self.runner = EngineThread(engine)
        self.created = int(time.time())

    def sampling(self, body: dict, prompt_len: int, default_max: int, extra_stops: tuple[str, ...] = ()
                 ) -> SamplingParams:
        model = _get(body, "model", str)
        if model is not None and model != self.model_name:
            raise RequestError(f"The model '{model}' does not exist; this server serves '{self.model_name}'",
                               "model", 404, "model_not_found")
        n = _get(body, "n", int, 1)
        if n != 1:
            raise RequestError("only n = 1 is supported", "n")
        key = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
        max_tokens = _get(body, key, int, default_max, lambda v: v >= 1, "must be at least 1")
        context = self.engine.max_len
        if prompt_len + max_tokens > context:
            raise RequestError(f"This model's maximum context length is {context} tokens; the prompt has "
                               f"{prompt_len} and {key} asks for {max_tokens}", key, 400,
                               "context_length_exceeded")
        temperature = _get(body, "temperature", (int, float), 1.0, lambda v: 0 <= v <= 2, "must be in [0, 2]")
        top_p = _get(body, "top_p", (int, float), None, lambda v: 0 < v <= 1, "must be in (0, 1]")
        top_k = _get(body, "top_k", int, None, lambda v: v >= 1, "must be at least 1")
        seed = _get(body, "seed", int)
        stop = body.get("stop")
        if stop is None:
            stops: tuple[str, ...] = ()
        elif isinstance(stop, str):
            stops = (stop,)
        elif isinstance(stop, list) and all(isinstance(s, str) and s for s in stop) and len(stop) <= 4:
            stops = tuple(stop)
        else:
            raise RequestError("'stop' must be a string or an array of up to 4 non-empty strings", "stop")
        _get(body, "stream", bool)
        return SamplingParams(max_new_tokens=max_tokens, temperature=float(temperature),
                              top_p=None if top_p is None else float(top_p), top_k=top_k, seed=seed,
                              stop_ids=stop_token_ids(self.tokenizer),
                              stop_strings=stops + extra_stops)

    def encode(self, text: str) -> list[int]:
        ids = self.tokenizer.encode(text).ids
        if not ids:
            raise RequestError("the prompt is empty", "prompt")
        return ids


def create_app(server: Server) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        server.runner.stop()

    app = FastAPI(title="dsv3", description="OpenAI-compatible API for a dsv3 DeepSeek-V3 checkpoint",
                  lifespan=lifespan)

    @app.exception_handler(RequestError)
    async def _request_error(_, exc: RequestError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(404)
    async def _not_found(request, exc):
        return JSONResponse(RequestError(f"no route {request.url.path}", status=404).body(), status_code=404)

    @app.exception_handler(405)
    async def _bad_method(request, exc):
        err = RequestError(f"method {request.method} not allowed on {request.url.path}", status=405)
        return JSONResponse(err.body(), status_code=405)

    async def read_body(request: Request) -> dict:
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RequestError(f"the request body is not valid JSON ({e})") from None
        if not isinstance(body, dict):
            raise RequestError("the request body must be a JSON object")
        return body

    @app.get("/health")
    async def health():
        e = server.engine
        return {"status": "ok", "running": len(e.running), "waiting": len(e.waiting),
                "generated_tokens": e.stats["generated"], "acceptance_rate": e.acceptance_rate}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": server.model_name, "object": "model", "created": server.created,
                                            "owned_by": "dsv3"}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await read_body(request)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise RequestError("'prompt' is required and must be a string", "prompt")
        ids = server.encode(prompt)
        params = server.sampling(body, len(ids), server.default_max_tokens)
        return await respond(body, ids, params, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await read_body(request)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise RequestError("'messages' is required and must be a non-empty array", "messages")
        for i, m in enumerate(messages):
            if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                raise RequestError(f"messages[{i}] must be an object with string 'role' and 'content'",
                                   f"messages[{i}]")
            if m["role"] not in ("system", "user", "assistant"):
                raise RequestError(f"messages[{i}].role must be system, user or assistant", f"messages[{i}].role")
        ids = server.encode(server.template.render(messages))
        default_max = max(1, min(256, server.engine.max_len - len(ids)))
        params = server.sampling(body, len(ids), default_max, server.template.default_stops)
        return await respond(body, ids, params, chat=True)

    async def respond(body: dict, ids: list[int], params: SamplingParams, chat: bool):
        loop = asyncio.get_running_loop()
        out: asyncio.Queue = asyncio.Queue()
        server.runner.submit(_Job(ids, params, loop, out))
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        first = await out.get()
        if isinstance(first, GenerationError):
            raise RequestError(str(first))
        if body.get("stream"):
            return StreamingResponse(stream(first, out, rid, created, len(ids), chat), media_type="text/event-stream")
        text, finish, n_out = first
        while finish is None:
            delta, finish, n_out = await out.get()
            text += delta
        if finish == "error":
            raise RequestError("generation failed inside the engine", status=500)
        usage = {"prompt_tokens": len(ids), "completion_tokens": n_out, "total_tokens": len(ids) + n_out}
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish,
                      "logprobs": None}
            return {"id": rid, "object": "chat.completion", "created": created, "model": server.model_name,
                    "choices": [choice], "usage": usage}
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        return {"id": rid, "object": "text_completion", "created": created, "model": server.model_name,
                "choices": [choice], "usage": usage}

    async def stream(first, out, rid, created, n_prompt, chat):
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(delta: str | None, finish: str | None, role: bool = False) -> str:
            if chat:
                d = {"role": "assistant", "content": ""} if role else ({"content": delta} if delta else {})
                choice = {"index": 0, "delta": d, "finish_reason": finish, "logprobs": None}
            else:
                choice = {"index": 0, "text": delta or "", "finish_reason": finish, "logprobs": None}
            return "data: " + json.dumps({"id": rid, "object": obj, "created": created, "model": server.model_name,
                                          "choices": [choice]}) + "\n\n"

        if chat:
            yield chunk(None, None, role=True)
        item = first
        while True:
            delta, finish, _ = item
            if finish == "error":
                yield "data: " + json.dumps(RequestError("generation failed", status=500).body()) + "\n\n"
                break
            if delta:
                yield chunk(delta, None)
            if finish is not None:
                yield chunk(None, finish)
                break
            item = await out.get()
        yield "data: [DONE]\n\n"

    return app
