"""How much larger is a micro-batch's gradient than its batch's? The first-order reason behind
the rho x sqrt(m) rule (docs/choosing_rho.md), measured on trained runs.

To first order in rho, SAM's step minimises ``L(w) + rho ||g||`` (Foret et al. 2021) and mSAM's
minimises ``L(w) + rho sum_j (n_j/n) ||g_j||`` (Behdin et al. 2023): each micro-batch ``j``
penalises the norm of *its own* gradient ``g_j``. So at equal rho, mSAM's penalty is SAM's
times

    r_m = sum_j (n_j/n) ||g_j|| / ||g||,     g: the whole batch's gradient.

Without BatchNorm ``g = sum_j (n_j/n) g_j``, so ``r_m >= 1`` (the triangle inequality). Where
the per-example gradients are mostly noise around a small mean, ``||g_j||`` grows like
``1/sqrt(n_j)`` and ``r_m`` approaches ``sqrt(m)``: mSAM at ``rho`` acts like SAM at
``rho sqrt(m)``, which is what the rule says. Where the gradients agree (the mean dominates),
``r_m`` stays near 1 and mSAM at ``rho`` acts like SAM at ``rho``. With BatchNorm, SAM's ``g``
normalises the whole batch together and each ``g_j`` its own micro-batch, so ``g`` is not the
mean of the ``g_j`` and ``r_m`` also carries that difference (it can even fall below 1).

The second figure is exact rather than first order: the correction each method adds to the
gradient at radius rho,

    s_m = ||sum_j (n_j/n) (h_j - g_j)|| / ||h - g||,
    h = grad L(w + rho g/||g||),  h_j = grad L_j(w + rho g_j/||g_j||).

The gradients are taken as the optimizer takes them: the model in training mode, each
micro-batch (and, for ``g``, the whole batch) normalised with its own BatchNorm statistics,
the run's own (possibly noisy) training labels. ``r_m`` is averaged over ``--batches`` random
training batches of ``--batch-size``.

    python scripts/microbatch_grad_ratio.py runs/<study>/runs/<run> [...] [--m 4,16] [--init]

``--init`` also measures the run's model freshly initialised (seed = the run's seed), which
shows the start of training; a run's checkpoint shows its end. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


def _cross_entropy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x).float(), y)


def _grad(model: nn.Module, loss_fn: LossFn, x: torch.Tensor, y: torch.Tensor,
          params: Sequence[torch.Tensor]) -> torch.Tensor:
    grads = torch.autograd.grad(loss_fn(model, x, y), params, allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1)
                      for p, g in zip(params, grads)])


def _check_m(m: int, n: int) -> None:
    if not 1 <= m <= n:
        raise ValueError(f"m={m} must be between 1 and the batch size {n}")


def _unit(g: torch.Tensor) -> torch.Tensor:
    return g / (g.norm() + 1e-12)  # a zero gradient gives a zero perturbation, as in msam


def grad_ratio(model: nn.Module, x: torch.Tensor, y: torch.Tensor, m: int,
               loss_fn: LossFn = _cross_entropy) -> float:
    """``r_m = sum_j (n_j/n) ||g_j|| / ||g||`` on one batch, ``m`` contiguous micro-batches
    (sizes differ by at most one, as ``msam`` splits). ``g`` is the whole batch's gradient with
    the model as it is (training mode: BatchNorm uses each forward's own statistics). The model
    is not changed (a copy absorbs BatchNorm's running-statistic updates)."""
    n = len(x)
    _check_m(m, n)
    model = copy.deepcopy(model)
    params = [p for p in model.parameters() if p.requires_grad]
    g = _grad(model, loss_fn, x, y, params)
    total = 0.0
    for xj, yj in zip(torch.tensor_split(x, m), torch.tensor_split(y, m)):
        total += len(xj) / n * float(_grad(model, loss_fn, xj, yj, params).norm())
    return total / max(float(g.norm()), 1e-12)


def correction_ratio(model: nn.Module, x: torch.Tensor, y: torch.Tensor, m: int, rho: float,
                     loss_fn: LossFn = _cross_entropy) -> float:
    """``s_m = ||sum_j (n_j/n) (h_j - g_j)|| / ||h - g||`` on one batch at radius ``rho``: the
    size of the correction mSAM adds to the gradient, over SAM's (``h = grad L(w + e)``,
    ``e = rho g/||g||``; ``h_j = grad L_j(w + e_j)``, ``e_j = rho g_j/||g_j||``; m = 1 gives
    1). Exact, not first order. The model is not changed."""
    n = len(x)
    _check_m(m, n)
    model = copy.deepcopy(model)
    params = [p for p in model.parameters() if p.requires_grad]
    saved = [p.detach().clone() for p in params]

    def perturbed(xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        g = _grad(model, loss_fn, xb, yb, params)
        _add(params, rho * _unit(g))
        h = _grad(model, loss_fn, xb, yb, params)
        with torch.no_grad():  # back to w exactly (adding and subtracting e would drift)
            for p, w in zip(params, saved):
                p.copy_(w)
        return h - g

    sam = perturbed(x, y)
    msam = torch.zeros_like(sam)
    for xj, yj in zip(torch.tensor_split(x, m), torch.tensor_split(y, m)):
        msam += len(xj) / n * perturbed(xj, yj)
    return float(msam.norm()) / max(float(sam.norm()), 1e-12)


def _add(params: Sequence[torch.Tensor], flat: torch.Tensor) -> None:
    offset = 0
    for p in params:
        with torch.no_grad():
            p.add_(flat[offset:offset + p.numel()].view_as(p))
        offset += p.numel()


def _measure(model: nn.Module, data, ms: Sequence[int], batches: int, batch_size: int,
             seed: int, rho: float) -> dict[str, list[float]]:
    from msam.data import iterate_batches

    model.train()
    out: dict[str, list[float]] = {f"{k}_{m}": [] for k in "rs" for m in ms}
    used = 0
    for x, y in iterate_batches(data.train, batch_size, shuffle=True, seed=seed, epoch=0):
        if used == batches:
            break
        if len(x) < batch_size:  # only full batches, as in training
            continue
        used += 1
        xb, yb = data.batch("train", x, y)
        for m in ms:
            out[f"r_{m}"].append(grad_ratio(model, xb, yb, m))
            out[f"s_{m}"].append(correction_ratio(model, xb, yb, m, rho))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    from msam.training.measure import load_trained_model
    from msam.training.trainer import _build_model

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="run folders (final.pt or last.pt inside)")
    p.add_argument("--m", default="4,16", help="micro-batch counts, comma-separated")
    p.add_argument("--batches", type=int, default=8, help="training batches to average over")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0, help="which training batches")
    p.add_argument("--rho", type=float, default=0.05, help="radius of s_m (default 0.05)")
    p.add_argument("--init", action="store_true", help="also the freshly initialised model")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    ms = [int(v) for v in args.m.split(",")]
    heads = [f"{k}_{m}" for k in "rs" for m in ms]
    print(f"sqrt(m): {', '.join(f'{math.sqrt(m):.0f}' for m in ms)}; s_m at rho {args.rho}\n")
    print("| run | model | " + " | ".join(heads) + " |")
    print("|---|---|" + "---:|" * len(heads))
    for run in args.runs:
        model, data, cfg = load_trained_model(run)
        models = [("trained", model)]
        if args.init:
            torch.manual_seed(cfg.seed)
            models.insert(0, ("initialised", _build_model(cfg, data)))
        for what, mod in models:
            res = _measure(mod, data, ms, args.batches, args.batch_size, args.seed, args.rho)
            if not all(res.values()):
                raise SystemExit(f"{run}: no full training batch of {args.batch_size}")
            cells = [f"{statistics.mean(v):.2f}" + (f" ± {statistics.stdev(v):.2f}"
                                                     if len(v) > 1 else "")
                     for v in res.values()]
            print(f"| {Path(run).name} | {what} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
