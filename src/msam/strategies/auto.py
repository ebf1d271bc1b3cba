"""The ``auto`` strategy: measure ``loop`` and ``vmap`` once, then use the faster.

What it does on the first step for a given configuration (model class, parameter shapes and
dtypes, micro-batch shapes, number of micro-batches, device, CPU thread count):

* **No probe** -- ``loop`` is used directly -- when ``vmap`` cannot help or cannot apply: one
  micro-batch (``m = 1`` is SAM: nothing to vectorise), no ``model=``, or a job that carries
  hooks only ``loop`` honours (``ascent_context`` / ``descent_context`` / ``ascent_grad_hook``,
  as set by :mod:`msam.distributed`).
* Otherwise both candidates compute this step's gradient ``1 + repeats`` times, **interleaved**
  (loop, vmap, loop, vmap, ...) so that machine noise hits both alike, without committing
  BatchNorm statistics and with the gradients discarded; the first call of each is a warm-up.
  Each candidate's time is the minimum over its timed calls (on CUDA with
  ``torch.cuda.synchronize`` around each call). A candidate that raises (e.g. a model that
  ``vmap`` cannot trace, or runs out of memory) is dropped.
* ``vmap`` is chosen only if it is faster than ``loop`` by more than ``margin`` (default 10%):
  it holds ``m`` copies of the parameters and every micro-batch's activations at once (see
  ``msam bench``), so a tie goes to the strategy with the lower memory.

The choice is cached for the process (``AutoStrategy.cache``), so the probe costs
``2 * (1 + repeats)`` extra gradient computations on the first step only; the gradient
is identical up to rounding either way. ``choice`` and ``timings`` tell what was measured.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time

import torch

from msam.core.batch import tensor_leaves
from msam.strategies.base import GradientJob, Strategy, _null_descent
from msam.strategies.loop import LoopStrategy
from msam.strategies.vmap import VmapStrategy

__all__ = ["AutoStrategy"]

_CACHE: dict[tuple, str] = {}


def _key(job: GradientJob) -> tuple:
    shapes = tuple((tuple(p.shape), str(p.dtype)) for p in job.params)
    mb = job.micro_batches[0][0]
    leaves = tuple((path, tuple(t.shape), str(t.dtype)) for path, t in tensor_leaves(mb))
    device = job.params[0].device
    threads = torch.get_num_threads() if device.type == "cpu" else 0
    return (type(job.model).__name__, shapes, leaves, len(job.micro_batches), str(device),
            threads, tuple(job.perturb), job.adaptive)


def _loop_only_reason(job: GradientJob) -> str | None:
    if len(job.micro_batches) < 2:
        return "one micro-batch"
    if job.model is None:
        return "no model"
    if job.ascent_context is not contextlib.nullcontext or \
            job.descent_context is not _null_descent or \
            getattr(job, "ascent_grad_hook", None) is not None:
        return "hooks that only loop honours"
    return None


class AutoStrategy(Strategy):
    """Picks ``loop`` or ``vmap`` by measuring both once (see the module docstring)."""

    name = "auto"
    cache = _CACHE

    def __init__(self, repeats: int = 2, margin: float = 0.10) -> None:
        if repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {repeats!r}")
        if margin < 0:
            raise ValueError(f"margin must be >= 0, got {margin!r}")
        self.repeats = repeats
        self.margin = margin
        self.candidates: dict[str, Strategy] = {"loop": LoopStrategy(), "vmap": VmapStrategy()}
        self.timings: dict[str, float] = {}
        self.choice: str | None = None
        self.reason: str = ""

    def _probe(self, job: GradientJob) -> str:
        device = job.params[0].device
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda *a: None)
        saved = [None if p.grad is None else p.grad.clone() for p in job.params]
        probe_job = dataclasses.replace(job, commit_batchnorm=False)
        timings = {name: float("inf") for name in self.candidates}
        alive = dict(self.candidates)
        try:
            for r in range(self.repeats + 1):
                for name in list(alive):
                    try:
                        sync(device)
                        t0 = time.perf_counter()
                        alive[name].accumulate(probe_job)
                        sync(device)
                        dt = time.perf_counter() - t0
                        if r > 0:
                            timings[name] = min(timings[name], dt)
                    except Exception:  # noqa: BLE001 - an untraceable model loses the probe
                        timings[name] = float("inf")
                        del alive[name]
                    finally:
                        with torch.no_grad():
                            for p, b, g in zip(job.params, job.backup, saved):
                                p.copy_(b)
                                p.grad = g
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
        self.timings = timings
        loop_t, vmap_t = timings["loop"], timings["vmap"]
        if vmap_t < float("inf") and vmap_t * (1.0 + self.margin) < loop_t:
            self.reason = f"vmap {vmap_t:.4g}s vs loop {loop_t:.4g}s"
            return "vmap"
        self.reason = f"loop {loop_t:.4g}s vs vmap {vmap_t:.4g}s (margin {self.margin:.0%})"
        return "loop"

    def accumulate(self, job: GradientJob) -> torch.Tensor:
        reason = _loop_only_reason(job)
        if reason is not None:
            self.choice, self.reason = "loop", reason
        else:
            key = _key(job)
            if key not in _CACHE:
                _CACHE[key] = self._probe(job)
            elif self.choice is None:
                self.reason = "cached by an earlier probe in this process"
            self.choice = _CACHE[key]
        return self.candidates[self.choice].accumulate(job)
