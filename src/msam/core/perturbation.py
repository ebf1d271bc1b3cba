"""Perturbation rules: from a micro-batch's gradient ``g_j`` to its perturbation ``e_j``.

A rule has one job: given the gradient ``g_j = grad L_j(w)`` of the perturbed parameters, the
weights ``w`` and each parameter's param group (its hyperparameters), return ``e_j``. Every
execution strategy, the distributed optimizer, the two-step API and :mod:`msam.analysis`
m-sharpness call the same rule object, so ``e_j`` is written once.

SAM (Foret et al., ICLR 2021) approximates ``max_{||e||_2 <= rho} L(w + e)`` by one normalised
gradient step::

    e = rho * g / (||g|| + eps)

ASAM (Kwon et al., ICML 2021) measures the neighbourhood relative to the weights, with the
elementwise operator ``T = |w| + eta``::

    e = rho * T^2 g / (||T g|| + eps)

``||.||`` is the global L2 norm over every perturbed parameter. ``eps = 1e-12`` keeps a zero
gradient from dividing by zero (then ``e = 0``). In mSAM (Behdin et al. 2023) the rule is
evaluated once per micro-batch ``j`` with that micro-batch's own gradient ``g_j``. ``rho`` (and
``eta``) are per-param-group hyperparameters, read from each parameter's group.

Weight decay never enters ``e``: it belongs to the base optimizer (decoupled), so ``g`` here is
the gradient of the loss alone.

A rule that keeps state across steps (a schedule, a reused direction) saves it in
:meth:`PerturbationRule.state_dict`; the optimizer stores it with its own state.

Example::

    rule = msam.core.SAMRule()
    e, norm = rule(grads, params, [{"rho": 0.05}] * len(params))
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

__all__ = [
    "EPS", "ASAMRule", "PerturbationRule", "SAMRule", "check_dense", "perturbation",
    "perturbation_norm",
]

#: Added to the norm so that a zero gradient gives a zero perturbation instead of NaN.
EPS = 1e-12

Tensors = Sequence[torch.Tensor | None]

_NATIVE_NORM_DTYPES = (torch.float32, torch.float64)


def _tensor_norms(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per-tensor L2 norms: float32 / float64 tensors in their own dtype with one fused
    ``torch._foreach_norm`` call per (device, dtype); other dtypes (float16, bfloat16) in float64,
    so that squaring cannot overflow."""
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.device, t.dtype), []).append(i)
    out: list[torch.Tensor] = [torch.empty(0)] * len(tensors)
    for (_, dtype), idx in groups.items():
        if dtype in _NATIVE_NORM_DTYPES:
            norms: Sequence[torch.Tensor] = torch._foreach_norm([tensors[i] for i in idx])
        else:
            norms = [torch.linalg.vector_norm(tensors[i], dtype=torch.float64) for i in idx]
        for i, n in zip(idx, norms):
            out[i] = n
    return out


