"""``loop`` and ``vmap`` give the same result (float64, 1e-10), with and without BatchNorm."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import msam
from msam.strategies.auto import AutoStrategy

from reference import reference_msam_grad

pytestmark = pytest.mark.usefixtures("float64")


def _cnn(bn=True):
    torch.manual_seed(0)
    norm = torch.nn.BatchNorm2d(4) if bn else torch.nn.Identity()
    return torch.nn.Sequential(
        torch.nn.Conv2d(2, 4, 3, padding=1), norm, torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten(), torch.nn.Linear(16, 3))


def _run(strategy, bn, adaptive, n, m, steps=2):
    model = _cnn(bn)
    opt = msam.MSAM(model.parameters(), torch.optim.SGD, rho=0.2, micro_batches=m, lr=0.1,
                    momentum=0.9, adaptive=adaptive, strategy=strategy, model=model)
    losses = []
    for s in range(steps):
        g = torch.Generator().manual_seed(s)
        x, y = torch.randn(n, 2, 5, 5, generator=g), torch.randint(0, 3, (n,), generator=g)
        losses.append(float(opt.step(
            lambda b: torch.nn.functional.cross_entropy(model(b["x"]), b["y"]), {"x": x, "y": y})))
    return model, losses


@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("bn", [False, True])
@pytest.mark.parametrize("n, m", [(12, 4), (14, 4), (9, 2)])
@pytest.mark.parametrize("other", ["vmap", "batched"])
def test_loop_equals_vmap(bn, adaptive, n, m, other):
    a, la = _run("loop", bn, adaptive, n, m)
    b, lb = _run(other, bn, adaptive, n, m)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-10, msg=name)
    assert max(abs(u - v) for u, v in zip(la, lb)) < 1e-10


def test_auto_strategy_picks_a_candidate_and_matches_loop():
    a, _ = _run("loop", True, False, 12, 4)
    strat = AutoStrategy()
    b, _ = _run(strat, True, False, 12, 4)
    assert strat.choice in ("loop", "vmap", "batched", "lowrank")
    for x, y in zip(a.state_dict().values(), b.state_dict().values()):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-10)


def _leaf(x, kind):
    return {"t": x, "tuple": (x,), "dict": {"inp": x}, "nested": ({"a": [x]},)}[kind]


def _unleaf(b, kind):
    return {"t": lambda: b, "tuple": lambda: b[0], "dict": lambda: b["inp"],
            "nested": lambda: b[0]["a"][0]}[kind]()


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 13), m=st.integers(1, 13), d=st.integers(1, 4),
       kind=st.sampled_from(["t", "tuple", "dict", "nested"]),
       rho=st.sampled_from([0.0, 0.05, 0.7]),
       strategy=st.sampled_from(["loop", "vmap", "batched", "lowrank"]))
def test_property_matches_reference_over_shapes_m_and_structures(n, m, d, kind, rho, strategy):
    m = min(m, n)
    torch.manual_seed(n * 31 + m)
    model = torch.nn.Sequential(torch.nn.Linear(d, 3), torch.nn.Tanh(), torch.nn.Linear(3, 1))
    x = torch.randn(n, d)
    target = torch.randn(n, 1)
    batch = (_leaf(x, kind), target)

    def loss_fn(b):
        return ((model(_unleaf(b[0], kind)) - b[1]) ** 2).mean()

    loss = msam.msam_gradient(loss_fn, batch, model.parameters(), rho=rho, micro_batches=m,
                              strategy=strategy, model=model)
    ref, ref_loss = reference_msam_grad(
        model, lambda f, b: ((f(b[0]) - b[1]) ** 2).mean(), (x, target), m, rho)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[name], rtol=1e-10, atol=1e-12)
    assert abs(float(loss) - ref_loss) < 1e-10
