"""Interleaved step timing and peak memory for a set of methods on one model.

Protocol, per model:

1. **Memory** (untimed): for each method, two steps under the memory probe of
   :mod:`msam.bench.memory`; the second is measured.
2. **Warm-up**: ``warmup`` untimed rounds.
3. **Timing**: ``steps`` rounds; a round runs **one step of every method**, in an order
   shuffled afresh each round (seeded), so that machine noise (other processes, frequency
   changes, cache state) falls on all methods alike. Each step is timed with
   ``time.perf_counter`` around the full optimizer step (``torch.cuda.synchronize`` before and
   after on CUDA). Python's garbage collector is off during a round and run between rounds.
   ``budget_s`` (optional) ends the timing early, after at least ``min_steps`` rounds.

Statistics per method: median and quartiles, p10 / p90, min, mean. Ratios to SGD and to SAM
are ratios of medians from the same run; ``paired_*`` are the medians of the per-round ratios
(the two steps of a round ran within seconds of each other).
"""

from __future__ import annotations

import gc
import random
import statistics
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from msam.bench.memory import measure_step_memory
from msam.bench.workloads import Method, Stepper, Workload, make_stepper

__all__ = ["ModelPlan", "quantiles", "run_model"]


@dataclass
class ModelPlan:
    """What to run for one model."""

    model: str
    methods: list[Method]
    steps: int
    warmup: int
    min_steps: int = 3
    budget_s: float | None = None
    memory: bool = True
    text_length: int = 32
    extra: dict[str, Any] = field(default_factory=dict)


