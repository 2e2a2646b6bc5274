"""SFT data (DeepSeek-V3 report, section 5.1): chat conversations rendered by the checkpoint's own chat template,
the loss on the assistant's tokens only, or raw prompt-completion records, the loss on the completion only; several
records packed per row.

A record is one JSONL line, either a conversation {"messages": [{"role": "system" | "user" | "assistant", "content":
str}, ...]} (what `dsv3 data tasks` writes; other fields are ignored) or raw text {"prompt": str, "completion": str}
(no chat template: the prompt's tokens as the tokenizer encodes a prompt, then the completion's without special
tokens, then end-of-text; the targets are the completion's tokens and the end-of-text, the prompt is context only:
the "prompt-completion" format with a completion-only loss, what `dsv3 data retrieval` writes). A record with
"messages" is a conversation whatever else it holds. A conversation's tokens are `ChatTemplate.encode` of the whole
conversation (the one renderer the server and `dsv3 eval --task` prompt with) followed by the tokenizer's
end-of-text token. Targets (`labels[i]`, the token position i learns to predict) are the tokens of each assistant
message and the token right after it (what ends the turn: the template's next-turn text, or end-of-text after the
last message); everything the user, the system or the template wrote is context only. The assistant's tokens are
found by rendering the conversation up to that message with and without it: the encodings must extend each other,
else the template cannot be trained on token-exactly and the record is refused.

Packing (`ConversationData.batch`): conversations in a seeded order per epoch, laid greedily one after another
into rows of seq_len tokens (a conversation never split; the rest of a row is padding), each its own document for
the model (`DeepseekV3.forward(segments=...)`: positions restart, attention stays inside, MTP targets never
cross). Step s's micro-batch m takes the next batch_size rows of that stream, so a resumed run sees the same
batches.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import Dsv3Error
from ..runs import jsonl_records
from ..tokenizer import EOT, ChatTemplate, ChatTemplateError, load_tokenizer
from .losses import IGNORE

ROLES = ("system", "user", "assistant")


class SFTDataError(Dsv3Error, ValueError):
    """A malformed conversation file; the message names the file, the line and the field."""


@dataclass
class PackedBatch:
    """Rows of packed conversations: ids, labels (IGNORE where nothing is learned) and segments (the conversation
    each token belongs to, -1 for padding), each [B, T] int64."""

    ids: torch.Tensor
    labels: torch.Tensor
    segments: torch.Tensor

    def rows(self, start: int, stop: int) -> PackedBatch:
        return PackedBatch(self.ids[start:stop], self.labels[start:stop], self.segments[start:stop])

    def to(self, device) -> PackedBatch:
        return PackedBatch(self.ids.to(device), self.labels.to(device), self.segments.to(device))


def encode_conversation(template: ChatTemplate, tokenizer, messages: list[dict], eot_id: int
                        ) -> tuple[list[int], list[int]]:
    """(ids, labels) of one conversation, both [L]: see the module docstring.

    Raises:
        SFTDataError: no assistant message, or the template's encodings of the conversation's prefixes do not
            extend one another at an assistant message (field "messages[i]").
        ChatTemplateError: the template fails on these messages.
    """
    full = template.encode(tokenizer, messages, add_generation_prompt=False) + [eot_id]
    labels = [IGNORE] * len(full)
    seen = False
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        seen = True
        before = template.encode(tokenizer, messages[:i], add_generation_prompt=True)
        upto = template.encode(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if full[: len(before)] != before or full[: len(upto)] != upto or len(upto) < len(before):
            raise SFTDataError(f"messages[{i}]: the chat template's tokens for the conversation up to this "
                               "assistant message are not a prefix of the whole conversation's, so its tokens "
                               "cannot be told apart")
        stop = min(len(upto) + 1, len(full))  # the assistant's tokens and the one that ends its turn
        for j in range(max(len(before), 1), stop):
            labels[j - 1] = full[j]  # position j-1 learns to predict token j
    if not seen:
        raise SFTDataError("messages: no assistant message to learn from")
    return full, labels


def encode_completion(tokenizer, prompt: str, completion: str, eot_id: int) -> tuple[list[int], list[int]]:
    """(ids, labels) of one prompt-completion record, both [L]: see the module docstring.

    Raises:
        SFTDataError: the prompt or the completion encodes to no tokens (field named).
    """
    context = tokenizer.encode(prompt).ids  # as the engine encodes a prompt (a BOS the tokenizer adds included)
    answer = tokenizer.encode(completion, add_special_tokens=False).ids
    for field, tokens in (("prompt", context), ("completion", answer)):
        if not tokens:
            raise SFTDataError(f"{field}: empty (the completion is learned as the prompt's continuation)")
    ids = context + answer + [eot_id]
    labels = [IGNORE] * len(ids)
    for j in range(len(context), len(ids)):
        labels[j - 1] = ids[j]  # position j-1 learns to predict token j
    return ids, labels


def _completion(record, where: str) -> tuple[str, str] | None:
    """(prompt, completion) of a raw-text record, None for a conversation; checked."""
    if not isinstance(record, dict) or "messages" in record or "completion" not in record:
        return None
    for field in ("prompt", "completion"):
        if not isinstance(record.get(field), str):
            raise SFTDataError(f"{where}: field '{field}' must be a string")
    return record["prompt"], record["completion"]


def _messages(record, where: str) -> list[dict]:
    if not isinstance(record, dict) or "messages" not in record:
        raise SFTDataError(f"{where}: field 'messages' is missing (a conversation), or 'prompt' and 'completion' "
                           "(raw text)")
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        raise SFTDataError(f"{where}: field 'messages' must be a non-empty list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise SFTDataError(f"{where}: messages[{i}] must be an object with 'role' and 'content'")
        if m.get("role") not in ROLES:
            raise SFTDataError(f"{where}: messages[{i}].role = {m.get('role')!r}: must be one of {', '.join(ROLES)}")
        if not isinstance(m.get("content"), str):
            raise SFTDataError(f"{where}: messages[{i}].content must be a string")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def conversation_file(path: str | Path, split: str = "train") -> Path:
    """The JSONL file of `path`: the file itself, or `path/{split}.jsonl` for a directory (`dsv3 data tasks`).

    Raises:
        SFTDataError: neither exists.
    """
    path = Path(path)
    file = path / f"{split}.jsonl" if path.is_dir() else path
    if not file.is_file():
        raise SFTDataError(f"{file}: no such conversation file (a JSONL of {{\"messages\": [...]}} or {{\"prompt\", "
                           f"\"completion\"}} records, or a directory holding {split}.jsonl)")
    return file


class ConversationData:
    """The records of a JSONL file (conversations or prompt-completion records, "conversations" below), encoded for
    a checkpoint's tokenizer (and chat template), served as packed batches. `meta["vocab_size"]`, `eot_id` and
    `tokenizer_file` as `TokenData` has them, for the trainer."""

    def __init__(self, path: str | Path, checkpoint: str | Path, seq_len: int, split: str = "train"):
        """Raises:
            SFTDataError: the file is missing or malformed (file, line and field named), a conversation is longer
                than seq_len, or the tokenizer has no end-of-text token.
        """
        self.file = conversation_file(path, split)
        checkpoint = Path(checkpoint)
        self.tokenizer_file = checkpoint / "tokenizer.json"
        tokenizer = load_tokenizer(checkpoint)
        template = ChatTemplate(checkpoint)
        self.eot_id = tokenizer.token_to_id(EOT)
        if self.eot_id is None:
            raise SFTDataError(f"{self.tokenizer_file} has no {EOT} token to end conversations with")
        self.meta = {"vocab_size": tokenizer.get_vocab_size()}
        self.seq_len = seq_len
        self.conversations: list[tuple[list[int], list[int]]] = []
        for n, record in jsonl_records(self.file, SFTDataError):
            where = f"{self.file}:{n}"
            try:
                raw = _completion(record, where)
                ids, labels = (encode_completion(tokenizer, *raw, self.eot_id) if raw is not None else
                               encode_conversation(template, tokenizer, _messages(record, where), self.eot_id))
            except (SFTDataError, ChatTemplateError) as e:
                raise SFTDataError(str(e) if str(e).startswith(where) else f"{where}: {e}") from None
            if len(ids) > seq_len:
                raise SFTDataError(f"{where}: the record has {len(ids)} tokens, more than seq_len {seq_len}; "
                                   "shorten it or raise seq_len")
            self.conversations.append((ids, labels))
        if not self.conversations:
            raise SFTDataError(f"{self.file}: no records (conversations or prompt-completion pairs)")
        self._epochs: dict[tuple[int, int], list[list[int]]] = {}  # (seed, epoch) -> rows of conversation indices

    def __len__(self) -> int:
        return len(self.conversations)

    @property
    def target_tokens(self) -> int:
        """Tokens learned from in one pass over the file."""
        return sum(sum(x != IGNORE for x in labels) for _, labels in self.conversations)

    def _rows(self, seed: int, epoch: int) -> list[list[int]]:
        key = (seed, epoch)
        if key not in self._epochs:
            order = list(range(len(self.conversations)))
            random.Random(f"sft:{seed}:{epoch}").shuffle(order)
            rows, row, used = [], [], 0
            for c in order:
                n = len(self.conversations[c][0])
                if used + n > self.seq_len:
                    rows.append(row)
                    row, used = [], 0
                row.append(c)
                used += n
            rows.append(row)
            self._epochs = {k: v for k, v in self._epochs.items() if k[1] >= epoch - 1}  # keep two epochs
            self._epochs[key] = rows
        return self._epochs[key]

    def row(self, seed: int, index: int) -> list[int]:
        """The conversations of row `index` of the seeded stream (epoch after epoch)."""
        epoch = 0
        while index >= len(self._rows(seed, epoch)):
            index -= len(self._rows(seed, epoch))
            epoch += 1
        return self._rows(seed, epoch)[index]

    def batch(self, batch_size: int, seq_len: int, seed: int, step: int, micro: int = 0,
              grad_accum: int = 1) -> PackedBatch:
        """Rows (step * grad_accum + micro) * batch_size .. + batch_size of the stream, packed [B, seq_len]."""
        first = (step * grad_accum + micro) * batch_size
        ids = torch.zeros(batch_size, seq_len, dtype=torch.long)
        labels = torch.full((batch_size, seq_len), IGNORE, dtype=torch.long)
        segments = torch.full((batch_size, seq_len), -1, dtype=torch.long)
        for r in range(batch_size):
            at = 0
            for c in self.row(seed, first + r):
                x, y = self.conversations[c]
                ids[r, at:at + len(x)] = torch.tensor(x)
                labels[r, at:at + len(y)] = torch.tensor(y)
                segments[r, at:at + len(x)] = c
                at += len(x)
        return PackedBatch(ids, labels, segments)
