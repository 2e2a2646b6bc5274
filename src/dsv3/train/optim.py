"""AdamW with optionally low-precision moments (the paper keeps AdamW's first and second moments in BF16).

Same update as torch.optim.AdamW (decoupled weight decay, bias correction); the moments are read into fp32,
updated, and stored back in `state_dtype`. Master weights and gradients stay in the parameters' dtype.
"""

from __future__ import annotations

import math

import torch


class AdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay) whose moments are stored in `state_dtype` (bf16, as in DeepSeek-V3 §3.3.3)
    while the update is computed in fp32; the master weights stay in their own dtype. Same arguments as
    `torch.optim.AdamW`."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.95), eps: float = 1e-8, weight_decay: float = 0.0,
                 state_dtype: torch.dtype = torch.bfloat16):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.state_dtype = state_dtype

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's `load_state_dict`, which casts the moments to each parameter's dtype, then the moments back to
        `state_dtype` (so a resumed run keeps bf16 moments, their memory and their rounding)."""
        super().load_state_dict(state_dict)
        for state in self.state.values():
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    state[key] = state[key].to(self.state_dtype)

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            b1, b2 = group["betas"]
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, dtype=self.state_dtype)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=self.state_dtype)
                state["step"] += 1
                g = p.grad.float()
                m = state["exp_avg"].float().mul_(b1).add_(g, alpha=1 - b1)
                v = state["exp_avg_sq"].float().mul_(b2).addcmul_(g, g, value=1 - b2)
                state["exp_avg"].copy_(m)
                state["exp_avg_sq"].copy_(v)
                p.mul_(1 - lr * wd)
                bias1, bias2 = 1 - b1 ** state["step"], 1 - b2 ** state["step"]
                denom = (v.sqrt() / math.sqrt(bias2)).add_(eps)
                p.addcdiv_(m.to(p.dtype), denom.to(p.dtype), value=-lr / bias1)
        return None