def global_norm(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """L2 norm over all ``tensors`` as a 0-d float64 tensor on the first tensor's device."""
    if not tensors:
        return torch.zeros((), dtype=torch.float64)
    device = tensors[0].device
    norms = _tensor_norms(list(tensors))
    stacked = torch.stack([n.to(device=device, dtype=torch.float64) for n in norms])
    return stacked.pow(2).sum().sqrt()


def sum_of_squares(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """``sum_i ||t_i||^2`` as a 0-d float64 tensor (0 for no tensors), e.g. of one rank's
    shards before the all-reduce that makes it global."""
    if not tensors:
        return torch.zeros((), dtype=torch.float64)
    norms = _tensor_norms(list(tensors))
    device = tensors[0].device
    return torch.stack([n.to(device=device, dtype=torch.float64) for n in norms]).pow(2).sum()


def _covers_its_storage(t: torch.Tensor) -> bool:
    """``t`` reaches every element of its storage exactly once (dense and non-overlapping, e.g.
    a contiguous or transposed tensor; not an expanded one, not a slice of a bigger buffer)."""
    if t.storage_offset() != 0 or t.untyped_storage().nbytes() != t.numel() * t.element_size():
        return False
    expected = 1
    for stride, size in sorted((st, sz) for st, sz in zip(t.stride(), t.shape) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _writable(g: torch.Tensor, seen: set[int]) -> bool:
    """Whether a gradient handed over by its owner may hold ``e`` in place: it owns its whole
    storage (autograd's transposed weight gradients do; an expanded tensor or a row of a stacked
    buffer does not), shares no storage with an earlier one, and has no autograd history."""
    if g.requires_grad or g.layout != torch.strided or g.numel() == 0 \
            or not _covers_its_storage(g):
        return False
    ptr = g.untyped_storage().data_ptr()
    if ptr in seen:
        return False
    seen.add(ptr)
    return True


def _scaled_by_norm(
    directions: list[torch.Tensor], writable: list[bool], idx: list[int],
    groups: Sequence[Mapping[str, Any]], norm: torch.Tensor,
) -> list[torch.Tensor]:
    """``direction_i * rho_i / (norm + eps)``, one fused multiply per (rho, device, dtype),
    written into the direction where ``writable`` (after every out-of-place product, so no
    entry reads a tensor that was already overwritten)."""
    out: list[torch.Tensor] = [torch.empty(0)] * len(directions)
    buckets: dict[tuple[bool, float, torch.device, torch.dtype], list[int]] = {}
    for k, i in enumerate(idx):
        d = directions[k]
        key = (writable[k], float(groups[i]["rho"]), d.device, d.dtype)
        buckets.setdefault(key, []).append(k)
    for (in_place, rho, device, dtype), ks in sorted(buckets.items(), key=lambda kv: kv[0][0]):
        scale = (rho / (norm + EPS)).to(device=device, dtype=dtype)
        tensors = [directions[k] for k in ks]
        if in_place:
            torch._foreach_mul_(tensors, scale)
        else:
            tensors = list(torch._foreach_mul(tensors, scale))
        for k, e in zip(ks, tensors):
            out[k] = e
    return out


def check_dense(grads: Tensors, params: Sequence[torch.Tensor]) -> None:
    """Refuse sparse ascent gradients (e.g. ``nn.Embedding(sparse=True)``) with an error naming
    the parameter: the perturbation's norm and ``w + e`` need dense gradients."""
    for i, g in enumerate(grads):
        if g is not None and g.layout != torch.strided:
            raise ValueError(
                f"perturbed parameter {i} (shape {tuple(params[i].shape)}) has a sparse "
                f"gradient ({g.layout}), e.g. from nn.Embedding(sparse=True); the SAM "
                "perturbation rho g/||g|| needs a dense gradient. Use sparse=False for that "
                "layer (and a base optimizer for dense gradients)")


def check_number(value: Any, name: str, *, ge: float | None = None, gt: float | None = None,
                 le: float | None = None, lt: float | None = None) -> float:
    """``value`` as a float if it is a finite real number within the bounds, else a
    ``ValueError`` naming ``name`` and the bounds (for the rules' hyperparameters)."""
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) \
        and math.isfinite(value)
    ok = ok and (ge is None or value >= ge) and (gt is None or value > gt) \
        and (le is None or value <= le) and (lt is None or value < lt)
    if not ok:
        bounds = [f"{op} {b}" for op, b in ((">=", ge), (">", gt), ("<=", le), ("<", lt))
                  if b is not None]
        raise ValueError(f"{name} must be a finite number{' ' if bounds else ''}"
                         f"{' and '.join(bounds)}, got {value!r}")
    return float(value)


class PerturbationRule:
    """Base class: ``rule(grads, params, groups) -> (e, norm)``.

    ``grads[i]`` is ``g_j`` for parameter ``params[i]`` (``None``: the parameter has no
    gradient and is not moved), ``groups[i]`` its param group (``rho``, ``eta``, ...). Returns
    one ``e_i`` per parameter (``None`` where the gradient is ``None``) and the 0-d norm the
    perturbation was normalised by (float64; non-finite when ``g_j`` is). Subclasses implement
    :meth:`direction` and :meth:`norm` or override :meth:`__call__`.
    """

    name = "base"
    #: The name in tables and plots (``None``: :attr:`name`).
    title: str | None = None
    #: Run-config keys of the rule (``msam train``): config key -> constructor argument
    #: (``None``: read by the trainer, not the constructor). Each key is a field of the config.
    config_keys: dict[str, str | None] = {}
    #: A rule that also changes how ``h_j`` is used sets this and implements :meth:`combine`:
    #: the engine then keeps ``g_j`` (it calls the rule with ``owned=False``) and asks the
    #: evaluator for each micro-batch's ``h_j`` separately (see docs/core.md).
    combines = False
    #: A ``combines`` rule that also moves the weights outside the base optimizer sets this and
    #: implements :meth:`combine_decoupled`: the engine sums the second part over the
    #: micro-batches (``d``, in gradient units, loss scale removed) and the optimizer applies
    #: ``p -= lr * d`` right after the base step, as AdamW applies its decoupled weight decay.
    decouples = False
    #: A rule that keeps a per-step statistic of the ascent gradients sets this: the engine calls
    #: :meth:`observe` with each ``g_j`` (before the rule) and :meth:`end_step` once the step is
    #: committed; :meth:`begin_step` starts each gradient computation.
    observes = False
    #: ``direction`` and ``norm_terms`` act element by element (or within a row), so the rule
    #: is correct on shards of the parameters (FSDP); see :mod:`msam.core.registry`.
    elementwise = False
    #: The rule takes the ascent gradient ``g_j`` (one pass at ``w`` per micro-batch). A rule
    #: whose direction comes from the base optimizer's state instead (Momentum-SAM) sets
    #: ``False`` and implements ``offset(params, groups, optimizer_state) -> (e, norm) | None``:
    #: the step is then one pass at ``w + e`` (at ``w`` when ``offset`` returns ``None``).
    ascent = True

    def direction(self, g: torch.Tensor, w: torch.Tensor, group: Mapping[str, Any]
                  ) -> torch.Tensor:
        raise NotImplementedError

    def norm_terms(self, g: torch.Tensor, w: torch.Tensor, group: Mapping[str, Any]
                   ) -> torch.Tensor:
        raise NotImplementedError

    def offset(self, params: Sequence[torch.Tensor], groups: Sequence[Mapping[str, Any]],
               state: Mapping[Any, Mapping[str, Any]]
               ) -> tuple[list[torch.Tensor | None], torch.Tensor] | None:
        """(rules with ``ascent = False``) ``(e, norm)`` from the base optimizer's per-parameter
        ``state``, or ``None`` for a plain step at ``w``."""
        raise NotImplementedError  # pragma: no cover - interface

    @torch.no_grad()
    def __call__(self, grads: Tensors, params: Sequence[torch.Tensor],
                 groups: Sequence[Mapping[str, Any]], *, owned: bool = False,
                 reduce_sq: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 exclusive: bool = False,
                 ) -> tuple[list[torch.Tensor | None], torch.Tensor]:
        """``owned=True``: the caller hands the gradients over and discards them, so ``e_i``
        may be written into ``grads[i]`` where that is safe (saves one parameter-sized
        buffer per micro-batch; the values are the same either way).

        ``reduce_sq`` (sharded parameters, :mod:`msam.distributed.sharded`): ``grads`` and
        ``params`` are this rank's shards; the norm is ``sqrt(reduce_sq(local sum of
        squares))``, ``reduce_sq`` being one all-reduce over the shards. Only rules whose
        direction and norm terms are elementwise (SAM, ASAM) are correct on shards.
        ``exclusive=True`` (with ``owned``): the caller also guarantees that the gradients are
        distinct, non-overlapping and referenced by nothing else, even where they are views
        into one buffer (FSDP's reduce-scatter output), so every one may hold ``e_i``."""
        check_dense(grads, params)
        idx = [i for i, g in enumerate(grads) if g is not None]
        out: list[torch.Tensor | None] = [None] * len(grads)
        if not idx and reduce_sq is None:
            return out, torch.zeros((), dtype=torch.float64)
        present: list[torch.Tensor] = [g for g in grads if g is not None]
        terms = [self.norm_terms(g, params[i], groups[i]) for i, g in zip(idx, present)]
        if reduce_sq is None:
            norm = global_norm(terms)
        else:
            norm = reduce_sq(sum_of_squares(terms)).sqrt()
        del terms
        dirs = [self.direction(g, params[i], groups[i]) for i, g in zip(idx, present)]
        seen: set[int] = set()
        writable = [d is not g or (owned and (exclusive or _writable(g, seen)))
                    for d, g in zip(dirs, present)]
        for i, e in zip(idx, _scaled_by_norm(dirs, writable, idx, groups, norm)):
            out[i] = e
        return out, norm

    def combine(self, grads: Tensors, contribs: Tensors, scale: Any,
                params: Sequence[torch.Tensor], groups: Sequence[Mapping[str, Any]]
                ) -> list[torch.Tensor | None]:
        """(``combines`` rules) Micro-batch ``j``'s contribution to ``p.grad`` from ``g_j``
        (``grads``, unscaled) and ``c_j = scale * h_j`` (``contribs``, ``scale = (n_j / n) x
        accumulation weight x loss scale``, a float or a 0-d tensor): ``scale * f(g_j, h_j)``."""
        raise NotImplementedError  # pragma: no cover - interface

    def combine_decoupled(self, grads: Tensors, contribs: Tensors, scale: Any,
                          params: Sequence[torch.Tensor], groups: Sequence[Mapping[str, Any]]
                          ) -> tuple[list[torch.Tensor | None], list[torch.Tensor | None]]:
        """(``decouples`` rules) As :meth:`combine`, split in two: ``(to_grad, to_weights)``,
        both ``scale`` times a function of ``g_j`` and ``h_j``. ``to_grad`` goes into ``p.grad``
        (the base optimizer's input); ``to_weights`` is the micro-batch's part of ``d``."""
        raise NotImplementedError  # pragma: no cover - interface

    def validate_group(self, group: Mapping[str, Any], where: str) -> None:
        """Check the rule's own param-group keys (called before every step); clear errors."""

    def check_params(self, params: Sequence[torch.Tensor], where: str) -> None:
        """Check the rule's loaded state against the perturbed parameters (their order and
        shapes), before a loaded state is used; clear errors. Nothing to check by default."""

    def begin_step(self) -> None:
        """(``observes`` rules) A gradient computation starts; drop anything uncommitted."""

    def observe(self, g: Tensors, weight: float) -> None:
        """(``observes`` rules) ``g_j`` of micro-batch ``j`` (``weight = n_j / n``)."""

    def end_step(self) -> None:
        """(``observes`` rules) The step was committed: update the state from what was
        observed."""

    def update(self, clean: Tensors) -> None:
        """(``observes`` rules) The step was committed; ``clean[i] = sum_j (n_j / n) g_j`` for
        perturbed parameter ``i`` (summed over ``accumulate`` calls with their ``scale``). By
        default :meth:`begin_step`, :meth:`observe` and :meth:`end_step` in turn."""
        self.begin_step()
        self.observe(clean, 1.0)
        self.end_step()

    def active(self, groups: Sequence[Mapping[str, Any]]) -> bool:
        """False when the rule moves nothing this step (every ``rho`` is 0)."""
        return any(float(g["rho"]) != 0.0 for g in groups)

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("name") != self.name:
            raise ValueError(
                f"perturbation rule: the state was saved by rule {state.get('name')!r}, this "
                f"optimizer uses {self.name!r}"
            )


class SAMRule(PerturbationRule):
    """SAM: ``e = rho * g / (||g|| + 1e-12)`` (Foret et al., ICLR 2021)."""

    name = "sam"
    title = "SAM"
    elementwise = True

    def direction(self, g, w, group):
        return g

    def norm_terms(self, g, w, group):
        return g


class ASAMRule(PerturbationRule):
    """ASAM: ``e = rho * T^2 g / (||T g|| + 1e-12)``, ``T = |w| + eta`` (Kwon et al., ICML 2021).

    ``eta`` is read from each parameter's group (default 0.01, as in the paper's code).
    """

    name = "asam"
    title = "ASAM"
    elementwise = True

    def direction(self, g, w, group):
        t = w.abs() + float(group["eta"])
        return t * t * g

    def norm_terms(self, g, w, group):
        return (w.abs() + float(group["eta"])) * g


def perturbation_norm(grads: Tensors, params: Sequence[torch.Tensor], adaptive: bool = False,
                      etas: Sequence[float] | None = None) -> torch.Tensor:
    """``||g||`` (SAM) or ``||T g||`` (ASAM) over the parameters with a gradient (float64)."""
    rule = ASAMRule() if adaptive else SAMRule()
    etas = [0.01] * len(params) if etas is None else etas
    terms = [rule.norm_terms(g, params[i], {"eta": etas[i]})
             for i, g in enumerate(grads) if g is not None]
    return global_norm(terms)


def perturbation(grads: Tensors, params: Sequence[torch.Tensor], rhos: Sequence[float],
                 adaptive: bool = False, etas: Sequence[float] | None = None, *,
                 owned: bool = False) -> tuple[list[torch.Tensor | None], torch.Tensor]:
    """Functional form of :class:`SAMRule` / :class:`ASAMRule` with per-parameter rho / eta."""
    etas = [0.01] * len(params) if etas is None else etas
    groups = [{"rho": r, "eta": e} for r, e in zip(rhos, etas)]
    return (ASAMRule() if adaptive else SAMRule())(grads, params, groups, owned=owned)
