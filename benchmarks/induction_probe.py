"""Does a checkpoint copy from its context at all? The repeated-random-tokens probe of induction heads (Olsson et al.
2022, "In-context learning and induction heads"): a sequence of random tokens seen twice; a model that copies
predicts the second copy far better than the first. Passkey retrieval (`dsv3 eval --passkey`) needs this skill, so
a checkpoint that fails here cannot pass it whatever its context length (issue 15).

    python benchmarks/induction_probe.py CKPT_OR_RUN [CKPT_OR_RUN ...] [--length 40] [--rows 8]

Prints, per checkpoint: the mean loss (nats/token) on the first and on the second copy, and top-1 accuracy on the
second. Tokens are drawn uniformly from ids 300..vocab-1 (past the byte alphabet and the specials), seed 0.
"""

from __future__ import annotations

import argparse

import torch

import dsv3


def probe(model, length: int, rows: int) -> tuple[float, float, float]:
    """(loss on the first copy, loss on the second copy, top-1 accuracy on the second copy)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(300, model.config.vocab_size, (rows, length), generator=g)  # [rows, L]
    seq = torch.cat([x, x], 1)  # [rows, 2L]
    with torch.no_grad():
        logits = model(seq[:, :-1], mtp=False).logits.float()  # [rows, 2L - 1, V]
    logp = torch.log_softmax(logits, -1).gather(-1, seq[:, 1:, None])[..., 0]  # [rows, 2L - 1]
    first, second = -logp[:, : length - 1].mean(), -logp[:, length:].mean()  # position t predicts token t + 1
    top1 = (logits[:, length:].argmax(-1) == seq[:, length + 1 :]).float().mean()
    return float(first), float(second), float(top1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoints", nargs="+", help="checkpoint directories or training runs")
    ap.add_argument("--length", type=int, default=40, help="tokens per copy")
    ap.add_argument("--rows", type=int, default=8)
    args = ap.parse_args()
    for ck in args.checkpoints:
        model = dsv3.load_pretrained(dsv3.resolve_checkpoint(ck), progress=False).eval()
        first, second, top1 = probe(model, args.length, args.rows)
        print(f"{ck}: loss on the first copy {first:.2f}, on the second {second:.2f}; top-1 on the second {top1:.0%}")


if __name__ == "__main__":
    main()
