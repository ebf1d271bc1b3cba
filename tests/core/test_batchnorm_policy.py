"""The BatchNorm rule, checked against statistics computed by hand from each micro-batch."""

from __future__ import annotations

import pytest
import torch

import msam

pytestmark = pytest.mark.usefixtures("float64")


def _model(momentum):
    torch.manual_seed(0)
    # BatchNorm first, so its input is the data itself and the statistics are easy to compute.
    return torch.nn.Sequential(torch.nn.BatchNorm1d(3, momentum=momentum), torch.nn.Linear(3, 2))


def _expected(x, m, old_mean, old_var, nbt, momentum):
    chunks = torch.tensor_split(x, m)
    mean = torch.stack([c.mean(0) for c in chunks]).mean(0)
    var = torch.stack([c.var(0, unbiased=True) for c in chunks]).mean(0)
    f = 1.0 / (nbt + 1) if momentum is None else momentum
    return (1 - f) * old_mean + f * mean, (1 - f) * old_var + f * var


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("m", [1, 3])
def test_running_stats_once_per_step_from_unperturbed_pass(m, momentum, strategy):
    model = _model(momentum)
    bn = model[0]
    opt = msam.MSAM(model.parameters(), torch.optim.SGD, rho=0.5, micro_batches=m, lr=0.1,
                    strategy=strategy, model=model)
    torch.manual_seed(1)
    for step in range(3):
        x = torch.randn(11, 3) * 2 + 1
        y = torch.randint(0, 2, (11,))
        old_mean, old_var = bn.running_mean.clone(), bn.running_var.clone()
        nbt = int(bn.num_batches_tracked)
        opt.step(lambda b: torch.nn.functional.cross_entropy(model(b[0]), b[1]), (x, y))
        exp_mean, exp_var = _expected(x, m, old_mean, old_var, nbt, momentum)
        torch.testing.assert_close(bn.running_mean, exp_mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(bn.running_var, exp_var, rtol=1e-12, atol=1e-12)
        assert int(bn.num_batches_tracked) == nbt + 1 == step + 1
    assert bn.momentum == momentum and bn.track_running_stats


def test_each_micro_batch_is_normalised_with_its_own_statistics():
    """With m micro-batches the gradient equals the average of per-micro-batch BN gradients."""
    model = _model(0.1)
    x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))

    def loss_fn(b):
        return torch.nn.functional.cross_entropy(model(b[0]), b[1])

    msam.msam_gradient(loss_fn, (x, y), model.parameters(), rho=0.0, micro_batches=2)
    got = [p.grad.clone() for p in model.parameters()]
    ref = [torch.zeros_like(p) for p in model.parameters()]
    for xc, yc in zip(torch.tensor_split(x, 2), torch.tensor_split(y, 2)):
        g = torch.autograd.grad(loss_fn((xc, yc)), list(model.parameters()))
        for r, gi in zip(ref, g):
            r += gi / 2
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_eval_mode_batchnorm_is_left_alone():
    model = _model(0.1).eval()
    bn = model[0]
    before = (bn.running_mean.clone(), bn.running_var.clone(), int(bn.num_batches_tracked))
    opt = msam.MSAM(model.parameters(), torch.optim.SGD, rho=0.1, micro_batches=2, lr=0.1)
    x, y = torch.randn(6, 3), torch.randint(0, 2, (6,))
    opt.step(lambda b: torch.nn.functional.cross_entropy(model(b[0]), b[1]), (x, y))
    assert torch.equal(bn.running_mean, before[0]) and torch.equal(bn.running_var, before[1])
    assert int(bn.num_batches_tracked) == before[2]


def test_buffers_keep_their_identity():
    """Running buffers are updated in place (other code, e.g. DDP or EMA, may hold them)."""
    model = _model(0.1)
    ids = [id(b) for b in model.buffers()]
    opt = msam.MSAM(model.parameters(), torch.optim.SGD, rho=0.1, micro_batches=2, lr=0.1)
    opt.step(lambda b: torch.nn.functional.cross_entropy(model(b[0]), b[1]),
             (torch.randn(6, 3), torch.randint(0, 2, (6,))))
    assert [id(b) for b in model.buffers()] == ids
