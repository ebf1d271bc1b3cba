"""USAM (unnormalised SAM, Andriushchenko & Flammarion, ICML 2022): ``e_j = rho g_j``, against a
float64 reference written from that equation with ``torch.func``, sharing no code with msam."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call

import msam

pytestmark = pytest.mark.usefixtures("float64")


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 12), torch.nn.Tanh(), torch.nn.Linear(12, 3))


def _data(step, n=12):
    g = torch.Generator().manual_seed(300 + step)
    return torch.randn(n, 5, generator=g), torch.randint(0, 3, (n,), generator=g)


def _usam_grad(model, batch, m, rho):
    """sum_j (n_j / n) grad L_j(w + rho grad L_j(w))."""
    w = {k: v.detach().clone() for k, v in model.named_parameters()}
    n = batch[0].shape[0]
    total = {k: torch.zeros_like(v) for k, v in w.items()}
    for x, y in zip(torch.tensor_split(batch[0], m), torch.tensor_split(batch[1], m)):
        def loss_at(p, x=x, y=y):
            return torch.nn.functional.cross_entropy(functional_call(model, p, (x,)), y)

        wp = {k: v.clone().requires_grad_(True) for k, v in w.items()}
        g = torch.autograd.grad(loss_at(wp), list(wp.values()))
        wq = {k: (w[k] + rho * gk).requires_grad_(True) for k, gk in zip(w, g)}
        h = torch.autograd.grad(loss_at(wq), list(wq.values()))
        for k, hk in zip(w, h):
            total[k] += x.shape[0] / n * hk
    return total


@pytest.mark.parametrize("strategy", ["loop", "vmap", "batched"])
@pytest.mark.parametrize("m", [1, 4])
def test_usam_matches_the_equation(m, strategy):
    model, ref = _model(), _model()
    opt = msam.MSAM(model.parameters(), torch.optim.SGD, rho=0.5, micro_batches=m, rule="usam",
                    strategy=strategy, model=model, lr=0.1, momentum=0.9)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    for s in range(4):
        batch = _data(s)
        opt.step(lambda b: torch.nn.functional.cross_entropy(model(b[0]), b[1]), batch)
        grads = _usam_grad(ref, batch, m, 0.5)
        for k, p in ref.named_parameters():
            p.grad = grads[k]
        ref_opt.step()
    diff = max(float((p - q).abs().max()) for p, q in zip(model.parameters(), ref.parameters()))
    print(f"max|diff| usam m={m} {strategy}: {diff:.3g}")
    assert diff < 1e-12
    # ... and it is not SAM at the same rho (the normalisation matters here).
    sam_model = _model()
    sam = msam.MSAM(sam_model.parameters(), torch.optim.SGD, rho=0.5, micro_batches=m, lr=0.1,
                    momentum=0.9)
    for s in range(4):
        sam.step(lambda b: torch.nn.functional.cross_entropy(sam_model(b[0]), b[1]), _data(s))
    assert max(float((p - q).abs().max())
               for p, q in zip(sam_model.parameters(), model.parameters())) > 1e-6
