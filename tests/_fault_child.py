"""Child process of tests/training/test_faults_runs.py: train (or run a study) with a fault
injected.

    python _fault_child.py train CONFIG_JSON POINT N
    python _fault_child.py study STUDY_YAML SLEEP_S

``POINT`` names where the process SIGKILLs itself, on the ``N``-th time it gets there:

* ``step``: at the start of an optimizer step (mid-epoch);
* ``replace:NAME``: with ``NAME``'s temp file complete, just before it is moved into place;
* ``torn``: halfway through writing ``last.pt``'s temp file;
* ``manifest:pending``: right after checksums.json lists a new last.pt as pending;
* ``manifest:commit``: right before checksums.json records a new last.pt as written;
* ``link``: after the previous checkpoint became prev.pt, before last.pt is replaced;
* ``sleep``: never; each optimizer step sleeps ``N`` milliseconds (a slow, live writer).

Faults are injected by wrapping library functions from outside, so the library carries no
test hooks.
"""

from __future__ import annotations

import io
import json
import os
import signal
import sys
import time
from pathlib import Path

import msam
from msam.training import TrainConfig, load_study_config, rundir, train
from msam.training.study import run_study

calls = {"n": 0}


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def hit(nth: int) -> bool:
    calls["n"] += 1
    return calls["n"] == nth


def inject(point: str, nth: int) -> None:
    if point.startswith("replace:"):
        name = point.split(":", 1)[1]
        real_replace = os.replace

        def replace(src, dst):
            if Path(dst).name == name and hit(nth):
                die()
            return real_replace(src, dst)

        os.replace = replace
    elif point == "torn":
        real_write = rundir.atomic_write

        def atomic_write(path, write):
            if Path(path).name == "last.pt" and hit(nth):
                def half(f):
                    buf = io.BytesIO()
                    write(buf)
                    data = buf.getvalue()
                    f.write(data[: len(data) // 2])
                    f.flush()
                    os.fsync(f.fileno())
                    die()
                return real_write(path, half)
            return real_write(path, write)

        rundir.atomic_write = atomic_write
    elif point.startswith("manifest:"):
        real_save = rundir.RunFiles._save
        phase = point.split(":", 1)[1]

        def save(self, manifest):
            pending = manifest.get("pending", {})
            if phase == "pending":
                real_save(self, manifest)
                if "last.pt" in pending and hit(nth):
                    die()
            else:
                if not pending and "last.pt" in manifest["files"] and hit(nth):
                    die()
                real_save(self, manifest)

        rundir.RunFiles._save = save
    elif point == "link":
        real_keep = rundir.RunFiles._keep_copy

        def keep(self, src, dst):
            real_keep(self, src, dst)
            if hit(nth):
                die()

        rundir.RunFiles._keep_copy = keep
    elif point in ("step", "sleep"):
        real_step = msam.MSAM.step

        def step(self, *args, **kwargs):
            if point == "sleep":
                time.sleep(nth / 1000)
            elif hit(nth):
                die()
            return real_step(self, *args, **kwargs)

        msam.MSAM.step = step
    else:
        raise SystemExit(f"unknown fault point {point!r}")


def main() -> None:
    mode = sys.argv[1]
    if mode == "train":
        cfg = TrainConfig(**json.loads(sys.argv[2]))
        inject(sys.argv[3], int(sys.argv[4]))
        train(cfg, quiet=True, resume=True)
    else:
        inject("sleep", int(float(sys.argv[3]) * 1000))
        run_study(load_study_config(sys.argv[2]), quiet=False)


if __name__ == "__main__":
    main()
