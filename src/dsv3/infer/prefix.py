"""Prefix store: latent-cache rows of recent sequences, reused when a new prompt starts with one of them.

MLA caches only the compressed latent and the shared RoPE key per token and layer (`LatentCache`), so the rows of a
whole conversation are small: `small` has 80 values x 7 layers x 4 bytes = 2.2 KiB per token (4.4 MiB for 2,048
tokens); the 671B model 576 x 62 layers (61 + its MTP layer) x 2 bytes = 70 KiB per token. The engine stores a
request's rows when it leaves its slot and copies the longest stored prefix of a new prompt into the new request's
slot on admission; only the rest of the prompt is prefilled. This is the idea of SGLang's RadixAttention and vLLM's
automatic prefix caching, kept to what contiguous slots need: whole sequences, not paged blocks.

Lookup is by hashes of block-aligned token prefixes (a chained BLAKE2b over `block` tokens at a time, the way vLLM
keys its blocks): the deepest block hash a prompt shares with the store names the entry to use, and the match is
then extended token by token inside that entry, so the hit length is exact (not rounded to a block). The entry's
tokens are compared before any row is used, so a hash collision can cost a miss, never a wrong row.

Memory is bounded by `capacity_bytes` (the rows' bytes): storing evicts the least recently used entries until the
new one fits; an entry larger than the whole capacity is not stored; an entry that is a prefix of a newly stored
one (the previous turn of the same chat) is dropped as redundant.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass

import torch

from ..errors import Dsv3Error


@dataclass
class PrefixEntry:
    """One stored sequence: its token ids and, per cache layer, its latent rows [len(tokens), r + p]."""

    id: int
    tokens: list[int]
    rows: list[torch.Tensor]
    digests: list[bytes]  # the hash of each block-aligned prefix, block 1 first

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.rows)


class PrefixStore:
    """Latent rows of recent sequences keyed by hashes of their token prefixes, LRU-evicted within a byte bound.

    capacity_bytes: the most the stored rows may hold (0 disables the store). block: tokens per hashed block;
    prompts sharing fewer than `block` tokens with every entry miss.

    Raises:
        Dsv3Error: capacity_bytes < 0 or block < 1.
    """

    def __init__(self, capacity_bytes: int, block: int = 16):
        if not isinstance(capacity_bytes, int) or capacity_bytes < 0:
            raise Dsv3Error(f"the prefix store's capacity must be a number of bytes >= 0, got {capacity_bytes!r}")
        if not isinstance(block, int) or block < 1:
            raise Dsv3Error(f"the prefix store's block must be a positive number of tokens, got {block!r}")
        self.capacity_bytes = capacity_bytes
        self.block = block
        self.entries: OrderedDict[int, PrefixEntry] = OrderedDict()  # least recently used first
        self._by_digest: dict[bytes, list[int]] = {}  # digest -> ids of the entries holding that prefix
        self._next_id = 0
        self.nbytes = 0
        self.stats = {"lookups": 0, "hits": 0, "hit_tokens": 0, "stored": 0, "evicted": 0}

    def _digests(self, tokens: list[int]) -> list[bytes]:
        """The chained hash of each whole block of `tokens`: digests[i] covers tokens[: (i + 1) * block]."""
        out, prev = [], b""
        for i in range(len(tokens) // self.block):
            block = array("q", tokens[i * self.block:(i + 1) * self.block]).tobytes()
            prev = hashlib.blake2b(prev + block, digest_size=16).digest()
            out.append(prev)
        return out

    def lookup(self, tokens: list[int]) -> tuple[PrefixEntry | None, int]:
        """The stored entry sharing the longest prefix with `tokens`, and that prefix's length (None, 0 on a
        miss). A hit makes the entry the most recently used."""
        self.stats["lookups"] += 1
        entry = self._deepest(tokens, self._digests(tokens))
        if entry is None:
            return None, 0
        length = next((i for i, (a, b) in enumerate(zip(tokens, entry.tokens)) if a != b),
                      min(len(tokens), len(entry.tokens)))
        if length < self.block:  # a colliding hash: the tokens disagree inside the first block
            return None, 0
        self.entries.move_to_end(entry.id)
        self.stats["hits"] += 1
        self.stats["hit_tokens"] += length
        return entry, length

    def put(self, tokens: list[int], rows: list[torch.Tensor]) -> bool:
        """Store copies of `rows` (per cache layer [len(tokens), r + p]) under `tokens`; evicts the least recently
        used entries to stay within capacity and drops stored prefixes of `tokens`. Returns whether it was
        stored (not when shorter than one block or larger than the capacity)."""
        size = sum(t.numel() * t.element_size() for t in rows)
        if len(tokens) < self.block or size > self.capacity_bytes:
            return False
        digests = self._digests(tokens)
        while (old := self._deepest(tokens, digests)) is not None and len(old.tokens) <= len(tokens) \
                and old.tokens == tokens[: len(old.tokens)]:
            self._remove(old.id)  # a prefix of the new entry (the previous turn): redundant
        while self.nbytes + size > self.capacity_bytes:
            self._remove(next(iter(self.entries)))
            self.stats["evicted"] += 1
        entry = PrefixEntry(self._next_id, list(tokens), [t.clone() for t in rows], digests)
        self._next_id += 1
        self.entries[entry.id] = entry
        for d in digests:
            self._by_digest.setdefault(d, []).append(entry.id)
        self.nbytes += size
        self.stats["stored"] += 1
        return True

    def _deepest(self, tokens: list[int], digests: list[bytes]) -> PrefixEntry | None:
        """The most recently stored entry holding the longest block-aligned prefix of `tokens` (by hash)."""
        found = None
        for d in digests:
            ids = self._by_digest.get(d)
            if not ids:
                break
            found = ids[-1]
        return None if found is None else self.entries[found]

    def _remove(self, eid: int) -> None:
        entry = self.entries.pop(eid)
        for d in entry.digests:
            ids = self._by_digest[d]
            ids.remove(eid)
            if not ids:
                del self._by_digest[d]
        self.nbytes -= entry.nbytes
