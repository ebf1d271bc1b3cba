"""measure()/format_table() and the state-safety guarantees of every msam.analysis function."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from msam.analysis import (
    AVAILABLE_METRICS,
    average_sharpness,
    filter_normalized_direction,
    format_table,
    hessian_trace,
    hvp,
    interpolate,
    loss_slice_1d,
    loss_surface_2d,
    m_sharpness,
    measure,
    spectral_density,
    top_hessian_eigenvalues,
)

DT = torch.float64


class ModeSpy(nn.Module):
    def __init__(self):
        super().__init__()
        self.seen: list[bool] = []

    def forward(self, x):
        self.seen.append(self.training)
        return x


def bn_cnn():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        nn.Dropout(0.3),
        ModeSpy(),
        nn.Flatten(),
        nn.Linear(3 * 6 * 6, 4),
    ).to(DT)
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
    model.train()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10, 1, 6, 6, generator=g, dtype=DT)
    y = torch.randint(0, 4, (10,), generator=g)
    batches = [(x[:6], y[:6]), (x[6:], y[6:])]
    return model, (lambda m, b: F.cross_entropy(m(b[0]), b[1])), batches


CALLS = {
    "hvp": lambda m, f, b: hvp(m, f, b, [torch.ones_like(p) for p in m.parameters()]),
    "lanczos": lambda m, f, b: top_hessian_eigenvalues(m, f, b, k=2, max_iter=10),
    "power": lambda m, f, b: top_hessian_eigenvalues(m, f, b, method="power", max_iter=5),
    "trace": lambda m, f, b: hessian_trace(m, f, b, num_probes=3),
    "slq": lambda m, f, b: spectral_density(m, f, b, num_runs=2, num_steps=4),
    "m_sharpness": lambda m, f, b: m_sharpness(m, f, b, rho=0.5, m=3),
    "m_sharpness_adaptive": lambda m, f, b: m_sharpness(m, f, b, rho=0.5, m=4, adaptive=True),
    "average_sharpness": lambda m, f, b: average_sharpness(m, f, b, rho=0.5, num_samples=3),
    "slice": lambda m, f, b: loss_slice_1d(
        m, f, b, filter_normalized_direction(m), [-1.0, 0.3, 1.0]
    ),
    "surface": lambda m, f, b: loss_surface_2d(
        m,
        f,
        b,
        filter_normalized_direction(m, 1),
        filter_normalized_direction(m, 2),
        [0, 1],
        [0.5],
    ),
    "interpolate": lambda m, f, b: interpolate(
        {k: v * 1.1 if v.is_floating_point() else v for k, v in m.state_dict().items()},
        m.state_dict(),
        m,
        f,
        b,
        num_points=3,
        recompute_bn=True,
    ),
    "measure": lambda m, f, b: measure(
        m,
        f,
        b,
        metrics=AVAILABLE_METRICS,
        m=3,
        k=2,
        max_iter=8,
        num_probes=3,
        num_samples=2,
        slq_runs=1,
        slq_steps=3,
    ),
}


@pytest.mark.parametrize("name", sorted(CALLS))
def test_state_modes_and_grads_untouched(name):
    model, loss_fn, batches = bn_cnn()
    model[3].train(False)  # a mixed-mode model must come back mixed
    flags = [m.training for m in model.modules()]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    CALLS[name](model, loss_fn, batches)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # bit-identical parameters and buffers
    assert [m.training for m in model.modules()] == flags
    assert all(p.grad is None for p in model.parameters())
    spy = model[4].seen
    assert spy and not any(spy), "measurement must run in eval mode"


def test_measure_is_json_serialisable_and_consistent():
    model, loss_fn, batches = bn_cnn()
    res = measure(
        model,
        loss_fn,
        batches,
        metrics=AVAILABLE_METRICS,
        rho=0.05,
        m=2,
        seed=3,
        k=3,
        max_iter=60,
        tol=1e-8,
        num_probes=20,
        num_samples=5,
        slq_runs=2,
        slq_steps=10,
    )
    text = json.dumps(res)
    assert json.loads(text) == res
    assert set(res["timings_s"]) == set(AVAILABLE_METRICS)
    assert all(isinstance(t, float) and t >= 0 for t in res["timings_s"].values())
    direct = top_hessian_eigenvalues(model, loss_fn, batches, k=1, max_iter=60, tol=1e-8, seed=3)
    assert res["lambda_max"] == pytest.approx(direct.eigenvalues[0], rel=1e-10)
    assert res["top_eigenvalues"][0] == pytest.approx(res["lambda_max"], rel=1e-6)
    tr = hessian_trace(model, loss_fn, batches, num_probes=20, seed=3)
    assert res["trace"] == pytest.approx(tr.mean, rel=1e-12)
    assert res["trace_se"] == pytest.approx(tr.std_error, rel=1e-12)
    ms = m_sharpness(model, loss_fn, batches, rho=0.05, m=2, seed=3)
    assert res["m_sharpness"] == pytest.approx(ms.value, rel=1e-12)
    assert res["config"]["m"] == 2 and res["config"]["num_examples"] == 10
    assert res["details"]["m_sharpness"]["num_micro_batches"] == 5
    assert "per_micro_batch" not in res["details"]["m_sharpness"]
    assert np.isfinite(res["loss"]) and res["grad_norm"] > 0


def test_measure_defaults_and_errors():
    model, loss_fn, batches = bn_cnn()
    res = measure(model, loss_fn, batches, max_iter=20, num_probes=4)
    assert list(res["timings_s"]) == ["lambda_max", "trace", "m_sharpness"]
    assert res["config"]["m"] == 6  # default: the first batch's size
    with pytest.raises(ValueError, match="unknown metric"):
        measure(model, loss_fn, batches, metrics=("lambda_min",))


def test_format_table():
    model, loss_fn, batches = bn_cnn()
    res = measure(
        model,
        loss_fn,
        batches,
        metrics=("loss", "lambda_max", "trace", "m_sharpness"),
        m=5,
        max_iter=20,
        num_probes=4,
        include_samples=True,
    )
    md = format_table(res)
    lines = md.splitlines()
    assert lines[0].startswith("| metric | value")
    assert len(lines) == 2 + 4
    for name in ("loss", "lambda_max", "trace", "m_sharpness"):
        assert any(line.startswith(f"| {name} |") for line in lines)
    assert "Hutchinson, 4 probes" in md and "m=5" in md
    plain = format_table(res, markdown=False)
    assert "|" not in plain and plain.splitlines()[0].startswith("metric")
    assert len(res["details"]["trace"]["samples"]) == 4


def test_measure_takes_the_optimizers_loss_fn_form():
    """Issue 25 case 12: ``loss_fn(batch)``, as msam.MSAM takes it, gives the same numbers as
    ``loss_fn(model, batch)``; ``micro_batches`` is a count, as for the optimizer."""
    model, loss_fn, batches = bn_cnn()
    one_arg = lambda b: F.cross_entropy(model(b[0]), b[1])  # noqa: E731
    kw = dict(metrics=("loss", "lambda_max", "m_sharpness"), max_iter=20, seed=1)
    two = measure(model, loss_fn, batches, m=2, **kw)
    one = measure(model, one_arg, batches, micro_batches=3, **kw)  # 6 examples / 3 = size 2
    for key in ("loss", "lambda_max", "m_sharpness"):
        assert one[key] == pytest.approx(two[key], rel=1e-12), key
    assert one["config"]["m"] == 2
    with pytest.raises(ValueError, match="not both"):
        measure(model, loss_fn, batches, m=2, micro_batches=3)
    with pytest.raises(ValueError, match="must divide"):
        measure(model, loss_fn, batches, micro_batches=4)
