"""`dsv3.allocator`: after `keep_freed_memory`, a large tensor freed and allocated again reuses its pages (no page
faults), where glibc's default maps fresh pages every time; `DSV3_MALLOC=default` leaves the default. Each case runs
in a fresh interpreter: the setting is process-wide and cannot be undone."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from dsv3.allocator import keep_freed_memory

PROBE = """
import resource, sys, torch
from dsv3.allocator import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else False
def faults():  # minor page faults while a 64 MiB tensor is allocated and written, after a first one was freed
    torch.ones(16 << 20)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(16 << 20)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(applied, min(faults() for _ in range(3)))
"""

glibc = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                           reason="mallopt is glibc's")


def _probe(mode: str, env_value: str | None = None) -> tuple[bool, int]:
    import os

    env = {k: v for k, v in os.environ.items() if k != "DSV3_MALLOC"}
    if env_value is not None:
        env["DSV3_MALLOC"] = env_value
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, env=env, check=True,
                         timeout=120).stdout.split()
    return out[0] == "True", int(out[1])


@glibc
def test_freed_memory_is_reused_without_page_faults():
    applied, faults = _probe("keep")
    assert applied
    assert faults < 100  # 16,384 pages of 4 KiB if it mapped fresh memory
    applied, faults = _probe("default")
    assert not applied and faults > 10_000  # the default this guards against: every 64 MiB block page-faulted anew


@glibc
def test_environment_opts_out():
    applied, faults = _probe("keep", env_value="default")
    assert not applied and faults > 10_000


def test_threshold_must_fit_a_c_int():
    with pytest.raises(ValueError, match="trim_threshold"):
        keep_freed_memory(1 << 40)  # ctypes would truncate it to 0 silently: trim after every free
