"""Studies: a grid of training runs with a summary table, a CSV of all runs and plots.

A study config is a run config plus

* ``grid``: ``{key: [values]}`` over training keys, e.g. ``optimizer: [sgd, sam, msam]``,
  ``rho: [0.05]``, ``micro_batches: [4, 16]``, ``seed: [0, 1, 2]``;
* ``per_method``: ``{method: {key: [values]}}`` replacing grid axes for one method (e.g. a
  larger ``rho`` for ``asam``);
* ``name`` and ``plots``.

Per-method rules keep the grid free of duplicates: ``sgd`` ignores ``rho``, ``micro_batches``,
``eta`` and ``strategy``; ``sam`` ignores ``micro_batches``; only ``asam`` uses ``eta``; and
``msam`` with ``m = 1`` *is* SAM, so it becomes the ``sam`` run; each method of the SAM family
(``gsam``, ``friendlysam``, ``wsam``, ``gcsam``; ``m = 1`` is the paper's method) uses only its
own keys (``gsam_alpha``, ...). A *cell* is one combination without the seed; its runs differ
only in ``seed``.

Layout (``out_dir``)::

    study.yaml          the resolved study config
    runs/<run name>/    one run directory per run (see msam.training.trainer)
    runs.csv            one row per run
    summary.md          mean +/- std per cell (and the per-run table)
    test_acc_vs_m.png   final test accuracy against m, one line per method / rho
    acc_vs_time.png     final test accuracy against training wall-clock time, one point per cell
    curves.png          validation accuracy and training loss per epoch, one line per cell

Resumable: a run whose ``done.json`` exists is not run again (its config must match); an
interrupted run resumes from its ``last.pt``. Each run is trained under its directory's lock
(:mod:`msam.training.rundir`), so two study processes on one directory share the runs out: a
run locked by the other process is skipped, and waited for at the end.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
import os
import platform
import re
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .checkpoint import atomic_write_json, atomic_write_text
from .config import (
    METHODS,
    RESUMABLE_CHANGES,
    SELECT_METRICS,
    VARIANT_KEYS,
    ConfigError,
    StudyConfig,
    TrainConfig,
    apply_overrides,
    config_diff,
    train_config_from_dict,
)
from .rundir import RunFiles, RunLockedError, run_lock
from .trainer import RunResult, StorageError, is_finished, read_done, train

__all__ = ["StudyRun", "export_study", "expand_grid", "load_runs", "run_study", "select_cells",
           "summarize"]

# Keys a method does not use: they are dropped from its grid (and its run names).
IGNORED_BY = {
    "sgd": {"rho", "micro_batches", "eta", "strategy", "every", "start_fraction", "start_epoch",
            "reuse", "reuse_alpha", "perturb", "rho_scaling"},
    "sam": {"micro_batches", "eta"},
    "msam": {"eta"},
    "asam": set(),
}
# The SAM family (docs/variants.md): micro_batches as msam, and only its own keys.
IGNORED_BY.update({method: {"eta"} for method in VARIANT_KEYS})
IGNORED_BY["momentumsam"] |= {"micro_batches"}   # one shared direction: m = 1
for _method, _ignored in IGNORED_BY.items():
    _ignored |= set().union(*VARIANT_KEYS.values()) - VARIANT_KEYS.get(_method, set())
_ABBREV = {"rho": "rho", "micro_batches": "m", "seed": "s", "label_noise": "noise",
           "batch_size": "bs", "weight_decay": "wd", "learning_rate": "lr", "lr": "lr",
           "train_subset": "n", "epochs": "ep", "perturb": "perturb",
           # schedules: msam_every5_s0, msam_late0.75_s0, msam_every5_reuselooksam_s0
           "every": "every", "start_fraction": "late", "start_epoch": "from-ep",
           "reuse": "reuse", "reuse_alpha": "ralpha",
           # SAM-family hyperparameters: wsam_rho0.1_m16_wgamma0.8_s0
           "gsam_alpha": "alpha", "gsam_rho_min": "rhomin", "wsam_gamma": "wgamma",
           "wsam_decoupled": "decoupled",
           "friendly_sigma": "sigma", "friendly_lambda": "lambda"}


@dataclass
class StudyRun:
    """One run of a study: its name, cell, seed and full config."""

    name: str
    method: str
    cell: tuple[tuple[str, Any], ...]  # (key, value) pairs without the seed, method first
    seed: int
    config: TrainConfig
    result: RunResult | None = None
    status: str = "pending"
    error: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def cell_label(self) -> str:
        return _cell_label(self.cell)


class FrozenMapping(Mapping):
    """A grid value that is a mapping (``model_options: [{norm: batch}, {norm: group}]``),
    frozen so that cells stay hashable: read-only, equal to a dict with the same items, in
    the order given. :func:`thaw` turns it (and nested values) back into plain dicts / lists
    for the run's config."""

    __slots__ = ("_items",)

    def __init__(self, items: Mapping[str, Any]) -> None:
        self._items = tuple((str(k), _freeze(v)) for k, v in items.items())

    def __getitem__(self, key: str) -> Any:
        for k, v in self._items:
            if k == key:
                return v
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        return (k for k, _ in self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(frozenset(self._items))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Mapping):
            return thaw(self) == {k: thaw(x) for k, x in other.items()}
        return NotImplemented

    def __repr__(self) -> str:
        return repr(thaw(self))


