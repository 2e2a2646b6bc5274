"""`dsv3 cost`: training compute, GPU-hours and dollars for a config, and the pipeline bubble of each schedule.

FLOPs per token come from `dsv3.params.training_flops_per_token`: 6 x activated matmul parameters (the head
included, once more per MTP module; the embedding lookup is free) + causal attention 3 x L x H x T x (d_qk + d_v).
GPU-hours = tokens x FLOPs/token / (peak x MFU). MFU here is against the GPU's dense BF16 peak (989.5 TFLOP/s for
an H800 / H100 SXM). DeepSeek-V3's 2.664M H800-hours for 14.8T tokens at 4K context correspond to ~40% of that
peak: FP8 GEMMs (twice the BF16 peak) offset by communication, attention and everything not a GEMM.

Pipeline bubbles per schedule (DeepSeek-V3 report, Table 2), with F a forward chunk, B a full backward chunk,
W its weight-gradient part and F&B an overlapped forward + backward pair:
  1F1B      (PP-1)(F+B)          parameters 1x   activations PP
  ZB1P      (PP-1)(F+B-2W)       parameters 1x   activations PP
  DualPipe  (PP/2-1)(F&B+B-3W)   parameters 2x   activations PP+1
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import ModelConfig
from .errors import Dsv3Error
from .params import training_flops_per_token


class CostError(Dsv3Error, ValueError):
    """A cost-model setting out of range (the GPU, the MFU); the message names it."""


GPU_MEMORY_GB = {"h800": 80, "h100": 80, "h200": 141, "a100": 80, "b200": 192}  # HBM per GPU, GB (10^9 bytes)
GPU_PEAK_BF16 = {"h800": 989.5e12, "h100": 989.5e12, "h200": 989.5e12, "a100": 312e12, "b200": 2250e12}
SUFFIX = {"K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12}


def parse_count(text: str) -> float:
    """'14.8T' -> 1.48e13; plain numbers pass through.

    Raises:
        ValueError: not a number with an optional K / M / B (= G) / T suffix.
    """
    text = str(text).strip()
    if text and text[-1].upper() in SUFFIX:
        return float(text[:-1]) * SUFFIX[text[-1].upper()]
    return float(text)


@dataclass
class CostEstimate:
    """One training run's compute and its price, as `training_cost` estimates it."""

    flops_per_token: float  # forward + backward FLOPs per trained token
    total_flops: float
    gpu_hours: float
    wall_days: float  # on all the GPUs at once
    dollars: float


def model_flops_utilization(tokens_per_s: float, flops_per_token: float, peak_flops: float, devices: int) -> float:
    """MFU: the model FLOP/s achieved ÷ the peak of every device that achieved them.

    tokens_per_s: the whole run's training rate (all ranks together); flops_per_token: forward + backward model
    FLOPs per token (`training_flops_per_token`); peak_flops: one device's peak FLOP/s; devices: the ranks.
    So a layout that splits the same work over more ranks in the same time reports a proportionally lower MFU.
    """
    return tokens_per_s * flops_per_token / (peak_flops * devices)


def training_cost(cfg: ModelConfig, tokens: float, gpus: int, gpu: str = "h800", mfu: float = 0.4,
                  seq_len: int = 4096, price_per_gpu_hour: float = 2.0) -> CostEstimate:
    """Compute, time and price of training `cfg` on `tokens` tokens (at `seq_len` context) with `gpus` GPUs of
    kind `gpu` (a key of `GPU_PEAK_BF16`) at `mfu` of their dense BF16 peak, paying `price_per_gpu_hour` dollars.

    Raises:
        CostError: an unknown gpu, or mfu outside (0, 1].
    """
    if gpu not in GPU_PEAK_BF16:
        raise CostError(f"unknown gpu {gpu!r}; known: {', '.join(GPU_PEAK_BF16)}")
    if not 0 < mfu <= 1:
        raise CostError(f"mfu must be in (0, 1], got {mfu}")
    per_token = training_flops_per_token(cfg, seq_len)
    total = per_token * tokens
    hours = total / (GPU_PEAK_BF16[gpu] * mfu) / 3600
    return CostEstimate(per_token, total, hours, hours / gpus / 24, hours * price_per_gpu_hour)


def pipeline_bubbles(pp: int, micro_batches: int, f: float = 1.0, b: float = 2.0, w: float = 1.0,
                     fb: float | None = None) -> dict[str, dict]:
    """Bubble time (in units of F) and fraction of the step for 1F1B, ZB1P and DualPipe (PP even)."""
    fb = f + b if fb is None else fb  # an overlapped pair costs its compute; communication is hidden
    useful = micro_batches * (f + b)
    bubbles = {
        "1F1B": ((pp - 1) * (f + b), "1x", f"{pp}"),
        "ZB1P": ((pp - 1) * (f + b - 2 * w), "1x", f"{pp}"),
        "DualPipe": ((pp / 2 - 1) * (fb + b - 3 * w), "2x", f"{pp + 1}"),
    }
    return {name: {"bubble": bub, "fraction": bub / (useful + bub), "parameters": par, "activations": act}
            for name, (bub, par, act) in bubbles.items()}
