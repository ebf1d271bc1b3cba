"""The ``auto`` strategy: measure ``loop`` and ``vmap`` once, then use the faster.

On the first step for a given (model, parameter shapes, batch shapes, micro-batch count,
device) it times each candidate's gradient computation (after one warm-up call) without
committing BatchNorm statistics and with the gradients discarded, then caches the winner for the
process. A candidate that fails (e.g. a model ``vmap`` cannot trace) is dropped. The probe costs
a few extra passes on the first step only; the result is identical up to rounding either way.
"""

from __future__ import annotations

import dataclasses
import time

import torch

from msam.core.batch import tensor_leaves
from msam.strategies.base import GradientJob, Strategy
from msam.strategies.loop import LoopStrategy
from msam.strategies.vmap import VmapStrategy

__all__ = ["AutoStrategy"]

_CACHE: dict[tuple, str] = {}


def _key(job: GradientJob) -> tuple:
    shapes = tuple(tuple(p.shape) for p in job.params)
    mb = job.micro_batches[0][0]
    leaves = tuple((path, tuple(t.shape), str(t.dtype)) for path, t in tensor_leaves(mb))
    device = str(job.params[0].device)
    return (type(job.model).__name__, shapes, leaves, len(job.micro_batches), device)


class AutoStrategy(Strategy):
    name = "auto"

    def __init__(self, repeats: int = 2) -> None:
        self.repeats = repeats
        self.candidates: dict[str, Strategy] = {"loop": LoopStrategy(), "vmap": VmapStrategy()}
        self.timings: dict[str, float] = {}
        self.choice: str | None = None

    def _probe(self, job: GradientJob) -> str:
        if job.model is None:
            return "loop"
        saved = [None if p.grad is None else p.grad.clone() for p in job.params]
        probe_job = dataclasses.replace(job, commit_batchnorm=False)
        timings = {}
        for name, strat in self.candidates.items():
            try:
                best = float("inf")
                for _ in range(self.repeats + 1):
                    t0 = time.perf_counter()
                    strat.accumulate(probe_job)
                    best = min(best, time.perf_counter() - t0)
                timings[name] = best
            except Exception:  # noqa: BLE001 - an untraceable model just loses the probe
                timings[name] = float("inf")
            finally:
                with torch.no_grad():
                    for p, b, g in zip(job.params, job.backup, saved):
                        p.copy_(b)
                        p.grad = g
        self.timings = timings
        return min(timings, key=timings.get) if min(timings.values()) < float("inf") else "loop"

    def accumulate(self, job: GradientJob) -> torch.Tensor:
        key = _key(job)
        if key not in _CACHE:
            _CACHE[key] = self._probe(job)
        self.choice = _CACHE[key]
        return self.candidates[self.choice].accumulate(job)