class _FrozenList(tuple):
    """A list inside a grid value (``{hidden: [16]}``), hashable; thawed back to a list."""

    __slots__ = ()


def _freeze(v: Any) -> Any:
    if isinstance(v, FrozenMapping | _FrozenList):
        return v
    if isinstance(v, Mapping):
        return FrozenMapping(v)
    if isinstance(v, list):
        return _FrozenList(_freeze(x) for x in v)
    return v


def thaw(v: Any) -> Any:
    """A frozen grid value as plain dicts and lists (anything else unchanged)."""
    if isinstance(v, FrozenMapping):
        return {k: thaw(x) for k, x in v.items()}
    if isinstance(v, _FrozenList):
        return [thaw(x) for x in v]
    return v


def _fmt_value(v: Any) -> str:
    if isinstance(v, Mapping):  # {norm: group, width: 2} -> "norm=group width=2"
        return " ".join(f"{_ABBREV.get(k, k)}={_fmt_value(x)}" for k, x in v.items())
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        short = f"{v:g}"  # 0.05, 1e-05, 1 (the names studies have always used) ...
        return short if float(short) == v else repr(v)  # ... unless it rounds: 0.1000001
    if isinstance(v, (list, tuple)):
        return "-".join(_fmt_value(x) for x in v)
    return re.sub(r"[^A-Za-z0-9.+-]+", "-", str(v)).strip("-") or "x"


def _short(key: str) -> str:
    """A grid key as shown in names and labels: its abbreviation, else its last dotted part."""
    return _ABBREV.get(key, key.split(".")[-1])


def _entries(key: str, v: Any) -> list[tuple[str, Any]]:
    """``(short key, value)`` pairs of one grid entry; a mapping gives one pair per item
    (``model_options: {norm: group}`` -> ``[("norm", "group")]``), nested mappings too."""
    if isinstance(v, Mapping):
        return [e for k, x in v.items() for e in _entries(str(k), x)] or [(_short(key), "")]
    return [(_short(key), v)]


def _cell_label(cell: Sequence[tuple[str, Any]]) -> str:
    parts = []
    for k, v in cell:
        if k == "optimizer":
            parts.append(str(v))
        else:
            parts += [f"{name}={_fmt_value(x)}" for name, x in _entries(k, v)]
    return " ".join(parts)


def _run_name(method: str, cell: Sequence[tuple[str, Any]], seed: int) -> str:
    parts = [method]
    for k, v in cell:
        if k == "optimizer":
            continue
        parts += [f"{name}{_fmt_value(x)}" for name, x in _entries(k, v)]
    parts.append(f"s{seed}")
    return "_".join(parts)


