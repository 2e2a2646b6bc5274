"""The process's C allocator, set for tensor work on CPU (issue 13).

PyTorch's CPU tensors come from the C library's `malloc`. glibc serves every request above its mmap threshold
(dynamic, at most 32 MiB) with a fresh `mmap` and unmaps it again on `free`, so a training step's largest tensors
(the logits and their gradient: [tokens, vocab] fp32, 64 MiB for `small` at 8 x 256 tokens) are page-faulted in
anew, zeroed page by page by the kernel, in every step. Measured on this project's 2-core CPU, one thread:
`log_softmax` of a 2,048 x 8,192 tensor 37 ms into fresh memory against 12 ms into reused memory, and a whole `small`
training step (8 x 256, no MTP) 1.23 s with ~63,000 page faults against 1.14 s with none once freed memory is kept.

`keep_freed_memory` tells glibc (`mallopt(3)`) to serve large blocks from its heap and to keep up to 1 GiB of freed
memory at the heap's top for reuse instead of returning it to the kernel: the trade jemalloc and tcmalloc make,
which PyTorch's CPU performance guide recommends preloading. The cost: a freed block below a live one is never
returned to the kernel, so a process's resident memory can stay above what it uses (in a training step the same
blocks come back every step; peak RSS of a `small` step measured 1.0-1.05 GB either way). `dsv3`'s command line
calls it at start for its batch commands, not for the long-running `serve` and `chat`, whose request mix varies;
`DSV3_MALLOC=default` in the environment leaves the allocator as it was. Elsewhere (macOS, musl, a preloaded
jemalloc/tcmalloc, where glibc's `mallopt` no longer governs `malloc`) it changes nothing that matters.
"""

from __future__ import annotations

import ctypes
import os
import platform

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_MAX = -4
ENV = "DSV3_MALLOC"


def is_glibc() -> bool:
    """Whether this process runs on Linux with glibc, whose `mallopt` `keep_freed_memory` calls."""
    return platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def keep_freed_memory(trim_threshold: int = 1 << 30) -> bool:
    """Serve large allocations from the heap and keep up to `trim_threshold` bytes (at most 2 GiB - 1, `mallopt`
    takes a C int) of freed memory for reuse. Returns whether glibc accepted both settings: False off Linux/glibc
    or when `DSV3_MALLOC=default` is set.

    Raises:
        ValueError: `trim_threshold` outside [0, 2**31).
    """
    if not 0 <= trim_threshold < 2**31:
        raise ValueError(f"trim_threshold must be in [0, 2**31) (a C int for mallopt), got {trim_threshold}")
    if os.environ.get(ENV, "").lower() == "default":
        return False
    if not is_glibc():
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    # mallopt returns 1 on success; 0 leaves that setting as it was
    return libc.mallopt(M_MMAP_MAX, 0) == 1 and libc.mallopt(M_TRIM_THRESHOLD, trim_threshold) == 1
