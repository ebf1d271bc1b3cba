"""Momentum-SAM (Becker, Altrock, Risse 2024, arXiv 2401.12033) against float64 references
written from the paper's update (its Figure 1 for SGD; the first moment for AdamW), sharing no
code with msam: one pass per step at w - rho v / ||v||, the first step plain."""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

import msam

pytestmark = pytest.mark.usefixtures("float64")


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 12), torch.nn.Tanh(), torch.nn.Linear(12, 3))


def _data(step, n=16):
    g = torch.Generator().manual_seed(500 + step)
    return torch.randn(n, 5, generator=g), torch.randint(0, 3, (n,), generator=g)


def _grad_at(model, w, batch):
    p = {k: v.clone().requires_grad_(True) for k, v in w.items()}
    loss = F.cross_entropy(functional_call(model, p, (batch[0],)), batch[1])
    return dict(zip(p, torch.autograd.grad(loss, list(p.values()))))


def _norm(d):
    return math.sqrt(sum(float((t ** 2).sum()) for t in d.values()))


def reference_sgd(steps, rho, lr=0.1, mu=0.9):
    """Figure 1: w~ = w - rho v/||v||; g = grad L(w~); v <- mu v + g; w <- w - lr v."""
    model = _model()
    w = {k: v.detach().clone() for k, v in model.named_parameters()}
    v = None
    for t in range(steps):
        if v is None:
            at = w                                   # v_0 = 0: the first step is plain
        else:
            n = _norm(v)
            at = {k: w[k] - rho * v[k] / (n + 1e-12) for k in w}
        g = _grad_at(model, at, _data(t))
        v = dict(g) if v is None else {k: mu * v[k] + g[k] for k in w}
        w = {k: w[k] - lr * v[k] for k in w}
    return w


def reference_adamw(steps, rho, lr=0.01, betas=(0.9, 0.999), eps=1e-8, wd=0.01):
    """The authors' AdamW form: the gradient at w - rho m/||m|| (m the first moment), then
    AdamW's update written out (decoupled decay, bias corrections)."""
    model = _model()
    w = {k: v.detach().clone() for k, v in model.named_parameters()}
    m = s = None
    for t in range(1, steps + 1):
        if m is None:
            at = w
        else:
            n = _norm(m)
            at = {k: w[k] - rho * m[k] / (n + 1e-12) for k in w}
        g = _grad_at(model, at, _data(t - 1))
        w = {k: w[k] * (1 - lr * wd) for k in w}
        m = {k: (betas[0] * m[k] if m else 0) + (1 - betas[0]) * g[k] for k in w}
        s = {k: (betas[1] * s[k] if s else 0) + (1 - betas[1]) * g[k] ** 2 for k in w}
        bc1, bc2 = 1 - betas[0] ** t, 1 - betas[1] ** t
        w = {k: w[k] - lr / bc1 * m[k] / ((s[k] / bc2).sqrt() + eps) for k in w}
    return w


def _loss(model):
    calls = []

    def loss_fn(b):
        calls.append(1)
        return F.cross_entropy(model(b[0]), b[1])

    return loss_fn, calls


def _max_diff(model, w):
    return max(float((p.detach() - w[k]).abs().max()) for k, p in model.named_parameters())


def test_sgd_matches_the_papers_figure_1_with_one_pass_per_step():
    model = _model()
    opt = msam.MSAM(model.parameters(), torch.optim.SGD, rho=0.5, rule="momentumsam", lr=0.1,
                    momentum=0.9)
    loss_fn, calls = _loss(model)
    for t in range(5):
        opt.step(loss_fn, _data(t))
    assert len(calls) == 5   # one forward-backward per step: SGD's price
    diff = _max_diff(model, reference_sgd(5, 0.5))
    print(f"max|diff| Momentum-SAM SGD: {diff:.3g}")
    assert diff < 1e-12
    # the sign matters: perturbing along +v (SAM-like) is a different update
    plus = reference_sgd(5, -0.5)
    assert max(float((p.detach() - plus[k]).abs().max())
               for k, p in model.named_parameters()) > 1e-6


def test_adamw_matches_the_first_moment_form():
    model = _model()
    opt = msam.MSAM(model.parameters(), torch.optim.AdamW, rho=0.3, rule="momentumsam",
                    lr=0.01, weight_decay=0.01)
    loss_fn, calls = _loss(model)
    for t in range(5):
        opt.step(loss_fn, _data(t))
    assert len(calls) == 5
    assert _max_diff(model, reference_adamw(5, 0.3)) < 1e-12


def test_resume_mid_run_is_bit_identical():
    def make():
        model = _model()
        return model, msam.MSAM(model.parameters(), torch.optim.SGD, rho=0.5,
                                rule="momentumsam", lr=0.1, momentum=0.9)

    straight, opt = make()
    for t in range(6):
        opt.step(_loss(straight)[0], _data(t))
    first, opt1 = make()
    for t in range(3):
        opt1.step(_loss(first)[0], _data(t))
    buf = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": opt1.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=False)
    resumed, opt2 = make()
    resumed.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    for t in range(3, 6):
        opt2.step(_loss(resumed)[0], _data(t))
    for p, q in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
    assert _max_diff(resumed, reference_sgd(6, 0.5)) < 1e-12


def test_batchnorm_statistics_come_from_the_one_pass():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.BatchNorm1d(8),
                                torch.nn.Tanh(), torch.nn.Linear(8, 3))
    opt = msam.MSAM(model.parameters(), torch.optim.SGD, rho=0.5, rule="momentumsam",
                    lr=0.1, momentum=0.9, model=model)
    before = model[1].running_mean.clone()
    for t in range(3):
        opt.step(lambda b: F.cross_entropy(model(b[0]), b[1]), _data(t))
    assert int(model[1].num_batches_tracked) == 3
    assert not torch.equal(before, model[1].running_mean)


@pytest.mark.parametrize("kwargs,match", [
    ({"momentum": 0.0}, "momentum=0"),
    ({"momentum": 0.9, "micro_batches": 4}, "micro_batches"),
    ({"momentum": 0.9, "strategy": "vmap"}, "'loop'"),
    ({"momentum": 0.9, "reuse": "looksam"}, "reuse"),
])
def test_refusals_name_the_argument(kwargs, match):
    model = _model()
    with pytest.raises(ValueError, match=match):
        msam.MSAM(model.parameters(), torch.optim.SGD, rho=0.5, rule="momentumsam", lr=0.1,
                  model=model, **kwargs)
    with pytest.raises(ValueError, match="keeps no momentum"):
        msam.MSAM(model.parameters(), torch.optim.Adagrad, rho=0.5, rule="momentumsam", lr=0.1)
    with pytest.raises(ValueError, match="msam_gradient"):
        msam.msam_gradient(lambda b: F.cross_entropy(model(b[0]), b[1]), _data(0),
                           model.parameters(), rule="momentumsam")
