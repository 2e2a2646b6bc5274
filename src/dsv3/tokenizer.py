"""Tokenizers: loading a checkpoint's or dataset's tokenizer, its special tokens, and the chat-template renderer.

Training (`dsv3.train.data`), inference (`dsv3.infer`), the server and the CLI all take their tokenizer from here,
so that serving a model never imports the training package. Tokenizers are HF `tokenizers` files
(`tokenizer.json`); the ones dsv3 trains are byte-level BPE with one special token, `EOT`, written between (and
before) documents.
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import Dsv3Error

EOT = "<|endoftext|>"  # the end-of-text token of the tokenizers dsv3 trains


class TokenizerError(Dsv3Error, ValueError):
    """A missing or unreadable tokenizer file; the message names it."""


def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE `tokenizers.Tokenizer` of `vocab_size` entries (EOT included) learned from `texts`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return tok


def load_tokenizer(path: str | Path):
    """The `tokenizers.Tokenizer` in `path` (a checkpoint or dataset directory holding tokenizer.json, or the file).

    Raises:
        TokenizerError: no tokenizer.json there.
    """
    from tokenizers import Tokenizer

    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.exists():
        raise TokenizerError(f"no tokenizer.json at {path}")
    return Tokenizer.from_file(str(file))


def stop_token_ids(tokenizer) -> tuple[int, ...]:
    """Token ids that end a generation: the end-of-text token when the tokenizer has one."""
    eot = tokenizer.token_to_id(EOT)
    return (eot,) if eot is not None else ()


# ------------------------------------------------------------------------------------------------ chat template
class ChatTemplate:
    """The checkpoint's `tokenizer_config.json` chat template (Jinja) when present, else a plain one.

    The one renderer of chat messages: the server's /v1/chat/completions, `dsv3 chat` and chat data use it."""

    PLAIN_STOP = "\nUser:"

    def __init__(self, checkpoint: str | Path | None):
        self.template = None
        cfg_file = Path(checkpoint) / "tokenizer_config.json" if checkpoint else None
        if cfg_file and cfg_file.exists():
            cfg = json.loads(cfg_file.read_text())
            if cfg.get("chat_template"):
                import jinja2

                self.template = jinja2.Environment().from_string(cfg["chat_template"])
                self.special = {k: cfg.get(k) for k in ("bos_token", "eos_token")}
                for k, v in self.special.items():
                    if isinstance(v, dict):
                        self.special[k] = v.get("content")

    def render(self, messages: list[dict]) -> str:
        """The prompt text for `messages` (OpenAI-style {"role", "content"} dicts), ending where the assistant
        speaks next."""
        if self.template is not None:
            return self.template.render(messages=messages, add_generation_prompt=True, **self.special)
        lines = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
        return "\n".join(lines) + "\nAssistant:"

    @property
    def default_stops(self) -> tuple[str, ...]:
        """Stop strings the template implies (the plain template's next user turn)."""
        return () if self.template is not None else (self.PLAIN_STOP,)
