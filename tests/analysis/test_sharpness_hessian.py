"""Hessian-vector products, top eigenvalues, Hutchinson trace and SLQ density of
msam.analysis, checked against independent dense references in float64."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call

from msam.analysis import (
    hessian_trace,
    hvp,
    spectral_density,
    top_hessian_eigenvalues,
)

DT = torch.float64


class Quadratic(nn.Module):
    """L(w) = 0.5 w^T A w + b^T w (the batch is ignored)."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor, w0: torch.Tensor):
        super().__init__()
        self.w = nn.Parameter(w0.clone())
        self.register_buffer("a", a.clone())
        self.register_buffer("b", b.clone())


def quad_loss(model: Quadratic, batch: torch.Tensor) -> torch.Tensor:
    w = model.w
    return 0.5 * w @ model.a @ w + model.b @ w


def random_symmetric(n: int, eigenvalues, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DT))
    return q @ torch.diag(torch.as_tensor(eigenvalues, dtype=DT)) @ q.T


def make_quadratic(a: torch.Tensor, seed: int = 0) -> Quadratic:
    g = torch.Generator().manual_seed(seed + 1)
    n = a.shape[0]
    return Quadratic(
        a, torch.randn(n, generator=g, dtype=DT), torch.randn(n, generator=g, dtype=DT)
    )


BATCHES = [torch.zeros(4, 1, dtype=DT)]


# ------------------------------------------------------------------------------------------
# quadratic: exact answers
# ------------------------------------------------------------------------------------------
EIGS = [9.0, 4.5, 2.0, 1.0, 0.3, -0.7, -3.0, 0.05]


@pytest.mark.parametrize("method", ["lanczos", "power"])
def test_quadratic_top_k_exact(method):
    a = random_symmetric(len(EIGS), EIGS, seed=3)
    model = make_quadratic(a)
    res = top_hessian_eigenvalues(
        model,
        quad_loss,
        BATCHES,
        k=3,
        method=method,
        tol=1e-12,
        max_iter=3000,
        return_eigenvectors=True,
    )
    ref = np.sort(np.linalg.eigvalsh(a.numpy()))[::-1][:3]
    np.testing.assert_allclose(res.eigenvalues, ref, rtol=0, atol=1e-6)
    assert res.converged
    assert res.eigenvalues == sorted(res.eigenvalues, reverse=True)
    assert len(res.residual_norms) == 3
    for lam, vec in zip(res.eigenvalues, res.eigenvectors):
        v = vec[0]
        assert abs(float(v.norm()) - 1.0) < 1e-8
        np.testing.assert_allclose((a @ v).numpy(), (lam * v).numpy(), atol=1e-5)


def test_lanczos_exact_when_space_is_exhausted():
    a = random_symmetric(len(EIGS), EIGS, seed=5)
    res = top_hessian_eigenvalues(make_quadratic(a), quad_loss, BATCHES, k=len(EIGS), tol=1e-14)
    np.testing.assert_allclose(res.eigenvalues, sorted(EIGS, reverse=True), atol=1e-10)
    assert res.converged and res.iterations == len(EIGS)


def test_lanczos_finds_repeated_eigenvalues():
    # single-vector Krylov spaces see each distinct eigenvalue once; the restart on breakdown
    # must recover the multiplicity
    eigs = [5.0, 5.0, 5.0, 1.0, 0.5, 0.5]
    a = random_symmetric(6, eigs, seed=1)
    res = top_hessian_eigenvalues(make_quadratic(a), quad_loss, BATCHES, k=4, tol=1e-12)
    np.testing.assert_allclose(res.eigenvalues, [5.0, 5.0, 5.0, 1.0], atol=1e-9)


@pytest.mark.parametrize("method", ["lanczos", "power"])
def test_largest_algebraic_even_if_negative_dominates(method):
    a = random_symmetric(5, [-10.0, 3.0, 1.0, 0.5, -2.0], seed=2)
    res = top_hessian_eigenvalues(
        make_quadratic(a), quad_loss, BATCHES, k=2, method=method, tol=1e-13, max_iter=5000
    )
    np.testing.assert_allclose(res.eigenvalues, [3.0, 1.0], atol=1e-6)