def expand_grid(study: StudyConfig) -> list[StudyRun]:
    """All runs of the study, in a stable order, with per-method rules applied.

    Every run's config is built and validated here, so a bad grid value fails before any
    training starts (the error names the grid key).
    """
    base = study.train
    grid = dict(study.grid)
    methods = list(grid.pop("optimizer", [base.optimizer]))
    seeds = list(grid.pop("seed", [base.seed]))
    cases = study.cases or [{}]
    runs: list[StudyRun] = []
    seen: dict[str, StudyRun] = {}
    for method in dict.fromkeys(methods):
        own = dict(study.per_method.get(method, {}))
        seeds_m = list(own.pop("seed", seeds))
        axes = {**grid, **own}
        axes = {k: v for k, v in axes.items() if k.split(".")[0] not in IGNORED_BY[method]}
        keys = list(axes)
        for combo, case in itertools.product(
                itertools.product(*(axes[k] for k in keys)), cases):
            values = {**dict(zip(keys, combo)), **case}
            actual = method
            if method == "msam" and values.get("micro_batches", base.micro_batches) == 1:
                actual = "sam"  # mSAM with one micro-batch is SAM
                values.pop("micro_batches", None)
            cell = (("optimizer", actual),) + tuple(  # frozen: cells are dict keys
                (k, _freeze(v)) for k, v in values.items()
                if k.split(".")[0] not in IGNORED_BY[actual]
            )
            for seed in seeds_m:
                name = _run_name(actual, cell, seed)
                overrides = [("optimizer", actual), ("seed", seed)]
                overrides += [(k, thaw(v)) for k, v in cell if k != "optimizer"]
                raw, sources = apply_overrides(study.raw, overrides)
                sources = {k: f"grid value {k}={v!r} (run {name})" for k, v in overrides}
                cfg = train_config_from_dict(raw, study.source, sources)
                cfg = cfg.replace(out_dir=str(Path(base.out_dir) / "runs" / name)).resolved()
                if name in seen:  # the same run reached twice (e.g. msam m=1 is sam): once
                    diff = config_diff(seen[name].config.to_dict(), cfg.to_dict())
                    if diff:
                        raise ConfigError(
                            f"{study.source}: grid values {_cell_label(seen[name].cell)!r} and "
                            f"{_cell_label(cell)!r} give runs that differ in {', '.join(diff)} "
                            f"but share the run name {name!r}; make the values distinct")
                    continue
                run = StudyRun(name=name, method=actual, cell=cell, seed=seed, config=cfg)
                seen[name] = run
                runs.append(run)
    return runs


def _run_one(run: StudyRun, prefix: str, quiet: bool, printer: Callable[[str], None]) -> None:
    """Skip (finished), resume or train one run; the caller holds the run's lock."""
    run_dir = Path(run.config.out_dir)
    done = run_dir / "done.json"
    if done.exists():
        _check_matches(run, read_done(run_dir)["config"])  # a corrupted record: named error
        if is_finished(run_dir, run.config):
            run.result = RunResult.from_dir(run_dir)
            run.status = "done"
            if not quiet:
                printer(f"{prefix}finished earlier; skipped")
            return
    try:
        started = (run_dir / "last.pt").exists() or (run_dir / "prev.pt").exists() \
            or done.exists()
        run.result = train(run.config, resume=started, quiet=quiet, log_prefix=prefix)
        run.status = "done"
    except (ConfigError, KeyboardInterrupt, StorageError):  # a full disk stops the study
        raise
    except Exception as err:  # one failed run must not lose the others
        run.status = "failed"
        run.error = f"{type(err).__name__}: {err}"
        run_dir.mkdir(parents=True, exist_ok=True)
        RunFiles(run_dir).write_text("error.txt", traceback.format_exc())
        printer(f"{prefix}FAILED: {run.error} (traceback in {run_dir / 'error.txt'})")


def _check_matches(run: StudyRun, done_config: dict[str, Any]) -> None:
    diff = [k for k in config_diff(done_config, run.config.to_dict())
            if k.split(".")[0] not in RESUMABLE_CHANGES]
    if diff:
        raise ConfigError(
            f"run directory {run.config.out_dir!r} holds a finished run with a different config "
            f"({', '.join(diff)}); delete it or use another out_dir for the study"
        )


