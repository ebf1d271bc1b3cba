"""FriendlySAM: SAM without the full-gradient component in the perturbation.

FriendlySAM (T. Li, P. Zhou, Z. He, X. Cheng, X. Huang, "Friendly Sharpness-Aware
Minimization", CVPR 2024, arXiv 2403.12350) observes that the full-gradient component of the
mini-batch gradient harms SAM's perturbation and removes an estimate of it, an exponential
moving average ``m`` of past mini-batch gradients (the paper's letters)::

    m_t = lambda * m_{t-1} + (1 - lambda) * g_t                 (g_t = grad L_B(w_t))
    d_t = g_t - sigma * m_t
    e_t = rho * d_t / (||d_t|| + 1e-12),    grad = grad L_B(w_t + e_t)

With micro-batches (mSAM) each micro-batch perturbs with its own ``g_j`` in the current term,
``d_j = g_j - sigma (lambda m_{t-1} + (1 - lambda) g_j)``, and the shared state is updated once
per step with the batch gradient at ``w``, ``g_t = sum_j (n_j / n) g_j`` (then ``m_t`` is the
``n_j / n``-weighted mean of the micro-batches' ``lambda m_{t-1} + (1 - lambda) g_j``; ``m = 1``
is exactly the paper's update). ``m_0 = 0``. The EMA is updated only when a step is committed (a
skipped or failed step leaves it as it was) and not on ``rho = 0`` steps (nothing is perturbed,
so no ascent gradient is taken). Under DDP each rank keeps the EMA of its own local gradients
(its perturbation is local, as in mSAM). With ``accumulate()`` the ``k`` calls are one step:
``g_t`` is the scale-weighted sum of their ``g_j`` and the EMA is updated once, when the step
commits (each call perturbs with ``m_{t-1}``).

Hyperparameters (constructor): ``sigma`` in ``[0, 1]``, the weight of the removed component
(default 1, the paper's setting), and ``lmbda`` (lambda) in ``[0, 1]``, the EMA decay (default
0.9, the default of the authors' code; their CIFAR-100 script uses 0.95). ``rho`` per param
group. State: ``m``, one tensor per perturbed parameter, shared by all micro-batches (saved in
``state_dict`` keyed by the parameter's index among the perturbed parameters). Extra memory:
two parameter-sized buffers (``m`` and this step's batch gradient). Passes per step: 2 per
micro-batch (as SAM). See docs/variants.md.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from msam.core.perturbation import PerturbationRule, SAMRule, check_dense, check_number

__all__ = ["FriendlySAMRule"]


class FriendlySAMRule(PerturbationRule):
    """FriendlySAM: ``e_j = rho d_j / ||d_j||``, ``d_j = g_j - sigma m`` (module docstring)."""

    name = "friendlysam"
    config_keys = {"friendly_sigma": "sigma", "friendly_lambda": "lmbda"}
    title = "FriendlySAM"
    observes = True

    def __init__(self, sigma: float = 1.0, lmbda: float = 0.9) -> None:
        self.sigma = check_number(sigma, "sigma", ge=0.0, le=1.0)
        self.lmbda = check_number(lmbda, "lmbda", ge=0.0, le=1.0)
        self.m: dict[int, torch.Tensor] = {}
        self._batch_grad: dict[int, torch.Tensor] = {}
        self._sam = SAMRule()

    def _ema(self, i: int, g: torch.Tensor) -> torch.Tensor | None:
        m = self.m.get(i)
        if m is not None and (m.device != g.device or m.dtype != g.dtype):
            m = self.m[i] = m.to(device=g.device, dtype=g.dtype)
        return m

    @torch.no_grad()
    def __call__(self, grads, params, groups, *, owned=False):
        check_dense(grads, params)
        keep = 1.0 - self.sigma * (1.0 - self.lmbda)
        idx = [i for i, g in enumerate(grads) if g is not None]
        dirs: list[torch.Tensor | None] = [None] * len(grads)
        # d = keep g - lambda sigma m: new tensors (one fused multiply), then the EMA term
        for i, d in zip(idx, torch._foreach_mul([grads[i] for i in idx], keep)):
            dirs[i] = d
        with_m = [(dirs[i], m) for i in idx if (m := self._ema(i, grads[i])) is not None]
        if with_m:
            torch._foreach_add_([d for d, _ in with_m], [m for _, m in with_m],
                                alpha=-self.lmbda * self.sigma)
        # Each direction is a new, distinct tensor: the SAM step writes e_j into it.
        return self._sam(dirs, params, groups, owned=True, exclusive=True)

    def begin_step(self) -> None:
        self._batch_grad = {}

    @torch.no_grad()
    def observe(self, g, weight: float) -> None:
        for i, gi in enumerate(g):
            if gi is None:
                continue
            acc = self._batch_grad.get(i)
            self._batch_grad[i] = gi * weight if acc is None else acc.add_(gi, alpha=weight)

    @torch.no_grad()
    def end_step(self) -> None:
        for i, gt in self._batch_grad.items():
            m = self._ema(i, gt)
            self.m[i] = gt.mul_(1.0 - self.lmbda) if m is None else \
                m.mul_(self.lmbda).add_(gt, alpha=1.0 - self.lmbda)
        self._batch_grad = {}

    @torch.no_grad()
    def update(self, clean) -> None:
        """``m_t = lambda m_{t-1} + (1 - lambda) g_t`` with the step's clean gradient ``g_t``
        (the engine's weighted sum of the ``g_j``; it may be ``g`` itself, so out of place)."""
        old = [(i, m, gt) for i, gt in enumerate(clean)
               if gt is not None and (m := self._ema(i, gt)) is not None]
        if old:  # m <- lambda m + (1 - lambda) g, fused over the parameters
            ms = [m for _, m, _ in old]
            torch._foreach_mul_(ms, self.lmbda)
            torch._foreach_add_(ms, [gt for _, _, gt in old], alpha=1.0 - self.lmbda)
        for i, gt in enumerate(clean):
            if gt is not None and i not in self.m:
                self.m[i] = gt.mul(1.0 - self.lmbda)

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name, "sigma": self.sigma, "lmbda": self.lmbda,
                "m": {i: t.clone() for i, t in self.m.items()}}

    def check_params(self, params, where: str) -> None:
        """Each saved ``m`` belongs to a perturbed parameter of the same shape."""
        for i, m in sorted(self.m.items()):
            if not 0 <= i < len(params):
                raise ValueError(f"{where}: 'm' has an entry for perturbed parameter {i}, the "
                                 f"optimizer perturbs {len(params)}")
            if m.shape != params[i].shape:
                raise ValueError(f"{where}: 'm' of perturbed parameter {i} has shape "
                                 f"{tuple(m.shape)}, the parameter {tuple(params[i].shape)}")

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        m = state.get("m", {})
        if not isinstance(m, Mapping) or not all(
                isinstance(k, int) and isinstance(v, torch.Tensor) for k, v in m.items()):
            raise ValueError("perturbation rule 'friendlysam': 'm' must map parameter indices "
                             f"to tensors, got {type(m).__name__}")
        self.m = {int(k): v.detach().clone() for k, v in m.items()}
        self._batch_grad = {}
