"""GSAM: surrogate-gap guided SAM.

GSAM (Zhuang et al., "Surrogate Gap Minimization Improves Sharpness-Aware Training", ICLR 2022;
"Surrogate Gap Guided Sharpness-Aware Minimization") descends on
the perturbed loss and, at the same time, decreases the surrogate gap ``L(w + e) - L(w)`` with
the component of ``g = grad L(w)`` orthogonal to ``h = grad L(w + e)`` (so the perturbed loss is
not increased to first order)::

    e     = rho_t * g / (||g|| + 1e-12)                          (SAM's ascent)
    h     = grad L(w + e)
    g_par = (g . h / ||h||^2) h,     g_perp = g - g_par          (0 when ||h|| = 0)
    grad  = h - alpha * g_perp

With micro-batches (mSAM) the decomposition is made per micro-batch with its own ``g_j`` and
``h_j`` and the results are averaged with ``n_j / n``: ``grad = sum_j (n_j/n) (h_j - alpha
g_perp_j)``. The inner products run over the perturbed parameters (a parameter outside
``perturb=`` receives ``h_j``).

rho scheduled with the learning rate (the paper's schedule): when a param group holds
``rho_max``, ``rho_min``, ``lr_max`` and ``lr_min``, its radius at each step is::

    rho_t = rho_min + (rho_max - rho_min) * (lr_t - lr_min) / (lr_max - lr_min)

clipped to ``[rho_min, rho_max]`` (a warm-up below ``lr_min`` keeps ``rho_min``); ``lr_t`` is the
group's current ``lr`` (whatever scheduler sets it). Without these keys ``rho`` is used as is.

Hyperparameters: ``alpha`` (constructor, default 0.05 -- this library's default; the paper tunes
it per model), ``rho`` or the four schedule keys per param group. State: none (the schedule
reads the param group). Extra memory: ``g_j`` is kept through the perturbed pass and ``h_j`` is
handed back on its own (two gradient-sized buffers per micro-batch in flight; docs/variants.md).
Passes per step: 2 per micro-batch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from msam.core.perturbation import SAMRule, check_number, global_norm

__all__ = ["GSAMRule", "scheduled_rho"]

SCHEDULE_KEYS = ("rho_max", "rho_min", "lr_max", "lr_min")


def scheduled_rho(group: Mapping[str, Any]) -> float:
    """The group's radius this step: the lr-linked schedule if it has the keys, else ``rho``."""
    if "rho_max" not in group:
        return float(group["rho"])
    frac = (float(group["lr"]) - group["lr_min"]) / (group["lr_max"] - group["lr_min"])
    frac = min(1.0, max(0.0, frac))
    return group["rho_min"] + (group["rho_max"] - group["rho_min"]) * frac


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``sum(a * b)`` as a 0-d float64 tensor (one BLAS dot; half precision via float32)."""
    if a.dtype in (torch.float16, torch.bfloat16):
        a, b = a.float(), b.float()
    return torch.dot(a.reshape(-1), b.to(a.dtype).reshape(-1)).double()


class GSAMRule(SAMRule):
    """GSAM: ``h_j - alpha * g_perp_j`` per micro-batch (see the module docstring)."""

    name = "gsam"
    config_keys = {"gsam_alpha": "alpha", "gsam_rho_min": None}
    title = "GSAM"
    combines = True

    def __init__(self, alpha: float = 0.05) -> None:
        self.alpha = check_number(alpha, "alpha", ge=0.0)

    def validate_group(self, group: Mapping[str, Any], where: str) -> None:
        present = [k for k in SCHEDULE_KEYS if k in group]
        if not present:
            return
        if len(present) != len(SCHEDULE_KEYS):
            missing = [k for k in SCHEDULE_KEYS if k not in group]
            raise ValueError(f"{where}: the GSAM rho schedule needs all of {SCHEDULE_KEYS}, "
                             f"missing {missing}")
        rmax = check_number(group["rho_max"], f"{where}: rho_max", ge=0.0)
        check_number(group["rho_min"], f"{where}: rho_min", ge=0.0, le=rmax)
        lmin = check_number(group["lr_min"], f"{where}: lr_min", ge=0.0)
        check_number(group["lr_max"], f"{where}: lr_max", gt=lmin)

    def _scheduled(self, groups: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
        if not any("rho_max" in g for g in groups):
            return list(groups)
        cache: dict[int, Mapping[str, Any]] = {}
        out = []
        for g in groups:
            if id(g) not in cache:
                cache[id(g)] = {**g, "rho": scheduled_rho(g)} if "rho_max" in g else g
            out.append(cache[id(g)])
        return out

    def __call__(self, grads, params, groups, *, owned=False):
        return super().__call__(grads, params, self._scheduled(groups), owned=owned)

    def active(self, groups) -> bool:
        return super().active(self._scheduled(groups))

    @torch.no_grad()
    def combine(self, grads, contribs, scale: Any, params, groups):
        # contribs c = scale * h, and g_par = (g . c / ||c||^2) c = k c, so
        # scale * (h - alpha (g - g_par)) = (1 + alpha scale k) c - alpha scale g.
        pairs = [(g, c) for g, c in zip(grads, contribs) if g is not None and c is not None]
        if not pairs:
            return list(contribs)
        # Inner products in the tensors' own dtype (float32 BLAS dots, no float64 copies of
        # the gradients), summed in float64; half precision is upcast to float32 first.
        device = pairs[0][1].device
        dot = torch.stack([_dot(g, c).to(device) for g, c in pairs]).sum()
        cc = global_norm([c for _, c in pairs]).to(device).pow(2)
        k = torch.where(cc > 0, dot / cc.clamp_min(torch.finfo(torch.float64).tiny), 0.0)
        k = k * scale
        ga = scale * self.alpha
        out = []
        for g, c in zip(grads, contribs):
            if g is None or c is None:
                out.append(c)
            elif isinstance(ga, float):
                out.append(torch.add(c * (1.0 + self.alpha * k).to(c.dtype), g, alpha=-ga))
            else:
                out.append(c * (1.0 + self.alpha * k).to(c.dtype) - g * ga)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name, "alpha": self.alpha}