def run_study(
    study: StudyConfig,
    *,
    quiet: bool = False,
    dry_run: bool = False,
    summarize_only: bool = False,
    printer: Callable[[str], None] = print,
    command: str | None = None,
) -> Path:
    """Run (or resume) every run of ``study`` and write the summary; returns the study dir.

    ``command``: the command line that runs this study, recorded in ``command.txt`` and in the
    summary's "Reproduce" section. ``summarize_only``: train and measure nothing; summarise
    the runs finished so far (the others are listed as pending) and keep ``command.txt``, e.g.
    after part of the grid was run with ``--set`` overrides.
    """
    if dry_run and summarize_only:
        raise ConfigError("--dry-run and --summarize-only contradict each other; pass one")
    root = Path(study.train.out_dir)
    if summarize_only:  # reads only the run directories: no dataset check
        return _summarize_finished(study, root, printer)
    runs = expand_grid(study)
    missing = _missing_data(runs)  # once, up front: not once per run
    if dry_run:
        for r in sorted(runs, key=lambda r: r.seed):
            printer(f"{r.name}: {r.cell_label} seed={r.seed} -> {r.config.out_dir}")
        if missing is not None:
            printer(f"WARNING: the study cannot run as it is: {missing}")
        return root
    if missing is not None:
        raise missing
    root.mkdir(parents=True, exist_ok=True)
    _write_study_config(root, study)
    if command:
        atomic_write_text(root / "command.txt", command + "\n")
    t_start = time.perf_counter()
    # Seeds outermost: an interrupted or still-running study has every cell at seed 0 first.
    order = sorted(runs, key=lambda r: r.seed)
    busy: list[tuple[int, StudyRun]] = []
    for i, run in enumerate(order, 1):
        prefix = f"[{i}/{len(runs)} {run.name}] "
        try:
            with run_lock(run.config.out_dir):
                _run_one(run, prefix, quiet, printer)
        except RunLockedError:  # another study process trains it: take the next one
            busy.append((i, run))
            if not quiet:
                printer(f"{prefix}being trained by another process; taking the next run")
            continue
        if run.status == "done" and i < len(order):  # partial results stay readable
            _summarize_quietly(study, runs, root, printer)
    for i, run in busy:  # wait for the other process, then use (or finish) its result
        prefix = f"[{i}/{len(runs)} {run.name}] "
        with run_lock(run.config.out_dir, wait=True):
            _run_one(run, prefix, quiet, printer)
    summary = summarize(study, runs, root)
    elapsed = time.perf_counter() - t_start
    printer("")
    printer(summary["table"])
    printer("")
    printer(f"study {study.name!r}: {len(runs)} runs in {elapsed:.1f}s -> {root}")
    printer(f"summary: {summary['summary_path']}")
    for p in summary["plots"]:
        printer(f"plot: {p}")
    failed = [r for r in runs if r.status == "failed"]
    if failed:
        raise RuntimeError(f"{len(failed)} run(s) failed: {', '.join(r.name for r in failed)}")
    return root


def _summarize_finished(study: StudyConfig, root: Path,
                        printer: Callable[[str], None]) -> Path:
    """The summary of the study's finished runs; nothing is trained or measured. Refuses
    (writing nothing) when no run is finished, so a mistyped override cannot replace a
    summary with an empty one."""
    if not (root / "runs").is_dir():
        raise ConfigError(f"config: key 'out_dir': {root} holds no study to summarise "
                          f"(no {root / 'runs'} folder)")
    runs = load_runs(study)
    for run in runs:
        if run.status == "pending" and run.error:
            printer(f"WARNING: {run.name}: not counted: {run.error}")
    done = sum(r.status == "done" for r in runs)
    if not done:
        raise ConfigError(f"none of the {len(runs)} runs of {root} is finished with this "
                          "config (see the warnings above); nothing was written")
    _write_study_config(root, study)
    summary = summarize(study, runs, root, summarized_only=True)
    printer(summary["table"])
    printer("")
    printer(f"study {study.name!r}: {done} of {len(runs)} runs finished (nothing trained) "
            f"-> {root}")
    printer(f"summary: {summary['summary_path']}")
    for p in summary["plots"]:
        printer(f"plot: {p}")
    return root


def _missing_data(runs: list[StudyRun]) -> Exception | None:
    """The first dataset of the study's runs that cannot be read (None: all can)."""
    from msam.data import DatasetNotFoundError, check_available

    for key in dict.fromkeys((r.config.dataset, r.config.data_dir, r.config.download)
                             for r in runs):
        try:
            check_available(*key)
        except DatasetNotFoundError as err:
            return err
    return None


#: What :func:`export_study` copies: study-level files, then per-run files (no checkpoints).
EXPORT_FILES = ("summary.md", "runs.csv", "study.yaml", "command.txt", "*.png")
EXPORT_RUN_FILES = ("config.yaml", "config.json", "run_info.json", "metrics.csv", "metrics.jsonl",
                    "done.json", "sharpness.json", "error.txt")