def quantiles(values: Sequence[float]) -> dict[str, float]:
    """median, p10, p25, p75, p90 (linear interpolation), min, max, mean and n."""
    xs = sorted(values)
    n = len(xs)
    if n == 0:
        return {"n": 0}

    def q(f: float) -> float:
        pos = f * (n - 1)
        lo = int(pos)
        hi = min(lo + 1, n - 1)
        return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)

    return {"n": n, "median": q(0.5), "p10": q(0.1), "p25": q(0.25), "p75": q(0.75),
            "p90": q(0.9), "min": xs[0], "max": xs[-1], "mean": statistics.fmean(xs)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _log(log: Callable[[str], None] | None, msg: str) -> None:
    if log is not None:
        log(msg)


def run_model(
    wl: Workload,
    plan: ModelPlan,
    *,
    device: torch.device,
    seed: int = 0,
    rho: float = 0.05,
    log: Callable[[str], None] | None = print,
) -> dict[str, Any]:
    """Benchmark ``plan.methods`` on ``wl``; returns the JSON-ready result for this model."""
    steppers: dict[str, Stepper] = {}
    errors: dict[str, str] = {}
    for meth in plan.methods:
        try:
            steppers[meth.key] = make_stepper(wl, meth, rho=rho)
        except Exception as err:  # noqa: BLE001 - reported per method
            errors[meth.key] = f"{type(err).__name__}: {err}"

    def guarded(key: str, fn: Callable[[], Any]) -> bool:
        try:
            fn()
            return True
        except Exception as err:  # noqa: BLE001 - a failing method is reported, not fatal
            errors[key] = f"{type(err).__name__}: {err}"
            _log(log, f"  {key}: FAILED ({errors[key]})")
            _log(log, "".join(traceback.format_exception_only(type(err), err)).strip())
            steppers.pop(key, None)
            return False

    memory: dict[str, dict[str, int]] = {}
    t_start = time.perf_counter()
    if plan.memory:
        for key in list(steppers):
            st = steppers[key]

            def measure(st: Stepper = st, key: str = key) -> None:
                memory[key] = measure_step_memory(st.step, wl.model, st.state_tensors, wl.batch,
                                                  device)

            guarded(key, measure)
        _log(log, f"  memory measured ({time.perf_counter() - t_start:.0f}s)")

    rng = random.Random(seed)
    times: dict[str, list[float]] = {k: [] for k in steppers}
    rounds: list[dict[str, float]] = []
    t_warm = time.perf_counter()
    for _ in range(plan.warmup):
        order = list(steppers)
        rng.shuffle(order)
        for key in order:
            guarded(key, steppers[key].step)
    _log(log, f"  warm-up: {plan.warmup} round(s), {time.perf_counter() - t_warm:.0f}s")

    t_timing = time.perf_counter()
    gc_was_enabled = gc.isenabled()
    try:
        for r in range(plan.steps):
            order = list(steppers)
            rng.shuffle(order)
            this_round: dict[str, float] = {}
            gc.collect()
            gc.disable()
            for key in order:
                st = steppers.get(key)
                if st is None:
                    continue
                _sync(device)
                t0 = time.perf_counter()
                ok = guarded(key, st.step)
                _sync(device)
                dt = (time.perf_counter() - t0) / st.window  # per optimizer step
                if ok:
                    times[key].append(dt)
                    this_round[key] = dt
            gc.enable()
            rounds.append(this_round)
            elapsed = time.perf_counter() - t_timing
            if plan.budget_s is not None and r + 1 >= plan.min_steps \
                    and elapsed > plan.budget_s and r + 1 < plan.steps:
                _log(log, f"  time budget {plan.budget_s:.0f}s reached after {r + 1} rounds")
                break
    finally:
        if gc_was_enabled:
            gc.enable()
    n_rounds = len(rounds)
    _log(log, f"  timing: {n_rounds} round(s), {time.perf_counter() - t_timing:.0f}s")

    def paired(key: str, ref: str) -> dict[str, float] | None:
        ratios = [r[key] / r[ref] for r in rounds if key in r and ref in r and r[ref] > 0]
        return quantiles(ratios) if ratios else None

    med = {k: quantiles(v)["median"] for k, v in times.items() if v}
    results = []
    for meth in plan.methods:
        key = meth.key
        entry: dict[str, Any] = {
            "key": key, "method": meth.kind, "strategy": meth.strategy, "m": meth.m,
            "label": meth.label, "micro_batch_size": -(-wl.batch_size // meth.m),
        }
        if key in times and times[key]:
            entry["time_s"] = quantiles(times[key])
            entry["times_s"] = times[key]
            for ref in ("sgd", "sam"):
                entry[f"ratio_{ref}"] = med[key] / med[ref] if ref in med else None
                entry[f"paired_ratio_{ref}"] = paired(key, ref) if ref in med else None
        if key in memory:
            entry["memory"] = memory[key]
            for ref in ("sgd", "sam"):
                if ref in memory:
                    entry[f"memory_ratio_{ref}"] = (
                        memory[key]["peak_bytes"] / memory[ref]["peak_bytes"])
        if meth.kind in ("sam", "msam") and meth.strategy == "loop" and "sam" in memory \
                and key in memory:
            # The loop strategy's memory bound: SAM's peak plus one parameter-sized buffer.
            bound = memory["sam"]["peak_bytes"] + wl.param_bytes
            entry["memory_bound_bytes"] = bound
            entry["memory_within_bound"] = memory[key]["peak_bytes"] <= bound
        strategy = getattr(getattr(steppers.get(key), "optimizer", None), "engine", None)
        strategy = getattr(strategy, "strategy", None)
        if getattr(strategy, "name", None) == "auto":
            # What auto measured and chose (also saved in the optimizer's state_dict).
            entry["auto_choice"] = strategy.choice
            entry["auto_reason"] = strategy.reason
        if key in errors:
            entry["error"] = errors[key]
        results.append(entry)
    return {
        "model": wl.name, "input": wl.input_desc, "batch_size": wl.batch_size,
        "params": wl.n_params, "param_bytes": wl.param_bytes, "batchnorm": wl.has_batchnorm,
        "rounds": n_rounds, "warmup_rounds": plan.warmup, "requested_rounds": plan.steps,
        "seconds": time.perf_counter() - t_start, "results": results,
    }
