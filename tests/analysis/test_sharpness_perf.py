"""Timing of lambda_max / trace / m-sharpness on a small BatchNorm CNN (slow; opt-in).

Run with ``MSAM_RUN_SLOW=1 pytest -q -s tests/analysis/test_sharpness_perf.py`` or directly as a
script (``python tests/analysis/test_sharpness_perf.py [num_probes] [threads]``), which prints JSON.
Workload: conv-BN-ReLU x2 + linear (50,378 parameters), 2,048 random 1x28x28 examples in
batches of 256, cross-entropy over 10 random labels.
"""

from __future__ import annotations

import json
import sys
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from msam.analysis import hessian_trace, m_sharpness, top_hessian_eigenvalues


def cnn_workload(num_examples: int = 2048, batch: int = 256):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 32, 3, stride=2, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.Conv2d(32, 64, 3, stride=2, padding=1),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(64 * 7 * 7, 10),
    )
    g = torch.Generator().manual_seed(0)
    x = torch.randn(num_examples, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (num_examples,), generator=g)
    batches = [(x[i : i + batch], y[i : i + batch]) for i in range(0, num_examples, batch)]
    return model, (lambda m, b: F.cross_entropy(m(b[0]), b[1])), batches


def _timed(fn):
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w0, time.process_time() - c0


def run(num_probes: int = 100) -> dict:
    model, loss_fn, batches = cnn_workload()
    eig, w_eig, c_eig = _timed(lambda: top_hessian_eigenvalues(model, loss_fn, batches, k=1))
    tr, w_tr, c_tr = _timed(lambda: hessian_trace(model, loss_fn, batches, num_probes=num_probes))
    ms, w_ms, c_ms = _timed(lambda: m_sharpness(model, loss_fn, batches, rho=0.05, m=128))
    return {
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "threads": torch.get_num_threads(),
        "lambda_max": eig.eigenvalues[0],
        "lambda_max_hvps": eig.iterations,
        "lambda_max_converged": eig.converged,
        "lambda_max_wall_s": w_eig,
        "lambda_max_cpu_s": c_eig,
        "trace": tr.mean,
        "trace_se": tr.std_error,
        "trace_probes": num_probes,
        "trace_wall_s": w_tr,
        "trace_cpu_s": c_tr,
        "m_sharpness": ms.value,
        "m_sharpness_wall_s": w_ms,
        "m_sharpness_cpu_s": c_ms,
    }


@pytest.mark.slow
def test_cnn_timing():
    res = run(num_probes=20)
    print(json.dumps(res, indent=1))
    assert res["num_parameters"] == 50_378
    assert res["lambda_max_converged"] and res["lambda_max"] > 0
    assert abs(res["trace"]) < 1e6 and res["m_sharpness"] > 0


if __name__ == "__main__":
    if len(sys.argv) > 2:
        torch.set_num_threads(int(sys.argv[2]))
    print(json.dumps(run(int(sys.argv[1]) if len(sys.argv) > 1 else 100), indent=1))
