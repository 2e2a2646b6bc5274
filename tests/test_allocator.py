"""`dsv3.allocator`: after `keep_freed_memory`, a large tensor freed and allocated again reuses its pages (no page
faults), where glibc's default maps fresh pages every time; `DSV3_MALLOC=default` leaves the default. Each case runs
in a fresh interpreter: the setting is process-wide and cannot be undone."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from dsv3.allocator import is_glibc, keep_freed_memory

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

glibc = pytest.mark.skipif(not is_glibc(), reason="mallopt is glibc's")
THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")
# with transparent huge pages always on, a fresh 64 MiB block faults in as ~32 huge pages: the default's fault count
# says nothing then
DEFAULT_FAULTS_COUNT = not (THP.exists() and "[always]" in THP.read_text())


def _probe(mode: str, env_value: str | None = None) -> tuple[bool, int]:
    # the child gets glibc's malloc with its defaults: no preloaded allocator, no malloc tunables
    env = {k: v for k, v in os.environ.items()
           if k not in ("DSV3_MALLOC", "LD_PRELOAD", "GLIBC_TUNABLES") and not k.startswith("MALLOC_")}
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
    assert not applied
    if DEFAULT_FAULTS_COUNT:
        assert faults > 10_000  # the default this guards against: every 64 MiB block page-faulted anew


@glibc
def test_environment_opts_out():
    applied, faults = _probe("keep", env_value="default")
    assert not applied
    if DEFAULT_FAULTS_COUNT:
        assert faults > 10_000


def test_threshold_must_fit_a_c_int():
    with pytest.raises(ValueError, match="trim_threshold"):
        keep_freed_memory(1 << 40)  # ctypes would truncate it to 0 silently: trim after every free
