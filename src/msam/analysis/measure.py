"""One-call sharpness measurement for the CLI and study summaries.

:func:`measure` runs a chosen set of metrics on ``(model, loss_fn, batches)`` and returns a
JSON-serialisable dict (floats, ints, bools, strings, lists, dicts) including wall-clock
timings; :func:`format_table` renders it as a Markdown (or plain) table. No I/O.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from ._common import (
    LossFn,
    as_batch_list,
    batch_size,
    batch_weights,
    eval_mode,
    loss_and_grad,
    mean_loss,
    norm,
    trainable_parameters,
)
from .hessian import hessian_trace, spectral_density, top_hessian_eigenvalues
from .sharpness import average_sharpness, m_sharpness

__all__ = ["AVAILABLE_METRICS", "DEFAULT_METRICS", "format_table", "measure"]

DEFAULT_METRICS = ("lambda_max", "trace", "m_sharpness")
AVAILABLE_METRICS = (
    "loss",
    "grad_norm",
    "lambda_max",
    "top_eigenvalues",
    "trace",
    "m_sharpness",
    "average_sharpness",
    "spectral_density",
)


def measure(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Sequence[Any],
    metrics: Sequence[str] = DEFAULT_METRICS,
    rho: float = 0.05,
    m: int | None = None,
    seed: int = 0,
    *,
    micro_batches: int | None = None,
    k: int = 5,
    method: str = "lanczos",
    max_iter: int = 100,
    tol: float = 1e-4,
    num_probes: int = 100,
    ascent_steps: int = 5,
    step_size: float | None = None,
    adaptive: bool = False,
    num_samples: int = 20,
    slq_runs: int = 5,
    slq_steps: int = 50,
    slq_points: int = 200,
    include_samples: bool = False,
) -> dict[str, Any]:
    """Measure sharpness/flatness metrics of ``model`` on ``batches``.

    Metrics (any subset of :data:`AVAILABLE_METRICS`, run in the given order):

    ``loss``                 example-weighted mean loss (eval mode)
    ``grad_norm``            ``||grad L(w)||_2``
    ``lambda_max``           top Hessian eigenvalue (:func:`top_hessian_eigenvalues`, k=1)
    ``top_eigenvalues``      the ``k`` largest Hessian eigenvalues
    ``trace``                Hutchinson trace with ``num_probes`` Rademacher probes
    ``m_sharpness``          :func:`m_sharpness` with radius ``rho`` and micro-batch ``m``
    ``average_sharpness``    :func:`average_sharpness` with ``num_samples`` directions
    ``spectral_density``     SLQ density (``slq_runs`` x ``slq_steps``) on ``slq_points``

    ``loss_fn`` is ``loss_fn(batch)``, as for :class:`msam.MSAM` (it calls ``model``, whose
    parameters are perturbed in place), or ``loss_fn(model, batch)`` as in the lower-level
    functions of :mod:`msam.analysis`; the number of required arguments decides.

    ``micro_batches=M`` splits each batch into ``M`` micro-batches for ``m_sharpness`` (a
    count, as ``micro_batches`` of the optimizer). ``m`` is the alternative the m-sharpness
    literature uses (Andriushchenko & Flammarion 2022): the micro-batch *size*; give one of
    them. Neither: each batch is one micro-batch.

    Returns a dict with the headline numbers at the top level (``"lambda_max"``,
    ``"trace"``, ``"trace_se"``, ``"m_sharpness"``, ...), full per-metric ``"details"``,
    ``"timings_s"`` (seconds per metric) and ``"config"``. Everything is JSON-serialisable.
    Raw per-probe / per-micro-batch samples are included only if ``include_samples``.
    """
    batches = as_batch_list(batches)
    loss_fn = _model_and_batch(loss_fn)
    unknown = [name for name in metrics if name not in AVAILABLE_METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; available: {list(AVAILABLE_METRICS)}")
    params = trainable_parameters(model)
    _, num_examples = batch_weights(batches)
    if m is not None and micro_batches is not None:
        raise ValueError("give m (micro-batch size) or micro_batches (their count), not both")
    if micro_batches is not None:
        size = batch_size(batches[0])
        if micro_batches < 1 or size % micro_batches:
            raise ValueError(f"micro_batches={micro_batches} must divide the batch size {size}")
        m = size // micro_batches
    m_eff = int(m) if m is not None else batch_size(batches[0])

    def _drop_samples(d: dict[str, Any]) -> dict[str, Any]:
        if include_samples:
            return d
        return {key: val for key, val in d.items() if key not in ("samples", "per_micro_batch")}

    def run_loss() -> tuple[dict[str, Any], dict[str, Any]]:
        with eval_mode(model):
            value = mean_loss(model, loss_fn, batches)
        return {"loss": value}, {"value": value}

    def run_grad_norm() -> tuple[dict[str, Any], dict[str, Any]]:
        with eval_mode(model):
            _, grads = loss_and_grad(model, loss_fn, batches, params)
        g = norm(grads)
        return {"grad_norm": g}, {"value": g}

    def run_lambda_max() -> tuple[dict[str, Any], dict[str, Any]]:
        res = top_hessian_eigenvalues(
            model, loss_fn, batches, k=1, method=method, max_iter=max_iter, tol=tol, seed=seed
        )
        return {"lambda_max": res.eigenvalues[0]}, res.to_dict()

    def run_top() -> tuple[dict[str, Any], dict[str, Any]]:
        res = top_hessian_eigenvalues(
            model, loss_fn, batches, k=k, method=method, max_iter=max_iter, tol=tol, seed=seed
        )
        return {"top_eigenvalues": list(res.eigenvalues)}, res.to_dict()

    def run_trace() -> tuple[dict[str, Any], dict[str, Any]]:
        res = hessian_trace(model, loss_fn, batches, num_probes=num_probes, seed=seed)
        return {"trace": res.mean, "trace_se": res.std_error}, _drop_samples(res.to_dict())

    def run_msharp() -> tuple[dict[str, Any], dict[str, Any]]:
        res = m_sharpness(
            model,
            loss_fn,
            batches,
            rho=rho,
            m=m_eff,
            ascent_steps=ascent_steps,
            step_size=step_size,
            adaptive=adaptive,
            seed=seed,
        )
        return (
            {"m_sharpness": res.value, "m_sharpness_se": res.std_error},
            _drop_samples(res.to_dict()),
        )

    def run_avg() -> tuple[dict[str, Any], dict[str, Any]]:
        res = average_sharpness(
            model,
            loss_fn,
            batches,
            rho=rho,
            num_samples=num_samples,
            seed=seed,
            adaptive=adaptive,
        )
        return (
            {"average_sharpness": res.value, "average_sharpness_se": res.std_error},
            _drop_samples(res.to_dict()),
        )

    def run_slq() -> tuple[dict[str, Any], dict[str, Any]]:
        res = spectral_density(
            model,
            loss_fn,
            batches,
            num_runs=slq_runs,
            num_steps=slq_steps,
            num_points=slq_points,
            seed=seed,
        )
        lo = min(min(r) for r in res.nodes)
        hi = max(max(r) for r in res.nodes)
        summary = {"spectral_min": lo, "spectral_max": hi, "slq_trace": res.trace_estimate()}
        return summary, res.to_dict()

    runners: dict[str, Callable[[], tuple[dict[str, Any], dict[str, Any]]]] = {
        "loss": run_loss,
        "grad_norm": run_grad_norm,
        "lambda_max": run_lambda_max,
        "top_eigenvalues": run_top,
        "trace": run_trace,
        "m_sharpness": run_msharp,
        "average_sharpness": run_avg,
        "spectral_density": run_slq,
    }

    result: dict[str, Any] = {}
    details: dict[str, Any] = {}
    timings: dict[str, float] = {}
    for name in metrics:
        t0 = time.perf_counter()
        headline, detail = runners[name]()
        timings[name] = time.perf_counter() - t0
        result.update(headline)
        details[name] = detail
    result["details"] = details
    result["timings_s"] = timings
    result["config"] = {
        "metrics": list(metrics),
        "rho": float(rho),
        "m": m_eff,
        "seed": int(seed),
        "k": int(k),
        "method": method,
        "max_iter": int(max_iter),
        "tol": float(tol),
        "num_probes": int(num_probes),
        "ascent_steps": int(ascent_steps),
        "step_size": None if step_size is None else float(step_size),
        "adaptive": bool(adaptive),
        "num_samples": int(num_samples),
        "num_examples": int(num_examples),
        "num_batches": len(batches),
        "num_parameters": int(sum(p.numel() for p in params)),
    }
    return _jsonable(result)


def _model_and_batch(loss_fn: Callable[..., Any]) -> LossFn:
    """``loss_fn(model, batch)`` from either form (see :func:`measure`)."""
    import inspect

    try:
        params = inspect.signature(loss_fn).parameters.values()
    except (TypeError, ValueError):  # no signature (a builtin): the documented two-arg form
        return loss_fn
    required = [p for p in params if p.default is p.empty
                and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(required) == 1 and not any(p.kind == p.VAR_POSITIONAL for p in params):
        return lambda _model, batch: loss_fn(batch)
    return loss_fn


def _jsonable(x: Any) -> Any:
    """Convert numpy/torch scalars and tuples into plain Python types (recursively)."""
    if isinstance(x, dict):
        return {str(key): _jsonable(val) for key, val in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, bool) or x is None or isinstance(x, str):
        return x
    if isinstance(x, int):
        return int(x)
    if hasattr(x, "item"):
        return _jsonable(x.item())
    if isinstance(x, float):
        return float(x)
    return x


def _fmt(x: Any) -> str:
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, int):
        return str(x)
    if isinstance(x, float):
        if math.isnan(x):
            return "nan"
        return f"{x:.6g}"
    if isinstance(x, list):
        return ", ".join(_fmt(v) for v in x[:8]) + (", ..." if len(x) > 8 else "")
    return str(x)


def format_table(result: dict[str, Any], markdown: bool = True) -> str:
    """Render a :func:`measure` result as a table: metric, value, std. error, time, notes."""
    details = result.get("details", {})
    timings = result.get("timings_s", {})
    rows: list[tuple[str, str, str, str, str]] = []
    for name, detail in details.items():
        se = ""
        notes = ""
        if name == "lambda_max":
            value = _fmt(result.get("lambda_max"))
            notes = f"{detail['method']}, {detail['iterations']} HVPs, " + (
                "converged" if detail["converged"] else "NOT converged"
            )
        elif name == "top_eigenvalues":
            value = _fmt(result.get("top_eigenvalues"))
            notes = f"{detail['method']}, {detail['iterations']} HVPs, " + (
                "converged" if detail["converged"] else "NOT converged"
            )
        elif name == "trace":
            value = _fmt(result.get("trace"))
            se = _fmt(result.get("trace_se"))
            notes = f"Hutchinson, {detail['num_probes']} probes"
        elif name == "m_sharpness":
            value = _fmt(result.get("m_sharpness"))
            se = _fmt(result.get("m_sharpness_se"))
            notes = (
                f"rho={_fmt(detail['rho'])}, m={detail['m']}, "
                f"{detail['num_micro_batches']} micro-batches, {detail['ascent_steps']} steps"
                + (", adaptive" if detail["adaptive"] else "")
            )
        elif name == "average_sharpness":
            value = _fmt(result.get("average_sharpness"))
            se = _fmt(result.get("average_sharpness_se"))
            notes = f"rho={_fmt(detail['rho'])}, {detail['num_samples']} directions"
        elif name == "spectral_density":
            value = f"[{_fmt(result.get('spectral_min'))}, {_fmt(result.get('spectral_max'))}]"
            notes = (
                f"SLQ {detail['num_runs']}x{detail['num_steps']}, "
                f"trace~{_fmt(result.get('slq_trace'))}"
            )
        else:
            value = _fmt(result.get(name, detail.get("value")))
        time_s = timings.get(name)
        rows.append((name, value, se, "" if time_s is None else f"{time_s:.2f}", notes))
    header = ("metric", "value", "std. error", "time (s)", "notes")
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines)
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    fmt_row = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()
    out = [fmt_row(header), fmt_row(tuple("-" * w for w in widths))]
    out += [fmt_row(r) for r in rows]
    return "\n".join(out)
