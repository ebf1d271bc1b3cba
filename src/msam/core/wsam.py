"""WSAM: weighted sharpness as a regulariser.

WSAM (Yue et al., "Sharpness-Aware Minimization Revisited: Weighted Sharpness as a
Regularization Term", KDD 2023) minimises the loss plus a weighted sharpness term::

    L_WSAM(w) = L(w) + gamma / (1 - gamma) * (max_{||e|| <= rho} L(w + e) - L(w))
              = (1 - 2 gamma) / (1 - gamma) * L(w) + gamma / (1 - gamma) * L_SAM(w)

so its gradient, with SAM's ``e`` and ``h = grad L(w + e)``, ``g = grad L(w)``, is::

    grad = (1 - 2 gamma) / (1 - gamma) * g + gamma / (1 - gamma) * h        0 <= gamma < 1

``gamma = 0.5`` is SAM, ``gamma = 0`` the base optimizer's gradient. With micro-batches (mSAM)
the combination is made per micro-batch with its own ``g_j``, ``e_j`` and ``h_j`` and averaged
with ``n_j / n`` (the combination is linear, so this equals combining the averages).

This rule hands the combined gradient to the base optimizer (coupled form). The paper's
"decoupled" update applies the sharpness term ``gamma / (1 - gamma) (h - g)`` outside the base
optimizer (like AdamW's weight decay); that is the same for plain SGD without momentum and is
not implemented here for momentum / adaptive base optimizers.

Hyperparameters: ``gamma`` (constructor, default 0.9 -- this library's default; the paper tunes
it), ``rho`` per param group. State: none. Extra memory: ``g_j`` is kept through the perturbed
pass and ``h_j`` is handed back on its own (two gradient-sized buffers per micro-batch in
flight; docs/variants.md). Passes per step: 2 per micro-batch.
"""

from __future__ import annotations

from typing import Any

from msam.core.perturbation import SAMRule, check_number

__all__ = ["WSAMRule"]


class WSAMRule(SAMRule):
    """WSAM: ``(1 - 2 gamma)/(1 - gamma) g_j + gamma/(1 - gamma) h_j`` per micro-batch."""

    name = "wsam"
    combines = True

    def __init__(self, gamma: float = 0.9) -> None:
        self.gamma = check_number(gamma, "gamma", ge=0.0, lt=1.0)

    def combine(self, grads, contribs, scale: Any, params, groups):
        a = (1.0 - 2.0 * self.gamma) / (1.0 - self.gamma)
        b = self.gamma / (1.0 - self.gamma)
        out = []
        for g, c in zip(grads, contribs):
            out.append(c if g is None or c is None else c * b + g * (scale * a))
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name, "gamma": self.gamma}
