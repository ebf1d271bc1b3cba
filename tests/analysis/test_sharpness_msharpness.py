"""m-sharpness and average sharpness of msam.analysis against closed forms and an
independent trust-region solver (float64)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from msam.analysis import average_sharpness, m_sharpness, split_batch

DT = torch.float64
A2 = np.array([[3.0, 1.2], [1.2, 1.0]])  # SPD, non-diagonal


class CenteredQuadratic(nn.Module):
    """Micro-batch loss L_j(w) = mean_{i in j} 0.5 (w - c_i)^T A (w - c_i); batch = rows c_i."""

    def __init__(self, a: np.ndarray, w0):
        super().__init__()
        self.w = nn.Parameter(torch.as_tensor(w0, dtype=DT).clone())
        self.register_buffer("a", torch.as_tensor(a, dtype=DT))


def cq_loss(model: CenteredQuadratic, c: torch.Tensor) -> torch.Tensor:
    d = model.w[None, :] - c
    return 0.5 * torch.einsum("ni,ij,nj->n", d, model.a, d).mean()


def max_on_ball(g: np.ndarray, a: np.ndarray, rho: float) -> float:
    """max_{||e|| <= rho} g^T e + 0.5 e^T A e via the trust-region secular equation.

    For mu > lambda_max(A), e(mu) = (mu I - A)^{-1} g has decreasing norm; the global maximiser
    is e(mu*) with ||e(mu*)|| = rho (Gay 1981; More & Sorensen 1983), found by bisection.
    """
    lam = np.linalg.eigvalsh(a)
    top = lam[-1]
    gn = np.linalg.norm(g)
    lo, hi = top + 1e-15 * max(1.0, abs(top)), top + gn / rho + 1.0
    eye = np.eye(len(g))
    for _ in range(300):
        mid = 0.5 * (lo + hi)
        if np.linalg.norm(np.linalg.solve(mid * eye - a, g)) > rho:
            lo = mid
        else:
            hi = mid
    e = np.linalg.solve(hi * eye - a, g)
    return float(g @ e + 0.5 * e @ a @ e)


def max_on_circle_grid(g: np.ndarray, a: np.ndarray, rho: float) -> float:
    """Independent 2-D check: dense angle grid on the circle ||e|| = rho, then local refine."""
    t = np.linspace(0.0, 2 * np.pi, 400_001)
    e = rho * np.stack([np.cos(t), np.sin(t)], 1)
    vals = e @ g + 0.5 * np.einsum("ni,ij,nj->n", e, a, e)
    i = int(np.argmax(vals))
    tt = np.linspace(t[i] - 2e-5, t[i] + 2e-5, 20_001)
    e = rho * np.stack([np.cos(tt), np.sin(tt)], 1)
    return float(np.max(e @ g + 0.5 * np.einsum("ni,ij,nj->n", e, a, e)))


def micro_gradients(w, c: np.ndarray, m: int) -> list[tuple[np.ndarray, int]]:
    out = []
    for i in range(0, len(c), m):
        cj = c[i : i + m]
        out.append((A2 @ (np.asarray(w) - cj.mean(0)), len(cj)))
    return out


W0 = [0.3, -0.2]
C = np.random.default_rng(0).normal(size=(10, 2))


def test_reference_solvers_agree():
    for g in (np.array([1.0, 0.5]), np.array([-0.2, 2.0])):
        for rho in (0.01, 0.3, 2.0):
            assert max_on_ball(g, A2, rho) == pytest.approx(
                max_on_circle_grid(g, A2, rho), rel=1e-10
            )


@pytest.mark.parametrize("rho", [0.01, 0.1, 0.5])
def test_m_sharpness_matches_exact_maximum(rho):
    model = CenteredQuadratic(A2, W0)
    m = 3  # micro-batches of 3, 3, 3, 1
    res = m_sharpness(model, cq_loss, [torch.as_tensor(C, dtype=DT)], rho=rho, m=m, ascent_steps=60)
    parts = micro_gradients(W0, C, m)
    exact = [max_on_ball(g, A2, rho) for g, _ in parts]
    np.testing.assert_allclose(res.per_micro_batch, exact, rtol=1e-9, atol=1e-13)
    sizes = [n for _, n in parts]
    assert res.micro_batch_sizes == sizes == [3, 3, 3, 1]
    assert res.value == pytest.approx(np.dot(sizes, exact) / sum(sizes), rel=1e-9)


def test_default_estimator_small_rho_closed_form():
    # for small rho: max ~= rho ||g|| + 0.5 rho^2 g^T A g / ||g||^2 + O(rho^3)
    rho = 1e-3
    model = CenteredQuadratic(A2, W0)
    res = m_sharpness(model, cq_loss, [torch.as_tensor(C, dtype=DT)], rho=rho, m=5)
    for val, (g, _) in zip(res.per_micro_batch, micro_gradients(W0, C, 5)):
        gn = np.linalg.norm(g)
        approx = rho * gn + 0.5 * rho**2 * (g @ A2 @ g) / gn**2
        assert val == pytest.approx(approx, abs=10 * rho**3 * np.linalg.norm(A2, 2) ** 2 / gn)
        # with the default 5 ascent steps the estimate is already essentially exact
        assert val == pytest.approx(max_on_ball(g, A2, rho), rel=1e-8)
        assert val <= max_on_ball(g, A2, rho) + 1e-15  # a feasible point: lower bound


def test_zero_ascent_steps_is_the_sam_step():
    rho = 0.2
    model = CenteredQuadratic(A2, W0)
    res = m_sharpness(model, cq_loss, [torch.as_tensor(C, dtype=DT)], rho=rho, m=4, ascent_steps=0)
    for val, (g, _) in zip(res.per_micro_batch, micro_gradients(W0, C, 4)):
        e = rho * g / np.linalg.norm(g)
        assert val == pytest.approx(g @ e + 0.5 * e @ A2 @ e, rel=1e-12)


def test_adaptive_matches_rescaled_problem():
    # ASAM ball ||e / T|| <= rho with T = |w| + eta: substitute e = T u
    rho, eta = 0.3, 0.01
    model = CenteredQuadratic(A2, W0)
    res = m_sharpness(
        model,
        cq_loss,
        [torch.as_tensor(C, dtype=DT)],
        rho=rho,
        m=5,
        adaptive=True,
        ascent_steps=80,
        eta=eta,
    )
    t = np.abs(np.asarray(W0)) + eta
    for val, (g, _) in zip(res.per_micro_batch, micro_gradients(W0, C, 5)):
        exact = max_on_ball(t * g, np.diag(t) @ A2 @ np.diag(t), rho)
        assert val == pytest.approx(exact, rel=1e-8)


def test_smaller_m_is_sharper():
    # S(g) = max_e g^T e + 0.5 e^T A e is convex in g, so averaging over micro-batches
    # (m small) gives at least the full-batch value (Jensen)
    data = [torch.as_tensor(C, dtype=DT)]
    model = CenteredQuadratic(A2, W0)
    vals = [
        m_sharpness(model, cq_loss, data, rho=0.1, m=m, ascent_steps=20).value
        for m in (1, 2, 5, 10)
    ]
    assert all(a >= b - 1e-12 for a, b in zip(vals, vals[1:]))
    assert vals[0] > vals[-1]


def test_micro_batches_do_not_straddle_batches():
    model = CenteredQuadratic(A2, W0)
    ct = torch.as_tensor(C, dtype=DT)
    res = m_sharpness(model, cq_loss, [ct[:7], ct[7:]], rho=0.1, m=4, ascent_steps=30)
    assert res.micro_batch_sizes == [4, 3, 3]
    exact = [
        max_on_ball(A2 @ (np.asarray(W0) - C[i:j].mean(0)), A2, 0.1)
        for i, j in ((0, 4), (4, 7), (7, 10))
    ]
    np.testing.assert_allclose(res.per_micro_batch, exact, rtol=1e-9)
    assert res.value == pytest.approx(np.dot([4, 3, 3], exact) / 10, rel=1e-9)


def test_zero_gradient_uses_random_direction_and_finds_top_curvature():
    # at the minimiser the gradient vanishes; the maximum is 0.5 rho^2 lambda_max(A)
    c = np.array([[0.3, -0.2]])
    model = CenteredQuadratic(A2, c[0])
    rho = 0.1
    res = m_sharpness(model, cq_loss, [torch.as_tensor(c, dtype=DT)], rho=rho, m=1, ascent_steps=60)
    assert res.value == pytest.approx(0.5 * rho**2 * np.linalg.eigvalsh(A2)[-1], rel=1e-8)


def test_weights_restored_exactly_float32():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 1))
    x, y = torch.randn(32, 5), torch.randn(32, 1)
    loss_fn = lambda mdl, b: ((mdl(b[0]) - b[1]) ** 2).mean()
    before = [p.detach().clone() for p in model.parameters()]
    m_sharpness(model, loss_fn, [(x, y)], rho=0.37, m=8, adaptive=True)
    average_sharpness(model, loss_fn, [(x, y)], rho=0.37, num_samples=3)
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p, q)


def test_average_sharpness_quadratic_closed_form():
    # E_{e uniform on rho S^{n-1}} [g^T e + 0.5 e^T A e] = 0.5 rho^2 tr(A) / n
    rng = np.random.default_rng(1)
    q = np.linalg.qr(rng.normal(size=(6, 6)))[0]
    a = q @ np.diag([5.0, 2.0, 1.0, 0.5, 0.1, 3.0]) @ q.T
    w0 = rng.normal(size=6)
    model = CenteredQuadratic(a, w0)
    data = [torch.zeros(3, 6, dtype=DT)]
    rho = 0.5
    expected = 0.5 * rho**2 * np.trace(a) / 6
    plain = average_sharpness(model, cq_loss, data, rho=rho, num_samples=400, seed=3)
    anti = average_sharpness(
        model, cq_loss, data, rho=rho, num_samples=400, seed=3, antithetic=True
    )
    for res in (plain, anti):
        assert abs(res.value - expected) <= 3 * res.std_error
    assert anti.std_error < plain.std_error / 3  # the linear term cancels in pairs
    assert plain.base_loss == pytest.approx(0.5 * w0 @ a @ w0, rel=1e-12)


def test_split_batch_structures():
    x, y = torch.arange(10).reshape(10, 1), torch.arange(10)
    parts = split_batch({"x": x, "y": y, "scale": torch.tensor(2.0)}, 4)
    assert [len(p["x"]) for p in parts] == [4, 4, 2]
    assert all(torch.equal(p["scale"], torch.tensor(2.0)) for p in parts)
    parts = split_batch((x, [y, "tag"]), 3)
    assert [len(p[0]) for p in parts] == [3, 3, 3, 1]
    assert torch.equal(parts[-1][1][0], torch.tensor([9])) and parts[0][1][1] == "tag"
    assert math.isclose(sum(len(p[0]) for p in parts), 10)