def export_study(root: str | Path, dest: str | Path) -> Path:
    """Copy a study's results (summary, CSV, plots, resolved config, command, and every run's
    config, metrics and sharpness, but no checkpoints) from ``root`` into ``dest``: a small,
    reviewable folder such as ``results/<study>/``. Returns ``dest``."""
    import shutil

    root, dest = Path(root), Path(dest)
    if not (root / "summary.md").is_file():
        raise FileNotFoundError(f"{root} holds no summary.md; run the study first")
    dest.mkdir(parents=True, exist_ok=True)
    for pattern in EXPORT_FILES:
        for path in sorted(root.glob(pattern)):
            shutil.copy2(path, dest / path.name)
    for run_dir in sorted(p for p in (root / "runs").glob("*") if p.is_dir()):
        files = [run_dir / f for f in EXPORT_RUN_FILES if (run_dir / f).is_file()]
        if files:
            (dest / "runs" / run_dir.name).mkdir(parents=True, exist_ok=True)
            for path in files:
                shutil.copy2(path, dest / "runs" / run_dir.name / path.name)
    return dest


def _summarize_quietly(study: StudyConfig, runs: list[StudyRun], root: Path,
                       printer: Callable[[str], None]) -> None:
    try:
        summarize(study, runs, root)
    except Exception as err:  # an interim summary must never stop the study
        printer(f"interim summary skipped: {type(err).__name__}: {err}")


def _write_study_config(root: Path, study: StudyConfig) -> None:
    d = study.to_dict()
    d["out_dir"] = str(root)
    atomic_write_json(root / "study.json", d)
    try:
        import yaml
    except ImportError:  # pragma: no cover
        return
    atomic_write_text(root / "study.yaml", yaml.safe_dump(d, sort_keys=False))


# -- summary -----------------------------------------------------------------------------------

def _mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return None, None
    mean = sum(vals) / len(vals)
    if len(vals) < 2:
        return mean, None
    var = sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)
    return mean, math.sqrt(var)


def _pm(mean: float | None, std: float | None, scale: float = 1.0, digits: int = 2) -> str:
    if mean is None:
        return "-"
    s = f"{mean * scale:.{digits}f}"
    if std is not None:
        s += f" ± {std * scale:.{digits}f}"
    return s


def _run_row(run: StudyRun, grid_keys: Sequence[str]) -> dict[str, Any]:
    res = run.result
    final = res.final if res is not None else {}
    row: dict[str, Any] = {"run": run.name, "method": run.method}
    cell = dict(run.cell)
    for k in grid_keys:
        v = cell.get(k, "")
        row[k] = json.dumps(thaw(v)) if isinstance(v, FrozenMapping | _FrozenList) else v
    row.update(seed=run.seed, status=run.status,
               test_acc=final.get("test_acc"), val_acc=final.get("val_acc"),
               train_loss=final.get("train_loss"), train_acc=final.get("train_acc"),
               test_loss=final.get("test_loss"), epochs=final.get("epoch"),
               time_s=None if res is None else round(res.train_time_s, 3))
    for k, v in ((res.sharpness or {}) if res is not None else {}).items():
        if k != "examples":
            row[f"sharpness.{k}"] = v
    row["run_dir"] = run.config.out_dir
    row["error"] = run.error
    return row


_METHOD_ORDER = {m: i for i, m in enumerate(METHODS)}


def _sort_key(cell: tuple[tuple[str, Any], ...]) -> tuple:
    out: list[Any] = [_METHOD_ORDER.get(dict(cell)["optimizer"], 99)]
    for k, v in cell[1:]:
        out.append((k, (0, v) if isinstance(v, (int, float)) else (1, str(v))))
    return tuple(out)


