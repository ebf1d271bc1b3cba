"""Exception safety, non-finite handling, GradScaler skip, autocast and input validation."""

from __future__ import annotations

import math

import pytest
import torch

import msam


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(),
                               torch.nn.Linear(8, 3))


def _batch(n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g)


def _snapshot(model, opt):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        {k: v.clone() if isinstance(v, torch.Tensor) else v
         for k, v in _flat_state(opt.state_dict()).items()},
        [None if p.grad is None else p.grad.clone() for p in model.parameters()],
    )


def _flat_state(sd):
    out = {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            out[f"{pid}.{k}"] = v
    return out


def _assert_same(a, b):
    for k in a[0]:
        assert torch.equal(a[0][k], b[0][k]), k
    assert a[1].keys() == b[1].keys()
    for k in a[1]:
        assert torch.equal(a[1][k], b[1][k]) if isinstance(a[1][k], torch.Tensor) else \
            a[1][k] == b[1][k], k
    for ga, gb in zip(a[2], b[2]):
        assert (ga is None and gb is None) or torch.equal(ga, gb)


class Boom(RuntimeError):
    pass


@pytest.mark.parametrize("strategy", ["loop", "vmap", "batched"])
@pytest.mark.parametrize("fail_at", [("ascent", 0), ("perturbed", 0), ("perturbed", 2)])
def test_loss_fn_raising_leaves_everything_as_before(fail_at, strategy):
    model = _model()
    opt = msam.MSAM(model.parameters(), torch.optim.SGD, rho=0.1, micro_batches=3, lr=0.1,
                    momentum=0.9, strategy=strategy, model=model)
    calls = []

    def good(b):
        return torch.nn.functional.cross_entropy(model(b[0]), b[1])

    opt.step(good, _batch(seed=1))  # create momentum state and a .grad
    before = _snapshot(model, opt)
    phase, j = fail_at
    # loop: calls alternate ascent/perturbed per micro-batch; vmap: one traced call per pass.
    target = (2 * j + (phase == "perturbed")) if strategy == "loop" else (phase == "perturbed")

    def bad(b):
        calls.append(1)
        if len(calls) - 1 == target:
            raise Boom("injected")
        return good(b)

    with pytest.raises(Boom):
        opt.step(bad, _batch(seed=2))
    _assert_same(before, _snapshot(model, opt))
    bn = model[1]
    assert bn.momentum == 0.1 and bn.track_running_stats
    # and training continues normally afterwards
    opt.step(good, _batch(seed=3))
    assert int(bn.num_batches_tracked) == 2


@pytest.mark.parametrize("mode", ["raise", "skip"])
def test_non_finite_loss(mode):
    model = _model()
    opt = msam.MSAM(model.parameters(), torch.optim.SGD, rho=0.1, micro_batches=2, lr=0.1,
                    momentum=0.9, nonfinite=mode)
    opt.step(lambda b: torch.nn.functional.cross_entropy(model(b[0]), b[1]), _batch(seed=1))
    before = _snapshot(model, opt)
    n = {"calls": 0}

    def nan_in_perturbed(b):
        n["calls"] += 1
        loss = torch.nn.functional.cross_entropy(model(b[0]), b[1])
        return loss * float("nan") if n["calls"] == 4 else loss

    if mode == "raise":
        with pytest.raises(FloatingPointError, match="perturbed pass of micro-batch 1"):
            opt.step(nan_in_perturbed, _batch(seed=2))
    else:
        loss = opt.step(nan_in_perturbed, _batch(seed=2))
        assert math.isnan(float(loss)) and opt.skipped_steps == 1
    _assert_same(before, _snapshot(model, opt))


def test_grad_scaler_skips_whole_step_and_lowers_scale():
    model = _model()
    opt = msam.MSAM(model.parameters(), torch.optim.SGD, rho=0.1, micro_batches=2, lr=0.1,
                    momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)

    def loss_fn(b):
        return torch.nn.functional.cross_entropy(model(b[0]), b[1])

    opt.step(loss_fn, _batch(seed=1), scaler=scaler)
    scaler.update()
    assert opt.steps == 1
    before = _snapshot(model, opt)
    scale = scaler.get_scale()
    for overflow_call in (1, 2):  # ascent of micro-batch 0, then its perturbed pass
        n = {"calls": 0}

        def overflow(b, at=overflow_call, n=n):
            n["calls"] += 1
            loss = loss_fn(b)
            return loss * float("inf") if n["calls"] == at else loss

        opt.step(overflow, _batch(seed=2), scaler=scaler)
        scaler.update()
        assert scaler.get_scale() == scale / 2
        scale = scaler.get_scale()
        now = _snapshot(model, opt)
        _assert_same((before[0], before[1], []), (now[0], now[1], []))
    assert opt.steps == 1 and opt.skipped_steps == 2
    # A good step after the skips trains again, with gradients unscaled.
    w = [p.detach().clone() for p in model.parameters()]
    opt.step(loss_fn, _batch(seed=3), scaler=scaler)
    scaler.update()
    assert opt.steps == 2 and any(not torch.equal(a, b) for a, b in zip(w, model.parameters()))


def test_scaled_step_equals_unscaled_step():
    """With a power-of-two scale and no overflow the scaler changes nothing (float64)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        m1, m2 = _model(), _model()
        o1 = msam.MSAM(m1.parameters(), torch.optim.SGD, rho=0.1, micro_batches=2, lr=0.1)
        o2 = msam.MSAM(m2.parameters(), torch.optim.SGD, rho=0.1, micro_batches=2, lr=0.1)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
        x, y = _batch()
        o1.step(lambda b: torch.nn.functional.cross_entropy(m1(b[0]), b[1]), (x, y))
        o2.step(lambda b: torch.nn.functional.cross_entropy(m2(b[0]), b[1]), (x, y),
                scaler=scaler)
        for a, b in zip(m1.parameters(), m2.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    finally:
        torch.set_default_dtype(old)


def test_bf16_autocast_inside_loss_fn_trains():
    model = _model()
    opt = msam.MSAM(model.parameters(), torch.optim.SGD, rho=0.05, micro_batches=2, lr=0.1)

    def loss_fn(b):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(b[0])
        return torch.nn.functional.cross_entropy(logits.float(), b[1])

    x, y = _batch(64)
    first = float(opt.step(loss_fn, (x, y)))
    for _ in range(30):
        last = float(opt.step(loss_fn, (x, y)))
    assert math.isfinite(last) and last < first
    assert all(p.dtype == torch.float32 for p in model.parameters())


# -- validation -----------------------------------------------------------------------------
def _params():
    return torch.nn.Linear(2, 1).parameters()


@pytest.mark.parametrize("kwargs, match", [
    ({"rho": -0.1}, "rho"),
    ({"rho": float("nan")}, "rho"),
    ({"rho": float("inf")}, "rho"),
    ({"micro_batches": 0}, "micro_batches"),
    ({"micro_batches": 2.5}, "micro_batches"),
    ({"micro_batch_size": 0}, "micro_batch_size"),
    ({"micro_batches": 2, "micro_batch_size": 4}, "micro_batches or micro_batch_size"),
    ({"eta": 0.0}, "eta"),
    ({"adaptive": True, "eta": -1.0}, "eta"),
    ({"max_grad_norm": 0}, "max_grad_norm"),
    ({"nonfinite": "ignore"}, "nonfinite"),
    ({"strategy": "threads"}, "strategy"),
])
def test_constructor_validation_names_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        msam.MSAM(_params(), torch.optim.SGD, lr=0.1, **kwargs)


def test_no_trainable_parameter():
    lin = torch.nn.Linear(2, 1).requires_grad_(False)
    with pytest.raises(ValueError, match="params: no parameter requires grad"):
        msam.MSAM(lin.parameters(), torch.optim.SGD, lr=0.1)


def test_batch_validation():
    lin = torch.nn.Linear(2, 1)
    opt = msam.MSAM(lin.parameters(), torch.optim.SGD, micro_batches=4, lr=0.1)

    def loss_fn(b):
        return lin(b[0]).pow(2).mean()

    with pytest.raises(ValueError, match="fewer than micro_batches=4"):
        opt.step(loss_fn, (torch.randn(3, 2), torch.randn(3)))
    with pytest.raises(ValueError, match=r"batch\[0\] has 8, batch\[1\] has 7"):
        opt.step(loss_fn, (torch.randn(8, 2), torch.randn(7)))
    with pytest.raises(ValueError, match="no tensor"):
        opt.step(loss_fn, ("a", 1))
    with pytest.raises(TypeError, match="scalar tensor"):
        opt.step(lambda b: lin(b[0]), (torch.randn(8, 2), torch.randn(8)))
    w = lin.weight.detach().clone()
    with pytest.raises(ValueError, match="perturb"):
        msam.MSAM(lin.parameters(), torch.optim.SGD, perturb=[torch.nn.Parameter(w)], lr=0.1)
    with pytest.raises(ValueError, match="vmap.*model"):
        msam.MSAM(lin.parameters(), torch.optim.SGD, strategy="vmap", lr=0.1).step(
            loss_fn, (torch.randn(8, 2), torch.randn(8)))
    assert torch.equal(lin.weight, w)
