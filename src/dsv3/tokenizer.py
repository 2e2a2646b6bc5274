"""Tokenizers: loading a checkpoint's or dataset's tokenizer, its special tokens, and the chat-template renderer.

Training (`dsv3.train.data`), inference (`dsv3.infer`), the server and the CLI all take their tokenizer from here,
so that serving a model never imports the training package. Tokenizers are HF `tokenizers` files
(`tokenizer.json`); the ones dsv3 trains are byte-level BPE with one special token, `EOT`, written between (and
before) documents.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import re
from collections.abc import Mapping
from pathlib import Path

from .errors import Dsv3Error

EOT = "<|endoftext|>"  # the end-of-text token of the tokenizers dsv3 trains


class TokenizerError(Dsv3Error, ValueError):
    """A missing or unreadable tokenizer file; the message names it."""


def train_tokenizer(texts: list[str], vocab_size: int, split_digits: bool = False):
    """A byte-level BPE `tokenizers.Tokenizer` of `vocab_size` entries (EOT included) learned from `texts`.

    split_digits: every digit its own token (a `Digits(individual_digits=True)` split before the byte-level one), so
    that numbers are read digit by digit (arithmetic tasks); such a tokenizer is not exported to GGUF (llama.cpp's
    GPT-2 pre-tokenizer would merge digits)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                         if split_digits else byte_level)
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


def frequent_token_ids(tokenizer, n: int, keep: tuple[int, ...] = ()) -> list[int]:
    """The ids of the `n` tokens a BPE vocabulary ranks most frequent, plus `keep` (e.g. the stop ids), sorted: what
    a reduced-vocabulary drafter predicts (FR-Spec, Zhao et al. 2025, ranks by corpus counts; with only the
    tokenizer at hand, its merge list is the ranking: BPE merges the most frequent pair of its training corpus
    first, Sennrich et al. 2016). A merged token ranks at its merge; a base token (a byte of a byte-level BPE)
    just before the first merge that uses it, since it was at least that frequent then; base tokens no merge uses
    rank last, in id order. Special tokens come only through `keep`.

    Raises:
        TokenizerError: n < 1, or a tokenizer that is not BPE (no merges to rank by).
    """
    if n < 1:
        raise TokenizerError(f"the draft vocabulary needs at least one token, got {n}")
    model = json.loads(tokenizer.to_str())["model"]
    if model.get("type") != "BPE":
        raise TokenizerError(f"a reduced draft vocabulary ranks a BPE tokenizer's merges; this tokenizer is "
                             f"{model.get('type')!r}")
    vocab = model["vocab"]
    rank: dict[int, float] = {}
    for i, m in enumerate(model["merges"]):  # ("a b" strings in older tokenizer.json files, else pairs)
        a, b = m if isinstance(m, list) else m.split(" ", 1)
        for part in (a, b):
            rank.setdefault(vocab[part], i - 0.5)  # (a merged part keeps the rank it was made at)
        rank.setdefault(vocab[a + b], i)
    special = {t.content for t in tokenizer.get_added_tokens_decoder().values()}
    unused = sorted(i for t, i in vocab.items() if i not in rank and t not in special)
    ranked = sorted(rank, key=rank.__getitem__) + unused
    return sorted(set(ranked[:n]) | set(keep))


def _read_json(file: Path) -> dict:
    """The JSON object in `file`.

    Raises:
        TokenizerError: the file is not valid JSON or does not hold an object.
    """
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerError(f"cannot read {file}: {e}") from None
    if not isinstance(data, dict):
        raise TokenizerError(f"{file} must hold a JSON object, got {type(data).__name__}")
    return data


def _eos_ids(value, file: Path) -> list[int]:
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise TokenizerError(f"{file}: eos_token_id must be a token id or a list of token ids, got {value!r}")
    return values


def stop_token_ids(tokenizer, checkpoint: str | Path | None = None) -> tuple[int, ...]:
    """Token ids that end a generation, without repeats: the tokenizer's end-of-text token `EOT` when it has one,
    then the checkpoint's `eos_token_id` from `config.json` and from `generation_config.json` (each an int or a
    list of ints, as transformers' `GenerationConfig` writes it; DeepSeek-V3 names `<｜end▁of▁sentence｜>` there).

    `checkpoint` is the checkpoint directory; without it (as before) only `EOT` counts.

    Raises:
        TokenizerError: one of those files is unreadable, or its `eos_token_id` is not an id or a list of ids.
    """
    ids = []
    eot = tokenizer.token_to_id(EOT)
    if eot is not None:
        ids.append(eot)
    if checkpoint is not None:
        for name in ("config.json", "generation_config.json"):
            file = Path(checkpoint) / name
            if file.is_file():
                ids += _eos_ids(_read_json(file).get("eos_token_id"), file)
    return tuple(dict.fromkeys(ids))


