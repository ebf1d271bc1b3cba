"""The ``auto`` strategy: measure ``loop``, ``vmap``, ``batched`` and ``lowrank`` once, then use
the fastest.

On the first step for a given configuration (parameter shapes and dtypes, micro-batch shapes,
number of micro-batches, device, CPU thread count):

* **No probe** -- ``loop`` is used directly -- when batching cannot help: one micro-batch
  (``m = 1`` is SAM: nothing to vectorise) or no ``model=``.
* Otherwise every candidate computes this step's gradient ``1 + repeats`` times,
  **interleaved** (loop, vmap, batched, loop, ...) so that machine noise hits all alike, without
  committing
  BatchNorm statistics and with the gradients discarded; the first call of each is a warm-up.
  Each candidate's time is the minimum over its timed calls (on CUDA with
  ``torch.cuda.synchronize`` around each call). A candidate that raises (e.g. a model that
  ``vmap`` cannot trace, or runs out of memory) is dropped, and so is ``batched`` when it
  falls back to ``loop`` for the model (it would only measure the loop twice), and
  ``lowrank`` when it falls back to ``batched`` or ``loop`` (its ``reason``).
* The fastest other candidate is chosen only if it is faster than ``loop`` by more than
  ``margin`` (default 10%): ``vmap`` and ``batched`` hold ``m`` copies of the parameters and
  every micro-batch's activations at once (see ``msam bench``), so a tie goes to the strategy
  with the lower memory, and ``auto`` is never slower than ``loop`` beyond the noise of the
  probe.

With a compiled model (``torch.compile``) ``loop`` runs the compiled graphs and the others
run the model eagerly (:mod:`msam.strategies.compiled`), so the probe compares them as they
would run; a choice other than ``loop`` is announced once by a ``NotCompiledWarning``.

The choice belongs to this strategy object (one per optimizer), is kept per configuration for
its lifetime and saved in the optimizer's ``state_dict`` (``choices``), so a resumed run uses
the same code path without probing again. ``choice``, ``reason`` and ``timings`` tell what was
measured.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from msam.strategies.base import StepContext, Strategy
from msam.strategies.batched import BatchedStrategy
from msam.strategies.compiled import quiet_not_compiled, warn_not_compiled
from msam.strategies.grouped import config_key
from msam.strategies.loop import LoopStrategy
from msam.strategies.lowrank import LowRankStrategy
from msam.strategies.vmap import VmapStrategy

__all__ = ["AutoStrategy", "config_key"]


class AutoStrategy(Strategy):
    """Picks ``loop``, ``vmap``, ``batched`` or ``lowrank`` by measuring them once (see the module
    docstring)."""

    name = "auto"

    def __init__(self, repeats: int = 2, margin: float = 0.10) -> None:
        if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
            raise ValueError(f"repeats must be an integer >= 1, got {repeats!r}")
        if not isinstance(margin, (int, float)) or not margin >= 0:
            raise ValueError(f"margin must be >= 0, got {margin!r}")
        self.repeats = repeats
        self.margin = float(margin)
        self.candidates: dict[str, Strategy] = {
            "loop": LoopStrategy(), "vmap": VmapStrategy(),
            "batched": BatchedStrategy(fallback=True),
            "lowrank": LowRankStrategy(fallback=True)}
        self.choices: dict[str, str] = {}
        self.timings: dict[str, float] = {}
        self.choice: str | None = None
        self.reason = ""

    def resolve(self, ctx: StepContext, trial: Callable[[Strategy], float]) -> Strategy:
        if len(ctx.micro_batches) < 2:
            self.choice, self.reason = "loop", "one micro-batch"
        elif ctx.model is None:
            self.choice, self.reason = "loop", "no model"
        else:
            key = config_key(ctx)
            if key in self.choices:
                self.choice = self.choices[key]
            else:
                self.choice = self.choices[key] = self._probe(trial)
            for cand in self.candidates.values():  # one warning, from auto, about its choice
                quiet_not_compiled(cand, ctx.model)
            if self.choice != "loop":
                warn_not_compiled(self, self.name, ctx.model,
                                  f"it chose {self.choice!r}, faster in its probe than the "
                                  f"compiled 'loop'",
                                  key=self.choice)
        return self.candidates[self.choice]

    def _probe(self, trial: Callable[[Strategy], float]) -> str:
        choice = self._measure(trial)
        for name, s in self.candidates.items():  # the losers' kept buffers are not needed
            if name != choice and isinstance(getattr(s, "_buffers", None), dict):
                s._buffers = {}  # type: ignore[attr-defined]
        return choice

    def _measure(self, trial: Callable[[Strategy], float]) -> str:
        import warnings

        timings = {name: float("inf") for name in self.candidates}
        alive = dict(self.candidates)
        for r in range(self.repeats + 1):
            for name in list(alive):
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")  # a batched fallback loses the probe
                        dt = trial(alive[name])
                except Exception:  # noqa: BLE001 - an untraceable model loses the probe
                    del alive[name]
                    timings[name] = float("inf")
                    continue
                if getattr(alive[name], "reason", "") and name in ("batched", "lowrank"):
                    del alive[name]  # it ran another candidate's path: not one itself
                    timings[name] = float("inf")
                    continue
                if r > 0:
                    timings[name] = min(timings[name], dt)
        self.timings = timings
        loop_t = timings["loop"]
        others = {k: v for k, v in timings.items() if k != "loop" and v < float("inf")}
        shown = ", ".join(f"{k} {v:.4g}s" for k, v in timings.items())
        if others:
            best = min(others, key=others.__getitem__)
            if others[best] * (1.0 + self.margin) < loop_t:
                self.reason = f"{best} fastest: {shown}"
                return best
        self.reason = f"loop: {shown} (others must be faster by {self.margin:.0%})"
        return "loop"

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name, "choices": dict(self.choices)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        choices = state.get("choices", {})
        if not isinstance(choices, dict) or not all(
                isinstance(k, str) and v in self.candidates for k, v in choices.items()):
            raise ValueError(f"strategy state: 'choices' must map configurations to "
                             f"{sorted(self.candidates)}, got {choices!r}")
        self.choices = dict(choices)


def timed(run: Callable[[], Any], device: torch.device) -> float:
    """Wall time of ``run()``, with the device synchronised around it (CUDA)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda *a: None)
    sync(device)
    t0 = time.perf_counter()
    run()
    sync(device)
    return time.perf_counter() - t0