def test_lanczos_reports_non_convergence():
    eigs = np.linspace(1.0, 1.001, 200)
    a = random_symmetric(200, eigs, seed=0)
    res = top_hessian_eigenvalues(make_quadratic(a), quad_loss, BATCHES, max_iter=3, tol=1e-12)
    assert res.iterations == 3 and not res.converged and res.max_iter == 3


def test_trace_diagonal_is_exact():
    a = torch.diag(torch.tensor([3.0, -1.0, 0.5, 7.0], dtype=DT))
    res = hessian_trace(make_quadratic(a), quad_loss, BATCHES, num_probes=5)
    assert res.samples == [pytest.approx(9.5, abs=1e-12)] * 5
    assert res.std_error == pytest.approx(0.0, abs=1e-12)


def test_trace_within_three_standard_errors():
    a = random_symmetric(10, np.linspace(-1.0, 4.0, 10), seed=7)
    res = hessian_trace(make_quadratic(a), quad_loss, BATCHES, num_probes=400, seed=1)
    exact = float(torch.trace(a))
    assert res.std_error > 0
    assert abs(res.mean - exact) <= 3 * res.std_error
    # the per-probe variance of the Rademacher estimator is 2 * sum_{i != j} A_ij^2
    an = a.numpy()
    var = 2 * (np.sum(an**2) - np.sum(np.diag(an) ** 2))
    assert res.std_error == pytest.approx(math.sqrt(var / 400), rel=0.25)
    # probes_per_pass only changes the schedule, not the result
    other = hessian_trace(
        make_quadratic(a), quad_loss, BATCHES, num_probes=400, seed=1, probes_per_pass=1
    )
    np.testing.assert_allclose(other.samples, res.samples, rtol=1e-12)


def test_slq_density_on_quadratic():
    eigs = [6.0, 3.0, 2.5, 1.0, -1.0, 0.2]
    a = random_symmetric(6, eigs, seed=4)
    dens = spectral_density(
        make_quadratic(a), quad_loss, BATCHES, num_runs=200, num_steps=20, num_points=2000
    )
    for nodes, weights in zip(dens.nodes, dens.weights):
        # Lanczos spans the whole 6-D space: the nodes are the exact eigenvalues
        np.testing.assert_allclose(sorted(nodes), sorted(eigs), atol=1e-8)
        assert sum(weights) == pytest.approx(1.0, abs=1e-10)
    assert np.trapezoid(dens.density, dens.grid) == pytest.approx(1.0, abs=1e-3)
    # E[v^T H v] = tr(H) / n for v uniform on the sphere
    assert dens.trace_estimate() == pytest.approx(sum(eigs), rel=0.1)
    mean_w = np.mean([np.asarray(w)[np.argsort(t)] for t, w in zip(dens.nodes, dens.weights)], 0)
    np.testing.assert_allclose(mean_w, np.full(6, 1 / 6), atol=0.05)


# ------------------------------------------------------------------------------------------
# linear regression with MSE: H = 2 X~^T X~ / N (F.mse_loss is the mean of squares, no 1/2)
# ------------------------------------------------------------------------------------------
def test_linear_regression_mse_hessian():
    g = torch.Generator().manual_seed(0)
    n, d = 57, 5
    x = torch.randn(n, d, generator=g, dtype=DT) * torch.tensor([3.0, 1.0, 0.5, 2.0, 0.1], dtype=DT)
    y = torch.randn(n, 1, generator=g, dtype=DT)
    model = nn.Linear(d, 1).to(DT)
    loss_fn = lambda mdl, b: F.mse_loss(mdl(b[0]), b[1])
    # unequal batch sizes: the example-weighted mean equals the loss over the whole set
    cuts = [0, 10, 13, 40, n]
    batches = [(x[i:j], y[i:j]) for i, j in zip(cuts[:-1], cuts[1:])]
    xt = np.hstack([x.numpy(), np.ones((n, 1))])  # parameters: weight (d), bias (1)
    ref = np.sort(np.linalg.eigvalsh(2.0 * xt.T @ xt / n))[::-1]
    res = top_hessian_eigenvalues(model, loss_fn, batches, k=d + 1, tol=1e-12)
    np.testing.assert_allclose(res.eigenvalues, ref, rtol=1e-9, atol=1e-9)
    tr = hessian_trace(model, loss_fn, batches, num_probes=300)
    assert abs(tr.mean - ref.sum()) <= 3 * tr.std_error


