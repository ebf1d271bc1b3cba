"""Curvature of the training loss: Hessian-vector products, top eigenvalues, trace, density.

All quantities refer to the Hessian ``H = d^2 L / dw^2`` of the example-weighted mean loss
``L(w) = sum_b n_b L_b(w) / sum_b n_b`` over the given batches, with respect to the
parameters that require gradients (see :mod:`msam.analysis._common` for the conventions).
The model is evaluated in ``eval()`` mode so that ``L`` is a fixed function of ``w`` (see
:func:`hvp`). Only Hessian-vector products are used; ``H`` is never formed.

References
----------
* Pearlmutter, B. A. (1994). Fast exact multiplication by the Hessian. *Neural Computation*.
* Lanczos, C. (1950); Parlett, B. N. (1998). *The Symmetric Eigenvalue Problem*, SIAM.
* Hutchinson, M. F. (1989). A stochastic estimator of the trace of the influence matrix for
  Laplacian smoothing splines. *Comm. Statist. Simulation Comput.*
* Lin, L., Saad, Y., Yang, C. (2016). Approximating spectral densities of large matrices.
  *SIAM Review*.
* Ghorbani, B., Krishnan, S., Xiao, Y. (2019). An investigation into neural net optimization
  via Hessian eigenvalue density. *ICML*.
* Keskar, N. S. et al. (2017). On large-batch training for deep learning: generalization gap
  and sharp minima. *ICLR* (sharpness and the top of the Hessian spectrum).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from ._common import (
    LossFn,
    as_batch_list,
    as_param_list,
    batch_weights,
    check_scalar,
    eval_mode,
    flatten,
    gaussian,
    make_generator,
    rademacher,
    trainable_parameters,
    unflatten,
)

__all__ = [
    "EigenResult",
    "SpectralDensity",
    "TraceResult",
    "hessian_trace",
    "hvp",
    "spectral_density",
    "top_hessian_eigenvalues",
]


# --------------------------------------------------------------------------------------------
# Hessian-vector products
# --------------------------------------------------------------------------------------------
def _hvp_many(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Sequence[Any],
    weights: Sequence[float],
    params: Sequence[Tensor],
    vectors: Sequence[Sequence[Tensor]],
) -> list[list[Tensor]]:
    """``H v`` for several ``v`` with one forward/backward per batch (graph kept per batch)."""
    out = [[torch.zeros_like(p) for p in params] for _ in vectors]
    # The fused attention kernels (flash / memory-efficient) have no double backward; the math
    # kernel computes the same attention from differentiable ops.
    with torch.enable_grad(), sdpa_kernel([SDPBackend.MATH]):
        for batch, w in zip(batches, weights):
            loss = check_scalar(loss_fn(model, batch))
            grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
            used = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
            if not used:  # loss at most linear in the parameters: zero Hessian
                continue
            used_params = [params[i] for i in used]
            for j, vec in enumerate(vectors):
                gv = sum((grads[i] * vec[i]).sum() for i in used)
                hv = torch.autograd.grad(
                    gv, used_params, retain_graph=j < len(vectors) - 1, allow_unused=True
                )
                for i, h in zip(used, hv):
                    if h is not None:
                        out[j][i].add_(h.detach(), alpha=w)
            del grads, loss
    return out


def hvp(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Sequence[Any],
    vector: Tensor | Sequence[Tensor],
) -> list[Tensor]:
    """Hessian-vector product ``H v`` of the example-weighted mean loss over ``batches``.

    Computed by double backpropagation (Pearlmutter 1994): for each batch the gradient is
    built with ``create_graph=True`` and ``d/dw <grad L_b(w), v>`` is taken; the results are
    accumulated with weights ``n_b / N``, so only one batch's graph is alive at a time.

    The model is switched to ``eval()`` mode for the measurement and every submodule's
    training flag is restored afterwards. Reason: the curvature is only meaningful for a loss
    that is a fixed function of the weights. In training mode, dropout masks change between
    calls and BatchNorm normalises with the current batch's statistics and updates its
    running buffers, so repeated products would not come from the same matrix (breaking the
    Lanczos recurrence) and the model's buffers would be modified.

    Parameters
    ----------
    vector:
        Either a list of tensors shaped like the trainable parameters, or one 1-D tensor of
        length equal to their total number of entries.

    Returns
    -------
    list of tensors shaped like the trainable parameters. ``.grad`` fields are not touched.
    """
    params = trainable_parameters(model)
    batches = as_batch_list(batches)
    weights, _ = batch_weights(batches)
    vec = [v.detach() for v in as_param_list(vector, params)]
    with eval_mode(model):
        return _hvp_many(model, loss_fn, batches, weights, params, [vec])[0]


class _HessianOperator:
    """Flat-vector view of ``v -> H v`` (must be used inside :func:`eval_mode`)."""

    def __init__(self, model: nn.Module, loss_fn: LossFn, batches: Sequence[Any]):
        self.model = model
        self.loss_fn = loss_fn
        self.params = trainable_parameters(model)
        self.batches = as_batch_list(batches)
        self.weights, self.num_examples = batch_weights(self.batches)
        self.n = sum(p.numel() for p in self.params)
        self.like = self.params[0].detach()
        self.num_hvps = 0

    def matmat(self, vectors: Sequence[Tensor]) -> list[Tensor]:
        lists = [unflatten(v, self.params) for v in vectors]
        res = _hvp_many(self.model, self.loss_fn, self.batches, self.weights, self.params, lists)
        self.num_hvps += len(vectors)
        return [flatten(r) for r in res]

    def matvec(self, v: Tensor) -> Tensor:
        return self.matmat([v])[0]


# --------------------------------------------------------------------------------------------
# Lanczos with full reorthogonalisation
# --------------------------------------------------------------------------------------------
class _Basis:
    """Growing row-matrix of orthonormal Lanczos vectors (capacity doubles when full)."""

    def __init__(self, like: Tensor, n: int, capacity: int):
        self.q = torch.empty((max(1, capacity), n), dtype=like.dtype, device=like.device)
        self.size = 0

    def append(self, v: Tensor) -> None:
        if self.size == self.q.shape[0]:
            grown = torch.empty(
                (2 * self.q.shape[0], self.q.shape[1]), dtype=self.q.dtype, device=self.q.device
            )
            grown[: self.size] = self.q
            self.q = grown
        self.q[self.size] = v
        self.size += 1

    @property
    def rows(self) -> Tensor:
        return self.q[: self.size]

    def orthogonalize(self, w: Tensor) -> Tensor:
        """Classical Gram-Schmidt against all stored vectors, applied twice ("twice is
        enough", Parlett 1998) -- this is the full reorthogonalisation."""
        if self.size == 0:
            return w
        q = self.rows
        for _ in range(2):
            w = w - q.T @ (q @ w)
        return w


def _tridiag(alphas: Sequence[float], betas: Sequence[float]) -> np.ndarray:
    k = len(alphas)
    t = np.diag(np.asarray(alphas, dtype=np.float64))
    if k > 1:
        off = np.asarray(betas[: k - 1], dtype=np.float64)
        t += np.diag(off, 1) + np.diag(off, -1)
    return t


@dataclass
class _LanczosOutput:
    alphas: list[float]
    betas: list[float]  # betas[j] couples q_j and q_{j+1}; 0 after a restart
    basis: _Basis
    steps: int
    last_beta: float
    exhausted: bool  # the whole space was spanned: Ritz values are exact eigenvalues
    stopped_by_check: bool


def _lanczos(
    matvec: Callable[[Tensor], Tensor],
    start: Tensor,
    n: int,
    max_steps: int,
    new_start: Callable[[], Tensor],
    restart_on_breakdown: bool,
    check: Callable[[list[float], list[float], float], bool] | None = None,
) -> _LanczosOutput:
    """Symmetric Lanczos with full reorthogonalisation.

    After step ``j`` the tridiagonal ``T_j`` (``alphas``/``betas``) satisfies
    ``H Q_j = Q_j T_j + beta_j q_{j+1} e_j^T``. ``check(alphas, betas, beta_j)`` is called
    after every step and stops the iteration when it returns True. If ``beta_j`` vanishes the
    Krylov space is invariant; with ``restart_on_breakdown`` a fresh random vector orthogonal
    to the basis continues the iteration (so repeated eigenvalues are found), otherwise the
    run stops (the quadrature is exact).
    """
    max_steps = min(max_steps, n)
    basis = _Basis(start, n, min(max_steps, 32))
    q = start / torch.linalg.vector_norm(start)
    basis.append(q)
    alphas: list[float] = []
    betas: list[float] = []
    eps = torch.finfo(start.dtype).eps
    scale = 0.0
    beta = 0.0
    steps = 0
    exhausted = False
    stopped = False
    for j in range(max_steps):
        w = matvec(q)
        steps += 1
        alpha = float(torch.dot(w, q))
        alphas.append(alpha)
        w = basis.orthogonalize(w)
        beta = float(torch.linalg.vector_norm(w))
        scale = max(scale, abs(alpha), beta)
        breakdown = beta <= eps ** (2.0 / 3.0) * max(scale, eps)
        if basis.size >= n:
            exhausted = True
            beta = 0.0
            break
        if breakdown and not restart_on_breakdown:
            exhausted = True  # invariant subspace: the quadrature/Ritz values are exact
            beta = 0.0
            break
        if not breakdown and check is not None and check(alphas, betas, beta):
            stopped = True
            break
        if j == max_steps - 1:
            break
        if breakdown:
            r = new_start()
            r = basis.orthogonalize(r)
            rn = float(torch.linalg.vector_norm(r))
            if rn <= eps * math.sqrt(n):
                exhausted = True
                beta = 0.0
                break
            betas.append(0.0)
            q = r / rn
        else:
            betas.append(beta)
            q = w / beta
        basis.append(q)
    return _LanczosOutput(alphas, betas, basis, steps, beta, exhausted, stopped)


# --------------------------------------------------------------------------------------------
# top eigenvalues
# --------------------------------------------------------------------------------------------
@dataclass
class EigenResult:
    """Top Hessian eigenvalues.

    Attributes
    ----------
    eigenvalues:
        The ``k`` largest (algebraic) eigenvalue estimates, in descending order.
    eigenvectors:
        Matching unit eigenvectors as lists of parameter-shaped tensors (``None`` unless
        requested).
    iterations:
        Hessian-vector products used (Lanczos steps; total power iterations over all
        eigenpairs for ``method="power"``).
    converged:
        Whether every requested eigenpair met the tolerance within ``max_iter``.
    residual_norms:
        ``||H v - lambda v||`` for each pair. For Lanczos this is the Ritz estimate
        ``beta_j |s_{j,i}|`` (exact in exact arithmetic, and reliable with full
        reorthogonalisation); for power iteration it is measured.
    """

    eigenvalues: list[float]
    eigenvectors: list[list[Tensor]] | None
    iterations: int
    converged: bool
    residual_norms: list[float]
    tol: float
    max_iter: int
    method: str
    num_parameters: int = 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable summary (eigenvectors omitted)."""
        return {
            "eigenvalues": [float(x) for x in self.eigenvalues],
            "iterations": int(self.iterations),
            "converged": bool(self.converged),
            "residual_norms": [float(x) for x in self.residual_norms],
            "tol": float(self.tol),
            "max_iter": int(self.max_iter),
            "method": self.method,
            "num_parameters": int(self.num_parameters),
        }


def _converged_mask(thetas: np.ndarray, resid: np.ndarray, tol: float, eps: float) -> np.ndarray:
    """ARPACK-style test: ``||r_i|| <= tol * max(|theta_i|, eps^(2/3) * max|theta|)``."""
    scale = float(np.max(np.abs(thetas))) if thetas.size else 0.0
    floor = eps ** (2.0 / 3.0) * max(scale, eps)
    return resid <= tol * np.maximum(np.abs(thetas), floor)


def top_hessian_eigenvalues(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Sequence[Any],
    k: int = 1,
    method: str = "lanczos",
    max_iter: int = 100,
    tol: float = 1e-4,
    seed: int = 0,
    return_eigenvectors: bool = False,
) -> EigenResult:
    """The ``k`` largest eigenvalues of the loss Hessian (``lambda_max`` for ``k=1``).

    ``lambda_max`` is the classical sharpness measure of Keskar et al. (2017) and the
    quantity whose reduction motivates SAM (Foret et al. 2021).

    ``method="lanczos"`` (default): Lanczos iteration with full reorthogonalisation from a
    seeded Gaussian start vector. After every step the Ritz values of the tridiagonal matrix
    are computed and the iteration stops once the ``k`` largest satisfy the residual test
    ``beta_j |s_{j,i}| <= tol * |theta_i|`` (relative to ``eps^(2/3) * max|theta|`` for
    near-zero values). ``max_iter`` bounds the number of Hessian-vector products. If the
    Krylov space becomes invariant, Lanczos restarts with a fresh random vector orthogonal to
    the basis so that repeated eigenvalues are not missed.

    ``method="power"``: power iteration, one eigenpair after the other, with deflation by
    projection onto the orthogonal complement of the eigenvectors already found
    (equivalent to Hotelling deflation in exact arithmetic). ``max_iter`` is the budget *per
    eigenpair* (twice that if the shift below is needed); convergence is declared when the
    Rayleigh quotient changes by less than ``tol`` relative. Plain power iteration finds the
    eigenvalue of largest *magnitude*; if that is negative, the iteration is repeated on the
    shifted operator ``H + |theta| I`` so that the largest *algebraic* eigenvalue is returned,
    as with Lanczos. Power iteration converges like ``(lambda_2/lambda_1)^t``; Lanczos is
    usually far cheaper for the same accuracy.

    Memory: Lanczos keeps every basis vector for the reorthogonalisation, i.e. up to
    ``max_iter`` copies of the parameter vector; power iteration keeps ``k``.

    The model is evaluated in ``eval()`` mode (see :func:`hvp`); its parameters, buffers and
    training flags are unchanged afterwards.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if method not in ("lanczos", "power"):
        raise ValueError(f"method must be 'lanczos' or 'power', got {method!r}")
    with eval_mode(model):
        op = _HessianOperator(model, loss_fn, batches)
        if k > op.n:
            raise ValueError(f"k={k} exceeds the number of parameters ({op.n})")
        gen = make_generator(seed)
        if method == "lanczos":
            res = _top_lanczos(op, k, max_iter, tol, gen, return_eigenvectors)
        else:
            res = _top_power(op, k, max_iter, tol, gen, return_eigenvectors)
    res.num_parameters = op.n
    return res


def _top_lanczos(
    op: _HessianOperator,
    k: int,
    max_iter: int,
    tol: float,
    gen: torch.Generator,
    return_vectors: bool,
) -> EigenResult:
    if max_iter < k:
        raise ValueError(f"max_iter={max_iter} must be >= k={k} for Lanczos")
    eps = float(torch.finfo(op.like.dtype).eps)

    def check(alphas: list[float], betas: list[float], beta: float) -> bool:
        if len(alphas) < k:
            return False
        thetas, s = np.linalg.eigh(_tridiag(alphas, betas))
        top = np.argsort(thetas)[::-1][:k]
        resid = beta * np.abs(s[-1, top])
        return bool(np.all(_converged_mask(thetas[top], resid, tol, eps)))

    start = gaussian(op.n, gen, op.like)
    out = _lanczos(
        op.matvec,
        start,
        op.n,
        max_iter,
        new_start=lambda: gaussian(op.n, gen, op.like),
        restart_on_breakdown=True,
        check=check,
    )
    thetas, s = np.linalg.eigh(_tridiag(out.alphas, out.betas))
    top = np.argsort(thetas)[::-1][:k]
    resid = out.last_beta * np.abs(s[-1, top])
    if out.exhausted:
        resid = np.zeros_like(resid)
    converged = out.exhausted or bool(np.all(_converged_mask(thetas[top], resid, tol, eps)))
    converged = converged and len(top) == k
    vectors = None
    if return_vectors:
        q = out.basis.rows[: len(out.alphas)]
        vectors = []
        for i in top:
            coeff = torch.as_tensor(s[:, i], dtype=q.dtype, device=q.device)
            y = q.T @ coeff
            y = y / torch.linalg.vector_norm(y)
            vectors.append([t.clone() for t in unflatten(y, op.params)])
    return EigenResult(
        eigenvalues=[float(thetas[i]) for i in top],
        eigenvectors=vectors,
        iterations=out.steps,
        converged=converged,
        residual_norms=[float(r) for r in resid],
        tol=tol,
        max_iter=max_iter,
        method="lanczos",
    )


def _top_power(
    op: _HessianOperator,
    k: int,
    max_iter: int,
    tol: float,
    gen: torch.Generator,
    return_vectors: bool,
) -> EigenResult:
    found: list[Tensor] = []
    values: list[float] = []
    resids: list[float] = []
    all_converged = True
    total = 0

    def project(v: Tensor) -> Tensor:
        for _ in range(2):  # twice for numerical orthogonality
            for u in found:
                v = v - torch.dot(u, v) * u
        return v

    for _ in range(k):
        shift = 0.0
        attempt = 0
        while True:
            attempt += 1
            v = project(gaussian(op.n, gen, op.like))
            v = v / torch.linalg.vector_norm(v)
            theta_prev = None
            converged = False
            theta, resid = 0.0, float("inf")
            for _it in range(max_iter):
                hv = project(op.matvec(v))
                total += 1
                theta = float(torch.dot(v, hv))
                resid = float(torch.linalg.vector_norm(hv - theta * v))
                if theta_prev is not None and abs(theta - theta_prev) <= tol * max(
                    abs(theta), 1e-30
                ):
                    converged = True
                    break
                theta_prev = theta
                w = hv + shift * v
                wn = torch.linalg.vector_norm(w)
                if float(wn) == 0.0:  # v is in the null space of the (shifted) operator
                    converged = True
                    break
                v = w / wn
            if theta < 0 and shift == 0.0 and attempt == 1:
                # dominant eigenvalue of the remaining spectrum is negative: shift so that the
                # largest algebraic eigenvalue becomes dominant, and start over
                shift = -theta
                continue
            break
        all_converged = all_converged and converged
        found.append(v)
        values.append(theta)
        resids.append(resid)
    order = sorted(range(k), key=lambda i: -values[i])
    vectors = None
    if return_vectors:
        vectors = [[t.clone() for t in unflatten(found[i], op.params)] for i in order]
    return EigenResult(
        eigenvalues=[values[i] for i in order],
        eigenvectors=vectors,
        iterations=total,
        converged=all_converged,
        residual_norms=[resids[i] for i in order],
        tol=tol,
        max_iter=max_iter,
        method="power",
    )


# --------------------------------------------------------------------------------------------
# trace (Hutchinson)
# --------------------------------------------------------------------------------------------
@dataclass
class TraceResult:
    """Hutchinson estimate of ``tr(H)``: ``mean`` of ``samples`` and its standard error."""

    mean: float
    std_error: float
    samples: list[float]
    num_probes: int
    num_parameters: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "mean": float(self.mean),
            "std_error": float(self.std_error),
            "num_probes": int(self.num_probes),
            "num_parameters": int(self.num_parameters),
            "samples": [float(x) for x in self.samples],
        }


