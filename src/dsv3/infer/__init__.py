"""Inference: sampling over the latent KV cache (the fast engine, speculative decoding and the server build on it)."""

from .sampling import sample_text, sample_tokens

__all__ = ["sample_text", "sample_tokens"]
