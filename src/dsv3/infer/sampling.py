"""Plain autoregressive sampling: prefill with naive attention, then absorbed decode over the latent cache."""

from __future__ import annotations

import torch

from ..model import DeepseekV3


@torch.no_grad()
def sample_tokens(model: DeepseekV3, prompt_ids: list[int], max_new_tokens: int, temperature: float = 0.8,
                  top_k: int | None = 50, seed: int = 0, stop_id: int | None = None) -> list[int]:
    """Sample up to `max_new_tokens` after `prompt_ids` (batch 1); temperature 0 means greedy."""
    if not prompt_ids:
        raise ValueError("the prompt must contain at least one token")
    limit = model.config.max_position_embeddings
    if len(prompt_ids) + max_new_tokens > limit:
        raise ValueError(f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                         f"model's context of {limit} tokens")
    device = model.lm_head.weight.device
    gen = torch.Generator(device=device).manual_seed(seed)
    cache = model.new_cache(1, len(prompt_ids) + max_new_tokens)
    ids = torch.tensor([prompt_ids], device=device)
    logits = model(ids, cache=cache, mtp=False).logits[:, -1]
    out: list[int] = []
    pos = len(prompt_ids)
    for _ in range(max_new_tokens):
        if temperature <= 0:
            nxt = int(logits.argmax(-1))
        else:
            scaled = logits.float() / temperature
            if top_k:
                kth = scaled.topk(min(top_k, scaled.shape[-1])).values[..., -1:]
                scaled = scaled.masked_fill(scaled < kth, float("-inf"))
            nxt = int(torch.multinomial(scaled.softmax(-1), 1, generator=gen))
        if nxt == stop_id:
            break
        out.append(nxt)
        logits = model(torch.tensor([[nxt]], device=device), cache=cache, start_pos=pos).logits[:, -1]
        pos += 1
    return out


def sample_text(model: DeepseekV3, tokenizer, prompt: str, max_new_tokens: int = 200, **kw) -> str:
    """Decode `sample_tokens` of an encoded prompt; stops at the end-of-text token."""
    from ..train.data import EOT

    ids = tokenizer.encode(prompt).ids
    eot = tokenizer.token_to_id(EOT)
    return tokenizer.decode(sample_tokens(model, ids, max_new_tokens, stop_id=eot, **kw))