def special_tokens(tokenizer, template: ChatTemplate) -> dict[str, str]:
    """The named special tokens (`bos_token`, `eos_token`, ...: token text) of a checkpoint, as its
    `tokenizer_config.json` gives them (`template.special`), with `EOT` as `eos_token` when the config names none
    and the tokenizer has it (a dsv3-trained tokenizer). The server's /tokenizer_info and the lm-eval harness
    (`infer/harness.py`) both read them from here, so both score from the same prefix token."""
    special = dict(template.special)
    if "eos_token" not in special and tokenizer.token_to_id(EOT) is not None:
        special["eos_token"] = EOT
    return special


# ------------------------------------------------------------------------------------------------ chat template
CHAT_TEMPLATE_FILE = "chat_template.jinja"  # where transformers 5 saves a checkpoint's (default) chat template
CHAT_TEMPLATE_DIR = "chat_templates"  # ... and its other, named templates (one NAME.jinja each)
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# Private-use code points (plane 15) that bracket control tokens typed in user text while the template renders, so
# that encoding can tell them from the control tokens the template writes itself (the values transformers uses).
_MARK_START, _MARK_END = "\U000f0000", "\U000f0001"
_REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")
# The plain `Role: text` rendering (`ChatTemplate` without a template) as Jinja, for files that must carry a
# template (GGUF's `tokenizer.chat_template`); tests hold the two renderings equal.
PLAIN_CHAT_TEMPLATE = (
    "{%- for m in messages -%}{%- if not loop.first -%}{{ '\\n' }}{%- endif -%}"
    "{{ (m['role'] if m['role'] is defined and m['role'] is not none else '') | string | capitalize }}: "
    "{{ m['content'] if m['content'] is defined and m['content'] is not none else '' }}"
    "{%- endfor -%}{%- if add_generation_prompt -%}{{ '\\nAssistant:' }}{%- endif -%}"
)


class ChatTemplateError(Dsv3Error, ValueError):
    """A chat template that cannot render these messages: it called `raise_exception(msg)` (the message is then
    exactly `msg`), it tried an unsafe operation the sandbox refused, it does not parse, or it failed on the input.
    The server answers it with HTTP 400."""


