"""``torch.optim`` hook behaviour around ``MSAM.step`` (the one place that touches torch.optim's
private module-level hook tables).

* Global step hooks (``torch.optim.optimizer.register_optimizer_step_pre_hook`` /
  ``_post_hook``) fire once per MSAM step, with the MSAM as the optimizer, not again for the
  base optimizer's step inside it.
* ``step()`` with every argument ``None`` that cannot change anything (every group's ``lr`` 0,
  every gradient zero: how ``torch.distributed.checkpoint`` initialises optimizer state) steps
  the base optimizer once to create its state.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import Any

import torch
from torch.optim import optimizer as _torch_optimizer

__all__ = ["is_state_init", "step_entry"]


@contextlib.contextmanager
def _global_step_hooks_held() -> Any:
    """Hold torch.optim's global step hooks back (``register_optimizer_step_pre_hook`` /
    ``_post_hook``) while an MSAM step runs: torch's wrapper of ``MSAM.step`` has called them
    once for this step, and the base optimizer's step inside it would call them again. Hooks
    registered meanwhile are kept. (Module-level tables: another thread's optimizer stepping
    at the same moment would not see them either.)"""
    tables: tuple[dict[Any, Any], ...] = (
        _torch_optimizer._global_optimizer_pre_hooks,  # type: ignore[assignment]
        _torch_optimizer._global_optimizer_post_hooks)
    if not any(tables):   # the common case: no global hook registered
        yield
        return
    saved = [dict(t) for t in tables]
    for t in tables:
        t.clear()
    try:
        yield
    finally:
        for t, held in zip(tables, saved):
            added = dict(t)
            t.clear()
            t.update(held)
            t.update(added)


def step_entry(step: Callable[..., Any]) -> Callable[..., Any]:
    """Around ``MSAM.step`` (torch.optim wraps this once more with its hooks):

    * global step hooks fire once per MSAM step (not again for the inner base step);
    * ``step()`` / ``step(closure=None)`` (every argument None; subclasses pass theirs on)
      that cannot change anything -- every group's ``lr``
      is 0 and every gradient is zero, which is how ``torch.distributed.checkpoint``
      initialises an optimizer's state (``_init_optim_state``) -- steps the base optimizer
      once to create its state (momentum buffers, Adam moments) instead of raising; msam's
      counters do not move. Any other ``step()`` without ``loss_fn`` is refused as before.
    """
    @functools.wraps(step)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        with _global_step_hooks_held():
            if all(a is None for a in (*args, *kwargs.values())) and is_state_init(self):
                self.base_optimizer.step()
                return None
            return step(self, *args, **kwargs)

    return wrapper


def _is_zero(x: Any) -> bool:
    return (not isinstance(x, bool) and isinstance(x, (int, float)) and x == 0) or (
        isinstance(x, torch.Tensor) and x.numel() == 1 and bool(x == 0))


def is_state_init(opt: Any) -> bool:
    """A ``step()`` that cannot change anything: nothing accumulated, every group's ``lr``
    0 and every gradient zero (how DCP initialises optimizer state; see ``step_entry``)."""
    return (not opt.pending and opt._two_step is None
            and all("lr" in g and _is_zero(g["lr"]) for g in opt.param_groups)
            and all(p.grad is not None and p.grad.layout == torch.strided
                    and not bool(p.grad.any()) for p in opt._params()))
