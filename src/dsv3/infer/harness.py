"""lm-eval (EleutherAI's LM Evaluation Harness) over a dsv3 model in this process: `Dsv3LM`, the `lm_eval` model
that `dsv3 eval RUN --lm-eval TASKS` hands to `lm_eval.simple_evaluate` (through `evaluate_tasks`).

lm-eval asks a model three things (its `LM` interface); here, with the checkpoint's tokenizer and no special tokens
added (the ids lm-eval's remote tokenizer gets from `dsv3 serve`'s /tokenize, so both ways score the same ids):
- `loglikelihood(context, continuation)` -> (log p(continuation | context) summed over its tokens, whether every
  one of them is the argmax). lm-eval's own `TemplateLM` splits the ids: the context is encoded, context +
  continuation is encoded, the continuation is the tail past the context's ids; an empty context is the prefix
  token. One plain forward per (padded) batch of sequences, the output head applied only where a continuation
  token is predicted;
- `loglikelihood_rolling(text)` -> log p(text) over all its tokens, in lm-eval's disjoint windows of `max_length`
  predicted tokens (`lm_eval.utils.get_rolling_token_windows`, one token of context between windows): the first
  window reads the prefix token then the text, each later one the `max_length` tokens before its last;
- `generate_until(context, {until, max_gen_toks})` -> the greedy continuation, cut before the first `until`
  string or at an end-of-sequence token, through dsv3's `Engine` (continuous batching).
The prefix token is the checkpoint's BOS when it names one, else its EOS (`tokenizer.special_tokens`; EOT for a
dsv3-trained tokenizer), as lm-eval's HF model chooses it. lm-eval's remote-tokenizer client takes `bos or eos` by
id, so a BOS of id 0 (DeepSeek-V3's) makes it fall back to EOS there: the two ways then differ in that one token.

This module imports `lm_eval` (the `eval` extra); nothing else in dsv3 imports this module except `dsv3 eval
--lm-eval`, so dsv3 works without lm-eval installed.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from ..errors import Dsv3Error
from ..tokenizer import ChatTemplate, special_tokens, stop_token_ids
from .engine import Engine, SamplingParams

LM_EVAL_EXTRA = "pip install 'dsv3[eval]'"


class HarnessError(Dsv3Error, ValueError):
    """A harness setting or an lm-eval request dsv3 cannot serve (unknown task, sampling asked for, a
    continuation longer than the context); names the culprit."""


class LmEvalMissing(Dsv3Error, ImportError):
    """lm-eval is not installed; the message names the extra that installs it."""


try:
    import lm_eval
    from lm_eval.api.model import TemplateLM
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError as e:
    raise LmEvalMissing(f"--lm-eval needs EleutherAI's lm-eval, which is not installed ({e}); install it with: "
                        f"{LM_EVAL_EXTRA}") from e

DEFAULT_BATCH = 8  # sequences per scoring forward and generations decoded together
DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's default for generate_until when a task gives no max_gen_toks


class Dsv3LM(TemplateLM):
    """A dsv3 model as an `lm_eval.api.model.LM` (a `TemplateLM`: lm-eval tokenizes and splits context from
    continuation, this class scores token ids). See the module docstring for what each request returns.

    Args:
        model: a `DeepseekV3` (any device and precision; log-probabilities are computed in fp32).
        tokenizer: its `tokenizers.Tokenizer`.
        checkpoint: the checkpoint directory (its named special tokens and end-of-sequence ids), or None.
        max_length: tokens one forward reads (the rolling window; contexts are left-truncated to it); default and
            upper bound: the model's context, `max_position_embeddings`.
        batch_size: sequences per scoring forward, and generations decoded together.

    Raises:
        HarnessError: max_length outside [2, context] or batch_size < 1.
    """

    def __init__(self, model, tokenizer, checkpoint: str | Path | None = None, max_length: int | None = None,
                 batch_size: int = DEFAULT_BATCH):
        super().__init__()
        context = model.config.max_position_embeddings
        max_length = context if max_length is None else max_length
        if not isinstance(max_length, int) or not 2 <= max_length <= context:
            raise HarnessError(f"max_length must be an integer in [2, {context}] (the model's context), got "
                               f"{max_length!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise HarnessError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.checkpoint = checkpoint
        self.max_length = max_length
        self.batch_size = batch_size
        special = special_tokens(tokenizer, ChatTemplate(checkpoint))
        self._bos, self._eos = (self._token_id(special.get(name)) for name in ("bos_token", "eos_token"))
        self.stop_ids = stop_token_ids(tokenizer, checkpoint)

    def _token_id(self, text: str | None) -> int | None:
        if text is None:
            return None
        token = self.tokenizer.token_to_id(text)
        return token if token is not None else self.tokenizer.encode(text, add_special_tokens=False).ids[0]

    # ---------------------------------------------------------------- what TemplateLM needs
    @property
    def eot_token_id(self) -> int | None:
        return self._eos

    @property
    def prefix_token_id(self) -> int:
        """The token an empty context and the first rolling window condition on: BOS, else EOS.

        Raises:
            HarnessError: the tokenizer names neither.
        """
        token = self._bos if self._bos is not None else self._eos
        if token is None:
            raise HarnessError("this tokenizer names neither a BOS nor an EOS token, so there is no token to score "
                               "the first token of a text from (tokenizer_config.json: bos_token / eos_token)")
        return token

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """The token ids of `string`, never with special tokens added (lm-eval adds its prefix token itself)."""
        return self.tokenizer.encode(string, add_special_tokens=False).ids

    @torch.no_grad()
    def _loglikelihood_tokens(self, requests: Sequence[tuple], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """(log p(continuation | context), is_greedy) for each (key, context ids, continuation ids) request.

        Each sequence is the last max_length + 1 tokens of context + continuation (older context is dropped); the
        model reads all but the last, and the positions before each continuation token give its log-probability.

        Raises:
            HarnessError: a continuation longer than max_length tokens.
        """
        out: list[tuple[float, bool] | None] = [None] * len(requests)
        # longest first: rows of a batch have similar lengths, so little padding
        order = sorted(range(len(requests)), key=lambda i: -(len(requests[i][1]) + len(requests[i][2])))
        device = self.model.lm_head.weight.device
        for b in range(0, len(order), self.batch_size):
            batch = order[b : b + self.batch_size]
            rows, conts, owners = [], [], []
            for i in batch:
                _, context, continuation = requests[i]
                if len(continuation) > self.max_length:
                    raise HarnessError(f"a continuation of {len(continuation)} tokens is longer than max_length "
                                       f"({self.max_length})")
                if not context:
                    raise HarnessError("a log-likelihood request without context tokens (lm-eval gives the prefix "
                                       "token for an empty context)")
                if not continuation:
                    out[i] = (0.0, True)
                    continue
                rows.append((list(context) + list(continuation))[-(self.max_length + 1):][:-1])
                conts.append(list(continuation))
                owners.append(i)
            if not rows:
                continue
            width = max(map(len, rows))
            ids = torch.tensor([r + [0] * (width - len(r)) for r in rows], device=device)  # [B, T] right-padded
            h = self.model(ids, mtp=False, head=False).hidden_states  # [B, T, D]; causal: padding is never read
            for r, (row, cont, i) in enumerate(zip(rows, conts, owners)):
                at = slice(len(row) - len(cont), len(row))  # the positions that predict the continuation
                logp = torch.log_softmax(self.model.lm_head(h[r, at]).float(), dim=-1)  # [n, V]
                target = torch.tensor(cont, device=device)
                value = float(logp.gather(1, target[:, None]).sum())
                out[i] = (value, bool((logp.argmax(-1) == target).all()))
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """log p(text) summed over all its tokens, for each request's (text,), in disjoint windows of max_length
        predicted tokens (lm-eval's `get_rolling_token_windows` with one token of context)."""
        windows, owner = [], []
        for k, (text,) in enumerate(r.args for r in requests):
            for pair in get_rolling_token_windows(self.tok_encode(text), self.prefix_token_id, self.max_length, 1):
                context, continuation = make_disjoint_window(pair)
                windows.append((None, context, continuation))
                owner.append(k)
        totals = [0.0] * len(requests)
        for k, (value, _) in zip(owner, self._loglikelihood_tokens(windows)):
            totals[k] += value
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """The greedy continuation of each request's (context, gen_kwargs): at most `max_gen_toks` tokens (256 when
        absent), cut before the first of the `until` strings or at an end-of-sequence token. The context is
        left-truncated to leave room for them.

        Raises:
            HarnessError: gen_kwargs ask for sampling (`do_sample`, a temperature > 0): this harness is greedy.
        """
        engine = Engine(self.model, self.tokenizer, max_batch=self.batch_size, max_len=self.max_length)
        reqs = []
        for context, gen_kwargs in (r.args[:2] for r in requests):
            kwargs = dict(gen_kwargs or {})
            if kwargs.get("do_sample") or float(kwargs.get("temperature") or 0) > 0:
                raise HarnessError(f"this harness decodes greedily; the task asks for sampling ({kwargs})")
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_gen = int(kwargs.get("max_gen_toks", DEFAULT_MAX_GEN_TOKS))
            ids = self.tok_encode(context) or [self.prefix_token_id]
            ids = ids[-max(1, self.max_length - max_gen):]
            params = SamplingParams(max_new_tokens=min(max_gen, self.max_length - len(ids)), temperature=0.0,
                                    stop_ids=self.stop_ids, stop_strings=tuple(s for s in until if s))
            reqs.append(engine.submit(ids, params))
        while not all(r.done for r in reqs):
            engine.step()
        return [r.text for r in reqs]


def evaluate_tasks(model, tokenizer, tasks: Sequence[str], include: Sequence[str | Path] = (),
                   limit: int | None = None, checkpoint: str | Path | None = None, max_length: int | None = None,
                   log_samples: bool = False) -> dict:
    """Run lm-eval's `tasks` (names, or task YAML files) on `model` in this process: `lm_eval.simple_evaluate`
    with a `Dsv3LM`. `include`: folders of extra task YAML files (lm-eval's `--include_path`; its own tasks stay
    available, and are not indexed when every task asked for is a task of these folders); `limit`: at most this
    many documents per task.

    Returns lm-eval's results dict: "results" (task -> metric -> value, e.g. "acc,none"), "configs", "versions",
    ... and "samples" (per document) when `log_samples`.

    Raises:
        HarnessError: an unknown task name (naming it), an include folder that is not a folder, limit < 1.
    """
    from lm_eval.tasks import TaskManager

    for folder in include:
        if not Path(folder).is_dir():
            raise HarnessError(f"--lm-eval-include {folder}: not a folder")
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise HarnessError(f"limit must be a positive number of documents, got {limit!r}")
    folders = [str(f) for f in include]
    # lm-eval's own ~200 task folders take ~10-20 s to index on a 2-core machine: skip them when every task asked
    # for is a plain task of the include folders (a group there may name lm-eval's own tasks)
    manager = TaskManager(include_path=folders, include_defaults=False) if folders else None
    if manager is None or not all(t in manager.all_subtasks for t in tasks):
        manager = TaskManager(include_path=folders or None)
    unknown = [t for t in tasks if t not in manager.all_tasks and not Path(t).is_file()]
    if unknown:
        raise HarnessError(f"unknown lm-eval task(s): {', '.join(unknown)} (`lm_eval ls tasks` lists lm-eval's own; "
                           "give a folder of task YAML files with --lm-eval-include)")
    lm = Dsv3LM(model, tokenizer, checkpoint, max_length)
    return lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit,
                                   log_samples=log_samples)
