"""Loss-landscape tools of msam.analysis: filter normalisation, slices, interpolation, plots."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from msam.analysis import (
    filter_normalized_direction,
    interpolate,
    loss_slice_1d,
    loss_surface_2d,
    plot_interpolation,
    plot_loss_slice,
    plot_loss_surface,
    plot_spectral_density,
    spectral_density,
)

DT = torch.float64


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 6, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(6 * 4 * 4, 3),
    ).to(DT)


def cnn_data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(12, 1, 8, 8, generator=g, dtype=DT)
    y = torch.randint(0, 3, (12,), generator=g)
    return [(x[:8], y[:8]), (x[8:], y[8:])], lambda m, b: F.cross_entropy(m(b[0]), b[1])


class Quadratic(nn.Module):
    def __init__(self, a: np.ndarray, b: np.ndarray, w0: np.ndarray):
        super().__init__()
        self.w = nn.Parameter(torch.as_tensor(w0, dtype=DT).clone())
        self.register_buffer("a", torch.as_tensor(a, dtype=DT))
        self.register_buffer("b", torch.as_tensor(b, dtype=DT))


def quad_loss(model, batch):
    return 0.5 * model.w @ model.a @ model.w + model.b @ model.w


RNG = np.random.default_rng(0)
QA = (lambda m: m @ m.T)(RNG.normal(size=(4, 4)))
QB = RNG.normal(size=4)
QW = RNG.normal(size=4)
QBATCH = [torch.zeros(2, 1, dtype=DT)]


def q_value(w: np.ndarray) -> float:
    return float(0.5 * w @ QA @ w + QB @ w)


# ------------------------------------------------------------------------------------------
def test_filter_normalization_matches_weight_filter_norms():
    model = small_cnn()
    dirs = filter_normalized_direction(model, seed=1)
    params = list(model.parameters())
    assert len(dirs) == len(params)
    for d, p in zip(dirs, params):
        assert d.shape == p.shape and d.dtype == p.dtype
        if p.dim() <= 1:  # biases and BatchNorm affine parameters: zero by default
            assert torch.count_nonzero(d) == 0
        else:
            for di, wi in zip(d, p.detach()):
                assert float(di.norm()) == pytest.approx(float(wi.norm()), rel=1e-12)
            assert not torch.allclose(d, p.detach())  # a random direction, not the weights


def test_filter_normalization_options_and_seeding():
    model = small_cnn()
    full = filter_normalized_direction(model, seed=1, ignore_bias_and_norm=False)
    layer = filter_normalized_direction(model, seed=1, normalization="layer")
    for d, dl, p in zip(full, layer, model.parameters()):
        if p.dim() <= 1:
            assert float(d.norm()) == pytest.approx(float(p.detach().norm()), rel=1e-12)
        else:
            assert float(dl.norm()) == pytest.approx(float(p.detach().norm()), rel=1e-12)
    a = filter_normalized_direction(model, seed=5)
    b = filter_normalized_direction(model, seed=5)
    c = filter_normalized_direction(model, seed=6)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    with pytest.raises(ValueError):
        filter_normalized_direction(model, normalization="bogus")


def test_slice_of_quadratic_is_the_parabola():
    model = Quadratic(QA, QB, QW)
    d = torch.as_tensor(RNG.normal(size=4), dtype=DT)
    alphas = np.linspace(-2, 2, 9)
    res = loss_slice_1d(model, quad_loss, QBATCH, [d], alphas)
    dn = d.numpy()
    g = QA @ QW + QB
    expected = q_value(QW) + alphas * (g @ dn) + 0.5 * alphas**2 * (dn @ QA @ dn)
    np.testing.assert_allclose(res.losses, expected, rtol=1e-12, atol=1e-12)
    assert res.alphas == pytest.approx(list(alphas))
    assert torch.equal(model.w.detach(), torch.as_tensor(QW, dtype=DT))


def test_surface_of_quadratic_is_exact():
    model = Quadratic(QA, QB, QW)
    d1 = torch.as_tensor(RNG.normal(size=4), dtype=DT)
    d2 = torch.as_tensor(RNG.normal(size=4), dtype=DT)
    alphas, betas = [-1.0, 0.0, 0.5], [-0.5, 0.25]
    res = loss_surface_2d(model, quad_loss, QBATCH, d1, d2, alphas, betas)  # flat tensors
    assert np.asarray(res.losses).shape == (3, 2)
    for i, a in enumerate(alphas):
        for j, b in enumerate(betas):
            w = QW + a * d1.numpy() + b * d2.numpy()
            assert res.losses[i][j] == pytest.approx(q_value(w), rel=1e-12)


def test_interpolation_between_states():
    model = Quadratic(QA, QB, QW)
    own = {k: v.clone() for k, v in model.state_dict().items()}
    wa, wb = RNG.normal(size=4), RNG.normal(size=4)
    sa = {"w": torch.as_tensor(wa, dtype=DT), "a": own["a"], "b": own["b"]}
    sb = {"w": torch.as_tensor(wb, dtype=DT), "a": own["a"], "b": own["b"]}
    res = interpolate(sa, sb, model, quad_loss, QBATCH, alphas=[-0.5, 0.0, 0.3, 1.0, 1.5])
    for t, val in zip(res.alphas, res.losses):
        assert val == pytest.approx(q_value((1 - t) * wa + t * wb), rel=1e-12)
    for k, v in model.state_dict().items():
        assert torch.equal(v, own[k])
    assert len(interpolate(sa, sb, model, quad_loss, QBATCH, num_points=7).alphas) == 7


def test_interpolation_with_batchnorm_recompute():
    batches, loss_fn = cnn_data()
    model = small_cnn()
    model.train()
    sa = {k: v.clone() for k, v in model.state_dict().items()}
    other = small_cnn()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.1 * torch.randn_like(p))
    sb = other.state_dict()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plain = interpolate(sa, sb, model, loss_fn, batches, num_points=3)
    rec = interpolate(sa, sb, model, loss_fn, batches, num_points=3, recompute_bn=True)
    assert np.all(np.isfinite(plain.losses)) and np.all(np.isfinite(rec.losses))
    assert rec.losses != plain.losses  # running statistics were re-estimated
    assert model.training and all(m.training for m in model.modules())
    assert model[1].momentum == 0.1
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_plots_are_written_as_png(tmp_path):
    model = small_cnn()
    batches, loss_fn = cnn_data()
    d1 = filter_normalized_direction(model, seed=0)
    d2 = filter_normalized_direction(model, seed=1)
    sl = loss_slice_1d(model, loss_fn, batches, d1, np.linspace(-1, 1, 5))
    surf = loss_surface_2d(model, loss_fn, batches, d1, d2, [-1, 0, 1], [-1, 0, 1])
    state = model.state_dict()
    interp = interpolate(state, state, model, loss_fn, batches, num_points=3)
    dens = spectral_density(model, loss_fn, batches, num_runs=2, num_steps=5, num_points=50)
    paths = [
        plot_loss_slice(sl, tmp_path / "slice.png"),
        plot_loss_slice([sl, sl], tmp_path / "two.png", labels=["a", "b"], log_scale=True),
        plot_loss_surface(surf, tmp_path / "sub" / "surface.png"),
        plot_interpolation(interp, tmp_path / "interp.png"),
        plot_spectral_density(dens, tmp_path / "esd.png"),
    ]
    for p in paths:
        data = p.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
