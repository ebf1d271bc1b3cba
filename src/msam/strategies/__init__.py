"""Execution strategies: how the micro-batch passes are scheduled (same math, same result)."""

from msam.strategies.auto import AutoStrategy
from msam.strategies.base import GradientJob, NonFiniteLossError, Strategy
from msam.strategies.loop import LoopStrategy
from msam.strategies.vmap import VmapStrategy

STRATEGIES = {"loop": LoopStrategy, "vmap": VmapStrategy, "auto": AutoStrategy}


def make_strategy(name: str | Strategy) -> Strategy:
    """A strategy instance from its name (``"loop"``, ``"vmap"``, ``"auto"``) or an instance."""
    if isinstance(name, Strategy):
        return name
    try:
        return STRATEGIES[name]()
    except KeyError:
        raise ValueError(
            f"strategy must be one of {sorted(STRATEGIES)}, got {name!r}"
        ) from None


__all__ = [
    "STRATEGIES", "AutoStrategy", "GradientJob", "LoopStrategy", "NonFiniteLossError",
    "Strategy", "VmapStrategy", "make_strategy",
]
