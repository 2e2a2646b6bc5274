"""`dsv3 serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over the continuous-batching engine.

Endpoints: POST /v1/completions, POST /v1/chat/completions (both with `stream: true` as server-sent events),
GET /v1/models, GET /health (open even when an API key is set; 503 when the engine thread is not running).

One background thread owns the engine. Request handlers read and validate the body, hand the request to that
thread and await its text through an asyncio queue; the thread admits new requests (each prefilled on its own)
between decode steps that serve every running request at once. Failure handling, in order of defence (details
in infer/DESIGN.md):
- admission: the body size is limited before parsing (413), the JSON must be an object of bounded nesting (400),
  every per-request value is checked against an explicit range (400 naming the field), so nothing a client sends
  can fail inside a batched forward; at most `max_batch + max_queue` requests are in the server (429 beyond);
- serving: an exception in an engine step fails that step's batch (500 with the message) and the thread goes on;
  a client that disconnects, or a request past its deadline (504), is ended between steps and its slot freed;
- the thread itself: if it ever stops, every request it held gets a 503 and /health answers 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import json
import logging
import math
import queue
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.background import BackgroundTask

from ..errors import Dsv3Error
from ..tokenizer import ChatTemplate, ChatTemplateError, special_tokens, stop_token_ids
from .engine import MAX_LOGPROBS, SEED_MAX, Engine, GenerationError, SamplingParams, TokenLogprob

log = logging.getLogger("dsv3.serve")

# stop strings per request and characters per stop string: OpenAI allows 4 stop strings, but lm-eval's generation
# tasks send up to 5 plus the end-of-text token (vLLM sets no limit); 16 keeps the per-token check bounded
MAX_STOPS, MAX_STOP_CHARS = 16, 256
MAX_NESTING = 64  # JSON arrays / objects inside one another in a request body
MAX_PROMPTS = 32  # prompts in one /v1/completions request (each is its own engine request; lm-eval sends batches)
LOGPROB_FLOOR = -9999.0  # what a log-probability of -inf (or NaN) is reported as: JSON has no infinities
RETRY_AFTER_S = 1  # the Retry-After of a 429


class ServerConfigError(Dsv3Error, ValueError):
    """A server setting out of range (queue length, timeout, body limit); names the setting."""


class RequestError(Exception):
    """An HTTP error answered with OpenAI's error body `{"error": {"message", "type", "param", "code"}}`."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message, self.param, self.status, self.code, self.headers = message, param, status, code, headers

    def body(self) -> dict:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


