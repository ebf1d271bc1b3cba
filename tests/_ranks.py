"""Launch a function on ``world`` spawned ranks with a bounded wait (shared by the DDP and FSDP
multi-process tests): a hung rank is killed and reported, never waited for forever."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(target: Callable[..., None], args_of: Callable[[int, int], tuple],
              out_dir: Path, world: int, timeout: float, label: str = "") -> list[dict]:
    """Start ``target(*args_of(rank, port))`` on each rank, join them within ``timeout``
    seconds, and return each rank's ``out_dir/rank{r}.pt`` (a rank's ``__error__`` raises)."""
    where = f"{label}: " if label else ""
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=target, args=args_of(r, port)) for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(5)
    if hung:
        raise AssertionError(f"{where}rank(s) {hung} still running after {timeout}s")
    results = []
    for r in range(world):
        path = Path(out_dir) / f"rank{r}.pt"
        if not path.exists():
            raise AssertionError(f"{where}rank {r} exited with {procs[r].exitcode} and wrote "
                                 "no result")
        res = torch.load(path, weights_only=False)
        if "__error__" in res:
            raise AssertionError(f"{where}rank {r} failed:\n{res['__error__']}")
        results.append(res)
    return results
