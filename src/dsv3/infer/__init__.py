"""Inference: the generation engine (continuous batching, latent cache, MTP speculation) and the server."""

from .engine import (
    Engine,
    GenerationError,
    Request,
    SamplingParams,
    TokenLogprob,
    sample_text,
    speculative_accept,
)

__all__ = ["Engine", "GenerationError", "Request", "SamplingParams", "TokenLogprob", "sample_text",
           "speculative_accept"]
