"""The mSAM gradient against independent references (NumPy hand computation, plain SAM)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import msam
from msam.core.batch import split_batch
from msam.core.perturbation import perturbation

pytestmark = pytest.mark.usefixtures("float64")


def _numpy_msam_least_squares(X, y, w, m, rho, adaptive=False, eta=0.01):
    """Hand computation: L_j(w) = mean_i (x_i.w - y_i)^2 / 2 on micro-batch j."""
    n = X.shape[0]
    bounds = np.array_split(np.arange(n), m)
    grad = np.zeros_like(w)
    for idx in bounds:
        Xj, yj = X[idx], y[idx]
        nj = len(idx)
        g = Xj.T @ (Xj @ w - yj) / nj
        if adaptive:
            t = np.abs(w) + eta
            e = rho * t * t * g / (np.linalg.norm(t * g) + 1e-12)
        else:
            e = rho * g / (np.linalg.norm(g) + 1e-12)
        h = Xj.T @ (Xj @ (w + e) - yj) / nj
        grad += nj / n * h
    return grad


@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("m", [1, 3, 4])
def test_least_squares_matches_numpy_hand_computation(m, adaptive):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(10, 5))
    y = rng.normal(size=10)
    w0 = rng.normal(size=5)
    w = torch.nn.Parameter(torch.tensor(w0))

    def loss_fn(batch):
        xb, yb = batch
        return 0.5 * ((xb @ w - yb) ** 2).mean()

    msam.msam_gradient(loss_fn, (torch.tensor(X), torch.tensor(y)), [w], rho=0.3,
                       micro_batches=m, adaptive=adaptive, eta=0.05)
    expected = _numpy_msam_least_squares(X, y, w0, m, 0.3, adaptive, 0.05)
    np.testing.assert_allclose(w.grad.numpy(), expected, rtol=1e-12, atol=1e-12)
    assert torch.equal(w.detach(), torch.tensor(w0)), "weights must be restored exactly"


def test_m1_equals_plain_two_pass_sam():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    x, y = torch.randn(20, 6), torch.randint(0, 3, (20,))
    ps = list(model.parameters())

    # Plain SAM, written out: ascent, perturb, descent, restore.
    loss = torch.nn.functional.cross_entropy(model(x), y)
    g = torch.autograd.grad(loss, ps)
    norm = torch.sqrt(sum((gi ** 2).sum() for gi in g))
    w0 = [p.detach().clone() for p in ps]
    with torch.no_grad():
        for p, gi in zip(ps, g):
            p.add_(0.1 * gi / (norm + 1e-12))
    h = torch.autograd.grad(torch.nn.functional.cross_entropy(model(x), y), ps)
    with torch.no_grad():
        for p, w in zip(ps, w0):
            p.copy_(w)

    got = msam.msam_gradient(
        lambda b: torch.nn.functional.cross_entropy(model(b[0]), b[1]), (x, y), ps, rho=0.1)
    for p, hi in zip(ps, h):
        torch.testing.assert_close(p.grad, hi, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(got, loss.detach(), rtol=1e-13, atol=1e-13)


def test_rho_zero_is_the_full_batch_gradient_for_any_m():
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    x, y = torch.randn(13, 4), torch.randint(0, 2, (13,))
    full = torch.autograd.grad(torch.nn.functional.cross_entropy(model(x), y),
                               list(model.parameters()))
    msam.msam_gradient(lambda b: torch.nn.functional.cross_entropy(model(b[0]), b[1]), (x, y),
                       model.parameters(), rho=0.0, micro_batches=5)
    for p, g in zip(model.parameters(), full):
        torch.testing.assert_close(p.grad, g, rtol=1e-12, atol=1e-14)


def test_perturbation_zero_gradient_gives_zero_not_nan():
    p = torch.ones(3)
    e, norm = perturbation([torch.zeros(3)], [p], [0.05])
    assert torch.equal(e[0], torch.zeros(3)) and float(norm) == 0.0


def test_perturbation_has_norm_rho():
    torch.manual_seed(0)
    ps = [torch.randn(3, 4), torch.randn(5)]
    gs = [torch.randn(3, 4), torch.randn(5)]
    e, _ = perturbation(gs, ps, [0.2, 0.2])
    total = torch.sqrt(sum((x ** 2).sum() for x in e))
    assert abs(float(total) - 0.2) < 1e-12


def test_split_sizes_differ_by_at_most_one_and_weights_sum_to_one():
    parts = split_batch((torch.arange(10), {"a": torch.zeros(10, 2)}, None), 4)
    sizes = [n for _, n in parts]
    assert sizes == [3, 3, 2, 2]
    mb0 = parts[0][0]
    assert torch.equal(mb0[0], torch.arange(3)) and mb0[1]["a"].shape == (3, 2) and mb0[2] is None


def test_perturb_subset_leaves_other_parameters_unperturbed():
    from reference import reference_msam_grad

    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2))
    x, y = torch.randn(12, 4), torch.randint(0, 2, (12,))
    subset = [model[2].weight, model[2].bias]

    def loss_of(f, b):
        return torch.nn.functional.cross_entropy(f(b[0]), b[1])

    msam.msam_gradient(lambda b: loss_of(model, b), (x, y), model.parameters(), rho=0.2,
                       micro_batches=3, perturb=subset)
    ref, _ = reference_msam_grad(model, loss_of, (x, y), 3, 0.2, perturb={"2.weight", "2.bias"})
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], rtol=1e-12, atol=1e-14)


def test_normalization_parameters_finds_norm_layers_only():
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2),
                                torch.nn.Flatten(), torch.nn.LayerNorm(8), torch.nn.Linear(8, 2))
    got = {id(p) for p in msam.normalization_parameters(model)}
    want = {id(p) for p in [model[1].weight, model[1].bias, model[3].weight, model[3].bias]}
    assert got == want
