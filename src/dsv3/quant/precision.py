"""Which modules stay out of FP8: one list for training GEMMs, one for the stored checkpoint.

The two differ on purpose. Training follows the report's recipe, storage follows the released weights, and
they disagree on exactly one module: MTP's `eh_proj`, an ordinary linear layer that trains in FP8 but ships in
BF16. Patterns are shell-style (`fnmatch`) over module names as `named_modules()` spells them; a stored tensor
`X.weight` belongs to module `X`.
"""

from __future__ import annotations

from fnmatch import fnmatchcase

# DeepSeek-V3 report section 3.3.1 (mixed precision framework): "we maintain the original precision (e.g., BF16
# or FP32) for the following components: the embedding module, the output head, MoE gating modules,
# normalization operators, and attention operators". The attention core (scores, softmax, weighted sum) is
# not a module, so it never meets `convert_to_fp8`; MLA's projections are ordinary linears, FP8 as in the report.
TRAINING_HIGH_PRECISION = ("*embed_tokens", "*lm_head", "*shared_head.head", "*.mlp.gate", "*norm")

# The released checkpoint (deepseek-ai/DeepSeek-V3 on Hugging Face, `quantization_config` fp8 e4m3 with 128x128
# blocks) stores as FP8 only the linear weights of attention and FFNs; everything above stays BF16, and so does
# the MTP module's `eh_proj` (`model.layers.61.eh_proj.weight` is BF16 with no `weight_scale_inv`).
STORAGE_HIGH_PRECISION = (*TRAINING_HIGH_PRECISION, "*.eh_proj")


def keeps_high_precision(module_name: str, patterns: tuple[str, ...]) -> bool:
    """Whether `module_name` (e.g. `model.layers.3.mlp.gate`) matches one of `patterns`."""
    return any(fnmatchcase(module_name, p) for p in patterns)
