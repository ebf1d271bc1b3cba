"""The perturbation rules by name, and the one place that decides where a rule runs.

A rule describes itself with class attributes (:class:`msam.core.PerturbationRule`):

==============  ==========================================================================
``elementwise``  ``direction`` and ``norm_terms`` act element by element (or row by row), so
                 a rank holding a shard of each parameter can apply the rule (FSDP)
``combines``     the rule combines ``g_j`` and ``h_j`` (``combine``), e.g. GSAM
``decouples``    part of the update bypasses the base optimizer (``combine_decoupled``), WSAM
``observes``     the rule keeps statistics of the clean gradient across steps (``update``)
==============  ==========================================================================

:func:`check_support` reads them, for every place that runs a rule (a strategy, DDP, FSDP, the
two-step API, ``msam_gradient``, a reuse schedule), at construction and on load. Built-in rules
are registered here, one line each; a user's rule with :func:`register_rule` (then usable by
name, in configs too).
"""

from __future__ import annotations

from msam.core.friendlysam import FriendlySAMRule
from msam.core.gcsam import GCSAMRule
from msam.core.gsam import GSAMRule
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


def check_support(rule: PerturbationRule, *, where: str, mode: str = "") -> None:
    """Raise ``ValueError`` naming the rule, the place and the alternative when ``rule`` cannot
    run at ``where``: ``"fsdp"``, ``"ddp"`` (with ``mode``), ``"two_step"``, ``"gradient"``
    (``msam_gradient``, which only fills ``.grad``) or ``"reuse"`` (a LookSAM schedule)."""
    name = rule.name
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


# The built-in rules, one line each (docs/variants.md).
register_rule("sam", SAMRule)
register_rule("asam", ASAMRule)
register_rule("usam", USAMRule)
register_rule("gsam", GSAMRule)
register_rule("friendlysam", FriendlySAMRule)
register_rule("wsam", WSAMRule)
register_rule("gcsam", GCSAMRule)
