"""Held-out evaluation: loss, perplexity and bits-per-byte.

Bits-per-byte divides the total cross-entropy (in bits) of the held-out tokens by the UTF-8 bytes of the text they
encode, so models with different tokenizers compare on the same scale (the paper reports BPB for that reason).
The split is read in consecutive, non-overlapping windows of `seq_len` tokens; the mean per-token loss is
scaled by the split's tokens/bytes ratio.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from ..model import DeepseekV3
from .data import TokenData


@torch.no_grad()
def evaluate(model: DeepseekV3, data_dir: str | Path, seq_len: int = 256, max_tokens: int | None = None,
             split: str = "val") -> dict:
    data = TokenData(data_dir, split)
    model.eval()
    device = model.lm_head.weight.device
    total_nats, count = 0.0, 0
    for window in data.windows(min(seq_len, model.config.max_position_embeddings), max_tokens):
        window = window.to(device)
        logits = model(window[:, :-1], mtp=False).logits
        total_nats += F.cross_entropy(logits[0].float(), window[0, 1:], reduction="sum").item()
        count += window.shape[1] - 1
    loss = total_nats / count
    tokens_per_byte = len(data) / data.bytes
    return {"loss": loss, "perplexity": math.exp(loss), "bpb": loss * tokens_per_byte / math.log(2),
            "tokens": count, "split": split}