def hessian_trace(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Sequence[Any],
    num_probes: int = 100,
    seed: int = 0,
    probes_per_pass: int = 8,
) -> TraceResult:
    """Hutchinson (1989) estimate of the Hessian trace with Rademacher probes.

    ``tr(H) = E[z^T H z]`` for ``z`` with i.i.d. +-1 entries; the estimate is the sample mean
    over ``num_probes`` probes and ``std_error = std(samples, ddof=1) / sqrt(num_probes)``.
    Its variance is ``2 * sum_{i != j} H_ij^2`` per probe, so it is exact for diagonal ``H``.

    ``probes_per_pass`` probes share each batch's forward/backward graph (one double backward
    per probe), trading memory for speed; results do not depend on it.
    """
    if num_probes < 1:
        raise ValueError("num_probes must be >= 1")
    with eval_mode(model):
        op = _HessianOperator(model, loss_fn, batches)
        gen = make_generator(seed)
        samples: list[float] = []
        while len(samples) < num_probes:
            chunk = min(max(1, probes_per_pass), num_probes - len(samples))
            zs = [rademacher(op.n, gen, op.like) for _ in range(chunk)]
            hzs = op.matmat(zs)
            samples += [float(torch.dot(z.double(), hz.double())) for z, hz in zip(zs, hzs)]
    arr = np.asarray(samples, dtype=np.float64)
    se = float(arr.std(ddof=1) / math.sqrt(arr.size)) if arr.size > 1 else float("nan")
    return TraceResult(float(arr.mean()), se, samples, num_probes, op.n)


