"""scripts/microbatch_grad_ratio.py against closed forms on least squares (float64).

For L(w) = ||X w - y||^2 / (2 n): g = X^T (X w - y) / n, H = X^T X / n, and the perturbed
gradient at w + e is exactly g + H e, so h - g = rho H g / ||g|| (per micro-batch with X_j).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from torch import nn

_PATH = Path(__file__).resolve().parents[2] / "scripts" / "microbatch_grad_ratio.py"
_spec = importlib.util.spec_from_file_location("microbatch_grad_ratio", _PATH)
assert _spec is not None and _spec.loader is not None
script = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(script)


def _mse(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return 0.5 * ((model(x).squeeze(-1) - y) ** 2).mean()


@pytest.fixture
def problem():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(30, 5, generator=gen, dtype=torch.float64)
    y = torch.randn(30, generator=gen, dtype=torch.float64)
    model = nn.Linear(5, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.randn(1, 5, generator=gen, dtype=torch.float64))
    return model, x, y


def _parts(x, y, m):  # sizes 8, 8, 7, 7 for n = 30, m = 4: unequal weights n_j / n
    return list(zip(torch.tensor_split(x, m), torch.tensor_split(y, m)))


@pytest.mark.parametrize("m", [1, 4, 30])
def test_grad_ratio_matches_the_closed_form(problem, m):
    model, x, y = problem
    w = model.weight.detach().reshape(-1).clone()
    n = len(x)

    def grad(xb, yb):
        return xb.T @ (xb @ w - yb) / len(xb)

    want = sum(len(xj) / n * grad(xj, yj).norm() for xj, yj in _parts(x, y, m))
    want = want / grad(x, y).norm()
    assert script.grad_ratio(model, x, y, m, loss_fn=_mse) == pytest.approx(float(want),
                                                                            rel=1e-10)
    assert torch.equal(model.weight.detach().reshape(-1), w)  # the model is not changed


@pytest.mark.parametrize("m", [1, 4])
def test_correction_ratio_matches_the_closed_form(problem, m):
    model, x, y = problem
    w = model.weight.detach().reshape(-1).clone()
    n, rho = len(x), 0.3

    def correction(xb, yb):
        g = xb.T @ (xb @ w - yb) / len(xb)
        return rho * (xb.T @ xb / len(xb)) @ g / g.norm()

    want = sum(len(xj) / n * correction(xj, yj) for xj, yj in _parts(x, y, m))
    want = want.norm() / correction(x, y).norm()
    got = script.correction_ratio(model, x, y, m, rho, loss_fn=_mse)
    assert got == pytest.approx(float(want), rel=1e-8)
    assert torch.equal(model.weight.detach().reshape(-1), w)


def test_grad_ratio_rejects_m_larger_than_the_batch(problem):
    model, x, y = problem
    with pytest.raises(ValueError, match="m=31"):
        script.grad_ratio(model, x, y, 31, loss_fn=_mse)


def test_correction_ratio_rejects_a_bad_m(problem):
    model, x, y = problem
    for m in (0, 31):
        with pytest.raises(ValueError, match=f"m={m}"):
            script.correction_ratio(model, x, y, m, 0.1, loss_fn=_mse)


def test_a_batchnorm_model_is_left_exactly_as_it_was():
    """Training-mode forwards would move BatchNorm's running statistics and the perturbation
    moves the weights: the caller's model must see neither."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))
    model.train()
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    script.grad_ratio(model, x, y, 4)
    script.correction_ratio(model, x, y, 4, 0.5)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_zero_gradient_gives_no_correction_not_nan(problem):
    model, x, _ = problem
    y = (x @ model.weight.detach().reshape(-1)).detach()  # an exact fit: every g_j = 0
    assert script.grad_ratio(model, x, y, 2, loss_fn=_mse) == 0.0
    assert script.correction_ratio(model, x, y, 2, 0.1, loss_fn=_mse) == 0.0
