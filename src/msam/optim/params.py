"""Checks of parameters and param groups shared by :class:`msam.MSAM`, its state loading and
:func:`msam.msam_gradient`."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch.optim import Optimizer

from msam.core.schedule import Schedule
from msam.optim.step import validate_eta, validate_rho

__all__ = ["build_base", "call_arguments", "check_new_group", "check_two_step", "flatten_params",
           "make_schedule", "nothing_accumulated", "perturb_ids", "resolve_base",
           "validate_eta", "validate_group", "validate_max_grad_norm", "validate_rho"]


def describe(p: torch.Tensor) -> str:
    return f"shape {tuple(p.shape)}, dtype {str(p.dtype).replace('torch.', '')}"


def check_new_group(group: dict[str, Any], index: int) -> None:
    """A param group about to be added: no parameter twice (torch.optim only warns, and then
    steps it twice), no complex parameter (SAM's norm and step are defined for real weights)."""
    params = group.get("params")
    if isinstance(params, torch.Tensor):
        group["params"] = params = [params]
    elif params is not None and not isinstance(params, (set, list)):
        group["params"] = params = list(params)   # a generator is read once
    if not isinstance(params, list):
        return   # torch.optim's own error
    seen: dict[int, int] = {}
    for k, p in enumerate(params):
        if not isinstance(p, torch.Tensor):
            continue
        if id(p) in seen:
            raise ValueError(
                f"params: param_groups[{index}] lists one parameter twice (positions "
                f"{seen[id(p)]} and {k}, {describe(p)}); it would be perturbed and stepped "
                "twice. List each parameter once (e.g. deduplicate tied weights)")
        seen[id(p)] = k
        if p.is_complex():
            raise ValueError(
                f"params: param_groups[{index}] parameter {k} ({describe(p)}) is complex; "
                "the SAM perturbation rho g/||g|| is defined for real parameters. Store it as "
                "a real parameter (e.g. torch.view_as_real) and rebuild the complex value in "
                "forward")


def validate_group(group: Mapping[str, Any], where: str) -> None:
    if "rho" in group:
        validate_rho(group["rho"], f"{where}: rho")
    if "eta" in group:
        validate_eta(group["eta"], f"{where}: eta")


def make_schedule(schedule: Schedule | None, every: Any, start_step: Any, reuse: Any,
                   reuse_alpha: Any) -> Schedule:
    if schedule is None:
        return Schedule(every, start_step, reuse, reuse_alpha)
    if not isinstance(schedule, Schedule):
        raise ValueError(f"schedule must be a msam.Schedule, got {type(schedule).__name__}")
    if (every, start_step, reuse, reuse_alpha) != (1, 0, None, 0.7):
        raise ValueError("schedule: give schedule= or every/start_step/reuse/reuse_alpha, "
                         "not both")
    return schedule


def flatten_params(params: Iterable[Any]) -> list[torch.Tensor]:
    if isinstance(params, torch.Tensor):
        return [params]
    out: list[torch.Tensor] = []
    for item in params:
        if isinstance(item, dict):
            out.extend(flatten_params(item["params"]))
        else:
            out.append(item)
    return out


def validate_max_grad_norm(value: Any) -> float | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                              or not math.isfinite(value) or value <= 0):
        raise ValueError(f"max_grad_norm must be a finite number > 0, got {value!r}")
    return None if value is None else float(value)


_BASE_KINDS = ("base_optimizer must be a torch.optim.Optimizer subclass (e.g. torch.optim.SGD), "
               "an optimizer instance, or a function returning one")


