"""Execution strategies: evaluators of micro-batch gradients (same math, same result)."""

from msam.core.nonfinite import NonFiniteLossError
from msam.strategies.auto import AutoStrategy
from msam.strategies.base import StepContext, Strategy
from msam.strategies.batched import BatchedFallbackWarning, BatchedStrategy
from msam.strategies.closure import ClosureStrategy
from msam.strategies.compiled import NotCompiledWarning
from msam.strategies.loop import LoopStrategy
from msam.strategies.lowrank import LowRankFallbackWarning, LowRankStrategy
from msam.strategies.vmap import VmapStrategy

STRATEGIES = {"loop": LoopStrategy, "vmap": VmapStrategy, "batched": BatchedStrategy,
              "lowrank": LowRankStrategy, "auto": AutoStrategy}


def make_strategy(name: str | Strategy) -> Strategy:
    """A strategy instance from its name (``"loop"``, ``"vmap"``, ``"batched"``,
    ``"lowrank"``, ``"auto"``) or an instance."""
    if isinstance(name, Strategy):
        return name
    try:
        return STRATEGIES[name]()
    except (KeyError, TypeError):
        raise ValueError(
            f"strategy must be one of {sorted(STRATEGIES)}, got {name!r}"
        ) from None


__all__ = [
    "STRATEGIES", "AutoStrategy", "BatchedFallbackWarning", "BatchedStrategy", "ClosureStrategy",
    "LoopStrategy", "LowRankFallbackWarning", "LowRankStrategy", "NonFiniteLossError",
    "NotCompiledWarning", "StepContext", "Strategy", "VmapStrategy", "make_strategy",
]
