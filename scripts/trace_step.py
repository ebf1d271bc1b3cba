"""Count what a reviewer reads in one ``MSAM.step``: distinct lines, files and the depth of e_j.

    python scripts/trace_step.py            # loop strategy, SGD, m = 4, 2-layer MLP, no BatchNorm

``sys.settrace`` over a warm second step; counted are the distinct (file, line) pairs executed
inside the ``msam`` package, the files they are in, and the call depth (comprehension and
generator-expression frames not counted) of the frame that calls the rule's ``direction``,
``MSAM.step`` being depth 0.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

import msam

PKG = str(Path(msam.__file__).resolve().parent)
_HIDDEN = ("<listcomp>", "<dictcomp>", "<setcomp>", "<genexpr>", "<lambda>")


def main() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(20, 32), torch.nn.ReLU(), torch.nn.Linear(32, 5))
    opt = msam.MSAM(model.parameters(), torch.optim.SGD, rho=0.05, micro_batches=4, lr=0.1,
                    momentum=0.9)
    x, y = torch.randn(64, 20), torch.randint(0, 5, (64,))

    def loss_fn(batch):
        xb, yb = batch
        return torch.nn.functional.cross_entropy(model(xb), yb)

    opt.step(loss_fn, (x, y))  # warm-up
    lines: set[tuple[str, int]] = set()
    e_depth: list[int] = []

    def depth(frame) -> int:
        """msam frames (comprehensions not counted) from ``frame`` up to ``MSAM.step``."""
        d = 0
        while frame is not None and not (frame.f_code.co_name == "step"
                                         and frame.f_code.co_filename.startswith(PKG)):
            if frame.f_code.co_filename.startswith(PKG) and frame.f_code.co_name not in _HIDDEN:
                d += 1
            frame = frame.f_back
        return d

    def tracer(frame, event, arg):
        if event != "call" or not frame.f_code.co_filename.startswith(PKG):
            return None
        if frame.f_code.co_name == "direction":
            e_depth.append(depth(frame.f_back))

        def local(frame, event, arg):
            if event == "line":
                lines.add((frame.f_code.co_filename, frame.f_lineno))
            return local
        return local

    sys.settrace(tracer)
    try:
        opt.step(loss_fn, (x, y))
    finally:
        sys.settrace(None)
    files = sorted({f for f, _ in lines})
    print(f"distinct lines: {len(lines)}")
    print(f"files: {len(files)}")
    for f in files:
        print(f"  {Path(f).relative_to(PKG)}: {sum(1 for g, _ in lines if g == f)} lines")
    if "--show" in sys.argv:
        import linecache
        for f, n in sorted(lines):
            print(f"{Path(f).relative_to(PKG)}:{n}: {linecache.getline(f, n).rstrip()}")
    deepest = max(e_depth) if e_depth else None
    print(f"depth of the frame that calls direction (step = 0): {deepest}")


if __name__ == "__main__":
    main()
