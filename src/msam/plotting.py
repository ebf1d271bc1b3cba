"""Every plot msam draws, with one matplotlib setup (:func:`figure`, :func:`save`).

Figures are drawn on matplotlib's Agg canvas directly (``matplotlib.figure.Figure`` +
``FigureCanvasAgg``): no display is needed, and neither pyplot's global state nor the user's
selected backend is touched. matplotlib is imported on first use (``msam[experiments]``).

* loss landscapes and spectra (re-exported by :mod:`msam.analysis`): :func:`plot_loss_slice`,
  :func:`plot_loss_surface`, :func:`plot_interpolation`, :func:`plot_spectral_density`;
* studies (``summary.md``): :func:`study_plots`, :func:`selected_plot`;
* the benchmark (``bench.png``): :func:`bench_plot`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from msam.analysis.hessian import SpectralDensity
    from msam.analysis.landscape import Interpolation, LossSlice, LossSurface

__all__ = [
    "bench_plot", "figure", "plot_interpolation", "plot_loss_slice", "plot_loss_surface",
    "plot_spectral_density", "save", "selected_plot", "study_plots",
]


def figure(width: float, height: float, nrows: int = 1, ncols: int = 1,
           layout: Any = "constrained") -> tuple[Any, list[Any]]:
    """A figure on the Agg canvas and its ``nrows * ncols`` axes (row by row)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("plotting needs matplotlib: pip install 'msam[experiments]'") from exc
    fig = Figure(figsize=(width, height), dpi=120, layout=layout)
    FigureCanvasAgg(fig)
    return fig, [fig.add_subplot(nrows, ncols, i + 1) for i in range(nrows * ncols)]


