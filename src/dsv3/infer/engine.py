"""Generation engine: continuous batching over a preallocated latent cache, with optional MTP speculation.

The cache has `max_batch` rows (slots). Running requests occupy rows 0..n-1 in order; when one finishes, the last
row is copied into its place, so a decode step always runs on the contiguous batch `[:n]` with per-row positions.

One `step()`:
1. admit waiting requests into free rows, each with its own prefill (naive attention over the prompt; prefill is
   never mixed into a decode batch), which also samples the request's first token;
2. one decode step for every running row: plain (one token per row, absorbed attention over the cache), or
   speculative with the MTP module (below).

MTP speculation (depth 1). For a row whose main cache holds positions < n, whose next token t_n is sampled but not
yet fed, and whose draft d for position n+1 came from the MTP module:
  verify   the main model reads [t_n, d] at positions n, n+1 in one forward -> distributions p_n, p_{n+1};
  accept   d with probability min(1, p_n(d) / q(d)) (greedy: iff d = argmax p_n). On acceptance t_{n+1} = d and
           a bonus token t_{n+2} ~ p_{n+1}: two tokens for one main forward. On rejection
           t_{n+1} ~ normalise(max(0, p_n - q)) (greedy: argmax p_n) and position n+1 is simply not kept (the
           per-row length is the rollback; the stale slot is masked and later overwritten);
  draft    the MTP module reads (h_j, t_{j+1}) pairs for the newest two positions (recomputing the older one
           when only one is new, which keeps the batch rectangular) and proposes the next draft.
This is the standard speculative-sampling rule, so the output distribution is exactly the main model's; greedy
output is the same token sequence as plain decoding.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..errors import Dsv3Error
from ..model import DeepseekV3
from ..tokenizer import stop_token_ids

SEED_MAX = 2**64 - 1  # torch.Generator.manual_seed takes an unsigned 64-bit seed


class GenerationError(Dsv3Error, ValueError):
    """A request that cannot be served as asked; names the field."""


@dataclass
class SamplingParams:
    """How one request samples: temperature (0 = greedy) with optional top-k / top-p, its own seeded generator,
    and when it stops (max_new_tokens, stop token ids, stop strings)."""

    max_new_tokens: int = 128
    temperature: float = 1.0  # 0: greedy
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()

    def validate(self) -> SamplingParams:
        """Itself, when every field is in range (checked before a request joins a batch, so that nothing
        request-specific can fail inside a batched step).

        Raises:
            GenerationError: naming the field out of range.
        """
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise GenerationError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise GenerationError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 1):
            raise GenerationError(f"top_k must be an integer >= 1, got {self.top_k!r}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise GenerationError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.seed is not None and (not isinstance(self.seed, int) or not 0 <= self.seed <= SEED_MAX):
            raise GenerationError(f"seed must be an integer in [0, 2**64 - 1], got {self.seed!r}")
        if any(not isinstance(s, str) or not s for s in self.stop_strings):
            raise GenerationError(f"stop strings must be non-empty strings, got {self.stop_strings!r}")
        return self


@dataclass
class DecodeSlot:
    """The engine's decode state of one running request (internal; the caller reads `Request`'s result fields)."""

    row: int = -1  # its row in the batched latent cache
    pos: int = 0  # tokens of this request in the main cache
    pending: int = -1  # the newest sampled token, not yet read by the model
    draft: int = -1  # the MTP draft token to verify next step
    draft_probs: torch.Tensor | None = None  # [V] the draft's sampling distribution (None when greedy)
    prev_h: torch.Tensor | None = None  # [D] h_{pos-1}: (prev_h, pending) is the newest MTP pair
    gen: torch.Generator | None = None  # this request's sampler (seeded: same seed, same tokens in any batch)
    emitted_chars: int = 0  # characters of `text` already passed to on_update


@dataclass
class Request:
    """One generation: what the caller gave (`prompt`, `params`, `on_update`) and what it gets back (`output`,
    `text`, `finish_reason`, the MTP `drafted`/`accepted` counts). The engine's per-request decode state lives
    apart, in `slot`, and is not part of the result."""

    prompt: list[int]
    params: SamplingParams
    on_update: Callable[[Request, str], None] | None = None  # called with each new piece of text (or "")
    id: int = 0
    output: list[int] = field(default_factory=list)
    text: str = ""  # decoded output, cut at a stop string
    finish_reason: str | None = None  # "stop" | "length"; "cancelled" | "timeout" | "error" from `cancel` or a server
    drafted: int = 0  # MTP drafts proposed for this request
    accepted: int = 0  # ... and accepted by the main model
    slot: DecodeSlot = field(default_factory=DecodeSlot, repr=False)  # engine state, not a result

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


def _probs(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Sampling distribution [V] from logits [V] after temperature, top-k and top-p."""
    logits = logits.float() / max(p.temperature, 1e-6)
    if p.top_k is not None and p.top_k < logits.shape[-1]:
        kth = logits.topk(p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    if p.top_p is not None and p.top_p < 1:
        sorted_p, idx = probs.sort(descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < p.top_p  # smallest prefix reaching top_p
        probs = torch.zeros_like(probs).scatter_(0, idx, sorted_p * keep)
        probs /= probs.sum()
    return probs


def _sample(probs: torch.Tensor, gen: torch.Generator | None) -> int:
    return int(torch.multinomial(probs, 1, generator=gen))


def speculative_accept(p: torch.Tensor, q: torch.Tensor, draft: int, gen: torch.Generator | None
                       ) -> tuple[bool, int]:
    """The speculative-sampling rule: keep `draft` ~ q with probability min(1, p/q), else resample from
    normalise(max(0, p - q)). Returns (accepted, token); the token is distributed exactly as p."""
    u = torch.rand((), generator=gen)
    if u * q[draft] <= p[draft]:
        return True, draft
    residual = (p - q).clamp(min=0)
    total = residual.sum()
    return False, _sample(residual / total if total > 0 else p, gen)


class Engine:
    """Continuous-batching generation over the latent KV cache (DeepSeek-V3 §2.1.1: only the compressed latent
    and the shared rope key are cached, and decode attends straight over it with the absorbed projections).

    Requests wait in `waiting`, are prefilled one at a time into a free cache row, then decode together in
    `running` (one token per step, or up to two with MTP speculation: the MTP module drafts, the next main
    forward verifies, §2.2 / Leviathan et al. 2023's acceptance rule). `step()` advances every running request;
    `generate()` runs a list of prompts to completion. Tensors live on the model's device.

    Raises:
        GenerationError: speculative decoding without an MTP module, max_batch < 1 or max_len < 2.
    """

    def __init__(self, model: DeepseekV3, tokenizer=None, max_batch: int = 16, max_len: int | None = None,
                 speculative: bool = False, log: Callable[[str], None] | None = None):
        cfg = model.config
        if speculative and cfg.num_nextn_predict_layers < 1:
            raise GenerationError("speculative decoding needs a model with an MTP module "
                                  "(num_nextn_predict_layers >= 1)")
        if not isinstance(max_batch, int) or max_batch < 1:
            raise GenerationError(f"max_batch must be a positive integer, got {max_batch!r}")
        if max_len is not None and (not isinstance(max_len, int) or max_len < 2):
            raise GenerationError(f"max_len must be an integer >= 2 (a prompt token and an output token), "
                                  f"got {max_len!r}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.speculative = speculative
        self.max_batch = max_batch
        self.max_len = min(max_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
        # one spare slot: a verify step may write one position past the last kept token
        self.cache = model.new_cache(max_batch, self.max_len + 1)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._next_id = 0
        self.stats = {"generated": 0, "drafted": 0, "accepted": 0, "decode_steps": 0, "decode_time": 0.0,
                      "prefill_time": 0.0, "prefill_tokens": 0}
        if log:
            log(f"latent KV cache: {self.cache.nbytes / 2**20:.1f} MiB for {max_batch} sequences x "
                f"{self.max_len} tokens ({len(self.cache.layers)} layers x (kv_lora_rank {cfg.kv_lora_rank} + "
                f"rope {cfg.qk_rope_head_dim}), {self.cache.layers[0].dtype})")

    # ---------------------------------------------------------------- API
    def submit(self, prompt: list[int], params: SamplingParams, on_update=None) -> Request:
        """Queue `prompt` (token ids) for generation; the returned Request fills in as `step()` runs.

        Raises:
            GenerationError: invalid params, an empty prompt, token ids outside the vocabulary, or prompt +
                max_new_tokens beyond the engine's max_len.
        """
        params.validate()
        if not prompt:
            raise GenerationError("the prompt is empty: at least one token is needed")
        vocab = self.model.config.vocab_size
        if any(not 0 <= t < vocab for t in prompt):
            raise GenerationError(f"prompt token ids must be in [0, {vocab})")
        if len(prompt) + params.max_new_tokens > self.max_len:
            raise GenerationError(f"prompt ({len(prompt)} tokens) + max_new_tokens ({params.max_new_tokens}) "
                                  f"exceeds the context of {self.max_len} tokens")
        req = Request(list(prompt), params, on_update, id=self._next_id)
        self._next_id += 1
        req.slot.gen = torch.Generator().manual_seed(params.seed if params.seed is not None else req.id)
        self.waiting.append(req)
        return req

    def cancel(self, req: Request, reason: str = "cancelled") -> None:
        """End `req` now with finish reason `reason`: drop it from the queue, or free its cache row (the last
        running row moves into it). A finished request is left as it is. Call it between steps, from the thread
        that calls `step`."""
        if req.done:
            return
        req.finish_reason = reason
        self.waiting = deque(r for r in self.waiting if r is not req)  # identity: Requests hold tensors
        self._retire_finished()

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Request]:
        reqs = [self.submit(p, params) for p in prompts]
        while not all(r.done for r in reqs):
            self.step()
        return reqs

    @property
    def acceptance_rate(self) -> float:
        return self.stats["accepted"] / self.stats["drafted"] if self.stats["drafted"] else 0.0

    @torch.no_grad()
    def step(self) -> None:
        while self.waiting and len(self.running) < self.max_batch:
            self._prefill(self.waiting.popleft())
        if self.running:
            t = time.perf_counter()
            (self._speculative_step if self.speculative else self._decode_step)()
            self.stats["decode_time"] += time.perf_counter() - t
            self.stats["decode_steps"] += 1

    # ---------------------------------------------------------------- internals
    def _prefill(self, req: Request) -> None:
        t0 = time.perf_counter()
        req.slot.row = len(self.running)
        self.running.append(req)
        view = self.cache.rows(req.slot.row, req.slot.row + 1)
        ids = torch.tensor([req.prompt])
        out = self.model(ids, cache=view, start_pos=0, mtp=False)
        req.slot.pos = len(req.prompt)
        req.slot.pending = self._choose(req, out.logits[0, -1])
        if self.speculative:
            # MTP over every prompt pair (h_j, t_{j+1}); the last pair uses the token just sampled
            nxt = torch.tensor([req.prompt[1:] + [req.slot.pending]])
            _, logits = self.model.mtp_step(1, out.hidden_states, nxt, view, 0)
            self._set_draft(req, logits[0, -1])
            req.slot.prev_h = out.hidden_states[0, -1]
        self.stats["prefill_time"] += time.perf_counter() - t0
        self.stats["prefill_tokens"] += len(req.prompt)
        self._emit(req, [req.slot.pending])
        self._retire_finished()

    def _decode_step(self) -> None:
        reqs = self.running
        ids = torch.tensor([[r.slot.pending] for r in reqs])
        # one row: a plain int position needs no per-row mask
        start = reqs[0].slot.pos if len(reqs) == 1 else torch.tensor([r.slot.pos for r in reqs])
        logits = self.model(ids, cache=self.cache, start_pos=start, mtp=False).logits[:, -1]
        for r, row_logits in zip(reqs, logits):
            r.slot.pos += 1
            r.slot.pending = self._choose(r, row_logits)
            self._emit(r, [r.slot.pending])
        self._retire_finished()

    def _speculative_step(self) -> None:
        reqs = self.running
        ids = torch.tensor([[r.slot.pending, r.slot.draft] for r in reqs])
        start = torch.tensor([r.slot.pos for r in reqs])
        out = self.model(ids, cache=self.cache, start_pos=start, mtp=False)  # verify
        pairs_h, pairs_tok, pairs_start = [], [], []
        for b, r in enumerate(reqs):
            n = r.slot.pos
            r.drafted += 1
            accepted, tok = self._verify(r, out.logits[b, 0])
            new = [tok]
            if accepted:
                r.accepted += 1
                self.stats["accepted"] += 1
                bonus = self._choose(r, out.logits[b, 1])
                new.append(bonus)
                # new MTP pairs at n and n+1: (h_n, d), (h_{n+1}, bonus)
                pairs_h.append(out.hidden_states[b, :2])
                pairs_tok.append([tok, bonus])
                pairs_start.append(n)
                r.slot.pos, r.slot.pending, r.slot.prev_h = n + 2, bonus, out.hidden_states[b, 1]
            else:
                # one new pair at n: (h_n, tok); the pair at n-1 is recomputed to keep T = 2
                pairs_h.append(torch.stack([r.slot.prev_h, out.hidden_states[b, 0]]))
                pairs_tok.append([r.slot.pending, tok])
                pairs_start.append(n - 1)
                r.slot.pos, r.slot.pending, r.slot.prev_h = n + 1, tok, out.hidden_states[b, 0]
            self._emit(r, new)
        self.stats["drafted"] += len(reqs)
        _, logits = self.model.mtp_step(1, torch.stack(pairs_h), torch.tensor(pairs_tok), self.cache,
                                        torch.tensor(pairs_start))
        for b, r in enumerate(reqs):
            self._set_draft(r, logits[b, -1])
        self._retire_finished()

    def _choose(self, req: Request, logits: torch.Tensor) -> int:
        if req.params.temperature == 0:
            return int(logits.argmax())
        return _sample(_probs(logits, req.params), req.slot.gen)

    def _set_draft(self, req: Request, logits: torch.Tensor) -> None:
        if req.params.temperature == 0:
            req.slot.draft, req.slot.draft_probs = int(logits.argmax()), None
        else:
            req.slot.draft_probs = _probs(logits, req.params)
            req.slot.draft = _sample(req.slot.draft_probs, req.slot.gen)

    def _verify(self, req: Request, logits: torch.Tensor) -> tuple[bool, int]:
        if req.params.temperature == 0:
            best = int(logits.argmax())
            return best == req.slot.draft, best
        return speculative_accept(_probs(logits, req.params), req.slot.draft_probs, req.slot.draft, req.slot.gen)

    def _emit(self, req: Request, tokens: list[int]) -> None:
        """Append sampled tokens, applying stop ids, stop strings and the length limit; stream new text."""
        p = req.params
        for tok in tokens:
            if req.done:
                break
            if tok in p.stop_ids:
                req.finish_reason = "stop"
                break
            req.output.append(tok)
            self.stats["generated"] += 1
            if len(req.output) >= p.max_new_tokens:
                req.finish_reason = "length"
        delta = ""
        if self.tokenizer is not None:
            text = self.tokenizer.decode(req.output)
            for s in p.stop_strings:
                cut = text.find(s, max(0, req.slot.emitted_chars - len(s)))
                if cut >= 0:
                    text, req.finish_reason = text[:cut], "stop"
            req.text = text
            # hold back an incomplete UTF-8 character and a possible start of a stop string
            safe = len(text) if req.done else _safe_length(text, p.stop_strings)
            delta = text[req.slot.emitted_chars : safe]
            req.slot.emitted_chars = max(req.slot.emitted_chars, safe)
        if req.on_update is not None and (delta or req.done):
            req.on_update(req, delta)

    def _retire_finished(self) -> None:
        keep = [r for r in self.running if not r.done]
        for new_row, r in enumerate(keep):
            if r.slot.row != new_row:
                self.cache.move_row(r.slot.row, new_row)
                r.slot.row = new_row
        self.running = keep


def sample_text(model: DeepseekV3, tokenizer, prompt: str, max_new_tokens: int = 200, temperature: float = 0.8,
                top_k: int | None = 50, seed: int = 0) -> str:
    """One completion of `prompt` (stops at the end-of-text token): the engine at batch 1."""
    ids = tokenizer.encode(prompt).ids
    engine = Engine(model, tokenizer, max_batch=1, max_len=len(ids) + max_new_tokens)
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, seed=seed,
                            stop_ids=stop_token_ids(tokenizer))
    return engine.generate([ids], params)[0].text


def _safe_length(text: str, stops: tuple[str, ...]) -> int:
    end = len(text)
    while end > 0 and text[end - 1] == "\ufffd":
        end -= 1
    for s in stops:
        for k in range(min(len(s) - 1, end), 0, -1):
            if text[:end].endswith(s[:k]):
                end -= k
                break
    return max(end, 0)
