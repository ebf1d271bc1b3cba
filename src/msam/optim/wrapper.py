"""An optimizer whose ``param_groups`` and ``state`` are those of the optimizer it wraps.

``opt.param_groups`` and ``opt.state`` ARE ``opt.base_optimizer``'s, whoever replaced them:
``opt.base_optimizer.load_state_dict(...)`` and DCP's ``set_optimizer_state_dict`` make new
lists, and an LR scheduler on ``opt`` must still set the lr the base step uses. They are
properties that read and write through ``base_optimizer``; before the base exists (inside
``Optimizer.__init__``) they are held on the instance. Every group carries the wrapper's own
hyperparameters (``group_keys``, e.g. ``rho`` / ``eta``), defaulted from ``defaults``.
"""

from __future__ import annotations

from typing import Any

from torch.optim import Optimizer

from msam.optim.params import check_new_group, validate_group
from msam.optim.state import GROUP_COUNTERS

__all__ = ["WrapperOptimizer"]


class WrapperOptimizer(Optimizer):
    """Base of :class:`msam.MSAM`: the param-group plumbing of a wrapping optimizer."""

    #: The wrapper's own per-group hyperparameters (defaulted from ``defaults``).
    group_keys: tuple[str, ...] = ("rho", "eta")
    #: Keys a saved state writes into its param groups that the base optimizer must not keep.
    saved_group_keys: tuple[str, ...] = GROUP_COUNTERS

    def _base(self) -> Any:
        return getattr(self, "base_optimizer", None)  # a wrapper may forward it (Lightning)

    @property  # type: ignore[override]
    def param_groups(self) -> list[dict[str, Any]]:
        base = self._base()
        return self.__dict__["_early_param_groups"] if base is None else base.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        base = self._base()
        if base is None:
            self.__dict__["_early_param_groups"] = value
        else:
            base.param_groups = value

    @property  # type: ignore[override]
    def state(self) -> Any:
        base = self._base()
        return self.__dict__["_early_state"] if base is None else base.state

    @state.setter
    def state(self, value: Any) -> None:
        base = self._base()
        if base is None:
            self.__dict__["_early_state"] = value
        else:
            base.state = value

    def _link(self) -> None:
        """Give every param group the wrapper's keys (groups replaced by a base-optimizer load
        may lack them) and drop saved counters from them; drop what ``Optimizer.__init__`` held
        before the base existed."""
        self.__dict__.pop("_early_param_groups", None)
        self.__dict__.pop("_early_state", None)
        for group in self.param_groups:
            for k in self.group_keys:
                group.setdefault(k, self.defaults[k])
            for k in self.saved_group_keys:   # a wrapper's state loaded into the base
                group.pop(k, None)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        base = self._base()
        check_new_group(param_group, len(self.param_groups))
        if base is None:  # during Optimizer.__init__
            return super().add_param_group(param_group)
        validate_group(param_group, "add_param_group")
        for k in self.group_keys:
            param_group.setdefault(k, self.defaults[k])
        base.add_param_group(param_group)
        self._link()
