"""msam.integrations.accelerate against the real accelerate package (CPU)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

accelerate = pytest.importorskip("accelerate")

import msam  # noqa: E402
from msam.integrations.accelerate import backward  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """accelerate keeps one process-wide state; each test builds its own Accelerator."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def _batches(n=4, bs=8):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(bs, 6, generator=g), torch.randint(0, 3, (bs,), generator=g))
            for _ in range(n)]


def _loop(model, batches, accum, mixed="no", record=None, acc_state=None, save_at=None,
          rule=None, lr_decay=0.9):
    acc = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=accum,
                                 mixed_precision=mixed)
    opt = msam.MSAM(model.parameters(), torch.optim.SGD, rho=0.1, micro_batches=2, model=model,
                    lr=0.1, momentum=0.9, **({} if rule is None else {"rule": rule}))
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=lr_decay)
    model, opt, sched = acc.prepare(model, opt, sched)
    if acc_state is not None:
        acc.load_state(acc_state)
    if record is not None:
        opt.optimizer.base_optimizer.register_step_pre_hook(
            lambda o, a, k: record.append([p.grad.clone() for p in model.parameters()]))

    def loss_fn(b):
        x, y = b
        return nn.functional.cross_entropy(model(x), y)

    for i, b in enumerate(batches):
        with acc.accumulate(model):
            backward(acc, opt, loss_fn, b)
            opt.step()
            sched.step()
            opt.zero_grad()
        if save_at is not None and i + 1 == save_at[0]:
            acc.save_state(save_at[1])
    return model, opt


@pytest.mark.parametrize("accum", [1, 2])
def test_accelerate_gradient_equals_msam_gradient(accum):
    model = _model()
    start = copy.deepcopy(model)
    batches = _batches()
    seen: list = []
    _loop(model, batches[:accum], accum, record=seen)
    assert len(seen) == 1
    params = list(start.parameters())

    def loss_fn(b):
        x, y = b
        return nn.functional.cross_entropy(start(x), y)

    for i, b in enumerate(batches[:accum]):
        msam.msam_gradient(loss_fn, b, params, rho=0.1, micro_batches=2, model=start,
                           accumulate=i > 0, scale=1 / accum)
    worst = max((g - p.grad).abs().max().item() for g, p in zip(seen[0], params))
    print(f"accelerate accum={accum}: max |grad_step - msam_gradient| = {worst:.3e}")
    assert worst < 1e-6
    assert start[1].num_batches_tracked.item() == accum  # once per batch
    assert model[1].num_batches_tracked.item() == accum


def test_accelerate_bf16_runs():
    model = _model()
    before = [p.detach().clone() for p in model.parameters()]
    _, opt = _loop(model, _batches(2), 1, mixed="bf16")
    assert opt.optimizer.steps == 2
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_accelerate_resume_continues_exactly(tmp_path):
    batches = _batches(4)
    full, _ = _loop(_model(), batches, 1)
    _loop(_model(), batches[:2], 1, save_at=(2, str(tmp_path / "s")))
    resumed, opt = _loop(_model(), batches[2:], 1, acc_state=str(tmp_path / "s"))
    assert opt.optimizer.steps == 4
    for a, b in zip(full.state_dict().values(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_accelerate_plain_backward_then_step_raises():
    model = _model()
    acc = accelerate.Accelerator(cpu=True)
    opt = acc.prepare(msam.MSAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1))
    x, y = _batches(1)[0]
    acc.backward(nn.functional.cross_entropy(model(x), y))
    with pytest.raises(RuntimeError, match="accelerate"):
        opt.step()
    with pytest.raises(TypeError, match="optimizer"):
        backward(acc, torch.optim.SGD(model.parameters(), lr=0.1), lambda b: b, x)


@pytest.mark.parametrize("accum", [1, 2])
@pytest.mark.parametrize("rule", ["wsam", "gsam"])
def test_accelerate_combining_rules_step_as_a_plain_loop(rule, accum):
    """GSAM and decoupled WSAM (whose sharpness step follows the base step) through
    accelerate's accumulate / step / zero_grad take the same steps as MSAM in a plain loop
    with accumulate(scale=1/k) + step()."""
    batches = _batches(n=4)
    model, _ = _loop(_model(), batches, accum, rule=rule, lr_decay=1.0)
    ref = _model()
    opt = msam.MSAM(ref.parameters(), torch.optim.SGD, rho=0.1, micro_batches=2, model=ref,
                    lr=0.1, momentum=0.9, rule=rule)

    def loss_fn(b):
        return nn.functional.cross_entropy(ref(b[0]), b[1])

    for i, b in enumerate(batches):
        opt.accumulate(loss_fn, b, scale=1 / accum)
        if (i + 1) % accum == 0:
            opt.step()
    assert opt.steps == 4 // accum
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    # the decoupled step is really there: without it the weights differ
    if rule == "wsam":
        coupled, _ = _loop(_model(), batches, accum, lr_decay=1.0,
                           rule=msam.core.WSAMRule(decoupled=False))
        assert max(float((p - q).abs().max())
                   for p, q in zip(model.parameters(), coupled.parameters())) > 1e-5
