"""benchmarks/gpu.sh, the GPU check, in its CPU dry run: the same script and checks, tiny."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_script_dry_run_writes_its_report(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), "--dry-run"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = Path(proc.stdout.strip().splitlines()[-1])
    text = report.read_text()
    for section in ("## Equivalence", "## Host syncs per step", "## Mixed precision",
                    "## msam bench"):
        assert section in text, section
    # every strategy matches float64 to float32 rounding, and the AMP checks hold
    rows = [ln for ln in text.splitlines() if ln.startswith("| ") and "e-" in ln]
    assert len(rows) >= 5 and all(float(ln.split("|")[2]) < 1e-5 for ln in rows[:5]), rows
    assert text.count("| True |") == 3, text
