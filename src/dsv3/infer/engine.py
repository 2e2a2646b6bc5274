"""Generation engine: continuous batching over a preallocated latent cache, with optional MTP speculation and an
optional compiled decode step.

The cache has `max_batch` rows (slots). Running requests occupy rows 0..n-1 in order; when one finishes, the last
row is copied into its place, so a decode step always runs on the contiguous batch `[:n]` with per-row positions.

One `step()`:
1. one prefill forward (never mixed into the decode batch): either several waiting prompts together, whole
   (right-padded to the longest), or the next chunk of one prompt — a prompt longer than
   `prefill_chunk` tokens, or one whose start was found in the prefix store (`infer/prefix.py`: those latent rows
   are copied into its slot and only the rest is prefilled). A prompt's last piece also samples its first token,
   and the request joins the decode batch;
2. one decode step for every running row: plain (one token per row, absorbed attention over the cache), or
   speculative with the MTP module (below).
So a long prompt is prefilled in chunks interleaved with the running requests' decode steps (chunked prefill, as
in Sarathi-Serve and vLLM), stalling them by one chunk at a time, not by the whole prompt; `prefill_share` bounds
the fraction of the time those chunks take while other requests decode. A request in the middle of its prefill
holds the row just after the decode rows (`prefilling`).

MTP speculation with k chained drafts (DeepSeek-V3 section 2.2's module used as a drafter, as vLLM and SGLang do;
the acceptance rule of Leviathan et al. 2023). Invariant at the start of a step, per row: the main cache holds
positions < n, the MTP cache holds the pairs (h_j, t_{j+1}) for j < n (the last one reads the pending token t_n,
sampled but not yet fed to the main model), and drafts d_1..d_k for positions n+1..n+k with their draft
distributions q_1..q_k.
  verify   the main model reads [t_n, d_1..d_k] at positions n..n+k in one forward -> p_0..p_k and h_n..h_{n+k};
  accept   d_i while u * q_i(d_i) <= p_{i-1}(d_i) (greedy: while d_i = argmax p_{i-1}); at the first rejection
           resample from normalise(max(0, p_{i-1} - q_i)) (greedy: argmax), else a bonus token from p_k. With a
           drafts kept a + 1 tokens are new; the rejected positions are simply not kept (the per-row length is
           the rollback: stale cache slots are masked, then overwritten);
  draft    the MTP module reads the k + 1 pairs (h_{n+i}, t_{n+i+1}) at positions n..n+k, of which the first a + 1
           are real (the rest keep the batch rectangular and are overwritten later), and its output at position
           n + a gives d'_1; then it reads its own output hidden state with d'_{j-1} one position further for
           each next draft d'_j (one module reused k times).
The output distribution is exactly the main model's; greedy output is the same token sequence as plain decoding.

Compiled decode (`compile=True`): the decode forwards (main model and MTP module) run through `torch.compile` with
static shapes, one graph per batch-size bucket (powers of two up to max_batch, padded with free cache rows) and
per token count (the weights stay graph inputs: inductor's `freezing`, which makes them constants, measured no
faster here, -3% to +5%). Under compile the model attends over the whole cache row (masked) and runs the routed experts
through `RoutedExperts.gathered`; the engine checks every position before the step, since the graph does not.
Prefill stays eager (its shapes vary with every prompt). Dynamo checks no guards on the model's modules before a
call (the model must not change while the engine serves), and each engine counts its own graphs (`compile_options`,
`compile_decode`). On CPU inductor writes each graph's wrapper, the code that calls its kernels in turn, in C++
rather than Python, and runs the step's few-row products as reductions over all cores (`gemv.FewRowMatmul`).

Expert statistics (`expert_stats=N`, what `dsv3 serve`'s page shows live): the decode forward also returns the main
MoE layers' top-k expert ids, which `ExpertStats` (infer/expert_stats.py) keeps for the last N steps (a reference per
step: no device op, no host sync) and counts when asked; off (N = 0), the forward is unchanged.
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
from ..model.moe import RoutedExperts
from ..model.transformer import at_positions
from ..tokenizer import stop_token_ids
from .detokenize import IncrementalText
from .expert_stats import ExpertStats
from .gemv import FewRowMatmul
from .head import DecodeHead, DraftHead
from .prefix import PrefixEntry, PrefixStore

SEED_MAX = 2**64 - 1  # torch.Generator.manual_seed takes an unsigned 64-bit seed
GEMV_MAX_ROWS = 16  # the compiled decode step's products with at most this many rows run as reductions (gemv.py)
MAX_LOGPROBS = 20  # alternatives per position, vLLM's limit (the legacy OpenAI API allowed 5)


class GenerationError(Dsv3Error, ValueError):
    """A request that cannot be served as asked; names the field."""


def compile_options(device: torch.device, max_rows: int = GEMV_MAX_ROWS) -> dict:
    """`torch.compile` options of the compiled decode step:
    - `guard_filter_fn`: dynamo checks no guard on the model's modules before each call (their parameters' shapes,
      strides and attributes), only on the step's inputs, the engine and globals. A profile put dynamo's guard
      check at ~0.2 ms of a ~2.5 ms step; against checking them (`decode_compile.py --variants "module guards"`)
      the `small` step measured 1.07x (0.94-1.16) at batch 1, 1.23x at a 2K context, 1.10x speculating (k = 3),
      level at batch 16.
      This assumes what an engine already does (`DecodeHead` packs the head's weight once): the model's modules do
      not change while the engine serves; a changed constant or parameter shape would not be noticed. Other
      engines are not affected: each compiles graphs of its own (checked with two engines on one model, and on two
      models differing only in a constant, each equal to its eager engine).
    On CPU also:
    - `cpp_wrapper`: the graph's wrapper (allocations and kernel calls, ~60 per layer) runs as compiled C++, not as
      Python; the `small` decode step was 1.11-1.14x faster with it at batch 1 (32 and 2,000-token contexts, greedy
      tokens identical; `benchmarks/decode_compile.py`), at ~15-20 s more compile time per graph with a cold cache
      (building the wrapper needs a C++ compiler and the Python headers, as inductor's CPU kernels already do);
    - `post_grad_custom_post_pass`: `gemv.FewRowMatmul(max_rows)`, the float32 products of at most `max_rows` rows
      (sequences x tokens of a step) as inductor reductions over all cores instead of the library's one-thread
      path: the `small` step 1.56-1.84x faster at batch 1, 1.45-1.48x at batch 2 (`decode_compile.py`, README)."""
    options: dict = {"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe}
    if device.type == "cpu":
        options.update(cpp_wrapper=True, post_grad_custom_post_pass=FewRowMatmul(max_rows))
    return options


def compile_decode(fn: Callable, options: dict, graphs: int) -> Callable:
    """`torch.compile` of one decode forward with `options` (`compile_options`): static shapes, one whole graph per
    input shape, at most `graphs` of them, counted for this call alone (`isolate_recompiles`: other engines' graphs
    of the same forward do not count against its limit, and no global dynamo setting is raised)."""
    return torch.compile(fn, dynamic=False, fullgraph=True, options=options, recompile_limit=graphs,
                         isolate_recompiles=True)


@dataclass
class SamplingParams:
    """How one request samples: temperature (0 = greedy) with optional top-k / top-p, its own seeded generator,
    when it stops (max_new_tokens, stop token ids, stop strings), and which log-probabilities it reports.

    logprobs: for every generated token, its log-probability and the `logprobs` most likely alternatives (0: the
        token's alone), from the model's raw distribution (log-softmax of the logits, before temperature, top-k
        and top-p: what vLLM reports by default).
    prompt_logprobs: the same for every prompt token after the first, given the tokens before it (an echo of the
        prompt's likelihood). Such a prompt is always prefilled, never copied from the prefix store; with it
        max_new_tokens may be 0 (score the prompt only).
    """

    max_new_tokens: int = 128
    temperature: float = 1.0  # 0: greedy
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    logprobs: int | None = None
    prompt_logprobs: int | None = None

    def validate(self) -> SamplingParams:
        """Itself, when every field is in range (checked before a request joins a batch, so that nothing
        request-specific can fail inside a batched step).

        Raises:
            GenerationError: naming the field out of range.
        """
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(self, name)
            if k is not None and (not isinstance(k, int) or isinstance(k, bool) or not 0 <= k <= MAX_LOGPROBS):
                raise GenerationError(f"{name} must be an integer in [0, {MAX_LOGPROBS}], got {k!r}")
        least = 0 if self.prompt_logprobs is not None else 1
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < least:
            raise GenerationError(f"max_new_tokens must be an integer >= {least}"
                                  f"{' (0 only to score a prompt, with prompt_logprobs)' if least else ''}, "
                                  f"got {self.max_new_tokens!r}")
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
    pos: int = 0  # tokens of this request in the main cache (while prefilling: prompt tokens done)
    reuse: int | None = None  # prompt tokens to copy from the prefix store (None: not looked up yet)
    entry: PrefixEntry | None = None  # the prefix store's entry holding them
    pending: int = -1  # the newest sampled token, not yet read by the model
    drafts: list[int] = field(default_factory=list)  # MTP drafts for positions pos+1.. to verify next step
    draft_probs: list[torch.Tensor] = field(default_factory=list)  # [V] each draft's distribution (sampled only)
    gen: torch.Generator | None = None  # this request's sampler (seeded: same seed, same tokens in any batch)
    emitted_chars: int = 0  # characters of `text` already passed to on_update
    text: IncrementalText | None = None  # the output's text, decoded a window at a time (with a tokenizer)


@dataclass
class TokenLogprob:
    """A token's log-probability under the model's raw distribution at its position, and the `k` most likely
    tokens there with theirs (token id -> logprob, most likely first; the chosen token's value is the same float
    as `logprob` when it is among them)."""

    token: int
    logprob: float
    top: dict[int, float]


def token_logprobs(logits: torch.Tensor, tokens: list[int], k: int) -> list[TokenLogprob]:
    """TokenLogprob for each row of logits [n, V] (fp32 log-softmax) and its token; k alternatives each."""
    logp = torch.log_softmax(logits.float(), dim=-1)  # [n, V]
    chosen = logp.gather(1, torch.tensor(tokens, device=logp.device)[:, None])[:, 0].tolist()
    top = logp.topk(k, dim=-1) if k else None
    out = []
    for i, (tok, value) in enumerate(zip(tokens, chosen)):
        alts = dict(zip(top.indices[i].tolist(), top.values[i].tolist())) if k else {}
        out.append(TokenLogprob(tok, value, alts))
    return out


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
    logprobs: list[TokenLogprob] = field(default_factory=list)  # one per output token (params.logprobs)
    prompt_logprobs: list[TokenLogprob | None] = field(default_factory=list)  # per prompt token, the first None
    slot: DecodeSlot = field(default_factory=DecodeSlot, repr=False)  # engine state, not a result

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


def _probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Sampling distributions [n, V] (fp32, on the CPU, where every request's generator lives) from logits [n, V],
    row i after params[i]'s temperature, top-k and top-p: one division and one softmax for all the rows, the
    top-k / top-p cuts row by row where asked."""
    temperature = torch.tensor([max(p.temperature, 1e-6) for p in params])  # [n]
    logits = logits.float().cpu() / temperature[:, None]
    for row, p in zip(logits, params):
        if p.top_k is not None and p.top_k < row.shape[-1]:
            row.masked_fill_(row < row.topk(p.top_k).values[-1], float("-inf"))
    probs = logits.softmax(-1)
    for row, p in zip(probs, params):
        if p.top_p is not None and p.top_p < 1:
            sorted_p, idx = row.sort(descending=True)
            keep = sorted_p.cumsum(-1) - sorted_p < p.top_p  # smallest prefix reaching top_p
            row.zero_().scatter_(0, idx, sorted_p * keep)
            row /= row.sum()
    return probs


def _sample(probs: torch.Tensor, gens: list[torch.Generator | None]) -> list[int]:
    """One token per row of probs [n, V] (unnormalised is fine) by inverse transform sampling: one uniform u from
    the row's generator gens[i], then the first token whose cumulative probability (in fp64) exceeds u x the row's
    total. Exactly the categorical distribution, as `torch.multinomial`, which on CPU draws V exponentials per sample
    instead of one uniform: at V = 8,192 one row took 182-185 us that way and 19-32 us this way, 16 rows 2,959 us
    and 150 us (`benchmarks/host_step.py`, this project's CPU), a cost per sampled row and step. Each row draws from
    its own generator only, so a request's tokens do not depend on the rows it shares a step with.

    Raises:
        GenerationError: a row whose total is not a positive number (NaN logits from a broken model).
    """
    if not gens:
        return []
    cdf = probs.double().cumsum(-1)  # [n, V]
    total = cdf[:, -1]  # [n]
    if not bool((total > 0).all()):
        raise GenerationError(f"cannot sample from a distribution that sums to {float(total.min())} (NaN logits?)")
    u = torch.stack([torch.rand((), generator=g, dtype=torch.float64) for g in gens])  # [n]
    picked = torch.searchsorted(cdf, (u * total)[:, None], right=True)[:, 0].tolist()  # cdf[i-1] <= u*total < cdf[i]
    # u * total rounded up to the total (defensive: not seen in 10^6 random totals): the row's last token with mass
    return [i if i < cdf.shape[1] else int(probs[b].nonzero()[-1]) for b, i in enumerate(picked)]


def speculative_accept(p: torch.Tensor, q: torch.Tensor, draft: int, gen: torch.Generator | None
                       ) -> tuple[bool, int]:
    """The speculative-sampling rule: keep `draft` ~ q with probability min(1, p/q), else resample from
    normalise(max(0, p - q)). Returns (accepted, token); the token is distributed exactly as p."""
    u = torch.rand((), generator=gen)
    if u * q[draft] <= p[draft]:
        return True, draft
    residual = (p - q).clamp(min=0)
    return False, _sample((residual if residual.sum() > 0 else p)[None], [gen])[0]


class Engine:
    """Continuous-batching generation over the latent KV cache (DeepSeek-V3 §2.1.1: only the compressed latent
    and the shared rope key are cached, and decode attends straight over it with the absorbed projections).

    Requests wait in `waiting`, are prefilled together into free cache rows, then decode together in
    `running` (one token per step, or up to draft_tokens + 1 with MTP speculation: the MTP module drafts, the next
    main forward verifies; see the module doc). `step()` advances every running request; `generate()` runs a list
    of prompts to completion. Tensors live on the model's device.

    Logits come from the engine's `DecodeHead` (a packed copy of the output head on CPU; see infer/head.py), applied
    outside the (maybe compiled) forwards.

    draft_tokens: k, the MTP drafts per step when speculative (the context shrinks by k - 1 positions: a verify
        step writes k positions past the last kept token). 1 here (the paper's one draft per MTP module); the
        command line defaults to 3, which measured fastest on the `small` preset (README, speculation tables).
    compile: run the decode forwards through `torch.compile` (module doc); `warmup()` compiles every batch
        bucket up front.
    prefill_chunk: the most prompt tokens one prefill forward takes (padding included): longer prompts are
        prefilled a chunk at a time between decode steps. None: every prompt in one piece.
    prefill_share: the most of the wall time a chunked prefill may take while other requests decode, in (0, 1]:
        after a chunk of t seconds the next one waits until the decode steps since have taken t(1 - share)/share
        (timed by the engine's clock). 1: a chunk every step. With nothing decoding, chunks run back to back.
    prefix_cache_bytes: the prefix store's bound (0: no store). Each request's latent rows are stored when it
        leaves its slot; a prompt starting with stored tokens gets those rows copied instead of prefilled.
    expert_stats: keep `expert_stats` (an `ExpertStats`, infer/expert_stats.py): the tokens each routed expert of
        each main MoE layer received over the last this-many decode steps, counted on the device as the steps run;
        0 (the default): none, and the decode forward is exactly what it is without them.
    draft_vocab: token ids the MTP drafts are restricted to (`DraftHead`: the head's rows for them only, e.g.
        `tokenizer.frequent_token_ids`); None: the full vocabulary. The output stays exactly the main model's.

    Raises:
        GenerationError: speculative decoding without an MTP module, max_batch < 1, max_len < 2,
            draft_tokens < 1, prefill_chunk < 1, prefill_share outside (0, 1], prefix_cache_bytes < 0,
            expert_stats < 0, compile=True for a model whose experts have their own GEMM (FP8 training modules), or
            a draft_vocab without speculation, empty, repeated or outside the vocabulary.
    """

    def __init__(self, model: DeepseekV3, tokenizer=None, max_batch: int = 16, max_len: int | None = None,
                 speculative: bool = False, log: Callable[[str], None] | None = None, draft_tokens: int = 1,
                 compile: bool = False, prefill_chunk: int | None = None, prefill_share: float = 1.0,
                 prefix_cache_bytes: int = 0, expert_stats: int = 0, draft_vocab: list[int] | None = None):
        cfg = model.config
        if speculative and cfg.num_nextn_predict_layers < 1:
            raise GenerationError("speculative decoding needs a model with an MTP module "
                                  "(num_nextn_predict_layers >= 1)")
        if not isinstance(max_batch, int) or max_batch < 1:
            raise GenerationError(f"max_batch must be a positive integer, got {max_batch!r}")
        if max_len is not None and (not isinstance(max_len, int) or max_len < 2):
            raise GenerationError(f"max_len must be an integer >= 2 (a prompt token and an output token), "
                                  f"got {max_len!r}")
        if not isinstance(draft_tokens, int) or draft_tokens < 1:
            raise GenerationError(f"draft_tokens must be a positive integer, got {draft_tokens!r}")
        if prefill_chunk is not None and (not isinstance(prefill_chunk, int) or prefill_chunk < 1):
            raise GenerationError(f"prefill_chunk must be a positive number of tokens or None, got {prefill_chunk!r}")
        if not (isinstance(prefill_share, (int, float)) and 0 < prefill_share <= 1):
            raise GenerationError(f"prefill_share must be a fraction in (0, 1], got {prefill_share!r}")
        if not isinstance(prefix_cache_bytes, int) or prefix_cache_bytes < 0:
            raise GenerationError(f"prefix_cache_bytes must be an integer >= 0, got {prefix_cache_bytes!r}")
        if draft_vocab is not None and not speculative:
            raise GenerationError("draft_vocab restricts the MTP drafts: it needs speculative=True")
        if not isinstance(expert_stats, int) or isinstance(expert_stats, bool) or expert_stats < 0:
            raise GenerationError(f"expert_stats must be a number of decode steps >= 0 (0: off), got {expert_stats!r}")
        if compile and any(type(m)._linear is not RoutedExperts._linear for m in model.modules()
                           if isinstance(m, RoutedExperts)):
            raise GenerationError("compile=True runs the routed experts through RoutedExperts.gathered, which "
                                  "bypasses this model's own expert GEMM (FP8?); load the checkpoint unquantized")
        self.model = model.eval()
        self.head = DecodeHead(model.lm_head.weight)
        try:  # the drafts' head: the full one, or its rows for a reduced draft vocabulary
            self.draft_head = self.head if draft_vocab is None else DraftHead(model.lm_head.weight, draft_vocab)
        except ValueError as e:
            raise GenerationError(str(e)) from None
        self.tokenizer = tokenizer
        self.speculative = speculative
        self.draft_tokens = draft_tokens if speculative else 0
        self.max_batch = max_batch
        # a verify step reads positions up to pos + k, which must stay inside the model's context and the cache
        spare = max(self.draft_tokens - 1, 0)
        room = cfg.max_position_embeddings - spare
        self.max_len = min(max_len or room, room)
        self.cache = model.new_cache(max_batch, self.max_len + 1 + spare)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # decoding, in rows 0..n-1
        self.prefilling: Request | None = None  # part-way through its prompt, in row n
        self.prefill_chunk = prefill_chunk
        self.prefill_share = prefill_share
        self._credit = 0.0  # seconds of chunked prefill the decode steps since the last chunk allow (prefill_share)
        self.prefix = PrefixStore(prefix_cache_bytes) if prefix_cache_bytes else None
        self._next_id = 0
        self.stats = {"generated": 0, "drafted": 0, "accepted": 0, "decode_steps": 0, "decode_time": 0.0,
                      "prefill_time": 0.0, "prefill_tokens": 0, "reused_tokens": 0, "compile_time": 0.0}
        self.accepted_at = [0] * self.draft_tokens  # drafts accepted at each draft position (1..k)
        self.expert_stats = ExpertStats(model, expert_stats) if expert_stats else None
        self.compiled = compile
        self.buckets = sorted({min(2**i, max_batch) for i in range(max_batch.bit_length() + 1)})
        self._seen: set[tuple] = set()  # (kind, bucket, tokens) graphs already compiled
        self._log = log
        # the graphs each compiled forward may build: per batch bucket the main forward needs one (1 token, or k + 1
        # verifying) and the MTP forward two (k + 1 catch-up pairs, one chained draft); 3 leaves room
        self.graph_limit = 3 * len(self.buckets)
        if compile:
            options = compile_options(next(model.parameters()).device)
            self._main_fn = compile_decode(self._main_forward, options, self.graph_limit)
            self._mtp_fn = compile_decode(self._mtp_forward, options, self.graph_limit)
        else:
            self._main_fn, self._mtp_fn = self._main_forward, self._mtp_forward
        if log:
            log(f"latent KV cache: {self.cache.nbytes / 2**20:.1f} MiB for {max_batch} sequences x "
                f"{self.max_len} tokens ({len(self.cache.layers)} layers x (kv_lora_rank {cfg.kv_lora_rank} + "
                f"rope {cfg.qk_rope_head_dim}), {self.cache.layers[0].dtype})")
            if draft_vocab is not None:
                log(f"MTP drafts over {len(self.draft_head.ids)} of {cfg.vocab_size} tokens")

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
        if req is self.prefilling:
            self.prefilling = None  # its row, past the decode rows, is free again
        self._retire_finished()

    def abandon(self, reason: str = "error") -> list[Request]:
        """End every request holding a cache row (running or part-way through its prefill) with `reason`, without
        storing their rows (after a failed step they may be half written); the waiting ones stay queued. Returns
        the ended requests."""
        ended = self.running + ([self.prefilling] if self.prefilling is not None else [])
        for r in ended:
            r.finish_reason = reason
        self.running, self.prefilling = [], None  # every row is free; the next prefill overwrites them
        return ended

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Request]:
        reqs = [self.submit(p, params) for p in prompts]
        while not all(r.done for r in reqs):
            self.step()
        return reqs

    @property
    def acceptance_rate(self) -> float:
        return self.stats["accepted"] / self.stats["drafted"] if self.stats["drafted"] else 0.0

    @torch.no_grad()
    def warmup(self) -> float:
        """Compile every decode graph now (each batch bucket; with speculation the verify and both MTP shapes),
        so that no request waits for a compilation. Call it before the first request. Returns the seconds spent
        (0 when not compiling).

        Raises:
            GenerationError: requests already submitted (the warm-up writes junk into free cache rows).
        """
        if not self.compiled:
            return 0.0
        if self.running or self.waiting:
            raise GenerationError("warmup() runs before the first request")
        t0 = time.perf_counter()
        k = self.draft_tokens
        for n in self.buckets:  # junk ids at position 0 of free rows
            ids, start = [[0] * (k + 1)] * n, [0] * n
            logits, hidden = self._run_main(ids, start)
            if self.speculative:
                h, _ = self._run_mtp(hidden, ids, start, [0] * n)
                if k > 1:
                    self._run_mtp(h[:, :1], [[0]] * n, start)
        seconds = time.perf_counter() - t0
        if self._log:
            self._log(f"compiled the decode step for batch sizes {self.buckets} in {seconds:.0f} s")
        return seconds

    @property
    def busy(self) -> bool:
        """Whether any request is waiting, prefilling or decoding."""
        return bool(self.waiting or self.running or self.prefilling is not None)

    @torch.no_grad()
    def step(self) -> None:
        """One prefill forward when a prompt is waiting or part-way (module doc), then one decode step."""
        if self.prefilling is None:
            self._admit()
        if self.prefilling is not None and (not self.running or self.prefill_share >= 1 or self._credit >= 0):
            t = time.perf_counter()
            self._prefill_chunk()
            self._credit -= time.perf_counter() - t
        if self.running:
            t = time.perf_counter()
            (self._speculative_step if self.speculative else self._decode_step)()
            dt = time.perf_counter() - t
            self.stats["decode_time"] += dt
            self.stats["decode_steps"] += 1
            if self.prefilling is not None and self.prefill_share < 1:
                self._credit += dt * self.prefill_share / (1 - self.prefill_share)

    # ---------------------------------------------------------------- forwards
    def _main_forward(self, ids: torch.Tensor, start: torch.Tensor | int
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The main model over the cache, without its head: ids [B, T] at positions start.. -> (h [B, T, D]
        (final-normed), with expert statistics on the main MoE layers' expert ids [L, B*T, K], else None)."""
        out = self.model(ids, cache=self.cache, start_pos=start, mtp=False, head=False)
        if self.expert_stats is None:
            return out.hidden_states, None
        return out.hidden_states, torch.stack([r.topk_idx for r in out.routing[: len(self.expert_stats.layers)]])

    def _mtp_forward(self, h: torch.Tensor, ids: torch.Tensor, start: torch.Tensor, at: torch.Tensor | None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """The MTP module over its cache, without the head: pairs (h [B, T, D], ids [B, T]) -> (h^1 [B, T, D],
        the normed state [B, D] the head reads at position `at` of each row, the last when None)."""
        return self.model.mtp_step(1, h, ids, self.cache, start, logits_at=at, head=False)

    def _bucket(self, n: int) -> int:
        return next(b for b in self.buckets if b >= n)

    def _timed(self, key: tuple, fn, *args):
        """Run a (maybe compiled) forward; the first call of each graph counts as compile time."""
        if not self.compiled or key in self._seen:
            return fn(*args)
        t0 = time.perf_counter()
        out = fn(*args)
        self._seen.add(key)
        self.stats["compile_time"] += time.perf_counter() - t0
        return out

    def _pad(self, ids: list[list[int]], start: list[int], extra: int) -> tuple[torch.Tensor, torch.Tensor]:
        """ids [n, T] and starts [n] as tensors on the model's device, padded with `extra` junk rows at position 0
        (they write into free cache rows, which a later prefill overwrites)."""
        device = self.cache.layers[0].device
        ids_t = torch.tensor(ids + [[0] * len(ids[0])] * extra, device=device)
        return ids_t, torch.tensor(start + [0] * extra, device=device)

    def _check_positions(self, start: list[int], t: int) -> None:
        last = max(start) + t
        if last > self.cache.max_len:  # the compiled step cannot check its own indices
            raise GenerationError(f"positions up to {last} exceed the cache ({self.cache.max_len})")

    def _run_main(self, ids: list[list[int]], start: list[int], record: bool = False
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """Main forward for n rows: (logits [n, T, V], h [n, T, D]). record: count its routing in
        `expert_stats` (a decode step's forward, not a warm-up's)."""
        n, t = len(ids), len(ids[0])
        if not self.compiled:
            ids_t, start_t = self._pad(ids, start, 0)
            # one row: a plain int position needs no per-row mask
            h, experts = self._main_fn(ids_t, start[0] if n == 1 else start_t)
        else:
            self._check_positions(start, t)
            b = self._bucket(n)
            h, experts = self._timed(("main", b, t), self._main_fn, *self._pad(ids, start, b - n))
            h = h[:n]
        if record and experts is not None:
            self.expert_stats.record(experts, n * t)  # the padding rows come after the n real ones
        return self.head(h), h

    def _run_mtp(self, h: torch.Tensor, ids: list[list[int]], start: list[int], at: list[int] | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """MTP forward for n rows (h [n, T, D]): (h^1 [n, T, D], logits [n, V])."""
        n, t = len(ids), len(ids[0])
        b = self._bucket(n) if self.compiled else n
        if b > n:
            h = torch.cat([h, h.new_zeros(b - n, *h.shape[1:])])
        ids_t, start_t = self._pad(ids, start, b - n)
        at_t = None if at is None else torch.tensor(at + [0] * (b - n), device=ids_t.device)
        if self.compiled:
            self._check_positions(start, t)
        h1, normed = self._timed(("mtp", b, t, at is None), self._mtp_fn, h, ids_t, start_t, at_t)
        return h1[:n], self.draft_head(normed[:n])

    # ---------------------------------------------------------------- steps
    def _lookup(self, req: Request) -> int:
        """Prompt tokens of `req` to copy from the prefix store (once per request): the stored match, less one
        token (the last prompt position is always computed, for its logits; and the MTP row before the match's
        end reads the token after it), so at most len(prompt) - 1."""
        if req.slot.reuse is None:
            use = self.prefix is not None and req.params.prompt_logprobs is None  # echo needs every position
            entry, hit = self.prefix.lookup(req.prompt) if use else (None, 0)
            req.slot.reuse, req.slot.entry = max(min(hit, len(req.prompt)) - 1, 0), entry
        return req.slot.reuse

    def _admit(self) -> None:
        """Take waiting requests into the rows after the decode rows: several whole prompts that fit one chunk
        together (prefilled now), or a single one to prefill a chunk per step (`prefilling`): a prompt longer
        than a chunk, or one with a stored prefix (those rows are copied into its slot)."""
        budget = self.prefill_chunk or math.inf
        group: list[Request] = []
        while self.waiting and len(self.running) + len(group) < self.max_batch:
            r = self.waiting[0]
            if self._lookup(r) or len(r.prompt) > budget:
                if group:
                    break  # it goes alone, next
                self.waiting.popleft()
                r.slot.row, r.slot.pos = len(self.running), r.slot.reuse
                if r.slot.pos:
                    rows = r.slot.entry.rows
                    for layer, stored in zip(self.cache.layers, rows):
                        layer[r.slot.row, : r.slot.pos] = stored[: r.slot.pos]
                    self.stats["reused_tokens"] += r.slot.pos
                r.slot.entry = None
                self.prefilling, self._credit = r, 0.0
                return
            if (len(group) + 1) * max(len(g.prompt) for g in [*group, r]) > budget:
                break
            group.append(self.waiting.popleft())
        if group:
            for i, r in enumerate(group):
                r.slot.row = len(self.running) + i
            self.running.extend(group)  # before the forward: a failed step then ends them with the batch
            self._started(group, self._prefill(group, 0, max(len(r.prompt) for r in group)))

    def _prefill_chunk(self) -> None:
        """The next chunk of `prefilling`'s prompt; its row first follows the decode rows if some of them left."""
        r = self.prefilling
        if r.slot.row != len(self.running):
            self.cache.move_row(r.slot.row, len(self.running), r.slot.pos)
            r.slot.row = len(self.running)
        first = self._prefill([r], r.slot.pos, min(len(r.prompt), r.slot.pos + (self.prefill_chunk or len(r.prompt))))
        if first is not None:
            self.running.append(r)
            self.prefilling = None
            self._started([r], first)

    def _prefill(self, reqs: list[Request], start: int, stop: int) -> torch.Tensor | None:
        """Prefill prompt positions [start, stop) of `reqs` (consecutive rows from reqs[0]'s) in one forward (the
        model picks the attention form by cost), their pieces right-padded to the longest (causal attention keeps
        the padding out of every real token's view; the padded positions are past each row's length, masked later
        and overwritten). A row whose prompt ends here samples its first token at its own last position (and its
        first drafts); one whose prompt goes on (a chunk, only ever alone) just advances. Rows asking for
        prompt_logprobs get those of the piece's tokens. Returns the logits [m, V] the first tokens were sampled
        from when the prompts ended, else None."""
        t0 = time.perf_counter()
        first = reqs[0].slot.row
        view = self.cache.rows(first, first + len(reqs))
        device = self.cache.layers[0].device
        pieces = [r.prompt[start:stop] for r in reqs]
        width = stop - start
        ids = torch.tensor([p + [0] * (width - len(p)) for p in pieces], device=device)  # [m, width]
        last = torch.tensor([len(p) - 1 for p in pieces], device=device)  # [m]
        out = self.model(ids, cache=view, start_pos=start, mtp=False, head=False)
        ends = all(start + len(p) == len(r.prompt) for r, p in zip(reqs, pieces))
        first = None
        if ends:
            first = self.head(at_positions(out.hidden_states, last))  # [m, V]
            for r, tok in zip(reqs, self._choose(reqs, first)[0]):
                r.slot.pending = tok
        for i, (r, p) in enumerate(zip(reqs, pieces)):
            r.slot.pos = start + len(p)
            if r.params.prompt_logprobs is not None:
                if start == 0:
                    r.prompt_logprobs.append(None)  # the first token has no context
                nxt = r.prompt[start + 1 : r.slot.pos + 1]  # what positions start.. predict, inside the prompt
                if nxt:
                    r.prompt_logprobs += token_logprobs(self.head(out.hidden_states[i, : len(nxt)]), nxt,
                                                        r.params.prompt_logprobs)
        if self.speculative:
            # MTP over every pair (h_j, t_{j+1}) of the piece; at a prompt's end the last pair reads the sampled token
            nxt = [r.prompt[start + 1 : r.slot.pos + 1] + ([r.slot.pending] if ends else []) for r in reqs]
            nxt = torch.tensor([n + [0] * (width - len(n)) for n in nxt], device=device)
            h1, normed = self.model.mtp_step(1, out.hidden_states, nxt, view, start, logits_at=last, head=False)
            if ends:
                self._draft(reqs, at_positions(h1, last)[:, None], self.draft_head(normed))
        self.stats["prefill_time"] += time.perf_counter() - t0
        self.stats["prefill_tokens"] += sum(len(p) for p in pieces)
        return first

    def _started(self, reqs: list[Request], logits: torch.Tensor) -> None:
        """Emit the first token of requests whose prompt is now in the cache (they are in the decode rows), sampled
        from logits [n, V]."""
        for r, row in zip(reqs, logits):
            self._emit(r, [r.slot.pending], row[None])
        self._retire_finished()

    def _decode_step(self) -> None:
        reqs = self.running
        logits, _ = self._run_main([[r.slot.pending] for r in reqs], [r.slot.pos for r in reqs], record=True)
        for r, tok, row in zip(reqs, self._choose(reqs, logits[:, -1])[0], logits[:, -1:]):
            r.slot.pos += 1
            r.slot.pending = tok
            self._emit(r, [tok], row)
        self._retire_finished()

    def _speculative_step(self) -> None:
        reqs, k = self.running, self.draft_tokens
        ids = [[r.slot.pending, *r.slot.drafts] for r in reqs]  # [n, k+1]
        start = [r.slot.pos for r in reqs]
        logits, hidden = self._run_main(ids, start, record=True)  # verify: [n, k+1, V], [n, k+1, D]
        greedy = logits.argmax(-1).tolist()  # [n][k+1]
        pair_ids, at = [], []
        for b, r in enumerate(reqs):
            new = self._accept(r, logits[b], greedy[b])  # a accepted drafts, then one more token
            a = len(new) - 1
            r.drafted += k
            r.accepted += a
            self.stats["drafted"] += k
            self.stats["accepted"] += a
            for i in range(a):
                self.accepted_at[i] += 1
            # MTP pairs at positions n..n+k: (h_{n+i}, t_{n+i+1}), real for i <= a, filler after
            pair_ids.append((new + [new[-1]] * k)[: k + 1])
            at.append(a)
            r.slot.pos, r.slot.pending = r.slot.pos + a + 1, new[-1]
            self._emit(r, new, logits[b, : len(new)])
        h1, first = self._run_mtp(hidden, pair_ids, start, at)
        h_at = at_positions(h1, torch.tensor(at, device=h1.device))[:, None]  # [n, 1, D]
        # draft only for the rows that go on (a finished row's chain could run past its cache row); retiring
        # first compacts the rows, so the kept rows' hidden states and logits follow them in order
        live = [b for b, r in enumerate(reqs) if not r.done]
        self._retire_finished()
        if live:
            self._draft(self.running, h_at[live], first[live])

    def _draft(self, reqs: list[Request], h: torch.Tensor, logits: torch.Tensor) -> None:
        """Set k drafts per row: the first from `logits` [n, V] (the MTP output at each row's newest pair, whose
        hidden state is h [n, 1, D]), each next one by feeding the MTP module its own h and the previous draft
        one position further."""
        for r in reqs:
            r.slot.drafts, r.slot.draft_probs = [], []
        for j in range(self.draft_tokens):
            if j:
                start = [r.slot.pos + j - 1 for r in reqs]  # the pair (h^1, d_j) sits at pos + j - 1
                h, logits = self._run_mtp(h, [[r.slot.drafts[-1]] for r in reqs], start)
            tokens, dists = self._choose(reqs, logits)
            for b, (r, tok) in enumerate(zip(reqs, tokens)):
                r.slot.drafts.append(tok)
                if b in dists:
                    r.slot.draft_probs.append(dists[b])

    def _choose(self, reqs: list[Request], logits: torch.Tensor) -> tuple[list[int], dict[int, torch.Tensor]]:
        """One token per row from logits [n, V]: one argmax for the greedy rows, one `_probs` and one `_sample` for
        the sampled ones (each with its row's generator). Returns the tokens and the sampled rows' distributions
        (row -> [V])."""
        out = logits.argmax(-1).tolist()
        rows = [b for b, r in enumerate(reqs) if r.params.temperature != 0]
        if not rows:
            return out, {}
        probs = _probs(logits[rows], [reqs[b].params for b in rows])  # [len(rows), V]
        for b, tok in zip(rows, _sample(probs, [reqs[b].slot.gen for b in rows])):
            out[b] = tok
        return out, dict(zip(rows, probs))

    def _accept(self, req: Request, logits: torch.Tensor, greedy: list[int]) -> list[int]:
        """Verify req's drafts against the main model's logits [k+1, V] at positions n..n+k (greedy: their
        argmaxes): the accepted drafts, then the correction or bonus token."""
        drafts, out = req.slot.drafts, []
        sampled = req.params.temperature != 0
        probs = _probs(logits, [req.params] * len(logits)) if sampled else None  # [k+1, V]
        for i, d in enumerate(drafts):
            if sampled:
                ok, tok = speculative_accept(probs[i], req.slot.draft_probs[i], d, req.slot.gen)
            else:
                ok, tok = d == greedy[i], greedy[i]
            out.append(tok)
            if not ok:
                return out
        out.append(_sample(probs[-1:], [req.slot.gen])[0] if sampled else greedy[len(drafts)])  # the bonus token
        return out

    def _emit(self, req: Request, tokens: list[int], logits: torch.Tensor) -> None:
        """Append sampled tokens (sampled from logits [len(tokens), V], for their log-probabilities), applying stop
        ids, stop strings and the length limit; stream new text."""
        p = req.params
        logprobs = token_logprobs(logits, tokens, p.logprobs) if p.logprobs is not None else None
        for i, tok in enumerate(tokens):
            if req.done:
                break
            if len(req.output) >= p.max_new_tokens:  # max_new_tokens 0: a scored prompt, nothing generated
                req.finish_reason = "length"
                break
            if tok in p.stop_ids:
                req.finish_reason = "stop"
                break
            req.output.append(tok)
            if logprobs is not None:
                req.logprobs.append(logprobs[i])
            self.stats["generated"] += 1
            if len(req.output) >= p.max_new_tokens:
                req.finish_reason = "length"
        delta = ""
        if self.tokenizer is not None:
            if req.slot.text is None:
                req.slot.text = IncrementalText(self.tokenizer)
            text = req.slot.text.update(req.output)  # = tokenizer.decode(req.output)
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
        """Drop finished requests from the decode rows (storing their rows in the prefix store, if any), moving the
        last rows into the holes."""
        keep = [r for r in self.running if not r.done]
        if self.prefix is not None:
            for r in self.running:
                if r.done:  # the cache holds (prompt + output)[:pos]: the pending token was never read
                    m = min(r.slot.pos, len(r.prompt) + len(r.output))
                    self.prefix.put((r.prompt + r.output)[:m], [t[r.slot.row, :m] for t in self.cache.layers])
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
