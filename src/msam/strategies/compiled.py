"""``torch.compile`` and the strategies: which ones run the compiled graphs.

``loop`` calls ``loss_fn`` one micro-batch at a time, as a training loop does: a compiled
model keeps a bounded number of graphs (one per grad mode / BatchNorm mode). The others cannot
use the graphs:

* ``batched`` and ``lowrank`` run the model under a :class:`torch.overrides.TorchFunctionMode`
  (:mod:`msam.strategies.grouped`). Dynamo traces into the mode and guards on its per-pass
  state (grad mode, which leaves require grad, the mode object's arguments), so it recompiled
  the model every pass until ``torch._dynamo.config.recompile_limit`` (8) and then ran it
  uncompiled for the rest of the run -- ``loop`` included, under ``auto`` -- without a word.
* ``vmap`` calls the model inside ``torch.func.vmap(grad(...))`` from eager code, which dynamo
  does not compile (it ran eagerly already).

So their passes run the model with compilation off (:func:`eager`: the public
``torch.compiler.set_stance("force_eager")``), which leaves the graphs of the compiled model
intact for every other call, and they say so once per model with a
:class:`NotCompiledWarning` that names the alternative (``strategy="loop"``).
"""

from __future__ import annotations

import contextlib
import sys
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

__all__ = ["NotCompiledWarning", "eager", "is_compiled", "quiet_not_compiled", "warn_not_compiled"]


_DYNAMO = "torch._dynamo"  # imported by torch.compile / nn.Module.compile


class NotCompiledWarning(UserWarning):
    """A strategy runs a compiled model (``torch.compile``) eagerly."""


def is_compiled(model: nn.Module | None) -> bool:
    """Whether ``model`` or one of its submodules is compiled: ``torch.compile(module)``,
    ``module.compile()``, or ``module.forward = torch.compile(module.forward)``.

    PyTorch has no public test for this; the private names it relies on are all here:
    ``torch._dynamo.eval_frame.OptimizedModule`` (what ``torch.compile(module)`` returns),
    ``nn.Module._compiled_call_impl`` (set by ``module.compile()``) and the
    ``_torchdynamo_orig_callable`` attribute of a function ``torch.compile`` wrapped."""
    if model is None or _DYNAMO not in sys.modules:  # nothing was ever compiled
        return False
    try:
        from torch._dynamo.eval_frame import OptimizedModule
    except ImportError:  # pragma: no cover - torch without dynamo
        return False
    for mod in model.modules():
        if isinstance(mod, OptimizedModule):
            return True
        if getattr(mod, "_compiled_call_impl", None) is not None:
            return True
        if hasattr(vars(mod).get("forward"), "_torchdynamo_orig_callable"):
            return True
    return False


@contextlib.contextmanager
def eager() -> Iterator[None]:
    """Run ``torch.compile``-d code eagerly inside the block (nothing is compiled, the cached
    graphs stay valid for calls outside it). A no-op while dynamo is tracing (the caller is
    itself being compiled) and before anything was compiled: ``torch.compile`` imports dynamo,
    and importing it here would cost seconds to runs that never compile."""
    if _DYNAMO not in sys.modules or torch.compiler.is_compiling():
        yield
        return
    with torch.compiler.set_stance("force_eager"):
        yield


def warn_not_compiled(owner: Any, name: str, model: nn.Module | None, why: str,
                      key: Any = None) -> None:
    """Warn once per ``owner`` (a strategy object), model and ``key`` that strategy ``name``
    runs a compiled ``model`` eagerly, because ``why``."""
    if model is None:
        return
    seen: dict[Any, bool] = owner.__dict__.setdefault("_not_compiled_seen", {})
    tag = (id(model), key)
    if tag in seen:
        return
    seen[tag] = compiled = is_compiled(model)
    if compiled:
        warnings.warn(f"strategy={name!r} runs the compiled model eagerly ({why}); "
                      f"strategy='loop' runs the compiled graphs", NotCompiledWarning,
                      stacklevel=3)


def quiet_not_compiled(owner: Any, model: nn.Module | None) -> None:
    """Keep ``owner`` from warning about ``model`` (``auto`` speaks for its candidates)."""
    if model is not None:
        owner.__dict__.setdefault("_not_compiled_seen", {})[(id(model), None)] = True