def summarize(study: StudyConfig, runs: list[StudyRun], root: Path, *,
              summarized_only: bool = False) -> dict[str, Any]:
    """Write ``runs.csv``, ``summary.md`` and the plots; returns the table and paths.
    ``summarized_only``: the summary was written by ``--summarize-only`` (its Reproduce
    section says so)."""
    grid_keys = [k for k in dict.fromkeys(
        k for r in runs for k, _ in r.cell if k != "optimizer")]
    rows = [_run_row(r, grid_keys) for r in runs]
    sharp_keys = sorted({k for row in rows for k in row if k.startswith("sharpness.")})
    selected = select_cells(study, runs)
    chosen = {r.name for sel in selected for r in sel["runs"]}
    for row in rows:
        row["selected"] = "" if study.select is None else row["run"] in chosen
    columns = (["run", "method", *grid_keys, "seed", "status", "test_acc", "val_acc",
                "train_loss", "train_acc", "test_loss", "epochs", "time_s", *sharp_keys,
                "selected", "run_dir", "error"])
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in columns})
    atomic_write_text(root / "runs.csv", buf.getvalue())

    cells: dict[tuple, list[StudyRun]] = {}
    for r in runs:
        cells.setdefault(r.cell, []).append(r)
    ordered = sorted(cells, key=_sort_key)
    header = ["method", *[_short(k) for k in grid_keys], "n", "test acc (%)",
              "val acc (%)", "train loss", "time/run (s)", *[k.split(".", 1)[1]
                                                            for k in sharp_keys]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    cell_stats = []
    for cell in ordered:
        members = [r for r in cells[cell] if r.result is not None and r.result.history]
        finals = [r.result.final for r in members]  # type: ignore[union-attr]
        d = dict(cell)
        test = _mean_std([f.get("test_acc") for f in finals])
        val = _mean_std([f.get("val_acc") for f in finals])
        loss = _mean_std([f.get("train_loss") for f in finals])
        tm = _mean_std([r.result.train_time_s for r in members])  # type: ignore[union-attr]
        sharp = []
        for k in sharp_keys:
            name = k.split(".", 1)[1]
            sharp.append(_mean_std([(r.result.sharpness or {}).get(name)  # type: ignore[union-attr]
                                    for r in members]))
        shown = [_fmt_value(d[k]) if k in d
                 else "1" if (k, d["optimizer"]) == ("micro_batches", "sam") else "–"
                 for k in grid_keys]
        cells_text = [str(d["optimizer"]), *shown,
                      f"{len(members)}" + (f"/{len(cells[cell])}"
                                           if len(members) != len(cells[cell]) else ""),
                      _pm(*test, scale=100), _pm(*val, scale=100), _pm(*loss, digits=4),
                      "-" if tm[0] is None else f"{tm[0]:.1f}",
                      *[_pm(*s, digits=4) for s in sharp]]
        lines.append("| " + " | ".join(cells_text) + " |")
        cell_stats.append({"cell": cell, "test": test, "time": tm, "runs": members})
    table = "\n".join(lines)

    plots: list[Path] = []
    if study.plots:
        try:
            from msam.plotting import selected_plot, study_plots

            plots = study_plots(root, cell_stats, grid_keys)
            if selected:
                plots.insert(0, selected_plot(root, selected, sharp_keys, study.train.base))
        except ImportError as err:
            plots = []
            print(f"plots skipped: {err}")
    seeds = sorted({r.seed for r in runs})
    md = [
        f"# Study `{study.name}`",
        "",
        f"{study.train.dataset}, model `{study.train.model}`, {study.train.epochs} epochs, "
        f"batch {study.train.batch_size}, base `{study.train.base}` lr {study.train.lr:g} "
        f"({study.train.schedule}), rho {study.train.rho:g} unless swept; seeds {seeds}. "
        "Final-epoch accuracies, mean ± sample std over seeds (no ± with one seed). "
        "SAM is m = 1; `–`: the method ignores that key.",
        "",
        *([study.description, ""] if study.description else []),
        *([*_selected_section(study, selected, sharp_keys), "## All cells", ""]
          if study.select else []),
        table,
        "",
        "## Runs",
        "",
        "| run | seed | status | test acc (%) | val acc (%) | train loss | time (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        t = "-" if row["time_s"] is None else f"{row['time_s']:.1f}"
        md.append(
            f"| {row['run']} | {row['seed']} | {row['status']} | "
            f"{_pm(row['test_acc'], None, 100)} | {_pm(row['val_acc'], None, 100)} | "
            f"{_pm(row['train_loss'], None, digits=4)} | {t} |"
        )
    if plots:
        md += ["", "## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots]
    md += ["", *_reproduce_section(root, runs, summarized_only)]
    summary_path = root / "summary.md"
    atomic_write_text(summary_path, "\n".join(md) + "\n")
    return {"table": table, "summary_path": summary_path, "plots": plots, "rows": rows}


def cpu_name() -> str:
    """The CPU model (from /proc/cpuinfo on Linux), for reports."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _reproduce_section(root: Path, runs: list[StudyRun],
                       summarized_only: bool = False) -> list[str]:
    done = [r for r in runs if r.result is not None]
    infos = [r.result.info for r in done if r.result.info]  # type: ignore[union-attr]
    threads = sorted({str(i.get("threads")) for i in infos if i.get("threads") is not None})
    devices = sorted({str(i.get("device")) for i in infos if i.get("device")})
    versions = sorted({str(i.get("torch")) for i in infos if i.get("torch")})
    total = sum(r.result.train_time_s for r in done)  # type: ignore[union-attr]
    cmd_file = root / "command.txt"
    command = (cmd_file.read_text().strip() if cmd_file.is_file()
               else f"msam study {root / 'study.yaml'}")  # the resolved config, written above
    note = ([f"This summary was written by `msam study {root / 'study.yaml'} "
             "--summarize-only`, which trains nothing. The command above is the last one that "
             "trained runs here: a grid run in parts (e.g. extended only where its edges won) "
             "needs each part's command, and running the whole `study.yaml` would also train "
             "the runs listed as pending.", ""] if summarized_only else [])
    return [
        "## Reproduce", "",
        "```bash", command, "```", "", *note,
        f"Machine: {cpu_name()}, {os.cpu_count()} logical cores; device "
        f"{', '.join(devices) or '-'}; torch {', '.join(versions) or '-'}; "
        f"{'/'.join(threads) or 'default'} thread(s) per run. Training time, summed over the "
        f"{len(done)} finished runs: {total / 60:.1f} min (sharpness measurement not included)."
        " The resolved config is `study.yaml`; every run's own config is in its `done.json`.",
    ]


# -- selection on validation ------------------------------------------------------------------

def select_cells(study: StudyConfig, runs: list[StudyRun]) -> list[dict[str, Any]]:
    """Per group of cells that differ only in ``study.select["over"]`` (e.g. ``rho``), the cell
    with the best mean validation metric over its finished seeds; ``[]`` without ``select``.

    Each entry: ``{"cell", "group", "chosen", "runs", "score", "candidates"}`` where
    ``candidates`` lists ``(chosen values, mean score, n runs)`` for every cell of the group.
    Ties go to the first cell in the grid's order. Test metrics are never looked at.
    """
    if not study.select:
        return []
    by, over = study.select["by"], list(study.select["over"])
    larger = SELECT_METRICS[by]
    cells: dict[tuple, list[StudyRun]] = {}
    for r in runs:
        cells.setdefault(r.cell, []).append(r)
    groups: dict[tuple, list[tuple]] = {}
    for cell in sorted(cells, key=_sort_key):
        group = tuple((k, v) for k, v in cell if k not in over)
        groups.setdefault(group, []).append(cell)
    out = []
    for group, members in groups.items():
        candidates = []
        for cell in members:
            done = [r for r in cells[cell] if r.result is not None and r.result.history]
            score = _mean_std([r.result.final.get(by) for r in done])[0]  # type: ignore[union-attr]
            candidates.append((cell, score, done))
        scored = [c for c in candidates if c[1] is not None]
        if not scored:
            continue
        best = scored[0]
        for c in scored[1:]:
            if (c[1] > best[1]) if larger else (c[1] < best[1]):
                best = c
        d = dict(best[0])
        out.append({
            "cell": best[0], "group": group, "chosen": {k: d[k] for k in over if k in d},
            "runs": best[2], "score": best[1],
            "candidates": [({k: dict(c)[k] for k in over if k in dict(c)}, sc, len(rs))
                           for c, sc, rs in candidates],
        })
    return out


_BASE_NAMES = {"sgd": "SGD", "adamw": "AdamW", "adam": "Adam"}
_METHOD_NAMES = {"msam": "mSAM", "friendlysam": "FriendlySAM"}


def _group_label(group: tuple, base: str = "sgd") -> str:
    d = dict(group)
    method = str(d.get("optimizer", ""))
    rest = [f"{name} = {_fmt_value(x)}" for k, v in group if k != "optimizer"
            for name, x in _entries(k, v)]
    if method == "sam":  # other grid keys (norm, noise, ...) tell the groups apart
        return f"SAM ({', '.join(['m = 1', *rest])})"
    if method == "sgd":  # the base optimizer alone
        name = _BASE_NAMES.get(base, base)
        return name + (f" ({', '.join(rest)})" if rest else "")
    return _METHOD_NAMES.get(method, method.upper()) + (
        f" ({', '.join(rest)})" if rest else "")


def _selected_section(study: StudyConfig, selected: list[dict[str, Any]],
                      sharp_keys: Sequence[str]) -> list[str]:
    assert study.select is not None
    by, over = study.select["by"], study.select["over"]
    names = [k.split(".", 1)[1] for k in sharp_keys]
    header = ["method", *[f"chosen {_ABBREV.get(k, k)}" for k in over], "n", "test acc (%)",
              f"{by} (selection)", "train loss", *names]
    lines = [f"## Selected: {', '.join(over)} chosen per method on mean {by}", "",
             f"For each method, the {', '.join(over)} value with the best mean {by} over seeds "
             "(validation split carved from the training set; the test set is never used to "
             "choose). Mean ± sample std over seeds.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for sel in selected:
        finals = [r.result.final for r in sel["runs"]]
        sharp = [_mean_std([(r.result.sharpness or {}).get(n) for r in sel["runs"]])
                 for n in names]
        score = _mean_std([f.get(by) for f in finals])
        lines.append("| " + " | ".join([
            _group_label(sel["group"], study.train.base),
            *[_fmt_value(sel["chosen"][k]) if k in sel["chosen"] else "–" for k in over],
            str(len(sel["runs"])),
            _pm(*_mean_std([f.get("test_acc") for f in finals]), scale=100),
            _pm(*score, scale=100) if by.endswith("acc") else _pm(*score, digits=4),
            _pm(*_mean_std([f.get("train_loss") for f in finals]), digits=4),
            *[_pm(*st, digits=3) for st in sharp]]) + " |")
    lines += ["", "Candidates (mean " + by + "): " + "; ".join(
        f"{_group_label(sel['group'], study.train.base)}: " + ", ".join(
            f"{'/'.join(_fmt_value(v) for v in ch.values())} → "
            + ("-" if sc is None else f"{100 * sc:.2f}" if by.endswith("acc") else f"{sc:.4f}")
            for ch, sc, _n in sel["candidates"])
        for sel in selected if len(sel["candidates"]) > 1), ""]
    return lines


def accuracy_curve(
    hists: Sequence[Sequence[dict[str, Any]]],
) -> tuple[str, list[tuple[int, float]]]:
    """The accuracy curve of one cell, averaged over its seeds' histories: validation accuracy
    if any epoch has it (with ``eval_every > 1`` some epochs have none, and are left out rather
    than drawn as gaps), else test accuracy. Returns ``(key, [(epoch, percent), ...])``."""
    key = "val_acc" if any(row.get("val_acc") is not None for h in hists for row in h) \
        else "test_acc"
    n_ep = min(len(h) for h in hists)
    points = []
    for e in range(n_ep):
        xs = [h[e][key] for h in hists if h[e].get(key) is not None]
        if xs:
            points.append((e + 1, 100 * sum(xs) / len(xs)))
    return key, points


def load_runs(study: StudyConfig) -> list[StudyRun]:
    """The study's runs with the results of those that are finished (no training). A run
    whose ``done.json`` holds another config is an error naming the keys. A run that failed
    (``error.txt``, no ``done.json``) is ``failed`` with the error's last line; one finished
    with other epochs or sharpness metrics stays ``pending``, with the reason in ``error``."""
    runs = expand_grid(study)
    for run in runs:
        run_dir = Path(run.config.out_dir)
        if (run_dir / "done.json").is_file():
            done = read_done(run_dir)
            _check_matches(run, done["config"])
            if is_finished(run_dir, run.config):
                run.result = RunResult.from_dir(run_dir)
                run.status = "done"
            else:
                run.error = (f"finished with {done.get('epochs')} epochs and sharpness "
                             f"metrics {list(done.get('sharpness_metrics') or [])}; the "
                             f"config asks for {run.config.epochs} and "
                             f"{list(run.config.sharpness.metrics)}")
        elif (run_dir / "error.txt").is_file():
            lines = (run_dir / "error.txt").read_text(errors="replace").strip().splitlines()
            run.status = "failed"
            run.error = lines[-1] if lines else "failed (empty error.txt)"
    return runs

