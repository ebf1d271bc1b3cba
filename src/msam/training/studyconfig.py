"""Study configuration: a :class:`TrainConfig` plus ``grid``, ``per_method``, ``cases``,
``select``, ``name``, ``plots`` and ``description`` (see ``docs/training.md``).

Grid values are checked key by key against the training schema here; each run's whole config
is built (and checked) by :func:`msam.training.study.expand_grid`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import (
    METHODS,
    SELECT_METRICS,
    TrainConfig,
    _suggest,
    _value_checker,
    train_config_from_dict,
)
from .configfile import ConfigError, apply_overrides, read_config_file, where_fn

__all__ = ["StudyConfig", "load_study_config", "study_from_dict"]


@dataclass
class StudyConfig:
    """A grid of runs around one base :class:`TrainConfig`."""

    train: TrainConfig
    grid: dict[str, list[Any]] = field(default_factory=dict)
    per_method: dict[str, dict[str, list[Any]]] = field(default_factory=dict)
    name: str = "study"
    plots: bool = True
    #: ``{"by": "val_acc", "over": ["rho"]}``: per method (and the other grid keys), report
    #: the value of the ``over`` keys whose cell has the best mean ``by`` over seeds.
    select: dict[str, Any] | None = None
    #: Markdown shown at the top of summary.md: what the study is and why it is sized so.
    description: str = ""
    #: ``[{every: 2}, {start_fraction: 0.75}]``: alternative cells (training-key mappings),
    #: each crossed with the grid -- a union of settings where a grid would give a product.
    cases: list[dict[str, Any]] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict, repr=False)  # training keys, for cells
    source: str = "config"

    def to_dict(self) -> dict[str, Any]:
        out = self.train.to_dict()
        out.update(grid=copy.deepcopy(self.grid), per_method=copy.deepcopy(self.per_method),
                   name=self.name, plots=self.plots)
        if self.select is not None:
            out["select"] = copy.deepcopy(self.select)
        if self.description:
            out["description"] = self.description
        if self.cases:
            out["cases"] = copy.deepcopy(self.cases)
        return out


def study_from_dict(
    raw: Mapping[str, Any], source: str = "config", sources: Mapping[str, str] | None = None
) -> StudyConfig:
    """Build and validate a :class:`StudyConfig` (grid axes are checked cell by cell later)."""
    sources = dict(sources or {})
    where = where_fn(source, sources)
    raw = dict(raw)
    grid = raw.pop("grid", None) or {}
    per_method = raw.pop("per_method", None) or {}
    name = raw.pop("name", "study")
    plots = raw.pop("plots", True)
    select = raw.pop("select", None)
    description = raw.pop("description", "") or ""
    cases = raw.pop("cases", None) or []
    train = train_config_from_dict(raw, source, sources)
    if not isinstance(description, str):
        raise ConfigError(f"{where('description')}: key 'description' must be a string")
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{where('name')}: key 'name' must be a non-empty string")
    if not isinstance(plots, bool):
        raise ConfigError(f"{where('plots')}: key 'plots' must be true or false")
    train_keys = set(TrainConfig.model_fields)

    def check_axes(axes: Any, prefix: str) -> dict[str, list[Any]]:
        if not isinstance(axes, Mapping):
            raise ConfigError(f"{where(prefix)}: key '{prefix}' must be a mapping of key: [values]")
        out: dict[str, list[Any]] = {}
        for key, values in axes.items():
            full = f"{prefix}.{key}"
            top = str(key).split(".")[0]
            if top not in train_keys or top == "out_dir":
                raise ConfigError(
                    f"{where(full)}: unknown key '{full}'{_suggest(top, train_keys)}; grid axes "
                    "must be training keys (e.g. optimizer, rho, micro_batches, seed)"
                )
            if not isinstance(values, (list, tuple)):
                values = [values]
            if not values:
                raise ConfigError(f"{where(full)}: key '{full}' has no values")
            check = _value_checker(top) if "." not in str(key) else (lambda v: v)
            checked = []
            for i, v in enumerate(values):
                try:
                    checked.append(check(v))
                except ConfigError as err:
                    raise ConfigError(f"{where(full)}: key '{full}[{i}]' {err}") from None
            out[str(key)] = checked
        return out

    grid_axes = check_axes(grid, "grid")
    if "optimizer" in grid_axes:
        for i, v in enumerate(grid_axes["optimizer"]):
            grid_axes["optimizer"][i] = v = v.lower()
            if v not in METHODS:
                raise ConfigError(f"{where('grid.optimizer')}: key 'grid.optimizer[{i}]' is "
                                  f"{v!r}; choose from {', '.join(METHODS)}")
    if not isinstance(per_method, Mapping):
        raise ConfigError(f"{where('per_method')}: key 'per_method' must be a mapping "
                          "method: {key: [values]}")
    pm: dict[str, dict[str, list[Any]]] = {}
    for method, axes in per_method.items():
        if method not in METHODS:
            raise ConfigError(f"{where(f'per_method.{method}')}: unknown key "
                              f"'per_method.{method}'; methods: {', '.join(METHODS)}")
        pm[method] = check_axes(axes or {}, f"per_method.{method}")
        if "optimizer" in pm[method]:
            raise ConfigError(f"{where(f'per_method.{method}.optimizer')}: key "
                              f"'per_method.{method}.optimizer' is not allowed")
    if not isinstance(cases, list) or not all(isinstance(c, Mapping) for c in cases):
        raise ConfigError(f"{where('cases')}: key 'cases' must be a list of mappings "
                          "{key: value}")
    checked_cases = []
    for i, case in enumerate(cases):
        one = check_axes({k: [v] for k, v in case.items()}, f"cases[{i}]")
        for k in one:
            if k in ("optimizer", "seed") or k in grid_axes:
                raise ConfigError(f"{where('cases')}: key 'cases[{i}].{k}' is also a grid axis "
                                  "(or optimizer / seed); put it in one place")
        checked_cases.append({k: v[0] for k, v in one.items()})
    _refuse_shadowed_overrides(sources, grid_axes, checked_cases)
    if select is not None:
        select = _check_select(select, grid_axes, pm, checked_cases, where)
    return StudyConfig(train=train, grid=grid_axes, per_method=pm, name=name, plots=plots,
                       select=select, description=description.strip(), raw=dict(raw),
                       source=source, cases=checked_cases)


def _refuse_shadowed_overrides(sources: Mapping[str, str], grid: Mapping[str, Any],
                               cases: list[dict[str, Any]]) -> None:
    """A training key set on the command line (``--set micro_batches=4``) that is also a grid
    axis (or set by every case) would be overridden in every run without a word: refuse it.
    (A ``per_method`` axis is not refused: the other methods use the value.)"""
    for key, label in sources.items():
        if key in grid:
            raise ConfigError(f"{label}: key '{key}' is also a grid axis (grid.{key}), whose "
                              "values every run uses, so this value would be ignored; set "
                              f"grid.{key} instead (e.g. --set grid.{key}=[...])")
        if cases and all(key in c for c in cases):
            raise ConfigError(f"{label}: key '{key}' is set by every one of the study's cases, "
                              "so this value would be ignored; change the cases instead")


def _check_select(select: Any, grid: Mapping[str, list[Any]],
                  per_method: Mapping[str, Mapping[str, list[Any]]],
                  cases: list[dict[str, Any]], where: Callable[[str], str]) -> dict[str, Any]:
    if not isinstance(select, Mapping):
        raise ConfigError(f"{where('select')}: key 'select' must be a mapping "
                          "{by: val_acc, over: [rho]}")
    unknown = sorted(set(select) - {"by", "over"})
    if unknown:
        raise ConfigError(f"{where('select')}: unknown key 'select.{unknown[0]}'; "
                          "valid keys: by, over")
    by = select.get("by", "val_acc")
    if by not in SELECT_METRICS:
        raise ConfigError(f"{where('select.by')}: key 'select.by' is {by!r}; choose from "
                          f"{', '.join(SELECT_METRICS)} (validation metrics only, never test)")
    over = select.get("over")
    if isinstance(over, str):
        over = [over]
    if not isinstance(over, (list, tuple)) or not over:
        raise ConfigError(f"{where('select.over')}: key 'select.over' must list grid keys, "
                          "e.g. [rho]")
    axes = set(grid) | {k for m in per_method.values() for k in m} | {k for c in cases for k in c}
    for k in over:
        if k not in axes or k in ("optimizer", "seed"):
            raise ConfigError(f"{where('select.over')}: key 'select.over' names {k!r}, which "
                              "is not a grid axis or a key of cases (other than optimizer and "
                              "seed)")
    return {"by": by, "over": [str(k) for k in over]}


def load_study_config(
    path: str | Path, overrides: Iterable[str | tuple] = ()
) -> StudyConfig:
    """Load a study config file (training keys + ``grid`` / ``per_method`` / ``name``)."""
    raw = read_config_file(path)
    raw, sources = apply_overrides(raw, overrides)
    return study_from_dict(raw, str(path), sources)
