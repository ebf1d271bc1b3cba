"""The mSAM gradient computation with its guarantees: validation, exact restore, fault safety.

:class:`GradientEngine` turns ``(loss_fn, batch)`` into the mSAM gradient in ``p.grad``::

    g_j = grad L_j(w)                    # micro-batch j's own gradient at w
    e_j = rho * g_j / (||g_j|| + 1e-12)  # ASAM: rho T^2 g_j / (||T g_j|| + 1e-12), T = |w|+eta
    h_j = grad L_j(w + e_j)
    grad = sum_j (n_j / n) * h_j

(Behdin et al. 2023, mSAM; Foret et al. 2021, SAM; Kwon et al. 2021, ASAM.) It is shared by the
optimizer wrapper :class:`msam.MSAM` and the functional entry point :func:`msam.msam_gradient`.

Guarantees: the weights are copied back from a saved copy (never by subtracting ``e_j``); if
``loss_fn`` raises or a loss / gradient is non-finite, the parameters, BatchNorm buffers and the
``.grad`` tensors are exactly as before the call, and the error is raised (or, with
``nonfinite="skip"`` or a ``GradScaler``, the step is reported as skipped).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from msam.core.batch import batch_size, resolve_micro_batches, split_batch
from msam.strategies import GradientJob, NonFiniteLossError, Strategy, make_strategy

__all__ = ["GradientEngine", "GradientResult", "validate_rho", "validate_eta"]


def validate_rho(rho: Any, name: str = "rho") -> float:
    if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not math.isfinite(rho) \
            or rho < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {rho!r}")
    return float(rho)


def validate_eta(eta: Any) -> float:
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not math.isfinite(eta) \
            or eta <= 0:
        raise ValueError(f"eta must be a finite number > 0, got {eta!r}")
    return float(eta)


def _validate_count(value: Any, name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return value


@dataclass
class GradientResult:
    """What one gradient computation did."""

    loss: torch.Tensor  # weighted mean loss at w over the batch (0-d, detached; NaN if skipped)
    skipped: bool = False     # True when a non-finite value made the step be skipped
    reason: str = ""


class GradientEngine:
    """Configuration and execution of the mSAM gradient (see the module docstring)."""

    def __init__(
        self,
        *,
        micro_batches: int | None = None,
        micro_batch_size: int | None = None,
        adaptive: bool = False,
        strategy: str | Strategy = "loop",
        model: nn.Module | None = None,
        nonfinite: str = "raise",
        ascent_context: Callable[[], contextlib.AbstractContextManager] | None = None,
        descent_context: Callable[[int, int], contextlib.AbstractContextManager] | None = None,
        ascent_grad_hook: Callable[[tuple], tuple] | None = None,
    ) -> None:
        self.micro_batches = _validate_count(micro_batches, "micro_batches")
        self.micro_batch_size = _validate_count(micro_batch_size, "micro_batch_size")
        if self.micro_batches is not None and self.micro_batch_size is not None:
            raise ValueError("give micro_batches or micro_batch_size, not both")
        if not isinstance(adaptive, bool):
            raise ValueError(f"adaptive must be True or False, got {adaptive!r}")
        if nonfinite not in ("raise", "skip"):
            raise ValueError(f"nonfinite must be 'raise' or 'skip', got {nonfinite!r}")
        if model is not None and not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.adaptive = adaptive
        self.strategy = make_strategy(strategy)
        self.model = model
        self.nonfinite = nonfinite
        self.ascent_context = ascent_context
        self.descent_context = descent_context
        # Transforms the ascent gradients before e_j (loop strategy only; see GradientJob).
        self.ascent_grad_hook = ascent_grad_hook

    @property
    def strategy_name(self) -> str:
        return self.strategy.name

    def num_micro_batches(self, n: int) -> int:
        return resolve_micro_batches(n, self.micro_batches, self.micro_batch_size)

    def _split(self, loss_fn: Callable, batch: Any) -> tuple[Callable, list[tuple[Any, float]]]:
        if batch is None:
            m = self.micro_batches or 1
            if m != 1 or self.micro_batch_size is not None:
                raise ValueError(
                    "batch: required when micro_batches > 1 (a loss_fn without a batch cannot "
                    "be split into micro-batches)"
                )
            return (lambda _unused: loss_fn()), [(None, 1.0)]
        n = batch_size(batch)
        m = self.num_micro_batches(n)
        return loss_fn, [(mb, n_j / n) for mb, n_j in split_batch(batch, m)]

    def compute(
        self,
        loss_fn: Callable[..., torch.Tensor],
        batch: Any,
        params: Sequence[torch.Tensor],
        *,
        rhos: Sequence[float],
        etas: Sequence[float],
        perturb: Sequence[bool],
        scaler: Any = None,
        grad_weight: float = 1.0,
        fresh: bool = True,
    ) -> GradientResult:
        """Add (``fresh=False``) or write (``fresh=True``) the mSAM gradient into ``p.grad``."""
        if not callable(loss_fn):
            raise ValueError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
        params = list(params)
        if not params:
            raise ValueError("params: no parameter requires grad")
        fn, micro = self._split(loss_fn, batch)
        if scaler is not None and not scaler.is_enabled():
            scaler = None
        loss_scale = 1.0
        if scaler is not None:
            # scale() initialises the scaler's state on the parameters' device (lazily created).
            loss_scale = float(scaler.scale(torch.ones((), device=params[0].device)))

        backup = [p.detach().clone() if k else p for p, k in zip(params, perturb)]
        old_grads = [p.grad for p in params]
        if fresh:
            for p in params:
                p.grad = None
            snapshots = old_grads
        else:
            snapshots = [None if g is None else g.detach().clone() for g in old_grads]

        def restore() -> None:
            with torch.no_grad():
                for p, b, k in zip(params, backup, perturb):
                    if k:
                        p.copy_(b)
                for p, g, old in zip(params, snapshots, old_grads):
                    if fresh or g is None:
                        p.grad = g
                    else:
                        old.copy_(g)
                        p.grad = old

        job = GradientJob(
            loss_fn=fn, micro_batches=micro, params=params, perturb=list(perturb),
            rhos=list(rhos), etas=list(etas), adaptive=self.adaptive, backup=backup,
            loss_scale=loss_scale, grad_weight=grad_weight, model=self.model,
        )
        if self.ascent_context is not None:
            job.ascent_context = self.ascent_context
        if self.descent_context is not None:
            job.descent_context = self.descent_context
        if self.ascent_grad_hook is not None:
            job.ascent_grad_hook = self.ascent_grad_hook
        try:
            loss = self.strategy.accumulate(job)
            if scaler is None:
                bad = first_nonfinite([p.grad for p in params])
                if bad is not None:
                    raise NonFiniteLossError("perturbed", -1, f"gradient (parameter {bad})")
        except NonFiniteLossError as err:
            restore()
            if scaler is not None or self.nonfinite == "skip":
                return GradientResult(torch.tensor(float("nan")), skipped=True, reason=str(err))
            raise
        except BaseException:
            restore()
            raise
        return GradientResult(loss.to(params[0].dtype), skipped=False)


def first_nonfinite(tensors: Sequence[torch.Tensor | None]) -> int | None:
    """Index of the first tensor that holds an inf or NaN (``None`` entries skipped), else None.

    The common all-finite case costs one sum per tensor and a single host sync: when every sum
    is finite, so is every element (an inf / NaN element makes its sum inf or NaN), and on CPU a
    sum is several times faster than ``isfinite().all()`` or an infinity norm. Only when some sum
    is not finite (a real inf / NaN, or finite values whose sum overflowed) are the tensors
    checked element by element, so the answer is exact.
    """
    present = [(i, t) for i, t in enumerate(tensors) if t is not None and t.numel() > 0]
    if not present:
        return None
    try:
        sums = [t.sum() for _, t in present]
        device = sums[0].device
        finite = torch.isfinite(torch.stack([s.to(device) for s in sums]))
        if bool(finite.all()):
            return None
    except (RuntimeError, TypeError, NotImplementedError):  # e.g. sparse gradients
        pass
    return next((i for i, t in present if not bool(torch.isfinite(t).all())), None)


def normalization_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters of normalization layers (BatchNorm, GroupNorm, LayerNorm, InstanceNorm).

    Pass them as ``perturb=`` to perturb only these, as in SAM-ON (Mueller et al., NeurIPS 2023);
    the remaining parameters are not perturbed but still receive the averaged gradient.
    """
    kinds = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)
    out: list[nn.Parameter] = []
    seen: set[int] = set()
    for mod in model.modules():
        if isinstance(mod, kinds) or type(mod).__name__.endswith(("LayerNorm", "RMSNorm")):
            for p in mod.parameters(recurse=False):
                if id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
    return out


def trainable(params: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    return [p for p in params if p.requires_grad]
