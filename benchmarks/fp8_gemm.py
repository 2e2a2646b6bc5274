"""FP8 vs BF16 GEMM throughput on DeepSeek-V3 shapes (needs a CUDA GPU with compute capability >= 8.9).

Times y = x W^T for x [tokens, K] and W [N, K] with the 671B model's shapes: 7168x2048 (K=2048 -> N=7168, an
expert's down projection), 2048x7168 (expert gate/up), 7168x18432 (the dense FFN). FP8 runs dsv3's fine-grained
GEMM (`dsv3.quant.fp8_gemm`: 1x128 activation tiles, 128x128 weight blocks, FP32 promotion every 128 of K via
per-slice `torch._scaled_mm`), with quantization timed separately.

    python benchmarks/fp8_gemm.py [--tokens 4096]
"""

from __future__ import annotations

import argparse
import sys

import torch

from dsv3.quant import fp8_gemm, quantize_blockwise, quantize_tiles

SHAPES = [(7168, 2048), (2048, 7168), (7168, 18432)]  # (N, K)


def bench(fn, reps=20) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps / 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=4096)
    args = ap.parse_args()
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9):
        print("no CUDA GPU with compute capability >= 8.9: nothing to measure (the CPU path is an emulation)")
        sys.exit(0)
    print(torch.cuda.get_device_name(), f"tokens={args.tokens}")
    print("| shape (N x K) | BF16 TFLOP/s | FP8 GEMM TFLOP/s | FP8 incl. quantization | FP8 / BF16 |")
    print("|---|---|---|---|---|")
    for n, k in SHAPES:
        print(row(args.tokens, n, k))


def row(tokens: int, n: int, k: int) -> str:
    x = torch.randn(tokens, k, device="cuda")
    w = torch.randn(n, k, device="cuda") * 0.02
    xb, wb = x.bfloat16(), w.bfloat16()
    flops = 2 * tokens * n * k
    t_bf16 = bench(lambda: xb @ wb.t())
    xq, xs = quantize_tiles(x)
    wq, ws = quantize_blockwise(w)
    t_fp8 = bench(lambda: fp8_gemm(xq, xs, wq, ws, b_blocks=True))
    t_all = bench(lambda: fp8_gemm(*quantize_tiles(x), wq, ws, b_blocks=True))
    err = (fp8_gemm(xq, xs, wq, ws, b_blocks=True) - x @ w.t()).norm() / (x @ w.t()).norm()
    return (f"| {n} x {k} | {flops / t_bf16 / 1e12:.0f} | {flops / t_fp8 / 1e12:.0f} | "
            f"{flops / t_all / 1e12:.0f} | {t_bf16 / t_fp8:.2f}x (rel. error {err:.2%}) |")


if __name__ == "__main__":
    main()
