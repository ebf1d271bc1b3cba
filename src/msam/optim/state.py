"""The ``state_dict`` contract of :class:`msam.MSAM`: what is saved, and a load that checks
everything before it changes anything.

A state is the base optimizer's state dict plus an ``msam`` entry (version 2: ``m``, the rule's
and the schedule's state, the strategy, ``max_grad_norm``, ``nonfinite`` and the step
counters). The step counters are also written into every saved param group, so that
``torch.distributed.checkpoint``'s optimizer state dicts (which keep only ``state`` and
``param_groups``) carry them. Also here: what ``copy.deepcopy`` and ``pickle`` keep.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch.optim import Optimizer

from msam.core.schedule import Schedule, validate_schedule_state
from msam.optim.params import validate_group
from msam.optim.step import validate_count
from msam.strategies import STRATEGIES, make_strategy

__all__ = ["getstate", "load_state_dict", "setstate", "state_dict", "validated_settings"]

_STATE_KEY = "msam"
_STATE_VERSION = 2
#: Per-parameter state keys written by other SAM implementations (a copy of the weights).
_FOREIGN_STATE_KEYS = ("old_p", "e_w", "sam_e_w")
#: Keys of the ``msam`` entry a version-2 state must have (``schedule`` may be absent: states
#: written before schedules existed load with the default one); version 1 needs ``micro_batches``.
_REQUIRED_KEYS = {1: ("micro_batches",),
                  2: ("micro_batches", "micro_batch_size", "rule", "strategy", "max_grad_norm",
                      "nonfinite", "steps", "skipped_steps")}
#: Step counters also written into every saved param group, so that
#: ``torch.distributed.checkpoint``'s optimizer state dicts (which keep only ``state`` and
#: ``param_groups``) carry them; see :func:`load_state_dict`.
GROUP_COUNTERS = ("msam_steps", "msam_skipped_steps")
#: Per-parameter state entries of torch's optimizers that have the parameter's shape.
_PARAM_SHAPED_STATE = ("momentum_buffer", "exp_avg", "exp_avg_sq", "max_exp_avg_sq",
                       "square_avg", "acc_delta", "grad_avg", "sum", "ax", "prev", "step_size",
                       "exp_inf")
#: Not pickled / deep-copied (as ``torch.optim.Optimizer`` drops its hooks): the step wrapper an
#: LR scheduler installs on the instance, the last result (closures) and the hook tables.
_NOT_COPIED = ("step", "last_result", "_optimizer_step_pre_hooks", "_optimizer_step_post_hooks",
               "_optimizer_state_dict_pre_hooks", "_optimizer_state_dict_post_hooks",
               "_optimizer_load_state_dict_pre_hooks", "_optimizer_load_state_dict_post_hooks")


def group_params(groups: Iterable[Mapping[str, Any]]) -> list[torch.Tensor]:
    return [p for g in groups for p in g["params"]]


def group_counters(groups: Any) -> tuple[int, int] | None:
    """The step counters written into every saved param group, or None when absent (the
    state was not saved by an MSAM); refused when the groups disagree or a value is invalid."""
    if not isinstance(groups, (list, tuple)) or not groups or not all(
            isinstance(g, Mapping) and GROUP_COUNTERS[0] in g for g in groups):
        return None
    values = {(g[GROUP_COUNTERS[0]], g.get(GROUP_COUNTERS[1], 0)) for g in groups}
    for steps, skipped in values:
        for name, v in zip(GROUP_COUNTERS, (steps, skipped)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"state_dict: param group {name!r} must be an integer >= 0, "
                                 f"got {v!r}")
    if len(values) != 1:
        raise ValueError(f"state_dict: the param groups disagree on {GROUP_COUNTERS}: "
                         f"{sorted(values)}")
    return next(iter(values))


def validated_settings(extra: Mapping[str, Any]) -> dict[str, Any]:
    """The ``msam`` entry of a state dict, checked value by value (versions 1 and 2)."""
    where = f"state_dict[{_STATE_KEY!r}]"
    version = extra.get("version")
    if version not in (1, _STATE_VERSION):
        raise ValueError(f"{where}: unknown version {version!r} (this msam reads 1 and "
                         f"{_STATE_VERSION})")
    missing = [k for k in _REQUIRED_KEYS[version] if k not in extra]
    if missing:
        raise ValueError(f"{where}: missing {', '.join(repr(k) for k in missing)} (a version-"
                         f"{version} msam state has {list(_REQUIRED_KEYS[version])}); it was "
                         "not written by MSAM.state_dict or was edited")
    mb = validate_count(extra.get("micro_batches"), f"{where}: micro_batches")
    mbs = validate_count(extra.get("micro_batch_size"), f"{where}: micro_batch_size")
    if mb is not None and mbs is not None:
        raise ValueError(f"{where}: both micro_batches and micro_batch_size are set")
    strategy = extra.get("strategy", "loop")
    if version == 1:
        rule = {"name": "asam" if extra.get("adaptive") else "sam"}
        strategy = {"name": strategy}
    else:
        rule = extra.get("rule")  # type: ignore[assignment]  # validated just below
    if not isinstance(strategy, Mapping) or strategy.get("name") not in STRATEGIES:
        raise ValueError(f"{where}: strategy must name one of {sorted(STRATEGIES)}, "
                         f"got {strategy!r}")
    if not isinstance(rule, Mapping) or not isinstance(rule.get("name"), str):
        raise ValueError(f"{where}: rule must be a mapping with a 'name', got {rule!r}")
    nonfinite = extra.get("nonfinite", "raise")
    if nonfinite not in ("raise", "skip"):
        raise ValueError(f"{where}: nonfinite must be 'raise' or 'skip', got {nonfinite!r}")
    mgn = extra.get("max_grad_norm")
    if mgn is not None and (isinstance(mgn, bool) or not isinstance(mgn, (int, float))
                            or not math.isfinite(mgn) or mgn <= 0):
        raise ValueError(f"{where}: max_grad_norm must be None or a finite number > 0, "
                         f"got {mgn!r}")
    counts = {}
    for key in ("steps", "skipped_steps"):
        v = extra.get(key, 0)
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{where}: {key} must be an integer >= 0, got {v!r}")
        counts[key] = v
    schedule = validate_schedule_state(extra.get("schedule"), where)
    return {"micro_batches": mb, "micro_batch_size": mbs, "strategy": dict(strategy),
            "rule": dict(rule), "nonfinite": nonfinite, "schedule": schedule,
            "max_grad_norm": None if mgn is None else float(mgn), **counts}




def state_dict(opt: Any) -> dict[str, Any]:
    """The base optimizer's state dict plus the ``msam`` entry (settings, rule and schedule
    state, counters); the step counters are also written into every saved param group
    (``msam_steps``, ``msam_skipped_steps``), where ``torch.distributed.checkpoint`` keeps
    them. Runs the hooks of ``register_state_dict_pre_hook`` / ``_post_hook``."""
    for pre_hook in opt._optimizer_state_dict_pre_hooks.values():
        pre_hook(opt)
    sd = opt.base_optimizer.state_dict()
    sd[_STATE_KEY] = {
        "version": _STATE_VERSION,
        "micro_batches": opt.engine.micro_batches,
        "micro_batch_size": opt.engine.micro_batch_size,
        "rule": opt.engine.rule.state_dict(),
        "strategy": opt.distribution.state_name(opt.engine.strategy),
        "max_grad_norm": opt.max_grad_norm,
        "nonfinite": opt.engine.nonfinite,
        "steps": opt.steps,
        "skipped_steps": opt.skipped_steps,
        "schedule": opt.schedule.state_dict(),
    }
    for group in sd["param_groups"]:
        group[GROUP_COUNTERS[0]] = opt.steps
        group[GROUP_COUNTERS[1]] = opt.skipped_steps
    for post_hook in opt._optimizer_state_dict_post_hooks.values():
        out = post_hook(opt, sd)
        if out is not None:
            sd = out
    return sd

def load_state_dict(opt: Any, state_dict: dict[str, Any]) -> None:
    """Load a state saved by :func:`state_dict`; anything else is refused with an error.

    Checks the whole state before changing anything: the ``msam`` entry (every key present,
    each value valid), per-parameter state written by other SAM implementations
    (``old_p``), the number and sizes of the param groups, the shape of every
    parameter-shaped entry of the base state (momentum buffers, Adam moments) and of the
    rule's state (FriendlySAM's EMA), and the param groups' ``rho`` / ``eta``. Then the
    saved settings replace this optimizer's (a ``UserWarning`` names each one that changes;
    the strategy, an execution choice, is restored silently).

    A state without the ``msam`` entry whose param groups carry the step counters (what
    ``torch.distributed.checkpoint``'s ``get_optimizer_state_dict`` returns for an MSAM)
    loads the base state and the counters; the settings stay this optimizer's (they are
    constructor settings), and the rule's state and a reuse direction are not in it (see
    docs/core.md). Runs the ``register_load_state_dict_pre_hook`` / ``_post_hook`` hooks.
    """
    if isinstance(state_dict, Mapping):
        state_dict = dict(state_dict)
        for pre_hook in opt._optimizer_load_state_dict_pre_hooks.values():
            out = pre_hook(opt, state_dict)
            if out is not None:
                state_dict = out
    if not isinstance(state_dict, Mapping) or "state" not in state_dict \
            or "param_groups" not in state_dict:
        raise ValueError("state_dict: not an optimizer state (needs 'state' and "
                         "'param_groups')")
    for pid, pstate in state_dict["state"].items():
        keys = pstate.keys() if isinstance(pstate, Mapping) else ()
        foreign = [k for k in _FOREIGN_STATE_KEYS if k in keys]
        if foreign:
            raise ValueError(
                f"state_dict: parameter {pid} has {foreign[0]!r}, the weight copy of another "
                "SAM implementation; its momentum is not transferable this way. Load that "
                "optimizer's base state into opt.base_optimizer if you must"
            )
    extra = state_dict.get(_STATE_KEY)
    counters = group_counters(state_dict["param_groups"]) if extra is None else None
    if not isinstance(extra, Mapping) and counters is None:
        raise ValueError(
            f"state_dict: no {_STATE_KEY!r} entry, so it was not saved by msam.MSAM; a plain "
            f"{type(opt.base_optimizer).__name__} state goes into "
            "opt.base_optimizer.load_state_dict(...)"
        )
    settings = validated_settings(extra) if isinstance(extra, Mapping) else None
    for i, g in enumerate(state_dict["param_groups"]):
        validate_group(g, f"state_dict: param_groups[{i}]")
    _check_base_state(opt, state_dict)
    params, _, perturb = opt._per_param()
    perturbed = [p for p, k in zip(params, perturb) if k]
    strategy = schedule = rule_state = None
    if settings is not None:
        strategy = make_strategy(settings["strategy"]["name"])
        strategy.load_state_dict(settings["strategy"])
        rule_state = settings["rule"]
        if rule_state is not None:  # checked on a copy: nothing changes before the end
            probe = copy.deepcopy(opt.engine.rule)
            probe.load_state_dict(rule_state)
            probe.check_params(perturbed, f"state_dict[{_STATE_KEY!r}]: rule")
        schedule = Schedule()
        schedule.load_state_dict(settings["schedule"], opt._params(),
                                 f"state_dict[{_STATE_KEY!r}]")
        opt.distribution.check_schedule(schedule)
        if schedule.reuse is not None and opt._perturb_ids is not None:
            raise ValueError(f"state_dict[{_STATE_KEY!r}]: schedule.reuse needs every "
                             "parameter perturbed, this optimizer has perturb=")
        changed = _changed_settings(opt, settings, schedule)
    # Everything is checked; from here on the state changes.
    sd = {k: v for k, v in state_dict.items() if k != _STATE_KEY}
    sd["param_groups"] = [{k: v for k, v in g.items() if k not in GROUP_COUNTERS}
                          for g in state_dict["param_groups"]]
    opt.base_optimizer.load_state_dict(sd)
    opt._link()
    if settings is None:
        opt.steps, opt.skipped_steps = counters  # type: ignore[misc]
    else:
        if rule_state is not None:
            opt.engine.rule.load_state_dict(rule_state)
        opt.engine.micro_batches = settings["micro_batches"]
        opt.engine.micro_batch_size = settings["micro_batch_size"]
        opt.engine.strategy = opt.distribution.evaluator(strategy)
        opt.engine.nonfinite = settings["nonfinite"]
        opt.max_grad_norm = settings["max_grad_norm"]
        opt.steps = settings["steps"]
        opt.skipped_steps = settings["skipped_steps"]
        opt.schedule = schedule  # type: ignore[assignment]
        if changed:
            warnings.warn(
                "load_state_dict: the saved msam settings replace this optimizer's: "
                + ", ".join(f"{k} {a!r} -> {b!r}" for k, a, b in changed)
                + " (settings are part of the state, so a resumed run continues as saved; "
                "set them again after loading to change them)", UserWarning, stacklevel=2)
    opt._step = None
    opt.distribution.check_settings(opt)
    for post_hook in opt._optimizer_load_state_dict_post_hooks.values():
        post_hook(opt)

def _check_base_state(opt: Any, state_dict: Mapping[str, Any]) -> None:
    """What ``torch.optim``'s load checks (group count and sizes), before anything changes,
    and the shape of each parameter-shaped per-parameter entry (a wrong one would load
    and fail at the next step with a broadcast error)."""
    saved = state_dict["param_groups"]
    groups = opt.param_groups
    if not isinstance(saved, (list, tuple)) or len(saved) != len(groups):
        n = len(saved) if isinstance(saved, (list, tuple)) else saved
        raise ValueError(f"state_dict: has {n} param groups, this optimizer "
                         f"{len(groups)}")
    where: dict[Any, tuple[int, int, torch.Tensor]] = {}
    for i, (sg, g) in enumerate(zip(saved, groups)):
        ids = sg.get("params") if isinstance(sg, Mapping) else None
        if not isinstance(ids, (list, tuple)) or len(ids) != len(g["params"]):
            n = len(ids) if isinstance(ids, (list, tuple)) else ids
            raise ValueError(f"state_dict: param_groups[{i}] has {n} parameters, this "
                             f"optimizer's {len(g['params'])}")
        for k, (pid, p) in enumerate(zip(ids, g["params"])):
            where[pid] = (i, k, p)
    for pid, pstate in state_dict["state"].items():
        if pid not in where or not isinstance(pstate, Mapping):
            continue
        i, k, p = where[pid]
        for key in _PARAM_SHAPED_STATE:
            v = pstate.get(key)
            if isinstance(v, torch.Tensor) and v.shape != p.shape:
                raise ValueError(
                    f"state_dict: state of parameter {pid} (param_groups[{i}] parameter "
                    f"{k}): {key!r} has shape {tuple(v.shape)}, the parameter "
                    f"{tuple(p.shape)}")

def _changed_settings(opt: Any, settings: Mapping[str, Any], schedule: Schedule
                      ) -> list[tuple[str, object, object]]:
    """The settings a load would change: ``(name, now, saved)``."""
    def plain(rule_state: Mapping[str, Any] | None) -> dict[str, Any]:
        return {k: v for k, v in (rule_state or {}).items()
                if isinstance(v, (str, int, float, bool, type(None)))}

    now = {"micro_batches": opt.engine.micro_batches,
           "micro_batch_size": opt.engine.micro_batch_size,
           "max_grad_norm": opt.max_grad_norm, "nonfinite": opt.engine.nonfinite}
    out: list[tuple[str, object, object]] = [
        (k, v, settings[k]) for k, v in now.items() if v != settings[k]]
    rule_now, rule_saved = plain(opt.engine.rule.state_dict()), plain(settings["rule"])
    if rule_saved and rule_now != rule_saved:
        out.append(("rule", rule_now, rule_saved))
    sched_now, sched_saved = (
        {k: v for k, v in sc.state_dict().items() if k != "direction"}
        for sc in (opt.schedule, schedule))
    if sched_now != sched_saved:
        out.append(("schedule", sched_now, sched_saved))
    return out


def getstate(opt: Any) -> dict[str, Any]:
    """Everything (``torch.optim.Optimizer`` keeps only ``defaults``, ``state`` and
    ``param_groups``, which lost the base optimizer, engine and schedule), less the hooks
    (as torch.optim), the last result and an LR scheduler's wrapper of ``step``. The
    ``perturb=`` subset is kept as positions (it is held by ``id``)."""
    if opt._two_step is not None:
        raise RuntimeError("copy/pickle between first_step() and second_step(): the "
                           "weights are perturbed; call second_step() first")
    state = {k: v for k, v in opt.__dict__.items() if k not in _NOT_COPIED}
    if opt._perturb_ids is not None:
        ids = opt._perturb_ids
        state["_perturb_ids"] = [k for k, p in enumerate(group_params(opt.param_groups))
                                 if id(p) in ids]
    if opt.pending:   # torch copies a Parameter without its .grad: carry the accumulated one
        state["_pending_grads"] = [p.grad for p in group_params(opt.param_groups)]
    return state


def setstate(opt: Any, state: dict[str, Any]) -> None:
    state = dict(state)
    positions = state.pop("_perturb_ids", None)
    pending_grads = state.pop("_pending_grads", None)
    Optimizer.__setstate__(opt, state)   # new hook tables, torch's step wrapper
    if pending_grads is not None:
        for p, g in zip(group_params(opt.param_groups), pending_grads):
            p.grad = g
    if positions is not None:
        params = group_params(opt.param_groups)
        opt._perturb_ids = {id(params[k]) for k in positions}
    else:
        opt._perturb_ids = None
    opt.last_result = None