# ------------------------------------------------------------------------------------------
# small tanh MLP against a dense autograd Hessian
# ------------------------------------------------------------------------------------------
def _mlp_problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 3)).to(DT)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 3, generator=g, dtype=DT)
    y = torch.randint(0, 3, (40,), generator=g)
    batches = [(x[:25], y[:25]), (x[25:], y[25:])]
    loss_fn = lambda mdl, b: F.cross_entropy(mdl(b[0]), b[1])
    return model, loss_fn, batches, x, y


def _dense_hessian(model, x, y):
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    flat0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def f(flat):
        params, off = {}, 0
        for name, shp in zip(names, shapes):
            k = math.prod(shp)
            params[name] = flat[off : off + k].view(shp)
            off += k
        return F.cross_entropy(functional_call(model, params, (x,)), y)

    return torch.autograd.functional.hessian(f, flat0)


def test_mlp_hvp_matches_dense_hessian():
    model, loss_fn, batches, x, y = _mlp_problem()
    h = _dense_hessian(model, x, y)
    v = torch.randn(h.shape[0], dtype=DT)
    hv = torch.cat([t.reshape(-1) for t in hvp(model, loss_fn, batches, v)])
    np.testing.assert_allclose(hv.numpy(), (h @ v).numpy(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("method", ["lanczos", "power"])
def test_mlp_top_eigenvalues_match_dense(method):
    model, loss_fn, batches, x, y = _mlp_problem()
    ref = np.sort(np.linalg.eigvalsh(_dense_hessian(model, x, y).numpy()))[::-1]
    k = 3 if method == "lanczos" else 2
    res = top_hessian_eigenvalues(
        model, loss_fn, batches, k=k, method=method, tol=1e-13, max_iter=5000
    )
    np.testing.assert_allclose(res.eigenvalues, ref[:k], rtol=1e-6, atol=1e-8)
    assert res.converged
    tr = hessian_trace(model, loss_fn, batches, num_probes=200)
    assert abs(tr.mean - ref.sum()) <= 3 * tr.std_error


@settings(max_examples=20, deadline=None)
@given(n=st.integers(2, 12), seed=st.integers(0, 10_000))
def test_lanczos_property_random_symmetric(n, seed):
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(n, n, generator=g, dtype=DT)
    a = (m + m.T) / 2
    res = top_hessian_eigenvalues(make_quadratic(a, seed), quad_loss, BATCHES, k=1, tol=1e-12)
    ref = float(np.linalg.eigvalsh(a.numpy())[-1])
    assert res.eigenvalues[0] == pytest.approx(ref, abs=1e-8 * max(1.0, abs(ref)))


# ------------------------------------------------------------------------------------------
# batches, eval mode and state restoration
# ------------------------------------------------------------------------------------------
def test_hvp_weights_batches_by_size():
    model, loss_fn, _, x, y = _mlp_problem()
    v = [torch.randn_like(p) for p in model.parameters()]
    whole = hvp(model, loss_fn, [(x, y)], v)
    split = hvp(model, loss_fn, [(x[:3], y[:3]), (x[3:30], y[3:30]), (x[30:], y[30:])], v)
    for a, b in zip(whole, split):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)
    # the plain (unweighted) mean of per-batch products is different
    parts = [hvp(model, loss_fn, [(x[i:j], y[i:j])], v) for i, j in ((0, 3), (3, 30), (30, 40))]
    unweighted = [sum(p[i] for p in parts) / 3 for i in range(len(v))]
    assert not all(torch.allclose(a, b) for a, b in zip(whole, unweighted))


def test_batches_as_dicts_and_flat_vector():
    model, _, _, x, y = _mlp_problem()
    dict_loss = lambda mdl, b: F.cross_entropy(mdl(b["x"]), b["y"])
    tuple_loss = lambda mdl, b: F.cross_entropy(mdl(b[0]), b[1])
    n = sum(p.numel() for p in model.parameters())
    v = torch.randn(n, dtype=DT)
    a = hvp(model, dict_loss, [{"x": x[:7], "y": y[:7]}, {"x": x[7:], "y": y[7:]}], v)
    b = hvp(model, tuple_loss, [(x, y)], v)
    for s, t in zip(a, b):
        torch.testing.assert_close(s, t, rtol=1e-12, atol=1e-13)


class _ModeSpy(nn.Module):
    def __init__(self):
        super().__init__()
        self.seen: list[bool] = []

    def forward(self, x):
        self.seen.append(self.training)
        return x


def _bn_model():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Dropout(0.5), _ModeSpy(), nn.Linear(8, 2)
    ).to(DT)
    model.train()
    with torch.no_grad():  # non-trivial running statistics
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2.0)
    x = torch.randn(16, 4, dtype=DT)
    y = torch.randint(0, 2, (16,))
    return (
        model,
        (lambda mdl, b: F.cross_entropy(mdl(b[0]), b[1])),
        [(x[:9], y[:9]), (x[9:], y[9:])],
    )


