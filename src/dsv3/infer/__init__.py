"""Inference: the generation engine (continuous batching, latent cache, MTP speculation), sampling, serving."""

from .engine import Engine, GenerationError, Request, SamplingParams, speculative_accept
from .sampling import sample_text, sample_tokens

__all__ = ["Engine", "GenerationError", "Request", "SamplingParams", "speculative_accept", "sample_text",
           "sample_tokens"]
