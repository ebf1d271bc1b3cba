"""Worst-case (m-)sharpness and average-case sharpness of the loss.

* **m-sharpness** (Foret et al. 2021, Sec. 4; Andriushchenko & Flammarion 2022; Behdin et al.
  2023): the training set is cut into micro-batches ``S_j`` of ``m`` examples and

  ``S_m(w, rho) = avg_j  max_{||e||_2 <= rho}  L_j(w + e) - L_j(w)``

  where ``L_j`` is the mean loss on micro-batch ``j``. SAM with batch size ``B`` split over
  ``B/m`` accelerators (or mSAM with micro-batch ``m``) minimises ``L + S_m``; small ``m``
  correlates better with generalisation (Foret et al. 2021; Andriushchenko & Flammarion
  2022). ``m = N`` gives the full-batch worst-case sharpness.

* **average sharpness** ``E_{e ~ U(rho S^{n-1})} [L(w + e) - L(w)]`` -- the expected loss
  increase along random directions of norm ``rho`` (a randomised-smoothing / PAC-Bayes style
  measure, cf. Keskar et al. 2017; Andriushchenko & Flammarion 2022). For a quadratic it
  equals ``rho^2 tr(H) / (2n)``.

The inner maximisation is solved approximately by projected gradient ascent; the estimate is
a lower bound of the true maximum (it is the loss at a feasible point).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from msam.core.perturbation import ASAMRule, SAMRule

from ._common import (
    LossFn,
    as_batch_list,
    batch_size,
    eval_mode,
    gaussian,
    loss_and_grad,
    make_generator,
    mean_loss,
    norm,
    preserved_state,
    set_params,
    split_batch,
    trainable_parameters,
    unflatten,
)

__all__ = [
    "AverageSharpnessResult",
    "MSharpnessResult",
    "average_sharpness",
    "m_sharpness",
]


@dataclass
class MSharpnessResult:
    """Result of :func:`m_sharpness`.

    ``value`` is the example-weighted average of ``per_micro_batch`` (weights
    ``micro_batch_sizes``; equal to the plain average when every micro-batch has ``m``
    examples). ``base_losses`` are the ``L_j(w)``.
    """

    value: float
    per_micro_batch: list[float]
    base_losses: list[float]
    micro_batch_sizes: list[int]
    rho: float
    m: int
    ascent_steps: int
    step_size: float
    adaptive: bool

    @property
    def std_error(self) -> float:
        """Standard error of the plain mean over micro-batches (spread across micro-batches)."""
        arr = np.asarray(self.per_micro_batch, dtype=np.float64)
        return float(arr.std(ddof=1) / math.sqrt(arr.size)) if arr.size > 1 else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {
            "value": float(self.value),
            "std_error": float(self.std_error),
            "num_micro_batches": len(self.per_micro_batch),
            "per_micro_batch": [float(x) for x in self.per_micro_batch],
            "rho": float(self.rho),
            "m": int(self.m),
            "ascent_steps": int(self.ascent_steps),
            "step_size": float(self.step_size),
            "adaptive": bool(self.adaptive),
        }


def _scale(ts: Sequence[Tensor], ss: Sequence[Tensor] | None) -> list[Tensor]:
    return list(ts) if ss is None else [t * s for t, s in zip(ts, ss)]


def _ascent_on_micro_batch(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    params: Sequence[Tensor],
    base: Sequence[Tensor],
    rho: float,
    ascent_steps: int,
    step_size: float,
    scale: Sequence[Tensor] | None,
    eta: float,
    gen: torch.Generator,
) -> tuple[float, float]:
    """Return ``(L_j(w), max found of L_j(w + e))`` for one micro-batch.

    The first point is the optimizer's own perturbation ``e_0`` (the same rule object,
    :mod:`msam.core.perturbation`). The ascent works with ``u`` where ``e = T u`` (``T = 1``
    unless adaptive) and ``||u||_2 <= rho``, so the feasible set is a Euclidean ball and
    projection is a rescaling.
    """
    set_params(params, base)
    loss0, grad = loss_and_grad(model, loss_fn, [batch], params)

    def to_u_grad(g: Sequence[Tensor]) -> list[Tensor]:  # d/du L(w + T u) = T grad
        return _scale(g, scale)

    def evaluate(u: Sequence[Tensor]) -> tuple[float, list[Tensor]]:
        set_params(params, [b + e for b, e in zip(base, _scale(u, scale))])
        val, g = loss_and_grad(model, loss_fn, [batch], params)
        return val, to_u_grad(g)

    gnorm = norm(to_u_grad(grad))
    if gnorm == 0.0 or not math.isfinite(gnorm):  # stationary point: random start direction
        flat = gaussian(sum(p.numel() for p in params), gen, params[0])
        z = unflatten(flat, params)
        grad = z if scale is None else [zi / s for zi, s in zip(z, scale)]  # T g is Gaussian
    rule = ASAMRule() if scale is not None else SAMRule()
    e0, _ = rule(list(grad), list(base), [{"rho": rho, "eta": eta}] * len(params))
    # SAM's first step e_0 = rho g / ||g|| (ASAM: rho T^2 g / ||T g||), as u = T^-1 e_0
    u = list(e0) if scale is None else [e / s for e, s in zip(e0, scale)]
    best, gbest = evaluate(u)
    eta = step_size
    for _ in range(ascent_steps):
        gn = norm(gbest)
        if gn == 0.0 or not math.isfinite(gn):
            break
        cand = [ui + eta * gi / gn for ui, gi in zip(u, gbest)]
        cn = norm(cand)
        if cn > rho:  # projection onto the ball ||u|| <= rho
            cand = [c * (rho / cn) for c in cand]
        val, g = evaluate(cand)
        if val > best:
            u, best, gbest = cand, val, g
        else:  # no improvement: stay at the best point and shorten the step
            eta *= 0.5
    set_params(params, base)
    return loss0, best


def m_sharpness(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Sequence[Any],
    rho: float,
    m: int,
    ascent_steps: int = 5,
    step_size: float | None = None,
    adaptive: bool = False,
    seed: int = 0,
    eta: float = 0.01,
) -> MSharpnessResult:
    """m-sharpness: average over micro-batches of ``m`` examples of the worst-case loss
    increase within an L2 ball of radius ``rho`` (Foret et al. 2021; Andriushchenko &
    Flammarion 2022; Behdin et al. 2023).

    Every batch is split along ``dim 0`` into micro-batches of ``m`` examples (the last one
    of a batch may be smaller; micro-batches never straddle batches). For each micro-batch
    ``j`` the maximisation of ``L_j(w + e)`` over ``||e||_2 <= rho`` is approximated by

    1. the SAM step ``e_0 = rho g / ||g||`` with ``g = grad L_j(w)`` (a random direction if
       ``g = 0``), then
    2. ``ascent_steps`` steps of projected *normalised* gradient ascent
       ``e <- P(e + eta_t grad L_j(w + e) / ||grad L_j(w + e)||)`` with ``eta_0 = step_size``
       (default ``2 rho``, enough to reach any point of the ball from any other); a step that
       does not increase the loss is rejected and halves ``eta_t``, so the best value seen
       is kept. ``P`` rescales onto the ball. For a quadratic and small ``rho`` each step
       shrinks the angular error to the maximiser by a factor of about ``1/3``, so the
       default 5 steps are essentially exact there; for strongly non-convex losses at large
       ``rho`` the estimate remains a (good) lower bound.

    ``ascent_steps=0`` gives the one-step SAM estimate. With ``adaptive=True`` the ball is
    the ASAM one (Kwon et al. 2021), ``||T_w^{-1} e||_2 <= rho`` with ``T_w = |w| + eta``
    elementwise, and the first step is ``e_0 = rho T_w^2 g / ||T_w g||``.

    The result is the example-weighted mean of ``max_e L_j(w+e) - L_j(w)`` (a lower bound of
    the exact m-sharpness, as the ascent finds a feasible point). The model runs in
    ``eval()`` mode; parameters, buffers and training flags are restored exactly (copied back
    from a saved copy). Cost: ``(2 + ascent_steps)`` forward/backward passes per micro-batch.
    """
    if rho < 0:
        raise ValueError("rho must be >= 0")
    if m < 1:
        raise ValueError("m must be >= 1")
    if ascent_steps < 0:
        raise ValueError("ascent_steps must be >= 0")
    step = float(2.0 * rho if step_size is None else step_size)
    batches = as_batch_list(batches)
    params = trainable_parameters(model)
    gen = make_generator(seed)
    per: list[float] = []
    base_losses: list[float] = []
    sizes: list[int] = []
    with eval_mode(model), preserved_state(model) as base:
        scale = [b.abs() + eta for b in base] if adaptive else None
        for batch in batches:
            for micro in split_batch(batch, m):
                n_j = batch_size(micro)
                if n_j == 0:
                    continue
                if rho == 0:
                    loss0 = mean_loss(model, loss_fn, [micro])
                    worst = loss0
                else:
                    loss0, worst = _ascent_on_micro_batch(
                        model, loss_fn, micro, params, base, rho, ascent_steps, step, scale, eta,
                        gen,
                    )
                per.append(worst - loss0)
                base_losses.append(loss0)
                sizes.append(n_j)
    total = sum(sizes)
    value = sum(s * v for s, v in zip(sizes, per)) / total
    return MSharpnessResult(
        value=float(value),
        per_micro_batch=per,
        base_losses=base_losses,
        micro_batch_sizes=sizes,
        rho=float(rho),
        m=int(m),
        ascent_steps=int(ascent_steps),
        step_size=step,
        adaptive=bool(adaptive),
    )


@dataclass
class AverageSharpnessResult:
    """Result of :func:`average_sharpness`: mean, standard error and samples of
    ``L(w + e) - L(w)`` (``samples`` are pair means when ``antithetic``)."""

    value: float
    std_error: float
    samples: list[float]
    base_loss: float
    rho: float
    num_samples: int
    antithetic: bool
    adaptive: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            "value": float(self.value),
            "std_error": float(self.std_error),
            "base_loss": float(self.base_loss),
            "rho": float(self.rho),
            "num_samples": int(self.num_samples),
            "antithetic": bool(self.antithetic),
            "adaptive": bool(self.adaptive),
            "samples": [float(x) for x in self.samples],
        }


def average_sharpness(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Sequence[Any],
    rho: float,
    num_samples: int = 20,
    seed: int = 0,
    antithetic: bool = False,
    adaptive: bool = False,
    eta: float = 0.01,
) -> AverageSharpnessResult:
    """Average-case sharpness ``E_e[L(w + e) - L(w)]``, ``e`` uniform on the sphere
    ``||e||_2 = rho`` (``e = rho z / ||z||``, ``z`` standard Gaussian).

    ``L`` is the example-weighted mean loss over all ``batches``. With ``antithetic=True``
    each direction is paired with its opposite (same expectation, since the distribution is
    symmetric; the first-order term cancels exactly, so the variance is much smaller); each
    sample then costs two evaluations. With ``adaptive=True``, ``e = T_w u`` with ``u``
    uniform on the sphere of radius ``rho`` and ``T_w = |w| + eta`` (ASAM geometry, Kwon et
    al. 2021). For a quadratic with Hessian ``H`` in ``n`` dimensions the expectation is
    ``rho^2 tr(H) / (2 n)``, so this measure is dominated by the bulk of the spectrum rather
    than by ``lambda_max`` (Andriushchenko & Flammarion 2022 compare both).

    Weights are restored exactly from a saved copy; the model runs in ``eval()`` mode.
    """
    if num_samples < 1:
        raise ValueError("num_samples must be >= 1")
    batches = as_batch_list(batches)
    params = trainable_parameters(model)
    n = sum(p.numel() for p in params)
    gen = make_generator(seed)
    samples: list[float] = []
    with eval_mode(model), preserved_state(model) as base:
        base_loss = mean_loss(model, loss_fn, batches)
        scale = [b.abs() + eta for b in base] if adaptive else None
        for _ in range(num_samples):
            z = gaussian(n, gen, params[0])
            u = unflatten(z * (rho / torch.linalg.vector_norm(z)), params)
            e = _scale(u, scale)
            signs = (1.0, -1.0) if antithetic else (1.0,)
            vals = []
            for sgn in signs:
                set_params(params, [b + sgn * d for b, d in zip(base, e)])
                vals.append(mean_loss(model, loss_fn, batches) - base_loss)
            samples.append(float(np.mean(vals)))
    arr = np.asarray(samples, dtype=np.float64)
    se = float(arr.std(ddof=1) / math.sqrt(arr.size)) if arr.size > 1 else float("nan")
    return AverageSharpnessResult(
        value=float(arr.mean()),
        std_error=se,
        samples=samples,
        base_loss=float(base_loss),
        rho=float(rho),
        num_samples=int(num_samples),
        antithetic=bool(antithetic),
        adaptive=bool(adaptive),
    )
