"""The DeepSeek-V3 model as plain single-process PyTorch, one concept per module."""

from .mla import MLA, LatentCache
from .moe import MLP, MoE, RoutedExperts, Router, RoutingInfo
from .norm import RMSNorm
from .rope import Rope, RotaryEmbedding, apply_rope
from .transformer import DecoderLayer, DeepseekV3, ModelOutput, MTPModule

__all__ = ["MLA", "LatentCache", "MLP", "MoE", "Router", "RoutedExperts", "RoutingInfo", "RMSNorm",
           "Rope", "RotaryEmbedding", "apply_rope", "DecoderLayer", "DeepseekV3", "ModelOutput", "MTPModule"]
