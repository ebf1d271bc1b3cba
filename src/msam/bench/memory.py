"""Peak memory of one optimizer step, the same quantity on CPU and CUDA.

Definition (reported as ``peak_bytes``)::

    peak_bytes = state_bytes + step_peak_bytes

* ``state_bytes``: the tensors that exist before the step and belong to this method: parameters,
  buffers and ``.grad`` of the model, the method's optimizer state (momentum buffers) and the
  batch (each storage counted once).
* ``step_peak_bytes``: the highest value, during the step, of (bytes allocated by PyTorch's
  allocator since the step began) minus (bytes freed since then). It covers every tensor the
  step creates -- activations saved for backward, gradients, the weight backup, the
  perturbation, temporaries inside kernels -- at the instant the sum of them is largest.

On CUDA ``step_peak_bytes`` is ``torch.cuda.max_memory_allocated() - memory_allocated()`` around
the step. On CPU PyTorch keeps no peak counter, so the step runs under
``torch.profiler.profile(profile_memory=True)``: the profiler then receives every allocation and
free of the CPU allocator together with the allocator's running total
(``total_allocated``), and the peak is the largest running total during the step minus the
total at its start. The step before the measured one also runs under the profiler, so that the
gradients it leaves behind (freed during the measured step) have known sizes. This is the CPU
analogue of ``max_memory_allocated``: tensor bytes only, not the Python heap, not
allocator/OS overhead (RSS), not oneDNN scratch memory allocated outside PyTorch's allocator.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn

__all__ = ["MEMORY_METHOD", "StepMemory", "measure_step_memory", "tensor_bytes"]

MEMORY_METHOD = (
    "peak_bytes = state_bytes (parameters, buffers, .grad, optimizer state, batch) + the "
    "largest increase of live allocator bytes during the step (CPU: torch.profiler "
    "profile_memory=True allocation events and their running total; CUDA: "
    "torch.cuda.max_memory_allocated)"
)


class StepMemory(dict):
    """``{"peak_bytes", "state_bytes", "step_peak_bytes"}`` (a dict, for JSON)."""


def tensor_bytes(tensors: Iterable[torch.Tensor | None]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views and aliases counted once)."""
    seen: set[tuple[str, int]] = set()
    total = 0
    for t in tensors:
        if t is None or not isinstance(t, torch.Tensor):
            continue
        st = t.untyped_storage()
        key = (str(t.device), st.data_ptr())
        if key in seen or st.nbytes() == 0:
            continue
        seen.add(key)
        total += st.nbytes()
    return total


def _batch_tensors(batch: Any) -> list[torch.Tensor]:
    from msam.core.batch import tensor_leaves

    return [t for _, t in tensor_leaves(batch)]


def _state_tensors(model: nn.Module, extra: Iterable[torch.Tensor], batch: Any
                   ) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    for p in model.parameters():
        out.append(p)
        if p.grad is not None:
            out.append(p.grad)
    out.extend(model.buffers())
    out.extend(extra)
    out.extend(_batch_tensors(batch))
    return out


def _walk(events):
    stack = list(events)
    while stack:
        e = stack.pop()
        yield e
        stack.extend(e.children)


@contextlib.contextmanager
def _without_profiler_chatter() -> Iterator[None]:
    """Drop the ``USDT: ... profiler_start`` / ``profiler_stop`` lines that torch's native
    profiler writes straight to file descriptor 2 (two per profiled step); any other output
    written there meanwhile is passed on."""
    fd = 2  # the native profiler writes to fd 2 itself, whatever sys.stderr is
    with tempfile.TemporaryFile() as tmp:
        sys.stderr.flush()
        saved = os.dup(fd)
        os.dup2(tmp.fileno(), fd)
        try:
            yield
        finally:
            os.dup2(saved, fd)
            os.close(saved)
            tmp.seek(0)
            kept = [line for line in tmp.read().decode(errors="replace").splitlines(True)
                    if not line.startswith("USDT:")]
            if kept:
                os.write(fd, "".join(kept).encode())


def _cpu_step_peak(step: Callable[[], Any]) -> int:
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with _without_profiler_chatter(), \
            profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    kr = prof.profiler.kineto_results if prof.profiler is not None else None
    if kr is None:  # pragma: no cover - profiler disabled
        raise RuntimeError("torch.profiler returned no results")
    allocs = [e for e in _walk(kr.experimental_event_tree()) if e.tag == _EventType.Allocation
              and e.extra_fields.device.type == "cpu"]
    if not allocs:
        return 0
    allocs.sort(key=lambda e: e.start_time_ns)
    first = allocs[0].extra_fields
    start = first.total_allocated - first.alloc_size
    peak = max(e.extra_fields.total_allocated for e in allocs)
    return max(0, int(peak - start))


def measure_step_memory(
    step: Callable[[], Any],
    model: nn.Module,
    state: Callable[[], Iterable[torch.Tensor]],
    batch: Any,
    device: torch.device,
) -> StepMemory:
    """Run ``step`` twice (the first as warm-up) and measure the second; see the module doc.

    ``state()`` returns the method's own tensors kept across steps (optimizer state).
    """
    import warnings

    if device.type == "cuda":
        step()
        torch.cuda.synchronize(device)
        state_bytes = tensor_bytes(_state_tensors(model, state(), batch))
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize(device)
        step_peak = torch.cuda.max_memory_allocated(device) - before
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _cpu_step_peak(step)  # warm-up under the profiler: its leftovers get known sizes
            state_bytes = tensor_bytes(_state_tensors(model, state(), batch))
            step_peak = _cpu_step_peak(step)
    return StepMemory(peak_bytes=int(state_bytes + step_peak), state_bytes=int(state_bytes),
                      step_peak_bytes=int(step_peak))