def save(fig: Any, path: str | os.PathLike[str], dpi: int = 120, tight: bool = False) -> Path:
    """Write ``fig`` as a PNG (creating the folder); returns the path."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    if tight:
        fig.tight_layout()
    fig.savefig(out, format="png", dpi=dpi)
    return out


# -- loss landscapes and spectra ---------------------------------------------------------------

def plot_loss_slice(
    result: LossSlice | Sequence[LossSlice],
    path: str | os.PathLike[str],
    labels: Sequence[str] | None = None,
    title: str | None = None,
    log_scale: bool = False,
) -> Path:
    """Line plot of one or several 1-D loss slices; returns the PNG path."""
    from msam.analysis.landscape import LossSlice

    slices = [result] if isinstance(result, LossSlice) else list(result)
    fig, (ax,) = figure(5.0, 3.6, layout=None)
    for i, sl in enumerate(slices):
        label = labels[i] if labels is not None else None
        ax.plot(sl.alphas, sl.losses, marker=".", label=label)
    ax.set_xlabel(r"$\alpha$")
    ax.set_ylabel(r"$L(w + \alpha d)$")
    if log_scale:
        ax.set_yscale("log")
    if labels is not None:
        ax.legend()
    ax.set_title(title or "1-D loss slice")
    ax.grid(alpha=0.3)
    return save(fig, path, tight=True)


def plot_loss_surface(
    result: LossSurface,
    path: str | os.PathLike[str],
    levels: int = 30,
    title: str | None = None,
    log_scale: bool = False,
) -> Path:
    """Filled contour plot of a 2-D loss surface; returns the PNG path."""
    z = np.asarray(result.losses, dtype=np.float64).T  # rows: betas, cols: alphas
    if log_scale:
        z = np.log10(np.maximum(z, np.finfo(np.float64).tiny))
    fig, (ax,) = figure(5.0, 4.2, layout=None)
    if len(result.alphas) > 1 and len(result.betas) > 1:
        cs = ax.contourf(result.alphas, result.betas, z, levels=levels, cmap="viridis")
        ax.contour(result.alphas, result.betas, z, levels=levels, colors="k", linewidths=0.3)
        fig.colorbar(cs, ax=ax, label="log10 loss" if log_scale else "loss")
    else:
        ax.plot(result.alphas if len(result.alphas) > 1 else result.betas, z.reshape(-1))
    ax.set_xlabel(r"$\alpha$ (direction 1)")
    ax.set_ylabel(r"$\beta$ (direction 2)")
    ax.set_title(title or "2-D loss surface")
    return save(fig, path, tight=True)


def plot_interpolation(
    result: Interpolation,
    path: str | os.PathLike[str],
    title: str | None = None,
    log_scale: bool = False,
) -> Path:
    """Loss along the line between two checkpoints (marks the endpoints); returns the path."""
    fig, (ax,) = figure(5.0, 3.6, layout=None)
    ax.plot(result.alphas, result.losses, marker=".")
    for x in (0.0, 1.0):
        ax.axvline(x, color="grey", lw=0.8, ls="--")
    ax.set_xlabel(r"$\alpha$  ($\theta = (1-\alpha)\theta_a + \alpha\theta_b$)")
    ax.set_ylabel("loss")
    if log_scale:
        ax.set_yscale("log")
    ax.set_title(title or "linear interpolation")
    ax.grid(alpha=0.3)
    return save(fig, path, tight=True)


def plot_spectral_density(
    result: SpectralDensity,
    path: str | os.PathLike[str],
    title: str | None = None,
    log_scale: bool = True,
) -> Path:
    """Hessian eigenvalue density (SLQ), log-scaled density axis by default."""
    grid = np.asarray(result.grid, dtype=np.float64)
    dens = np.asarray(result.density, dtype=np.float64)
    fig, (ax,) = figure(5.0, 3.6, layout=None)
    if log_scale:
        floor = max(float(dens.max()) * 1e-12, np.finfo(np.float64).tiny)
        ax.semilogy(grid, np.maximum(dens, floor))
    else:
        ax.plot(grid, dens)
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density")
    ax.set_title(title or f"Hessian spectral density (SLQ, sigma={result.sigma:.3g})")
    ax.grid(alpha=0.3)
    return save(fig, path, tight=True)


# -- studies -----------------------------------------------------------------------------------

def _study_helpers() -> Any:
    """:mod:`msam.training.study`, whose labels the plots use (imported late: it imports
    this module's functions when it writes a summary)."""
    from msam.training import study

    return study


def selected_plot(root: Path, selected: list[dict[str, Any]],
                  sharp_keys: Sequence[str], base: str = "sgd") -> Path:
    """Test accuracy and each sharpness metric of the selected cells: mean ± std and seeds."""
    S = _study_helpers()
    names = ["test_acc", *[k.split(".", 1)[1] for k in sharp_keys
                           if not k.endswith(("_se", "_error"))]]
    many = len(selected) > 6  # one rotated line per cell instead of stacked lines
    fig, axes = figure(max(3.6, 0.42 * len(selected)) * len(names), 4.6 if many else 3.8,
                       ncols=len(names))
    labels = []
    for sel in selected:
        label = S._group_label(sel["group"], base)
        chosen = ", ".join(f"{S._ABBREV.get(k, k)} {S._fmt_value(v)}"
                           for k, v in sel["chosen"].items())
        sep = ", " if many else "\n"
        labels.append((label if many else label.replace(" (", "\n(")) +
                      (f"{sep}{chosen}" if chosen else ""))
    # One colour per method, so a method's cells (m = 1, 4, ...) read as a group.
    methods = list(dict.fromkeys(dict(sel["group"]).get("optimizer") for sel in selected))
    colors = [f"C{methods.index(dict(sel['group']).get('optimizer')) % 10}" for sel in selected]
    for ax, name in zip(axes, names):
        for i, sel in enumerate(selected):
            if name == "test_acc":
                vals = [100 * r.result.final.get("test_acc") for r in sel["runs"]
                        if r.result.final.get("test_acc") is not None]
            else:
                vals = [(r.result.sharpness or {}).get(name) for r in sel["runs"]]
                vals = [v for v in vals if v is not None]
            if not vals:
                continue
            mean, std = S._mean_std(vals)
            ax.bar(i, mean, yerr=std or 0.0, capsize=4, color=colors[i], alpha=0.55)
            ax.plot([i] * len(vals), vals, "k.", markersize=5)
        ax.set_xticks(range(len(selected)))
        if many:
            ax.set_xticklabels(labels, fontsize=7, rotation=60, ha="right",
                               rotation_mode="anchor")
        else:
            ax.set_xticklabels(labels, fontsize=7)
        title = {"test_acc": "test accuracy (%)", "lambda_max": "Hessian lambda_max",
                 "trace": "Hessian trace"}.get(name, name)
        ax.set_title(title)
        if name == "test_acc":
            lo = min(min(100 * r.result.final.get("test_acc", 1) for r in sel["runs"])
                     for sel in selected)
            hi = max(max(100 * r.result.final.get("test_acc", 0) for r in sel["runs"])
                     for sel in selected)
            pad = max(0.5, 0.25 * (hi - lo))
            ax.set_ylim(lo - pad, hi + pad)
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle("Selected configurations (bars: mean ± std over seeds; dots: seeds)",
                 fontsize=9)
    path = root / "selected.png"
    return save(fig, path)


def _save_accuracy_plot(fig: Any, ax: Any, path: Path, xlabel: str, title: str,
                        legend_size: int) -> Path:
    ax.set_xlabel(xlabel)
    ax.set_ylabel("final test accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size)
    return save(fig, path)


def study_plots(root: Path, cell_stats: list[dict[str, Any]],
                grid_keys: list[str]) -> list[Path]:
    """A study's plots: test accuracy against m, accuracy against time, training curves."""
    from matplotlib.ticker import MaxNLocator

    S = _study_helpers()
    out: list[Path] = []
    # 1. final test accuracy against m: one line per (family, other keys)
    lines: dict[tuple, list[tuple[int, float, float]]] = {}
    flat: dict[tuple, tuple[float, float]] = {}
    for cs in cell_stats:
        d = dict(cs["cell"])
        mean, std = cs["test"]
        if mean is None:
            continue
        method = d["optimizer"]
        others = tuple((k, d[k]) for k in grid_keys if k in d and k not in ("micro_batches",))
        if method == "sgd":
            flat[others] = (mean, std or 0.0)
            continue
        family = "msam" if method in ("sam", "msam") else method
        m = 1 if method == "sam" else int(d.get("micro_batches", cs["runs"][0].config
                                                .micro_batches if cs["runs"] else 1))
        lines.setdefault((family, others), []).append((m, mean, std or 0.0))
    if lines or flat:
        fig, (ax,) = figure(6.4, 4.2)
        for (family, others), pts in sorted(lines.items(), key=lambda kv: str(kv[0])):
            pts.sort()
            label = ("SAM / mSAM" if family == "msam" else S._METHOD_NAMES.get(
                family, family.upper())) + _others_label(others)
            ax.errorbar([p[0] for p in pts], [100 * p[1] for p in pts],
                        yerr=[100 * p[2] for p in pts], marker="o", capsize=3, label=label)
        for others, (mean, std) in sorted(flat.items(), key=lambda kv: str(kv[0])):
            line = ax.axhline(100 * mean, linestyle="--", color="0.35",
                              label="SGD" + _others_label(others))
            if std:
                ax.axhspan(100 * (mean - std), 100 * (mean + std), alpha=0.1,
                           color=line.get_color())
        ms = sorted({p[0] for pts in lines.values() for p in pts})
        if ms:
            ax.set_xscale("log", base=2)
            ax.set_xticks(ms)
            ax.set_xticklabels([str(m) for m in ms])
        out.append(_save_accuracy_plot(fig, ax, root / "test_acc_vs_m.png",
                                       "micro-batches m (m = 1 is SAM)",
                                       "Test accuracy vs number of micro-batches", 8))

    # 2. test accuracy against wall-clock training time: one point per cell (cost vs benefit)
    timed = [cs for cs in cell_stats if cs["test"][0] is not None and cs.get("time", (None,))[0]]
    if len(timed) > 1:
        fig, (ax,) = figure(6.4, 4.4)
        for i, cs in enumerate(timed):
            (tm, tm_sd), (acc, acc_sd) = cs["time"], cs["test"]
            ax.errorbar([tm], [100 * acc], xerr=[tm_sd or 0.0], yerr=[100 * (acc_sd or 0.0)],
                        marker="o", capsize=3, color=f"C{i % 10}",
                        label=S._cell_label(cs["cell"]))
        out.append(_save_accuracy_plot(
            fig, ax, root / "acc_vs_time.png",
            "training wall-clock time per run (s, mean ± std over seeds)",
            "Test accuracy vs training time", 7))

    # 3. training curves per cell (mean over seeds)
    fig, (ax1, ax2) = figure(11, 4.2, ncols=2)
    drawn = False
    for cs in cell_stats:
        hists = [r.result.history for r in cs["runs"] if r.result is not None]
        if not hists:
            continue
        n_ep = min(len(h) for h in hists)
        epochs = list(range(1, n_ep + 1))
        label = S._cell_label(cs["cell"])

        def mean_curve(key: str, hists=hists, n_ep=n_ep) -> list[float]:
            vals = []
            for e in range(n_ep):
                xs = [h[e].get(key) for h in hists if h[e].get(key) is not None]
                vals.append(sum(xs) / len(xs) if xs else math.nan)
            return vals

        acc_key, shown = S.accuracy_curve(hists)
        (line,) = ax1.plot([e for e, _ in shown], [v for _, v in shown], marker=".",
                           label=label)
        ax2.plot(epochs, mean_curve("train_loss"), marker=".", label=label,
                 color=line.get_color())
        ax1.set_ylabel(f"{'validation' if acc_key == 'val_acc' else 'test'} accuracy (%)")
        drawn = True
    if drawn:
        for ax in (ax1, ax2):
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax1.set_xlabel("epoch")
        ax2.set_xlabel("epoch")
        ax2.set_ylabel("training loss")
        ax1.set_title("Accuracy per epoch")
        ax2.set_title("Training loss per epoch")
        for ax in (ax1, ax2):
            ax.grid(alpha=0.3)
        ax2.legend(fontsize=7)
        path = root / "curves.png"
        out.append(save(fig, path))
    return out


def _others_label(others: tuple) -> str:
    if not others:
        return ""
    S = _study_helpers()
    return " (" + ", ".join(f"{S._ABBREV.get(k, k)}={S._fmt_value(v)}" for k, v in others) + ")"


# -- the benchmark ----------------------------------------------------------------------------

def bench_plot(data: dict[str, Any], path: Path) -> Path:
    """Step time and peak memory relative to SGD against m, one column per model."""
    from matplotlib.ticker import FormatStrFormatter, NullFormatter

    from msam.bench.report import _by_key

    models = data["models"]
    n = max(1, len(models))
    fig, axes = figure(max(3.6 * n, 6.0), 7.0, nrows=2, ncols=n, layout=None)
    styles = {"loop": ("C0", "o"), "vmap": ("C1", "s"), "batched": ("C4", "D"),
              "lowrank": ("C3", "v"), "auto": ("C2", "^")}
    for col, model in enumerate(models):
        res = _by_key(model)
        ax_t, ax_m = axes[col], axes[n + col]
        sam = res.get("sam", {})
        for strategy, (color, marker) in styles.items():
            rows = sorted((r for r in model["results"] if r["method"] == "msam"
                           and r["strategy"] == strategy), key=lambda r: r["m"])
            if strategy == "loop" and sam:
                rows = [sam, *rows]
            pts = [(r["m"], r["ratio_sgd"]) for r in rows if r.get("ratio_sgd") is not None]
            if pts:
                ax_t.plot(*zip(*pts), color=color, marker=marker, label=f"mSAM {strategy}")
            mpts = [(r["m"], r["memory_ratio_sgd"]) for r in rows
                    if r.get("memory_ratio_sgd") is not None]
            if mpts:
                ax_m.plot(*zip(*mpts), color=color, marker=marker, label=f"mSAM {strategy}")
        acc = sorted((r for r in model["results"] if r["method"] == "accum"),
                     key=lambda r: r["m"])
        pts = [(r["m"], 2 * r["ratio_sgd"]) for r in acc if r.get("ratio_sgd") is not None]
        if pts and "sgd" in res:
            pts = [(1, 2.0), *pts]
            ax_t.plot(*zip(*pts), color="0.4", linestyle="--", marker=".",
                      label="2 x SGD at micro-batch size")
        ax_t.axhline(1.0, color="k", linewidth=0.8, label="SGD")
        if sam.get("ratio_sgd") is not None:
            ax_t.axhline(sam["ratio_sgd"], color="C3", linewidth=0.8, linestyle=":", label="SAM")
        ax_m.axhline(1.0, color="k", linewidth=0.8, label="SGD")
        if sam.get("memory_ratio_sgd") is not None:
            ax_m.axhline(sam["memory_ratio_sgd"], color="C3", linewidth=0.8, linestyle=":",
                         label="SAM")
        ms = sorted({r["m"] for r in model["results"]})
        for ax in (ax_t, ax_m):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log", base=2)
            ax.set_xticks(ms, [str(m) for m in ms])
            ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
            ax.yaxis.set_minor_formatter(NullFormatter())
            ax.set_xlabel("micro-batches m")
            ax.grid(True, alpha=0.3, which="both")
        ax_t.set_title(f"{model['model']} (batch {model['batch_size']})", fontsize=10)
        if col == 0:
            ax_t.set_ylabel("step time / SGD (median)")
            ax_m.set_ylabel("peak memory / SGD")
    seen: dict[str, Any] = {}
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(lab, h)
    if seen:
        fig.legend(list(seen.values()), list(seen), loc="lower center", ncol=3, fontsize=8,
                   frameon=False)
    meta = data["meta"]
    fig.suptitle(f"msam bench: {meta['device']}, {meta['threads']} thread(s), torch "
                 f"{meta['torch']}", fontsize=10)
    fig.tight_layout(rect=(0, 0.08, 1, 0.96))
    return save(fig, path, dpi=110)
