"""WSAM: weighted sharpness as a regulariser.

WSAM (Yue et al., "Sharpness-Aware Minimization Revisited: Weighted Sharpness as a
Regularization Term", KDD 2023) minimises the loss plus a weighted sharpness term::

    L_WSAM(w) = L(w) + gamma / (1 - gamma) * (max_{||e|| <= rho} L(w + e) - L(w))

with ``0 <= gamma < 1``.

With SAM's ``e = rho g / ||g||``, ``g = grad L(w)``, ``h = grad L(w + e)`` and
``beta = gamma / (1 - gamma)``, its gradient is ``g + beta (h - g)``. ``gamma = 0.5``
(``beta = 1``) is SAM's gradient, ``gamma = 0`` the base optimizer's. Two forms:

* **decoupled** (``decoupled=True``, the default and the paper's recommended form): the base
  optimizer (momentum, Adam moments, weight decay) sees only ``g``; the sharpness term is a
  separate plain step right after it, as AdamW applies its weight decay::

      w <- base_step(w, g)
      w <- w - lr * beta * (h - g)                   (lr: the param group's current lr)

* **coupled** (``decoupled=False``): the base optimizer gets the whole gradient
  ``(1 - beta) g + beta h``. Under momentum ``mu`` the sharpness term is then amplified like
  every gradient (by ``1 / (1 - mu)`` in the long run); at ``gamma = 0.9`` this is SAM at about
  nine times ``rho`` to first order, which is why it diverges where the decoupled form trains
  (results/fashion_mnist_noisy_variants_pilot/).

For plain SGD without momentum or weight decay the two forms are the same update.

With micro-batches (mSAM) every micro-batch uses its own ``g_j``, ``e_j`` and ``h_j``, and both
parts are averaged with ``n_j / n``: ``p.grad = sum_j (n_j/n) g_j`` (the batch gradient) and
``d = beta sum_j (n_j/n) (h_j - g_j)``. Gradient clipping (``max_grad_norm``) acts on what the
base optimizer sees (``g``; in the coupled form the whole gradient), never on ``d``.

Hyperparameters: ``gamma`` (default 0.9, the paper's default; the authors' code uses 0.88) and
``decoupled`` (constructor), ``rho`` per param group. State: none. Extra memory: ``g_j`` is kept
through the perturbed pass and ``h_j`` handed back on its own (two gradient-sized buffers per
micro-batch in flight); the decoupled form adds ``d`` (one parameter-sized buffer, held until the
base step). Passes per step: 2 per micro-batch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from msam.core.perturbation import SAMRule, check_number

__all__ = ["WSAMRule"]


class WSAMRule(SAMRule):
    """WSAM with ``beta = gamma / (1 - gamma)`` per micro-batch (see the module docstring):
    decoupled ``g_j`` to the base optimizer and ``beta (h_j - g_j)`` after it, or coupled
    ``(1 - beta) g_j + beta h_j``."""

    name = "wsam"
    config_keys = {"wsam_gamma": "gamma", "wsam_decoupled": "decoupled"}
    title = "WSAM"
    combines = True

    def __init__(self, gamma: float = 0.9, decoupled: bool = True) -> None:
        self.gamma = check_number(gamma, "gamma", ge=0.0, lt=1.0)
        if not isinstance(decoupled, bool):
            raise ValueError(f"decoupled must be True or False, got {decoupled!r}")
        self.decoupled = decoupled
        self.decouples = decoupled

    @property
    def beta(self) -> float:
        return self.gamma / (1.0 - self.gamma)

    def combine(self, grads, contribs, scale: Any, params, groups):
        a, b = 1.0 - self.beta, self.beta
        return [c if g is None or c is None else c * b + g * (scale * a)
                for g, c in zip(grads, contribs)]

    def combine_decoupled(self, grads, contribs, scale: Any, params, groups):
        to_grad: list[Tensor | None] = []
        to_weights: list[Tensor | None] = []
        for g, c in zip(grads, contribs):
            if g is None or c is None:  # no ascent gradient: h_j alone, nothing to regularise
                to_grad.append(c)
                to_weights.append(None)
                continue
            # c (this micro-batch's scaled h_j) and g_j are the step's own: c holds the
            # decoupled part in place, and at scale 1 (one micro-batch) g_j is the gradient.
            sg = g if isinstance(scale, float) and scale == 1.0 else g * scale
            to_weights.append(c.sub_(sg).mul_(self.beta))
            to_grad.append(sg)
        return to_grad, to_weights

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name, "gamma": self.gamma, "decoupled": self.decoupled}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        saved = state.get("decoupled", False)  # states written before the decoupled form
        if saved != self.decoupled:
            raise ValueError(
                f"perturbation rule: the state was saved by WSAM with decoupled={saved}, this "
                f"optimizer uses decoupled={self.decoupled} (a different update)")