# --------------------------------------------------------------------------------------------
# spectral density (stochastic Lanczos quadrature)
# --------------------------------------------------------------------------------------------
@dataclass
class SpectralDensity:
    """Smoothed eigenvalue density of ``H`` from stochastic Lanczos quadrature.

    ``density[i]`` approximates ``(1/n) sum_l N(grid[i]; lambda_l, sigma^2)``, i.e. the
    Gaussian-broadened normalised spectral measure (integrates to ~1). ``nodes[r]`` and
    ``weights[r]`` are the Gauss quadrature nodes (Ritz values) and weights of run ``r``.
    """

    grid: list[float]
    density: list[float]
    nodes: list[list[float]]
    weights: list[list[float]]
    sigma: float
    num_runs: int
    num_steps: int
    num_parameters: int

    def trace_estimate(self) -> float:
        """``n * mean_r sum_i w_ri theta_ri`` -- an (unbiased) estimate of ``tr(H)``."""
        vals = [sum(w * t for w, t in zip(ws, ts)) for ws, ts in zip(self.weights, self.nodes)]
        return self.num_parameters * float(np.mean(vals))

    def to_dict(self) -> dict[str, Any]:
        return {
            "grid": [float(x) for x in self.grid],
            "density": [float(x) for x in self.density],
            "nodes": [[float(x) for x in r] for r in self.nodes],
            "weights": [[float(x) for x in r] for r in self.weights],
            "sigma": float(self.sigma),
            "num_runs": int(self.num_runs),
            "num_steps": int(self.num_steps),
            "num_parameters": int(self.num_parameters),
        }


