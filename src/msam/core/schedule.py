"""Schedules: on which optimizer steps mSAM perturbs, and what the other steps do.

A perturbation step costs ``2m`` passes over ``m`` micro-batches; a step without perturbation
("off-step") is **one** plain forward + backward over the whole batch and a base step (the
cost of the base optimizer). Three ways to spend fewer perturbation steps:

* ``every=k``: perturb on steps ``0, k, 2k, ...`` (counted from ``start_step``), plain steps in
  between -- SAM every k steps, as in Composer's SAM ``interval``.
* ``start_step=s``: the base optimizer alone before step ``s``, mSAM from it on (late-phase
  SAM: Zhou et al. 2024, "Sharpness-Aware Minimization Efficiently Selects Flatter Minima Late
  in Training"). Combined with ``every``: perturb on ``s, s + k, s + 2k, ...``.
* ``reuse="looksam"`` (with ``every=k >= 2``): LookSAM (Liu et al., CVPR 2022, "Towards
  Efficient and Scalable Sharpness-Aware Minimization") adapted to micro-batches. On a
  perturbation step the mSAM gradient ``g_s = sum_j (n_j/n) h_j`` and the clean gradient
  ``g = sum_j (n_j/n) g_j`` (the ascent passes' gradients at ``w``, which mSAM computes
  anyway: no extra pass) give the part of ``g_s`` that the perturbations add::

      g_v = g_s - (g_s . g / ||g||^2) g          (the component of g_s orthogonal to g)

  and on the steps in between, from one plain pass's gradient ``g``::

      grad = g + alpha * (||g|| / ||g_v||) * g_v

  Before the first perturbation step (e.g. before ``start_step``) there is no ``g_v`` and the
  off-steps are plain. The direction is **shared** by the whole batch (one ``g_v`` from the
  averaged gradients), not kept per micro-batch: the off-step pass is one full-batch pass
  with no micro-batch gradients to pair ``m`` directions with, and ``m`` buffers would cost
  ``m`` parameter copies. **Memory**: one parameter-sized buffer kept between steps (``g_v``,
  saved in ``state_dict``), plus one transient parameter-sized buffer (``g``) during each
  perturbation step. ``alpha`` (``reuse_alpha``) defaults to 0.7, this library's choice; the
  paper tunes it.

The step counter is the optimizer's count of base steps (``MSAM.steps``): an ``accumulate()``
sequence finished by ``step()`` is one step; a skipped step (non-finite values) is not counted,
so it is retried with the same decision.

Off-steps use the same machinery as every step -- the strategy's evaluator (DDP's included: its
backward all-reduces the full-batch gradient), GradScaler, non-finite checks, exact restore --
and the BatchNorm rule of :mod:`msam.core.batchnorm` with one "micro-batch": the running
statistics are updated once, from that pass, exactly as an ordinary training step would.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from msam.core.perturbation import global_norm

__all__ = ["REUSE", "Schedule", "validate_schedule_state"]

REUSE = ("looksam",)
_EPS = 1e-12


def _int(value: Any, name: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return value


def _check(every: Any, start_step: Any, reuse: Any, reuse_alpha: Any, where: str = ""
           ) -> tuple[int, int, str | None, float]:
    pre = f"{where}: " if where else ""
    every = _int(every, f"{pre}every", 1)
    start_step = _int(start_step, f"{pre}start_step", 0)
    if reuse is not None and reuse not in REUSE:
        raise ValueError(f"{pre}reuse must be None or one of {REUSE}, got {reuse!r}")
    if isinstance(reuse_alpha, bool) or not isinstance(reuse_alpha, (int, float)) \
            or not math.isfinite(reuse_alpha) or reuse_alpha < 0:
        raise ValueError(f"{pre}reuse_alpha must be a finite number >= 0, got {reuse_alpha!r}")
    if reuse is not None and every < 2:
        raise ValueError(f"{pre}reuse={reuse!r} needs every >= 2 (with every=1 every step "
                         f"perturbs and nothing is reused), got every={every}")
    return every, start_step, reuse, float(reuse_alpha)


def validate_schedule_state(state: Any, where: str) -> dict[str, Any]:
    """A saved schedule (see :meth:`Schedule.state_dict`), checked; ``None`` is the default."""
    if state is None:
        return Schedule().state_dict()
    if not isinstance(state, Mapping):
        raise ValueError(f"{where}: schedule must be a mapping, got {state!r}")
    every, start, reuse, alpha = _check(state.get("every", 1), state.get("start_step", 0),
                                        state.get("reuse"), state.get("reuse_alpha", 0.7),
                                        f"{where}: schedule")
    direction = state.get("direction")
    if direction is not None and (
            not isinstance(direction, (list, tuple))
            or not all(d is None or isinstance(d, torch.Tensor) for d in direction)):
        raise ValueError(f"{where}: schedule.direction must be None or a list of tensors")
    return {"every": every, "start_step": start, "reuse": reuse, "reuse_alpha": alpha,
            "direction": None if direction is None else list(direction)}


class Schedule:
    """Which steps perturb (``every``, ``start_step``) and the reuse variant (``reuse``,
    ``reuse_alpha``); see the module docstring. Holds the reuse direction ``g_v``."""

    def __init__(self, every: int = 1, start_step: int = 0, reuse: str | None = None,
                 reuse_alpha: float = 0.7) -> None:
        self.every, self.start_step, self.reuse, self.reuse_alpha = _check(
            every, start_step, reuse, reuse_alpha)
        #: ``g_v`` per parameter (None before the first perturbation step, or without reuse).
        self.direction: list[torch.Tensor | None] | None = None
        self._direction_norm: torch.Tensor | None = None   # ||g_v||, computed once

    @property
    def trivial(self) -> bool:
        """Every step perturbs (the default)."""
        return self.every == 1 and self.start_step == 0 and self.reuse is None

    def perturbs(self, step: int) -> bool:
        """Whether optimizer step ``step`` (0-based) is a perturbation step."""
        return step >= self.start_step and (step - self.start_step) % self.every == 0

    def __repr__(self) -> str:
        return (f"Schedule(every={self.every}, start_step={self.start_step}, "
                f"reuse={self.reuse!r}, reuse_alpha={self.reuse_alpha})")

    # -- reuse -------------------------------------------------------------------------------
    @torch.no_grad()
    def prepare(self, params: Sequence[torch.Tensor], clean: Sequence[Any] | None,
                perturbed: bool) -> list[torch.Tensor | None] | None:
        """Before the base step, with the step's gradient in ``p.grad`` and its clean gradient
        ``clean = sum_j (n_j / n) g_j``: on a perturbation step return the new direction
        ``g_v`` (the step keeps it until it commits; ``None`` when nothing was perturbed); on
        an off-step add ``alpha ||g|| / ||g_v|| g_v`` to ``p.grad`` in place (the step's own
        gradient tensors) and return ``None``."""
        if perturbed:
            if clean is None:  # rho = 0: nothing was perturbed, so nothing to reuse
                return None
            gs = [p.grad for p in params]
            dot = _dot(gs, clean, params)
            gg = _dot(clean, clean, params)
            coef = torch.where(gg > 0, dot / torch.where(gg > 0, gg, 1.0), 0.0)
            new: list[torch.Tensor | None] = []
            for p, s, c in zip(params, gs, clean):
                s = torch.zeros_like(p) if s is None else s
                new.append(s.clone() if c is None else s - coef.to(s.dtype) * c)
            return new
        if self.direction is None:
            return None
        # g + alpha ||g|| / ||g_v|| g_v, in place in the step's own gradient (no new buffer):
        # one fused norm pass over g and one multiply-add with g_v.
        grads = [p.grad for p in params]
        gnorm = global_norm([g for g in grads if g is not None]).to(params[0].device)
        vnorm = self._direction_norm
        if vnorm is None:
            vnorm = self._direction_norm = _dot(self.direction, self.direction, params).sqrt()
        c = self.reuse_alpha * gnorm / (vnorm + _EPS)
        for p, g, v in zip(params, grads, self.direction):
            if v is None:
                continue
            if g is None:
                p.grad = v * c.to(v.dtype)
            else:
                g.addcmul_(v, c.to(g.dtype))
        return None

    def set_direction(self, direction: list[torch.Tensor | None] | None,
                      params: Sequence[torch.Tensor]) -> None:
        self.direction = direction
        self._direction_norm = None if direction is None else _dot(direction, direction,
                                                                   params).sqrt()

    # -- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"every": self.every, "start_step": self.start_step, "reuse": self.reuse,
                "reuse_alpha": self.reuse_alpha,
                "direction": None if self.direction is None else [
                    None if d is None else d.detach().clone() for d in self.direction]}

    def load_state_dict(self, state: Mapping[str, Any], params: Sequence[torch.Tensor],
                        where: str = "schedule") -> None:
        """Restore a saved schedule (checked first); ``direction`` goes onto each parameter's
        device and dtype."""
        s = validate_schedule_state(state, where)
        direction = s["direction"]
        if direction is not None:
            if len(direction) != len(params):
                raise ValueError(f"{where}: schedule.direction has {len(direction)} tensors, "
                                 f"the optimizer has {len(params)} parameters")
            for i, (d, p) in enumerate(zip(direction, params)):
                if d is not None and d.shape != p.shape:
                    raise ValueError(f"{where}: schedule.direction[{i}] has shape "
                                     f"{tuple(d.shape)}, parameter {i} {tuple(p.shape)}")
            direction = [None if d is None else d.detach().to(device=p.device, dtype=p.dtype,
                                                              copy=True)
                         for d, p in zip(direction, params)]
        self.every, self.start_step = s["every"], s["start_step"]
        self.reuse, self.reuse_alpha = s["reuse"], s["reuse_alpha"]
        self.direction = direction
        self._direction_norm = None


def _dot(a: Sequence[Any], b: Sequence[Any], params: Sequence[torch.Tensor]) -> torch.Tensor:
    """``sum_i a_i . b_i`` as a 0-d float64 tensor on the first parameter's device (None terms
    are 0): one ``vdot`` per tensor in its own dtype (float64 for half types), summed in
    float64; no host sync."""
    dev = params[0].device
    terms = []
    for x, y in zip(a, b):
        if x is not None and y is not None:
            if x.dtype not in (torch.float32, torch.float64):
                x, y = x.double(), y.double()
            terms.append(torch.vdot(x.reshape(-1), y.reshape(-1)).to(device=dev,
                                                                     dtype=torch.float64))
    if not terms:
        return torch.zeros((), dtype=torch.float64, device=dev)
    return torch.stack(terms).sum()