def resolve_base(params: Any, base_optimizer: Any, base_kwargs: Mapping[str, Any]
                 ) -> tuple[Optimizer | None, Any]:
    """``(base, groups)`` for ``Optimizer.__init__``: a built optimizer and its groups, or
    ``(None, params)`` (checked) when ``base_optimizer`` is a class or factory to build later."""
    if isinstance(base_optimizer, Optimizer):
        if base_kwargs:
            raise ValueError("base_kwargs given with an already-built base_optimizer: "
                             f"{sorted(base_kwargs)}; set them on the base optimizer instead")
        if params is not None:
            given = {id(p) for p in flatten_params(params)}
            have = {id(p) for g in base_optimizer.param_groups for p in g["params"]}
            if given != have:
                raise ValueError("params: differ from the parameters of the given "
                                 "base_optimizer (pass params=None to use its param groups)")
        for i, g in enumerate(base_optimizer.param_groups):
            validate_group(g, f"base_optimizer.param_groups[{i}]")
        return base_optimizer, base_optimizer.param_groups
    if isinstance(base_optimizer, type) and not issubclass(base_optimizer, Optimizer):
        raise ValueError(f"{_BASE_KINDS}; got the class "
                         f"{base_optimizer.__module__}.{base_optimizer.__qualname__}")
    if not callable(base_optimizer):
        raise ValueError(f"{_BASE_KINDS}; got {type(base_optimizer).__name__}")
    if params is None:
        raise ValueError("params: required when base_optimizer is a class")
    params = list(params) if not isinstance(params, torch.Tensor) else [params]
    for i, g in enumerate(params):
        if isinstance(g, Mapping):
            validate_group(g, f"params[{i}]")
    return None, params


def build_base(factory: Any, groups: list[dict[str, Any]],
               base_kwargs: Mapping[str, Any]) -> Optimizer:
    base = factory(groups, **base_kwargs)
    if not isinstance(base, Optimizer):
        raise ValueError(f"{_BASE_KINDS}; the function returned {type(base).__name__}")
    return base


def perturb_ids(perturb: Iterable[torch.Tensor] | None, groups: list[dict[str, Any]]
                ) -> set[int] | None:
    """The ``perturb=`` subset as parameter ids (``None``: every parameter)."""
    if perturb is None:
        return None
    ids = {id(p) for p in flatten_params(perturb)}
    if not ids <= {id(p) for g in groups for p in g["params"]}:
        raise ValueError("perturb: contains parameters that are not in params")
    return ids


def call_arguments(loss_fn: Any, batch: Any, closure: Any) -> Any:
    """``MSAM.step``'s ``loss_fn`` (a ``closure`` counts as one), checked against ``batch``."""
    if closure is not None:
        if loss_fn is not None or batch is not None:
            raise ValueError("closure: give a closure or loss_fn and batch, not both")
        return closure
    if loss_fn is None and batch is not None:
        raise ValueError("batch: given without loss_fn")
    return loss_fn


def nothing_accumulated(base: Optimizer) -> RuntimeError:
    """``step()`` with no arguments and nothing accumulated: msam does not take a plain step."""
    return RuntimeError(
        "step() without loss_fn: no accumulate() call since the last step, and msam does not "
        "step on a gradient it did not compute (that would be a plain "
        f"{type(base).__name__} step). Use opt.step(loss_fn, batch) for an mSAM step, or "
        "opt.base_step() to apply a gradient you filled yourself (e.g. with "
        "msam.msam_gradient). In a framework's training loop use msam.integrations: "
        "huggingface.MSAMTrainer (Hugging Face Trainer), accelerate.backward (accelerate), "
        "lightning.MSAMModule / lightning.manual_step (Lightning); see docs/integrations.md")


def check_two_step(schedule: Schedule, cfg: Any) -> None:
    """``first_step``: the two-step API perturbs once per batch, on every call, with a rule that
    needs nothing but ``g``."""
    from msam.core.registry import check_support

    if not schedule.trivial:
        raise ValueError(f"first_step: the two-step API perturbs on every call; with a "
                         f"schedule ({schedule!r}) use opt.step(loss_fn, batch)")
    if (cfg.micro_batches or 1) != 1 or cfg.micro_batch_size is not None:
        raise ValueError("first_step: the two-step API perturbs once per batch (m = 1); with "
                         "micro_batches use opt.step(loss_fn, batch)")
    check_support(cfg.rule, where="two_step")