# ------------------------------------------------------------------------------------------------ engine thread
@dataclass(eq=False)
class _Job:
    """One request on its way through the engine thread. The handler owns `out` and sets `cancelled`; the
    engine thread owns everything else."""

    prompt: list[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue  # (delta, finish_reason, n_output_tokens) tuples, then possibly a RequestError
    deadline: float  # time.monotonic() after which the engine thread ends the request (504)
    timeout: float  # seconds, for the message
    cancelled: bool = False  # the client is gone: free the slot at the next step boundary
    ended: bool = False  # the job has left the engine thread (finished, failed, cancelled or timed out)
    request: object = None  # the engine's Request once admitted

    def cancel(self) -> None:
        self.cancelled = True  # a plain attribute write: safe from the event loop while the engine thread reads it

    def post(self, item) -> None:
        """(engine thread) Hand `item` to the waiting handler."""
        try:
            self.loop.call_soon_threadsafe(self.out.put_nowait, item)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            self.cancelled = True


class EngineThread:
    """Runs the engine in its own thread. `submit` and `alive` are safe to call from the event loop.

    `capacity` bounds the requests in the thread (running + waiting): `submit` raises a 429 `RequestError` when
    it is reached, a 503 when the thread has stopped. Every submitted job ends exactly once, with its last text
    and finish reason, or with a `RequestError` posted to its queue (except when cancelled: nobody is listening).
    """

    def __init__(self, engine: Engine, capacity: int):
        self.engine = engine
        self.capacity = capacity
        self.inbox: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self.jobs: list[_Job] = []  # admitted to the engine and not yet ended (engine thread only)
        self.pending = 0  # submitted and not yet ended (under `lock`)
        self.lock = threading.Lock()
        self.closed = False  # the thread has stopped taking jobs (under `lock`)
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name="dsv3-engine", daemon=True)
        self.thread.start()

    @property
    def alive(self) -> bool:
        return self.thread.is_alive() and not self.closed

    def submit(self, job: _Job) -> None:
        """Queue `job` for the engine thread.

        Raises:
            RequestError: 503 when the thread has stopped, 429 (with Retry-After) when it holds `capacity` jobs.
        """
        with self.lock:
            if self.closed or not self.thread.is_alive():
                raise RequestError("the engine thread is not running: this server cannot generate (see its log)",
                                   status=503, code="engine_unavailable")
            if self.pending >= self.capacity:
                raise RequestError(f"the server is busy: {self.pending} requests are running or waiting, the "
                                   f"most it holds; retry later", status=429, code="server_busy",
                                   headers={"Retry-After": str(RETRY_AFTER_S)})
            self.pending += 1
            self.inbox.put(job)

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join(timeout=5)

    # ---------------------------------------------------------------- the thread
    def _run(self) -> None:
        try:
            while not self.stopped.is_set():
                try:
                    self._iteration()
                except Exception as e:  # noqa: BLE001 - a failed step fails its batch, never the server
                    self._fail_running(e)
        finally:
            with self.lock:
                self.closed = True  # from here on `submit` refuses, so the inbox can be drained for good
            left = self.jobs + _drain(self.inbox)
            for job in left:
                self._end(job, RequestError("the engine thread stopped before this request finished", status=503,
                                            code="engine_unavailable"))

    def _iteration(self) -> None:
        engine = self.engine
        try:
            job = self.inbox.get_nowait() if engine.busy else self.inbox.get(timeout=0.05)
        except queue.Empty:
            job = None
        while job is not None:
            self._admit(job)
            try:
                job = self.inbox.get_nowait()
            except queue.Empty:
                job = None
        self._reap()
        if engine.busy:
            engine.step()

    def _admit(self, job: _Job) -> None:
        if job.cancelled:
            self._end(job)
            return

        def on_update(req, delta):  # called by the engine, inside `step`, on this thread
            item = (delta, req.finish_reason, len(req.output))
            if req.done:
                self._end(job, item)
            else:
                job.post(item)

        try:
            job.request = self.engine.submit(job.prompt, job.params, on_update=on_update)
        except GenerationError as e:  # the handler validates first, so this is a second line of defence
            self._end(job, RequestError(str(e)))
        except Exception as e:  # noqa: BLE001 - one request that cannot be admitted fails alone
            log.exception("dsv3 serve: could not admit a request")
            self._end(job, RequestError(f"the engine could not admit this request ({type(e).__name__}: {e})",
                                        status=500, code="engine_error"))
        else:
            self.jobs.append(job)

    def _reap(self) -> None:
        """End cancelled requests and those past their deadline, freeing their slots."""
        now = time.monotonic()
        for job in self.jobs:
            if job.ended:
                continue
            if job.cancelled:
                self.engine.cancel(job.request)
                self._end(job)
            elif now > job.deadline:
                self.engine.cancel(job.request, "timeout")
                self._end(job, RequestError(f"the request did not finish within this server's limit of "
                                            f"{job.timeout:g} s (--request-timeout)", status=504, code="timeout"))
        self.jobs = [job for job in self.jobs if not job.ended]

    def _fail_running(self, error: Exception) -> None:
        """After an exception in a step: fail the running batch (500), keep the waiting requests."""
        log.exception("dsv3 serve: an engine step failed; failing its batch and serving on")
        batch = {id(r) for r in self.engine.abandon("error")}
        err = RequestError(f"generation failed inside the engine ({type(error).__name__}: {error}); the server "
                           f"goes on serving", status=500, code="engine_error")
        for job in self.jobs:
            if id(job.request) in batch:
                self._end(job, err)
        self.jobs = [job for job in self.jobs if not job.ended]

    def _end(self, job: _Job, item=None) -> None:
        """(engine thread) `job` leaves: release its place in the capacity, then post `item` (its last text or
        its error) if any, so that a client who has its answer finds the place free."""
        if job.ended:
            return
        job.ended = True
        with self.lock:
            self.pending -= 1
        if item is not None and not job.cancelled:
            job.post(item)


