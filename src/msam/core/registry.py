"""The perturbation rules by name, and the one place that decides where a rule runs.

A rule describes itself with class attributes (:class:`msam.core.PerturbationRule`):

==============  ==========================================================================
``elementwise``  ``direction`` and ``norm_terms`` act element by element (or row by row), so
                 a rank holding a shard of each parameter can apply the rule (FSDP)
``combines``     the rule combines ``g_j`` and ``h_j`` (``combine``), e.g. GSAM
``decouples``    part of the update bypasses the base optimizer (``combine_decoupled``), WSAM
``observes``     the rule keeps statistics of the clean gradient across steps (``update``)
``ascent``       the rule takes ``g_j`` (``False``: its direction is the base optimizer's
                 state, e.g. Momentum-SAM's momentum, and a step is one pass)
==============  ==========================================================================

:func:`check_support` reads them, for every place that runs a rule (a strategy, DDP, FSDP, the
two-step API, ``msam_gradient``, a reuse schedule), at construction and on load. Built-in rules
are registered here, one line each; a user's rule with :func:`register_rule` (then usable by
name, in configs too).
"""

from __future__ import annotations

from typing import Any

from msam.core.friendlysam import FriendlySAMRule
from msam.core.gcsam import GCSAMRule
from msam.core.gsam import GSAMRule
from msam.core.momentumsam import MOMENTUM_KEYS, MomentumSAMRule
from msam.core.perturbation import ASAMRule, PerturbationRule, SAMRule
from msam.core.usam import USAMRule
from msam.core.wsam import WSAMRule

__all__ = ["RULES", "check_support", "make_rule", "register_rule"]

RULES: dict[str, type[PerturbationRule]] = {}


def register_rule(name: str, cls: type[PerturbationRule], *, replace: bool = False) -> None:
    """Make ``rule=name`` (and ``optimizer: name`` in configs) build ``cls()``."""
    if not isinstance(name, str) or not name.isidentifier() or name != name.lower():
        raise ValueError(f"register_rule: name must be a lower-case identifier, got {name!r}")
    if not (isinstance(cls, type) and issubclass(cls, PerturbationRule)):
        raise ValueError(f"register_rule: {name!r} must be a msam.PerturbationRule subclass, "
                         f"got {cls!r}")
    if name in RULES and RULES[name] is not cls and not replace:
        raise ValueError(f"register_rule: {name!r} is already registered ({RULES[name].__name__})"
                         "; pass replace=True to replace it")
    RULES[name] = cls


def make_rule(rule: str | PerturbationRule) -> PerturbationRule:
    """A rule instance (default hyperparameters) from its registered name, or the instance."""
    if isinstance(rule, PerturbationRule):
        return rule
    try:
        return RULES[rule]()
    except (KeyError, TypeError):
        raise ValueError(f"rule must be one of {sorted(RULES)}, got {rule!r}") from None