class ChatTemplate:
    """The one renderer of chat messages (the server's /v1/chat/completions and `dsv3 chat` use it): the
    checkpoint's Jinja chat template, rendered as transformers' `apply_chat_template` renders it, or a plain
    `Role: text` template for checkpoints that have none.

    Where the template comes from, as in transformers 5: `chat_template.jinja` in the checkpoint when present
    (plus named ones in `chat_templates/*.jinja`), else `tokenizer_config.json`'s `chat_template` (a string, or a
    list of {"name", "template"}). Among named templates, `tool_use` is taken when tools are given and `default`
    otherwise. The template sees `messages`, `add_generation_prompt`, `tools`, `documents`, the named special
    tokens of `tokenizer_config.json` (`bos_token`, `eos_token`, ... and model-specific `*_token` entries such as
    `image_token`: strings) and any extra keyword.

    Templates from a checkpoint are untrusted code, so they run with no access to Python:
    - Jinja's `ImmutableSandboxedEnvironment`: attributes starting with `_` (and Python internals such as
      `func_globals`) are refused, so `cycler.__init__.__globals__`, `self._TemplateReference__context` or
      `().__class__.__base__.__subclasses__()` stop with `ChatTemplateError` instead of reaching `os`; lists and
      dicts cannot be modified in place. jinja2 >= 3.1.6 is required (older versions have known escapes). A
      refused attribute stops the render at once (transformers gives an undefined value that fails when used).
    - every input is rebuilt from plain JSON data (dict, list, str, int, float, bool, None; dataclasses and pydantic
      models through their fields; anything else becomes the string "<TypeName>"), so no caller object with
      methods reaches the template; `namespace` refuses attribute names starting with `_`; `dict` only builds dicts.
    - the environment matches transformers': `trim_blocks` and `lstrip_blocks` on (whitespace differs without
      them), the loop-controls extension (`{% break %}`, `{% continue %}`), `{% generation %}` blocks (rendered
      as their body), `tojson` as `json.dumps` (no HTML escaping; `indent`, `separators`, `sort_keys`,
      `ensure_ascii` arguments), `raise_exception(msg)` and `strftime_now(format)` (local time).
    Messages are cleaned as transformers cleans them: keys whose value is None are dropped, and a reasoning given
    as `reasoning_content`, `thinking` or `reasoning` is offered under the first two names.

    Token ids (`encode`): like transformers, the rendered chat is encoded with `add_special_tokens=False`, so a
    tokenizer whose post-processor adds BOS does not put a second one before a template that writes it. Control
    tokens (special added tokens, plus the added tokens the template's literal text contains, or those listed in
    `tokenizer_config.json`'s `chat_control_tokens`) that a user types into a message are, by default, parsed as
    control tokens: transformers 5.23 does the same unless `apply_chat_template(..., sanitize_control_tokens=True)`.
    `encode(..., sanitize_control_tokens=True)` is that safer mode, with the same result as transformers': control
    tokens inside messages, tools, documents and extra template values are encoded as plain text, and only the ones
    the template writes itself are control tokens. dsv3's server and `dsv3 chat` use it.

    Not supported: `continue_final_message`, tools given as Python functions (give JSON schemas), class-specific
    special-token defaults that some transformers tokenizer classes add when the config leaves a token out.

    Sources: transformers' chat template guide (https://huggingface.co/docs/transformers/main/en/chat_templating,
    chat_templating_writing, chat_extras) and its `apply_chat_template` / `utils/chat_template_utils.py` (5.23);
    Jinja's sandbox (https://jinja.palletsprojects.com/en/stable/sandbox/).

    Raises (constructor):
        ChatTemplateError: the template does not parse (the message names the file and line), or a list of named
            templates has no `default`.
        TokenizerError: `tokenizer_config.json` is not valid JSON.
    """

    PLAIN_STOP = "\nUser:"

    def __init__(self, checkpoint: str | Path | None, *, template: str | None = None,
                 special_tokens: dict[str, str] | None = None):
        """`checkpoint`: a checkpoint directory (or None: the plain template). `template` / `special_tokens`: give
        the template text and special tokens directly instead (they take precedence over the checkpoint's)."""
        self.templates: dict[str, str] = {}  # name -> Jinja source; one unnamed template is stored as "default"
        self.special: dict[str, str] = {}
        self.control_tokens_listed: list[str] | None = None  # tokenizer_config.json's `chat_control_tokens`
        self.origin = "the given template"
        if checkpoint is not None:
            self._read_checkpoint(Path(checkpoint))
        if template is not None:
            self.templates, self.origin = {"default": template}, "the given template"
        if special_tokens is not None:
            self.special = dict(special_tokens)
        if self.templates and "default" not in self.templates:
            raise ChatTemplateError(f"{self.origin} names several chat templates but none is 'default' "
                                    f"(names: {sorted(self.templates)})")
        for name, source in self.templates.items():
            _compile(source, f"{self.origin} ({name})" if len(self.templates) > 1 else self.origin)

    def _read_checkpoint(self, ckpt: Path) -> None:
        cfg_file = ckpt / "tokenizer_config.json"
        cfg = _read_json(cfg_file) if cfg_file.is_file() else {}
        if "added_tokens_decoder" not in cfg and (ckpt / "special_tokens_map.json").is_file():
            cfg = {**cfg, **_read_json(ckpt / "special_tokens_map.json")}  # the legacy file, as transformers reads it
        extra = cfg.get("extra_special_tokens")
        named = {**(extra if isinstance(extra, dict) else {}), **cfg}
        for name, value in named.items():  # bos_token ... mask_token, and model-specific ones such as image_token
            value = value.get("content") if isinstance(value, dict) else value
            if (name in SPECIAL_TOKEN_NAMES or name.endswith("_token")) and isinstance(value, str):
                self.special[name] = value
        listed = cfg.get("chat_control_tokens")
        self.control_tokens_listed = [t for t in listed if isinstance(t, str)] if isinstance(listed, list) else None
        files = {}
        if (ckpt / CHAT_TEMPLATE_FILE).is_file():
            files["default"] = (ckpt / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
        if (ckpt / CHAT_TEMPLATE_DIR).is_dir():
            for f in sorted((ckpt / CHAT_TEMPLATE_DIR).glob("*.jinja")):
                files[f.name.removesuffix(".jinja")] = f.read_text(encoding="utf-8")
        if files:  # template files take precedence over the config's entries, as in transformers
            self.templates = files
            self.origin = str(ckpt / CHAT_TEMPLATE_FILE) if list(files) == ["default"] else str(ckpt)
            return
        entry = cfg.get("chat_template")
        if isinstance(entry, str) and entry:
            self.templates = {"default": entry}
        elif isinstance(entry, list):
            self.templates = {t["name"]: t["template"] for t in entry if isinstance(t, dict) and "name" in t}
        self.origin = f"{cfg_file} chat_template"

    @property
    def template(self) -> str | None:
        """The default template's Jinja source, or None when the plain template is used."""
        return self.templates.get("default")

    @property
    def default_stops(self) -> tuple[str, ...]:
        """Stop strings the template implies (the plain template's next user turn)."""
        return () if self.templates else (self.PLAIN_STOP,)

    def render(self, messages: list[dict], add_generation_prompt: bool = True, *, tools: list[dict] | None = None,
               documents: list[dict] | None = None, **template_kwargs) -> str:
        """The prompt text for `messages` (OpenAI-style {"role", "content", ...} dicts), equal to transformers'
        `apply_chat_template(messages, tokenize=False, ...)`. With `add_generation_prompt` (the default, unlike
        transformers) it ends where the assistant speaks next. `tools` (JSON schemas), `documents` and
        `template_kwargs` are passed to the template as transformers passes them.

        Raises:
            ChatTemplateError: the template raised, was refused by the sandbox, or failed on these messages.
        """
        return self._render(messages, add_generation_prompt, tools, documents, template_kwargs, None)

    def encode(self, tokenizer, messages: list[dict], add_generation_prompt: bool = True, *,
               sanitize_control_tokens: bool = False, tools: list[dict] | None = None,
               documents: list[dict] | None = None, **template_kwargs) -> list[int]:
        """The prompt token ids for `messages` under `tokenizer` (a `tokenizers.Tokenizer`): with a template,
        equal to transformers' `apply_chat_template(messages, ..., sanitize_control_tokens=...)` (the chat encoded
        with `add_special_tokens=False`: the template writes BOS and the like itself). With the plain template, the
        tokenizer's own special tokens are added, as for a plain prompt. `sanitize_control_tokens=True` encodes
        control tokens typed into messages (tools, documents, template values) as plain text; see the class doc.

        Raises:
            ChatTemplateError: as `render`; or, when sanitizing, the tokenizer turns a control token's plain text
                back into the control token (it cannot be sanitized).
        """
        if not sanitize_control_tokens:
            text = self._render(messages, add_generation_prompt, tools, documents, template_kwargs, None)
            return tokenizer.encode(text, add_special_tokens=not self.templates).ids
        added = {t.content for t in tokenizer.get_added_tokens_decoder().values()}
        control = self._control_tokens(tokenizer, tools)
        text = self._render(messages, add_generation_prompt, tools, documents, template_kwargs, _alternation(control))
        ids = _encode_marked(tokenizer, text, added)
        if not self.templates:  # the plain template: the tokenizer's own BOS / EOS around the text, as unsanitized
            prefix, suffix = _post_processor_tokens(tokenizer)
            ids = prefix + ids + suffix
        return ids

    # -------------------------------------------------------------------------------------------- internals
    def _select(self, tools) -> str | None:
        if tools is not None and "tool_use" in self.templates:
            return self.templates["tool_use"]
        return self.templates.get("default")

    def _control_tokens(self, tokenizer, tools) -> tuple[str, ...]:
        """Added tokens that sanitizing protects: the special ones, plus the non-special ones named in
        `chat_control_tokens`, or else those (not whitespace) that the template's literal text contains."""
        added = tokenizer.get_added_tokens_decoder().values()
        if self.control_tokens_listed is not None:
            listed = set(self.control_tokens_listed)
            return tuple(t.content for t in added if t.special or t.content in listed)
        source = self._select(tools)
        literal = _literal_text(source) if source is not None else ""
        return tuple(t.content for t in added
                     if t.special or (t.content in literal and not t.content.isspace()))

    def _render(self, messages, add_generation_prompt, tools, documents, kwargs, mark) -> str:
        if not isinstance(messages, (list, tuple)) or not messages:
            raise ChatTemplateError("a chat needs at least one message")
        if not all(isinstance(m, Mapping) for m in messages):
            raise ChatTemplateError("chat messages must be dicts with 'role' and 'content'")
        if documents is not None and not all(isinstance(d, Mapping) for d in documents):
            raise ChatTemplateError("documents must be dicts (e.g. with 'title' and 'text')")
        if tools is not None and not all(isinstance(t, Mapping) for t in tools):
            raise ChatTemplateError("tools must be JSON schemas (dicts)")
        clash = {"messages", "tools", "documents", "add_generation_prompt"} & set(kwargs)
        if clash:
            raise ChatTemplateError(f"template values {sorted(clash)} are set by the renderer itself")
        messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
        if mark is not None:
            messages, tools, documents, kwargs = (_mark(x, mark) for x in (messages, tools, documents, kwargs))
        messages = [_with_reasoning_aliases(m) for m in _plain(messages)]
        source = self._select(tools)
        if source is None:
            lines = [f"{str(m.get('role', '')).capitalize()}: {m.get('content', '')}" for m in messages]
            return "\n".join(lines) + ("\nAssistant:" if add_generation_prompt else "")
        values = {**self.special, **_plain(kwargs)}
        compiled = _compile(source, self.origin)
        try:
            return compiled.render(messages=messages, tools=_plain(tools), documents=_plain(documents),
                                   add_generation_prompt=bool(add_generation_prompt), **values)
        except ChatTemplateError:
            raise
        except Exception as e:  # noqa: BLE001 - an untrusted template failing on user input is bad input, not a bug
            import jinja2.sandbox

            if isinstance(e, jinja2.sandbox.SecurityError):
                raise ChatTemplateError(f"the chat template in {self.origin} tried an unsafe operation and was "
                                        f"stopped: {e}") from None
            raise ChatTemplateError(f"the chat template in {self.origin} failed on these messages: "
                                    f"{type(e).__name__}: {e}") from None


# ------------------------------------------------------------------------------------------------ sandbox
@functools.lru_cache(maxsize=1)
def _environment():
    """The Jinja environment chat templates run in (built once; it holds no per-render state)."""
    import jinja2
    import jinja2.ext
    import jinja2.nodes
    import jinja2.sandbox
    import jinja2.utils

    if tuple(int(p) for p in jinja2.__version__.split(".")[:3] if p.isdigit()) < (3, 1, 6):
        raise ChatTemplateError(f"chat templates need jinja2 >= 3.1.6 (older sandboxes have known escapes); "
                                f"this is jinja2 {jinja2.__version__}")

    class Sandbox(jinja2.sandbox.ImmutableSandboxedEnvironment):
        def is_safe_attribute(self, obj, attr, value) -> bool:
            # Jinja's sandbox already refuses these; keep the rule explicit here, where it matters.
            return not str(attr).startswith("_") and super().is_safe_attribute(obj, attr, value)

        def unsafe_undefined(self, obj, attribute):
            # Jinja returns an undefined value that fails only when used (and `|attr` chains turn it into a plain
            # undefined); stop at the first refused access instead, with a message that says what happened.
            raise jinja2.sandbox.SecurityError(f"access to attribute {attribute!r} of a {type(obj).__name__!r} "
                                               f"object is unsafe")

    class GenerationBlock(jinja2.ext.Extension):
        # `{% generation %}...{% endgeneration %}` marks assistant text for transformers' training masks; a
        # template using it must still parse, and renders the body unchanged (in its own scope, as there).
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    class Namespace(jinja2.utils.Namespace):
        def __init__(*args, **kwargs):  # noqa: N805 - Jinja's signature, so that namespace(self=...) works
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                _check_name(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            _check_name(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

    def _check_name(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.sandbox.SecurityError(f"a namespace attribute may not start with '_' (got {name!r})")

    class DictMaker:
        """The templates' `dict`: builds plain dicts and exposes nothing else of the type."""

        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, keys, value=None):
            return dict.fromkeys(keys, value)

    def raise_exception(message):
        raise ChatTemplateError(str(message))

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    def strftime_now(format):  # noqa: A002 - the name templates use
        return datetime.datetime.now().strftime(format)

    env = Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now, dict=DictMaker(),
                       namespace=Namespace)
    return env


@functools.lru_cache(maxsize=32)
def _compile(source: str, origin: str):
    """The compiled template for `source` (cached: the server renders the same one for every request).

    Raises:
        ChatTemplateError: `source` does not parse; the message names `origin` and the line.
    """
    import jinja2

    try:
        return _environment().from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"the chat template in {origin} does not parse: line {e.lineno}: {e.message}") \
            from None


@functools.lru_cache(maxsize=32)
def _literal_text(source: str) -> str:
    """The template's raw text and string constants, joined by NUL (so no match spans two of them)."""
    import jinja2.nodes

    ast = _environment().parse(source)
    literals = {node.data for node in ast.find_all(jinja2.nodes.TemplateData)}
    literals |= {node.value for node in ast.find_all(jinja2.nodes.Const) if isinstance(node.value, str)}
    return "\0".join(sorted(literals))


def _plain(value):
    """`value` rebuilt from plain JSON types, so that the template can call no method of a caller's object."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):  # subclasses (enums, numpy strings...) may carry methods: back to the base type
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if type(value).__module__ == "numpy":
        import numpy as np

        if isinstance(value, np.generic):  # numpy scalars (np.bool_(False) must not become a truthy string)
            return _plain(value.item())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):  # pydantic models
        return _plain(value.model_dump())
    return f"<{type(value).__name__}>"


def _with_reasoning_aliases(message: dict) -> dict:
    reasoning = next((message[k] for k in _REASONING_KEYS if message.get(k) is not None), None)
    if reasoning is None:
        return message
    return {"thinking": reasoning, **message, "reasoning_content": reasoning}


# ------------------------------------------------------------------------------------------------ control tokens
def _alternation(tokens) -> re.Pattern:
    """A regex matching any of `tokens`, longer ones first (so a token wins over the tokens it contains)."""
    tokens = sorted(tokens, key=len, reverse=True)
    return re.compile("|".join(map(re.escape, tokens)) or "(?!)")  # (?!) never matches


def _mark(obj, pattern: re.Pattern):
    """`obj` with every control token in its strings (not dict keys) bracketed by the private-use markers, after
    removing any markers already there (so a user cannot forge a bracketed token)."""
    if isinstance(obj, str):
        obj = obj.replace(_MARK_START, "").replace(_MARK_END, "")
        return pattern.sub(lambda m: _MARK_START + m.group(0) + _MARK_END, obj)
    if isinstance(obj, Mapping):
        return {k: _mark(v, pattern) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_mark(v, pattern) for v in obj]
    return obj


def _encode_marked(tokenizer, text: str, added_tokens) -> list[int]:
    """Ids for a chat rendered from marked inputs: bracketed control tokens as plain text (markers dropped), the
    rest (the template's own control tokens included) as usual. A lone marker (a template's string method can
    split a bracketed token) is dropped but still separates the text on its two sides."""
    markers = re.compile(f"{_MARK_START}({_alternation(added_tokens).pattern}){_MARK_END}|[{_MARK_START}{_MARK_END}]")
    pieces = markers.split(text)  # [text, token, text, token, ..., text]; None where a lone marker matched
    newline = tokenizer.encode("\n", add_special_tokens=False).ids
    ids = tokenizer.encode(pieces[0], add_special_tokens=False).ids
    for i, piece in enumerate(pieces[1:], start=1):
        if not piece:
            continue
        as_text = i % 2 == 1
        piece_ids = _encode_piece(tokenizer, piece, as_text, newline)
        if as_text and tokenizer.token_to_id(piece) in piece_ids:
            raise ChatTemplateError(f"cannot encode {piece!r} as plain text: this tokenizer makes it the control "
                                    f"token again")
        ids += piece_ids
    return ids


def _encode_piece(tokenizer, piece: str, as_text: bool, newline: list[int]) -> list[int]:
    """Ids for a piece from inside the chat. It is encoded after a newline that is then removed, so that a
    SentencePiece-style tokenizer does not treat it as the start of a text (with a prefix space)."""
    def encode(s):
        if not as_text:
            return tokenizer.encode(s, add_special_tokens=False).ids
        # The tokenizer's pipeline without its added tokens (special or not): normalize, pre-tokenize, model.
        if tokenizer.normalizer is not None:
            s = tokenizer.normalizer.normalize_str(s)
        splits = [p for p, _ in tokenizer.pre_tokenizer.pre_tokenize_str(s)] if tokenizer.pre_tokenizer else [s]
        return [t.id for p in splits for t in tokenizer.model.tokenize(p)]

    ids = encode("\n" + piece)
    return ids[len(newline):] if ids[:len(newline)] == newline else encode(piece)


def _post_processor_tokens(tokenizer) -> tuple[list[int], list[int]]:
    """The ids the tokenizer's post-processor puts before and after a single text (e.g. ([bos], []))."""
    bare = tokenizer.encode("a", add_special_tokens=False).ids
    full = tokenizer.encode("a").ids
    for start in range(len(full) - len(bare) + 1):
        if full[start:start + len(bare)] == bare:
            return full[:start], full[start + len(bare):]
    return [], []