def _drain(q: queue.SimpleQueue) -> list:
    items = []
    with contextlib.suppress(queue.Empty):
        while True:
            items.append(q.get_nowait())
    return items


# ------------------------------------------------------------------------------------------------ validation
def _get(body: dict, key: str, types, default=None, check=None, rule: str = ""):
    """body[key] checked for type (booleans are not numbers here) and rule; `default` when absent or null.

    Raises:
        RequestError: 400 naming `key`.
    """
    value = body.get(key)
    if value is None:
        return default
    types = types if isinstance(types, tuple) else (types,)
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        raise RequestError(f"'{key}' must be of type {_type_name(types)}, got {_json_type(value)}", key)
    if check is not None and not check(value):
        raise RequestError(f"'{key}' {rule} (got {_short(value)})", key)
    return value


def _type_name(types: tuple) -> str:
    return " or ".join({int: "integer", float: "number", str: "string", list: "array", bool: "boolean",
                        dict: "object"}.get(t, t.__name__) for t in types)


def _json_type(value) -> str:
    return _type_name((type(value),)) if value is not None else "null"


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:30] + f"... ({len(text)} characters)"


def _nesting_ok(value, limit: int) -> bool:
    """Whether arrays and objects in `value` nest at most `limit` deep (iterative: no recursion on client data)."""
    stack = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        children = v.values() if isinstance(v, dict) else v if isinstance(v, list) else None
        if children is None:
            continue
        if depth > limit:
            return False
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))
    return True


def bind_warning(host: str, api_key: str | None) -> str | None:
    """The warning `dsv3 serve` prints when it binds `host` without an API key and `host` is not loopback-only
    (anyone who can reach the address can use the model), else None."""
    if api_key or host == "localhost":
        return None
    with contextlib.suppress(ValueError):
        if ipaddress.ip_address(host).is_loopback:
            return None
    return (f"warning: serving on {host} without an API key: anyone who can reach this address can use the "
            f"model; set --api-key or DSV3_API_KEY")


