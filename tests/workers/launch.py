"""Shared by the multi-process tests and their workers: launching ranks, joining them, and training runs."""

import argparse
import socket
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist


def worker_args(*extra: tuple[str, type]) -> argparse.Namespace:
    """A worker's command line (--rank --world --init --out and `extra`), with its gloo group joined."""
    ap = argparse.ArgumentParser()
    for name, typ in (("rank", int), ("world", int), ("init", str), ("out", str), *extra):
        ap.add_argument(f"--{name}", type=typ)
    args = ap.parse_args()
    dist.init_process_group("gloo", init_method=args.init, rank=args.rank, world_size=args.world)
    return args


def run_ranks(worker: Path, world: int, tmp_path: Path, *args: str, timeout: int = 240) -> list[dict]:
    """Start `world` processes of `worker` on a file rendezvous, wait for all, return what each saved."""
    init = f"file://{tmp_path / 'rendezvous'}"
    procs = [subprocess.Popen([sys.executable, str(worker), "--rank", str(r), "--world", str(world), "--init", init,
                               "--out", str(tmp_path / f"rank{r}.pt"), *args], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in range(world)]
    for p in procs:
        out, _ = p.communicate(timeout=timeout)
        assert p.returncode == 0, out
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]


def train(out: Path, args: list[str], nproc: int = 1) -> list[dict]:
    """`dsv3 train` in one process or under torchrun on loopback; asserts success, returns the metrics rows."""
    proc = run_train(out, args, nproc)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return metrics(out)


def run_train(out: Path, args: list[str], nproc: int = 1) -> subprocess.CompletedProcess:
    """`dsv3 train` in one process or under torchrun on loopback, whatever its outcome."""
    cmd = [sys.executable, "-m", "dsv3", "train"]
    if nproc > 1:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr",
               "127.0.0.1", "--master-port", str(port), "-m", "dsv3", "train"]
    return subprocess.run([*cmd, "--out", str(out), *args], capture_output=True, text=True, timeout=240)


def metrics(run: Path) -> list:
    from dsv3.runs import read_metrics

    return read_metrics(run)