def check_support(rule: PerturbationRule, *, where: str, mode: str = "",
                  optimizer: Any = None, micro_batches: int | None = None,
                  micro_batch_size: int | None = None, strategy: str = "loop") -> None:
    """Raise ``ValueError`` naming the rule, the place and the alternative when ``rule`` cannot
    run at ``where``: ``"fsdp"``, ``"ddp"`` (with ``mode``), ``"two_step"``, ``"gradient"``
    (``msam_gradient``, which only fills ``.grad``), ``"reuse"`` (a LookSAM schedule) or
    ``"optimizer"`` (``MSAM`` built around ``optimizer`` with ``micro_batches`` /
    ``micro_batch_size`` and ``strategy``)."""
    name = rule.name
    if not rule.ascent:
        _check_no_ascent(rule, where, optimizer, micro_batches, micro_batch_size, strategy)
    if where == "fsdp" and (not rule.elementwise or rule.combines):
        ok = sorted(n for n, c in RULES.items() if c.elementwise and not c.combines)
        raise ValueError(
            f"rule: {name!r} is not supported by ShardedMSAM: only rules whose direction and "
            f"norm act element by element are correct shard by shard ({ok}); use "
            "DistributedMSAM for it")
    if where == "ddp" and rule.combines and mode == "synchronized":
        raise ValueError(
            f"rule: {name!r} combines g_j and h_j, which in mode='synchronized' would need the "
            "ranks' mean h before combining (a second all-reduce); use mode='local' (each rank "
            "combines its own micro-batches)")
    if where == "two_step" and rule.combines:
        raise ValueError(
            f"first_step: rule {name!r} combines g_j and h_j, which the two-step API does not "
            "see together; use opt.step(loss_fn, batch)")
    if where == "gradient" and rule.decouples:
        raise ValueError(
            f"rule: {name!r} (decoupled) moves the weights after the base step, which "
            "msam_gradient (it only fills p.grad) cannot do; use msam.MSAM (its accumulate() "
            "and step() work inside trainers) or the coupled form, e.g. "
            "msam.core.WSAMRule(decoupled=False)")
    if where == "reuse" and rule.decouples:
        raise ValueError(
            f"reuse: 'looksam' rebuilds the gradient from p.grad, which rule {name!r} "
            "(decoupled) leaves without the sharpness term; drop reuse or use the coupled form")


def _check_no_ascent(rule: PerturbationRule, where: str, optimizer: Any,
                     micro_batches: int | None, micro_batch_size: int | None,
                     strategy: str) -> None:
    """A rule without an ascent pass (Momentum-SAM): one direction for the whole batch, from
    the base optimizer's momentum; it needs the optimizer and a plain pass."""
    name = rule.name
    if where in ("fsdp", "two_step", "gradient", "reuse"):
        what = {"fsdp": "ShardedMSAM (sharded momentum)", "two_step": "the two-step API",
                "gradient": "msam_gradient (it has no optimizer state)",
                "reuse": "a reuse schedule (there is no ascent gradient to reuse)"}[where]
        raise ValueError(f"rule: {name!r} takes its direction from the base optimizer's "
                         f"momentum, which {what} cannot provide; use msam.MSAM(...)"
                         ".step(loss_fn, batch)" + (" or DistributedMSAM" if where == "fsdp"
                                                    else ""))
    if where != "optimizer":
        return
    if (micro_batches or 1) != 1 or micro_batch_size is not None:
        raise ValueError(f"micro_batches: rule {name!r} perturbs the whole batch along one "
                         "direction (the optimizer's momentum), so micro-batches would all get "
                         "the same e; use micro_batches=1 (or rule='sam' for mSAM)")
    if strategy not in ("loop", "ddp"):  # the loop evaluator, alone or under DDP
        raise ValueError(f"strategy: rule {name!r} runs one pass per step, which only the "
                         f"'loop' strategy schedules; got {strategy!r}")
    groups = getattr(optimizer, "param_groups", [])
    defaults = getattr(optimizer, "defaults", {})
    has_slot = "momentum" in defaults or "betas" in defaults
    no_momentum = [i for i, g in enumerate(groups)
                   if "momentum" in g and not g["momentum"]]
    if not has_slot or no_momentum:
        where_ = (f"param_groups[{no_momentum[0]}] has momentum=0" if no_momentum
                  else f"{type(optimizer).__name__} keeps no momentum ({'/'.join(MOMENTUM_KEYS)})")
        raise ValueError(f"base_optimizer: rule {name!r} perturbs along the base optimizer's "
                         f"momentum, but {where_}; use SGD with momentum > 0 or Adam/AdamW")


# The built-in rules, one line each (docs/variants.md).
register_rule("sam", SAMRule)
register_rule("asam", ASAMRule)
register_rule("usam", USAMRule)
register_rule("gsam", GSAMRule)
register_rule("friendlysam", FriendlySAMRule)
register_rule("wsam", WSAMRule)
register_rule("gcsam", GCSAMRule)
register_rule("momentumsam", MomentumSAMRule)