class Server:
    """What the HTTP handlers share: the engine thread, the tokenizer and chat template, and the limits.

    Args:
        engine: the engine; its `max_batch` requests run at once, its `max_len` is the context (tokens).
        tokenizer: a `tokenizers.Tokenizer`.
        model_name: the model id clients send and `/v1/models` lists.
        checkpoint: the checkpoint directory (chat template, end-of-sequence ids), or None.
        default_max_tokens: completion length when a /v1/completions request gives none (OpenAI's is 16);
            chat requests default to 256. Either default is cut to the room the context leaves.
        max_queue: requests that may wait for a free slot; beyond `max_batch + max_queue` requests get 429.
        request_timeout: seconds from arrival (queueing included) after which a request is ended with 504.
        api_key: when set, every /v1 route needs `Authorization: Bearer <api_key>` (else 401); /health is open.
        max_body_bytes: request bodies beyond this get 413, before any parsing.

    Raises:
        ServerConfigError: a limit out of range.
        ChatTemplateError, TokenizerError: the checkpoint's chat template or tokenizer files are unusable.
    """

    def __init__(self, engine: Engine, tokenizer, model_name: str = "dsv3", checkpoint: str | Path | None = None,
                 default_max_tokens: int = 16, max_queue: int = 64, request_timeout: float = 600.0,
                 api_key: str | None = None, max_body_bytes: int = 2 * 2**20):
        for name, value, low in (("default_max_tokens", default_max_tokens, 1), ("max_queue", max_queue, 0),
                                 ("max_body_bytes", max_body_bytes, 1)):
            if not isinstance(value, int) or value < low:
                raise ServerConfigError(f"{name} must be an integer >= {low}, got {value!r}")
        if not (isinstance(request_timeout, (int, float)) and math.isfinite(request_timeout)
                and request_timeout > 0):
            raise ServerConfigError(f"request_timeout must be a positive number of seconds, got {request_timeout!r}")
        self.engine = engine
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.template = ChatTemplate(checkpoint)
        self.stop_ids = stop_token_ids(tokenizer, checkpoint)
        self.default_max_tokens = default_max_tokens
        self.max_queue = max_queue
        self.request_timeout = float(request_timeout)
        self.api_key = api_key or None
        self.max_body_bytes = max_body_bytes
        self.runner = EngineThread(engine, capacity=engine.max_batch + max_queue)
        self.created = int(time.time())

    def sampling(self, body: dict, prompt_len: int, prompt_param: str, default_max: int,
                 extra_stops: tuple[str, ...] = (), scoring: bool = False) -> SamplingParams:
        """The sampling parameters of `body`, every value checked against its range (`scoring`: the prompt's own
        log-probabilities are wanted, so max_tokens may be 0).

        Raises:
            RequestError: 400 naming the field (404 for an unknown model); `context_length_exceeded` naming
                `prompt_param` when the prompt leaves no room, `max_tokens` when it asks for more than the room.
        """
        model = _get(body, "model", str)
        if model is not None and model != self.model_name:
            raise RequestError(f"The model '{model}' does not exist; this server serves '{self.model_name}'",
                               "model", 404, "model_not_found")
        _get(body, "n", int, 1, lambda v: v == 1, "must be 1: one choice per request")
        temperature = _get(body, "temperature", (int, float), 1.0, lambda v: 0 <= v <= 2, "must be in [0, 2]")
        top_p = _get(body, "top_p", (int, float), None, lambda v: 0 < v <= 1, "must be in (0, 1]")
        vocab = self.engine.model.config.vocab_size
        top_k = _get(body, "top_k", int, None, lambda v: 1 <= v <= vocab, f"must be in [1, {vocab}] (the vocabulary)")
        seed = _get(body, "seed", int, None, lambda v: 0 <= v <= SEED_MAX, "must be in [0, 2**64 - 1]")
        stops = _stop_strings(body)
        _get(body, "stream", bool)
        context = self.engine.max_len
        room = context - prompt_len
        scoring_only = scoring and body.get("max_tokens") == 0 and body.get("max_completion_tokens") is None
        if room < (0 if scoring_only else 1):  # scoring a prompt (echo, max_tokens 0) needs no free position
            raise RequestError(f"This model's maximum context length is {context} tokens and the {prompt_param} "
                               f"has {prompt_len} tokens: it leaves no room for a completion; shorten it",
                               prompt_param, 400, "context_length_exceeded")
        key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        least = 0 if scoring else 1
        max_tokens = _get(body, key, int, None, lambda v: least <= v <= context, f"must be in [{least}, {context}]"
                          + (" (0 only with echo)" if least else ""))
        if max_tokens is None:
            max_tokens = min(default_max, room)
        elif max_tokens > room:
            raise RequestError(f"This model's maximum context length is {context} tokens; the {prompt_param} has "
                               f"{prompt_len} tokens and {key} asks for {max_tokens} more", key, 400,
                               "context_length_exceeded")
        return SamplingParams(max_new_tokens=max_tokens, temperature=float(temperature),
                              top_p=None if top_p is None else float(top_p), top_k=top_k, seed=seed,
                              stop_ids=self.stop_ids, stop_strings=stops + extra_stops)

    def encode(self, text: str) -> list[int]:
        ids = self.tokenizer.encode(text).ids
        if not ids:
            raise RequestError("the prompt is empty", "prompt")
        return ids

    def prompts(self, body: dict) -> list[list[int]]:
        """The token ids of each prompt of a /v1/completions body: `prompt` as a string, an array of strings, an
        array of token ids or an array of token-id arrays (what lm-eval sends); at most MAX_PROMPTS.

        Raises:
            RequestError: 400 naming `prompt` (missing, empty, another type, a token id outside the vocabulary).
        """
        prompt = body.get("prompt")
        vocab = self.engine.model.config.vocab_size
        what = "a string, an array of strings, an array of token ids or an array of token-id arrays"
        if isinstance(prompt, str):
            return [self.encode(prompt)]
        if not isinstance(prompt, list) or not prompt:
            raise RequestError(f"'prompt' is required: {what}", "prompt")
        if all(isinstance(p, str) for p in prompt):
            items = [self.encode(p) for p in prompt]
        elif all(_is_id(t) for t in prompt):
            items = [prompt]
        elif all(isinstance(p, list) and p and all(_is_id(t) for t in p) for p in prompt):
            items = prompt
        else:
            raise RequestError(f"'prompt' must be {what} (non-empty, integers only)", "prompt")
        if len(items) > MAX_PROMPTS:
            raise RequestError(f"'prompt' holds {len(items)} prompts; this server takes at most {MAX_PROMPTS} per "
                               "request", "prompt")
        for p in items:
            bad = next((t for t in p if not 0 <= t < vocab), None)
            if bad is not None:
                raise RequestError(f"'prompt' has token id {bad}, outside this model's vocabulary [0, {vocab})",
                                   "prompt")
        return items

    def tokenizer_info(self) -> dict:
        """What a remote tokenizer client needs: the special tokens (the checkpoint's `tokenizer_config.json`, else
        the end-of-text token of a dsv3-trained tokenizer as EOS), the chat template (the default one, or null for
        the plain `Role: text` rendering) and the context length."""
        special = special_tokens(self.tokenizer, self.template)
        return {"eos_token": special.get("eos_token"), "bos_token": special.get("bos_token"),
                "pad_token": special.get("pad_token"), "chat_template": self.template.templates.get("default"),
                "model_max_length": self.engine.max_len, "vocab_size": self.engine.model.config.vocab_size,
                "tokenizer_class": "PreTrainedTokenizerFast"}

    def token_text(self, token: int) -> str:
        """One token as text (its bytes decoded alone; a piece of a multi-byte character shows as U+FFFD)."""
        return self.tokenizer.decode([token], skip_special_tokens=False)


