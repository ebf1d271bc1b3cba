"""Momentum-SAM: the perturbation along the base optimizer's momentum, with no ascent pass.

Momentum-SAM (Becker, Altrock, Risse, "Momentum-SAM: Sharpness Aware Minimization without
Computational Overhead", arXiv 2401.12033, 2024; not to be confused with mSAM, this library's
micro-batch method) replaces SAM's ascent gradient by the momentum vector ``v`` the base
optimizer already keeps, so a step costs one forward-backward pass, as SGD. With SGD (the
paper's Figure 1)::

    w~_t    = w_t - rho v_t / ||v_t||            (note the sign: *against* the momentum)
    g_t     = grad L_B(w~_t)                      the step's only pass
    v_{t+1} = mu v_t + g_t,   w_{t+1} = w_t - lr v_{t+1}     (SGD with momentum, as torch's)

``v`` is SGD's ``momentum_buffer``; with Adam / AdamW it is the first moment ``exp_avg``, as in
the authors' AdamW variant (their code perturbs by ``-rho exp_avg / ||exp_avg||``). The first
step, before the base optimizer has any momentum, is a plain step at ``w`` (``v_0 = 0``). A base
optimizer without momentum is refused (``momentum=0`` SGD: ``v`` would be the last gradient).

Micro-batches: the direction is shared by the whole batch (it is not a function of the batch),
so ``m > 1`` is refused; ``m = 1`` only. The loss ``step`` returns is the loss at ``w~_t`` (the
pass at ``w_t`` does not exist), and BatchNorm running statistics come from that pass. The
paper's radii are much larger than SAM's (``rho`` up to 3 in the authors' configurations).
State: none beyond the base optimizer's. Passes per step: 1.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from msam.core.perturbation import EPS, PerturbationRule, global_norm

__all__ = ["MomentumSAMRule"]

#: Per-parameter state keys holding the momentum vector: SGD's, then Adam's / AdamW's.
MOMENTUM_KEYS = ("momentum_buffer", "exp_avg")


class MomentumSAMRule(PerturbationRule):
    """Momentum-SAM: ``e = -rho v / (||v|| + 1e-12)``, ``v`` the base optimizer's momentum."""

    name = "momentumsam"
    title = "Momentum-SAM"
    ascent = False

    @torch.no_grad()
    def offset(self, params: Sequence[torch.Tensor], groups: Sequence[Mapping[str, Any]],
               state: Mapping[Any, Mapping[str, Any]]
               ) -> tuple[list[torch.Tensor | None], torch.Tensor] | None:
        """``(e, ||v||)`` from the optimizer's ``state``; ``None`` before any momentum exists."""
        vs: list[torch.Tensor | None] = []
        for p in params:
            s = state.get(p, {})
            vs.append(next((s[k] for k in MOMENTUM_KEYS if isinstance(s.get(k), torch.Tensor)),
                           None))
        present = [v for v in vs if v is not None]
        if not present:
            return None  # the first step: no momentum yet, a plain step at w
        # v = 0 where a parameter has no momentum yet (e.g. one the loss has not used)
        norm = global_norm(present)
        return [None if v is None else v * (-float(g["rho"]) / (norm + EPS)).to(v.dtype)
                for v, g in zip(vs, groups)], norm

    def __call__(self, grads, params, groups, **kwargs):  # pragma: no cover - not called
        raise RuntimeError("Momentum-SAM takes no ascent gradient (its direction is the "
                           "optimizer's momentum, MomentumSAMRule.offset)")