def test_hvp_uses_eval_mode_and_restores_training():
    model, loss_fn, batches = _bn_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    v = [torch.randn_like(p) for p in model.parameters()]
    out1 = hvp(model, loss_fn, batches, v)
    out2 = hvp(model, loss_fn, batches, v)  # deterministic although dropout is present
    for a, b in zip(out1, out2):
        assert torch.equal(a, b)
    assert model.training and all(m.training for m in model.modules())
    assert model[4].seen and not any(model[4].seen)
    for k, t in model.state_dict().items():
        assert torch.equal(t, before[k]), k
    assert all(p.grad is None for p in model.parameters())
    # equals the product computed by hand in eval mode
    model.eval()
    params = list(model.parameters())
    ref = [torch.zeros_like(p) for p in params]
    for b in batches:
        loss = loss_fn(model, b)
        grads = torch.autograd.grad(loss, params, create_graph=True)
        hv = torch.autograd.grad(sum((g * t).sum() for g, t in zip(grads, v)), params)
        for r, h in zip(ref, hv):
            r.add_(h * len(b[0]) / 16)
    for a, b in zip(out1, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)


class _Attention(nn.Module):
    """One self-attention layer + mean pooling + linear head; ``fused`` selects
    ``F.scaled_dot_product_attention`` (whose fused CPU kernels have no double backward) or the
    same formula written out, the independent reference."""

    def __init__(self, fused: bool) -> None:
        super().__init__()
        self.fused = fused
        self.qkv = nn.Linear(8, 24)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = (t.view(b, n, 2, 4).transpose(1, 2) for t in self.qkv(x).chunk(3, dim=-1))
        mask = torch.zeros(b, 1, 1, n)
        mask[:, :, :, -1] = torch.finfo(x.dtype).min  # the last position is padding
        if self.fused:
            h = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:
            h = torch.softmax(q @ k.transpose(-1, -2) / 2.0 + mask, -1) @ v
        return self.head(h.transpose(1, 2).reshape(b, n, 8).mean(1))


def test_hvp_through_fused_attention_matches_the_written_out_formula():
    torch.manual_seed(0)
    fused, plain = _Attention(True), _Attention(False)
    plain.load_state_dict(fused.state_dict())
    batches = [(torch.randn(6, 5, 8), torch.randint(0, 3, (6,))) for _ in range(2)]

    def loss_fn(model, batch):
        return F.cross_entropy(model(batch[0]), batch[1])

    v = [torch.randn_like(p) for p in fused.parameters()]
    got = hvp(fused, loss_fn, batches, v)
    ref = hvp(plain, loss_fn, batches, v)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)
    assert sum(float(r.abs().sum()) for r in ref) > 0