def _is_id(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _finite(value: float) -> float:
    return value if math.isfinite(value) else LOGPROB_FLOOR


def completion_logprobs(server: Server, generated: list[TokenLogprob], prompt: list[int] | None = None,
                        prompt_logprobs: list[TokenLogprob | None] | None = None) -> dict:
    """The legacy completions `logprobs` object: `tokens`, `token_logprobs`, `top_logprobs` (token text -> logprob)
    and `text_offset` (into the returned text) of the generated tokens, after the prompt's (echo: `prompt` and its
    `prompt_logprobs`, the first entry null, having no context) when given."""
    entries = []
    if prompt is not None:
        entries.append((prompt[0], None, None))
        entries += [(lp.token, lp.logprob, lp.top) for lp in prompt_logprobs[1:]]
    entries += [(lp.token, lp.logprob, lp.top) for lp in generated]
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    offset = 0
    for token, logprob, top in entries:
        text = server.token_text(token)
        out["tokens"].append(text)
        out["token_logprobs"].append(None if logprob is None else _finite(logprob))
        out["top_logprobs"].append(None if top is None else {server.token_text(t): _finite(v) for t, v in top.items()})
        out["text_offset"].append(offset)
        offset += len(text)
    return out


def chat_logprobs(server: Server, logprobs: list) -> dict:
    """The chat `logprobs` object for some generated tokens: {"content": [{token, logprob, bytes, top_logprobs}]}."""
    def item(token: int, value: float) -> dict:
        text = server.token_text(token)
        return {"token": text, "logprob": _finite(value), "bytes": list(text.encode())}

    return {"content": [{**item(lp.token, lp.logprob), "top_logprobs": [item(t, v) for t, v in lp.top.items()]}
                        for lp in logprobs]}


def _stop_strings(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    items = [stop] if isinstance(stop, str) else stop
    if (not isinstance(items, list) or len(items) > MAX_STOPS
            or not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in items)):
        raise RequestError(f"'stop' must be a non-empty string or an array of up to {MAX_STOPS} non-empty strings, "
                           f"each of at most {MAX_STOP_CHARS} characters", "stop")
    return tuple(items)


def _check_messages(messages) -> None:
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' is required and must be a non-empty array", "messages")
    for i, m in enumerate(messages):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise RequestError(f"messages[{i}] must be an object with string 'role' and 'content'", f"messages[{i}]")
        if m["role"] not in ("system", "user", "assistant"):
            raise RequestError(f"messages[{i}].role must be system, user or assistant", f"messages[{i}].role")


_DISCONNECTED = object()  # put on a job's queue when its client hangs up before the response starts


async def _watch_disconnect(request: Request, outs: list[asyncio.Queue]) -> None:
    """Wait (after the body has been read) for the client to hang up, then tell the handler through `outs`."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    for out in outs:
        out.put_nowait(_DISCONNECTED)


# ------------------------------------------------------------------------------------------------ the app
def create_app(server: Server) -> FastAPI:
    """The FastAPI app serving `server` (kept as `app.state.server`); stops the engine thread on shutdown."""

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        server.runner.stop()

    app = FastAPI(title="dsv3", description="OpenAI-compatible API for a dsv3 DeepSeek-V3 checkpoint",
                  lifespan=lifespan)
    app.state.server = server

    @app.exception_handler(RequestError)
    async def _request_error(_, exc: RequestError):
        return exc.response()

    @app.exception_handler(404)
    async def _not_found(request, exc):
        return RequestError(f"no route {request.url.path}", status=404).response()

    @app.exception_handler(405)
    async def _bad_method(request, exc):
        return RequestError(f"method {request.method} not allowed on {request.url.path}", status=405).response()

    @app.exception_handler(Exception)
    async def _bug(request, exc):  # the server's own bug: still an OpenAI-style body (and a traceback in the log)
        return RequestError(f"internal error ({type(exc).__name__}: {exc})", status=500,
                            code="internal_error").response()

    async def check_api_key(request: Request) -> None:
        if server.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), server.api_key.encode()):
            raise RequestError("Incorrect or missing API key: send 'Authorization: Bearer KEY'", status=401,
                               code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    app.state.check_api_key = check_api_key  # for routes added to this app elsewhere (dsv3.web's page)

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(check_api_key)])

    async def read_body(request: Request) -> dict:
        limit = server.max_body_bytes
        too_big = RequestError(f"the request body is larger than this server's limit of {limit} bytes",
                               status=413, code="request_too_large")
        length = request.headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                raise RequestError(f"invalid Content-Length header {length[:40]!r}")
            if int(length) > limit:
                raise too_big
        chunks, size = [], 0
        async for chunk in request.stream():  # read as it arrives, so a chunked body cannot run past the limit
            size += len(chunk)
            if size > limit:
                raise too_big
            chunks.append(chunk)
        try:
            body = json.loads(b"".join(chunks).decode("utf-8"))
        except UnicodeDecodeError as e:
            raise RequestError(f"the request body is not valid UTF-8 ({e})") from None
        except RecursionError:
            raise RequestError(f"the request body nests arrays or objects more than {MAX_NESTING} deep") from None
        except ValueError as e:  # json.JSONDecodeError, or an integer literal of more than 4300 digits
            raise RequestError(f"the request body is not valid JSON ({e})") from None
        if not isinstance(body, dict):
            raise RequestError(f"the request body must be a JSON object, got {_json_type(body)}")
        if not _nesting_ok(body, MAX_NESTING):
            raise RequestError(f"the request body nests arrays or objects more than {MAX_NESTING} deep")
        return body

    @app.get("/health")
    async def health():
        e = server.engine
        if not server.runner.alive:
            return JSONResponse({"status": "error", "message": "the engine thread is not running"}, status_code=503)
        return {"status": "ok", "running": len(e.running), "waiting": len(e.waiting),
                "prefilling": int(e.prefilling is not None),
                "in_server": server.runner.pending, "capacity": server.runner.capacity,
                "generated_tokens": e.stats["generated"], "acceptance_rate": e.acceptance_rate}

    @v1.get("/models")
    async def models():
        return {"object": "list", "data": [{"id": server.model_name, "object": "model", "created": server.created,
                                            "owned_by": "dsv3"}]}

    @v1.post("/completions")
    async def completions(request: Request):
        body = await read_body(request)
        prompts = server.prompts(body)
        echo = _get(body, "echo", bool, False)
        k = _get(body, "logprobs", int, None, lambda v: 0 <= v <= MAX_LOGPROBS, f"must be in [0, {MAX_LOGPROBS}]")
        if _get(body, "stream", bool, False):
            if echo:
                raise RequestError("'echo' cannot be combined with 'stream'", "echo")
            if len(prompts) > 1:
                raise RequestError("'stream' takes one prompt per request", "prompt")
        params = []
        for ids in prompts:
            p = server.sampling(body, len(ids), "prompt", server.default_max_tokens, scoring=echo)
            p.logprobs, p.prompt_logprobs = k, (k or 0) if echo else None
            params.append(p)
        return await respond(request, body, prompts, params, chat=False, echo=echo)

    @v1.post("/chat/completions")
    async def chat(request: Request):
        body = await read_body(request)
        messages = body.get("messages")
        _check_messages(messages)
        try:
            ids = server.template.encode(server.tokenizer, messages, sanitize_control_tokens=True)
        except ChatTemplateError as e:
            raise RequestError(str(e), "messages") from None
        if not ids:
            raise RequestError("the messages render to an empty prompt", "messages")
        params = server.sampling(body, len(ids), "messages", 256, server.template.default_stops)
        top = _get(body, "top_logprobs", int, None, lambda v: 0 <= v <= MAX_LOGPROBS,
                   f"must be in [0, {MAX_LOGPROBS}]")
        if _get(body, "logprobs", bool, False):
            params.logprobs = top or 0
        elif top is not None:
            raise RequestError("'top_logprobs' needs 'logprobs': true", "top_logprobs")
        return await respond(request, body, [ids], [params], chat=True)

    app.include_router(v1)

    # the tokenizer, at the root as vLLM serves it (lm-eval's remote tokenizer calls these); behind the API key
    @app.get("/tokenizer_info", dependencies=[Depends(check_api_key)])
    async def tokenizer_info():
        return server.tokenizer_info()

    @app.post("/tokenize", dependencies=[Depends(check_api_key)])
    async def tokenize(request: Request):
        body = await read_body(request)
        prompt = _get(body, "prompt", str)
        if prompt is None:
            raise RequestError("'prompt' is required: the text to tokenize", "prompt")
        add = _get(body, "add_special_tokens", bool, True)
        ids = server.tokenizer.encode(prompt, add_special_tokens=add).ids
        return {"tokens": ids, "count": len(ids), "max_model_len": server.engine.max_len}

    @app.post("/detokenize", dependencies=[Depends(check_api_key)])
    async def detokenize(request: Request):
        body = await read_body(request)
        tokens = body.get("tokens")
        vocab = server.engine.model.config.vocab_size
        if not isinstance(tokens, list) or not all(_is_id(t) and 0 <= t < vocab for t in tokens):
            raise RequestError(f"'tokens' must be an array of token ids in [0, {vocab})", "tokens")
        return {"prompt": server.tokenizer.decode(tokens, skip_special_tokens=False)}

    async def respond(request: Request, body: dict, prompts: list[list[int]], params: list[SamplingParams],
                      chat: bool, echo: bool = False):
        """Run one engine request per prompt and answer with one choice each (or stream the single one)."""
        loop = asyncio.get_running_loop()
        jobs: list[_Job] = []
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        handed_over = False
        watcher = None
        try:
            for ids, p in zip(prompts, params):
                job = _Job(ids, p, loop, asyncio.Queue(), time.monotonic() + server.request_timeout,
                           server.request_timeout)
                server.runner.submit(job)  # a 429 here cancels the ones already submitted (finally)
                jobs.append(job)
            watcher = asyncio.create_task(_watch_disconnect(request, [j.out for j in jobs]))
            first = _checked(await jobs[0].out.get())
            if body.get("stream"):
                # from here StreamingResponse watches for the disconnect (and cancels `stream`, whose `finally`
                # cancels the job); the background task covers a stream that never starts
                watcher.cancel()
                handed_over = True
                return StreamingResponse(stream(first, jobs[0], rid, created, chat), media_type="text/event-stream",
                                         background=BackgroundTask(jobs[0].cancel))
            choices, n_in, n_out_all = [], 0, 0
            for i, job in enumerate(jobs):
                text, finish, n_out = first if i == 0 else _checked(await job.out.get())
                while finish is None:
                    delta, finish, n_out = _checked(await job.out.get())
                    text += delta
                req = job.request
                n_in, n_out_all = n_in + len(job.prompt), n_out_all + n_out
                if chat:
                    logprobs = chat_logprobs(server, req.logprobs) if req.params.logprobs is not None else None
                    choices.append({"index": i, "message": {"role": "assistant", "content": text},
                                    "finish_reason": finish, "logprobs": logprobs})
                else:
                    logprobs = None
                    if req.params.logprobs is not None:
                        logprobs = (completion_logprobs(server, req.logprobs, req.prompt, req.prompt_logprobs)
                                    if echo else completion_logprobs(server, req.logprobs))
                    if echo:
                        text = server.tokenizer.decode(job.prompt, skip_special_tokens=False) + text
                    choices.append({"index": i, "text": text, "logprobs": logprobs, "finish_reason": finish})
        finally:
            if not handed_over:
                if watcher is not None:
                    watcher.cancel()
                for job in jobs:
                    job.cancel()  # frees the slot when this handler stops early; a no-op for a finished job
        usage = {"prompt_tokens": n_in, "completion_tokens": n_out_all, "total_tokens": n_in + n_out_all}
        return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
                "model": server.model_name, "choices": choices, "usage": usage}

    async def stream(first, job: _Job, rid: str, created: int, chat: bool):
        obj = "chat.completion.chunk" if chat else "text_completion"

        sent = 0  # generated tokens whose log-probabilities went out

        def chunk(delta: str | None, finish: str | None, role: bool = False, n_out: int = 0) -> str:
            nonlocal sent
            logprobs = None
            req = job.request
            if req is not None and req.params.logprobs is not None and n_out > sent:
                new, sent = req.logprobs[sent:n_out], n_out
                logprobs = chat_logprobs(server, new) if chat else completion_logprobs(server, new)
            if chat:
                d = {"role": "assistant", "content": ""} if role else ({"content": delta} if delta else {})
                choice = {"index": 0, "delta": d, "finish_reason": finish, "logprobs": logprobs}
            else:
                choice = {"index": 0, "text": delta or "", "finish_reason": finish, "logprobs": logprobs}
            return "data: " + json.dumps({"id": rid, "object": obj, "created": created, "model": server.model_name,
                                          "choices": [choice]}) + "\n\n"

        try:
            if chat:
                yield chunk(None, None, role=True)
            item = first
            while True:
                if item is _DISCONNECTED:
                    return
                if isinstance(item, RequestError):  # an engine failure or a timeout after the stream began
                    yield "data: " + json.dumps(item.body()) + "\n\n"
                    break
                delta, finish, n_out = item
                if delta:
                    yield chunk(delta, None, n_out=n_out)
                if finish is not None:
                    yield chunk(None, finish, n_out=n_out)
                    break
                item = await job.out.get()
            yield "data: [DONE]\n\n"
        finally:
            job.cancel()  # the client hung up (this generator was cancelled) or the stream is done

    return app


@contextlib.contextmanager
def serve_in_thread(server: Server, host: str = "127.0.0.1", startup_timeout: float = 30.0,
                    app: FastAPI | None = None):
    """Serve `server` with uvicorn on a free port of `host` in a background thread while the block runs (tests,
    benchmarks, notebooks): yields the port. The thread is stopped on exit. app: the app to serve (one built
    around `server`, e.g. with `dsv3.web.create_web_app`); default `create_app(server)`.

    Raises:
        RuntimeError: uvicorn did not start within `startup_timeout` seconds.
    """
    import socket

    import uvicorn

    with socket.socket() as s:
        s.bind((host, 0))
        port = s.getsockname()[1]
    app = create_app(server) if app is None else app
    srv = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="critical"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout
    while not srv.started and time.monotonic() < deadline and thread.is_alive():
        time.sleep(0.02)
    if not srv.started:
        srv.should_exit = True
        raise RuntimeError(f"uvicorn did not start on {host}:{port} within {startup_timeout:g} s")
    try:
        yield port
    finally:
        srv.should_exit = True
        thread.join(timeout=10)


def _checked(item):
    """A queue item that is text, or the error it carries raised (499 for a client that hung up)."""
    if item is _DISCONNECTED:
        raise RequestError("the client closed the connection", status=499, code="client_closed")
    if isinstance(item, RequestError):
        raise item
    return item
