"""Non-finite detection with one host synchronisation per step.

Each pass records whether its loss (and the ascent norm) was finite as a flag **on the device**,
as ``GradScaler``'s ``found_inf`` does; :meth:`NonFiniteFlags.first` reads them all at once
(one sync) before anything is committed, and only on failure looks up which pass it was, so the
error can still name the micro-batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["NonFiniteFlags", "NonFiniteLossError"]


class NonFiniteLossError(FloatingPointError):
    """A loss or gradient was inf/NaN; ``phase`` is ``"ascent"`` or ``"perturbed"``."""

    def __init__(self, phase: str, micro_batch: int, what: str = "loss") -> None:
        self.phase, self.micro_batch, self.what = phase, micro_batch, what
        where = f" of micro-batch {micro_batch}" if micro_batch >= 0 else ""
        super().__init__(
            f"non-finite {what} in the {phase} pass{where}; parameters, BatchNorm buffers and "
            "optimizer state were left as before the step"
        )


class NonFiniteFlags:
    """Device-side record of which checks failed during one step."""

    def __init__(self) -> None:
        self._flags: list[torch.Tensor] = []
        self._what: list[tuple[str, int, str]] = []
        self._exact: list[Sequence[torch.Tensor] | None] = []

    def check(self, value: torch.Tensor, phase: str, micro_batch: int, what: str) -> None:
        """Record whether every element of ``value`` is finite (no host sync)."""
        self._flags.append(torch.isfinite(value.detach()).all())
        self._what.append((phase, micro_batch, what))
        self._exact.append(None)

    def check_all(self, values: Sequence[torch.Tensor], phase: str, micro_batches: Sequence[int],
                  what: str) -> None:
        """:meth:`check` for each of ``values`` (one per micro-batch of ``micro_batches``)."""
        for value, j in zip(values, micro_batches):
            self.check(value, phase, j, what)

    def check_grads(self, grads: Sequence[torch.Tensor | None], phase: str = "perturbed") -> None:
        """Record whether every gradient is finite, from one sum per tensor.

        An inf or NaN element makes its tensor's sum non-finite, so a finite sum proves the
        tensor finite; a sum is several times cheaper on CPU than ``isfinite().all()`` or a
        max-abs. Only when a sum is not finite (a real inf / NaN, or finite values whose sum
        overflowed) does :meth:`first` check those tensors element by element, so the answer
        is exact. Half-precision tensors are summed in float32.
        """
        present = []
        for g in grads:
            if g is None or g.numel() == 0:
                continue
            if g.layout != torch.strided:  # e.g. a sparse embedding gradient
                g = g.coalesce().values() if g.is_sparse else g.to_dense()
            present.append(g)
        if not present:
            return
        device = present[0].device
        sums = [g.sum(dtype=torch.float32) if g.element_size() < 4 else g.sum() for g in present]
        self._flags.append(torch.isfinite(torch.stack([s.to(device) for s in sums])).all())
        self._what.append((phase, -1, "gradient"))
        self._exact.append(present)

    def any_on_device(self, device: torch.device) -> torch.Tensor:
        """A 0-d bool tensor on ``device``: did any check fail (no host sync)? A gradient sum
        that overflowed counts as a failure here; :meth:`first` is exact."""
        if not self._flags:
            return torch.zeros((), dtype=torch.bool, device=device)
        return ~torch.stack([f.to(device) for f in self._flags]).all()

    def first(self) -> tuple[str, int, str] | None:
        """The first failed check ``(phase, micro_batch, what)``, or None: one host sync."""
        if not self._flags:
            return None
        ok = torch.stack([f.to(self._flags[0].device) for f in self._flags])
        if bool(ok.all()):
            return None
        for i in (~ok).nonzero().flatten().tolist():
            exact = self._exact[i]
            if exact is None or not all(bool(torch.isfinite(t).all()) for t in exact):
                return self._what[i]
        return None  # only finite values whose sums overflowed
