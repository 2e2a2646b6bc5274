"""RMSNorm: x / rms(x) * g, computed in fp32 whatever the input dtype (as DeepSeek and HF do)."""

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """RMSNorm over the last dim with a learned gain `weight` [dim] (Zhang & Sennrich 2019); eps as the config's
    `rms_norm_eps`. The gain multiplies after the cast back to the input dtype, as in transformers."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))  # stored as `...norm.weight` in checkpoints

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., dim] -> same shape; the output dtype follows torch promotion of x and `weight`."""
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)  # one fused kernel, same maths
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