def gaussian_broadening(
    nodes: Sequence[Sequence[float]],
    weights: Sequence[Sequence[float]],
    grid: np.ndarray,
    sigma: float,
) -> np.ndarray:
    """Average over runs of ``sum_i w_i N(t; theta_i, sigma^2)`` evaluated on ``grid``."""
    dens = np.zeros_like(grid, dtype=np.float64)
    for ts, ws in zip(nodes, weights):
        t = np.asarray(ts, dtype=np.float64)[None, :]
        w = np.asarray(ws, dtype=np.float64)[None, :]
        z = (grid[:, None] - t) / sigma
        dens += (w * np.exp(-0.5 * z**2)).sum(axis=1) / (sigma * math.sqrt(2 * math.pi))
    return dens / max(1, len(nodes))


def spectral_density(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Sequence[Any],
    num_runs: int = 10,
    num_steps: int = 50,
    num_points: int = 1000,
    sigma: float | None = None,
    seed: int = 0,
) -> SpectralDensity:
    """Hessian eigenvalue density by stochastic Lanczos quadrature (SLQ).

    Lin, Saad & Yang (2016); applied to neural networks by Ghorbani et al. (2019). For a
    random unit vector ``v`` (normalised Rademacher), ``num_steps`` Lanczos steps give
    ``T = S diag(theta) S^T`` and ``v^T f(H) v ~= sum_i w_i f(theta_i)`` with
    ``w_i = S[0, i]^2`` (Gauss quadrature). Since ``E[v v^T] = I/n``, averaging over
    ``num_runs`` vectors approximates the spectral measure ``(1/n) sum_l delta(t - lambda_l)``,
    which is broadened by a Gaussian of width ``sigma`` and evaluated on ``num_points``
    equispaced points covering the Ritz values +- 5 sigma.

    ``sigma`` defaults to 1% of the spread of the Ritz values (Ghorbani et al. use a much
    narrower kernel on a spectrum rescaled to [-1, 1]; pass ``sigma`` to control it). Each
    run costs ``num_steps`` Hessian-vector products and stores ``num_steps`` vectors.
    """
    if num_runs < 1 or num_steps < 1:
        raise ValueError("num_runs and num_steps must be >= 1")
    all_nodes: list[list[float]] = []
    all_weights: list[list[float]] = []
    with eval_mode(model):
        op = _HessianOperator(model, loss_fn, batches)
        gen = make_generator(seed)
        for _ in range(num_runs):
            start = rademacher(op.n, gen, op.like)
            out = _lanczos(
                op.matvec,
                start,
                op.n,
                num_steps,
                new_start=lambda: gaussian(op.n, gen, op.like),
                restart_on_breakdown=False,
            )
            thetas, s = np.linalg.eigh(_tridiag(out.alphas, out.betas))
            all_nodes.append([float(x) for x in thetas])
            all_weights.append([float(x) for x in s[0, :] ** 2])
    lo = min(min(r) for r in all_nodes)
    hi = max(max(r) for r in all_nodes)
    if sigma is None:
        spread = hi - lo
        sigma = 0.01 * spread if spread > 0 else max(abs(hi), 1.0) * 1e-2
    if sigma <= 0:
        raise ValueError("sigma must be positive")
    grid = np.linspace(lo - 5 * sigma, hi + 5 * sigma, max(2, num_points))
    dens = gaussian_broadening(all_nodes, all_weights, grid, sigma)
    return SpectralDensity(
        grid=grid.tolist(),
        density=dens.tolist(),
        nodes=all_nodes,
        weights=all_weights,
        sigma=float(sigma),
        num_runs=num_runs,
        num_steps=num_steps,
        num_parameters=op.n,
    )
