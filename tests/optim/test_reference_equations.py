"""The core against the independent reference where single mistakes hide.

Each test here was written against a realistic single mutation of the core that the earlier
suite let through (named in each docstring): the epsilon of the perturbation (only visible with
gradients as small as it), the GradScaler unscale of the ascent gradient (invisible unless the
epsilon matters: the perturbation is scale-invariant), ``perturb=`` through the optimizer, the
accumulation weight, the two non-finite gradient checks, the rollback of a failed
``accumulate``, BatchNorm after a weight layer (its statistics then depend on the weights, so a
leak from the perturbed pass shows), ``auto`` with each candidate, and exact split sizes.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import msam
from msam.core.batch import split_batch
from msam.strategies import AutoStrategy

from reference import (
    reference_linear_bn_running_stats,
    reference_msam_grad,
    reference_msam_grad_bn,
)

pytestmark = pytest.mark.usefixtures("float64")

STRATEGIES = ["loop", "vmap"]


def _mlp(seed=0, bn=False, momentum=0.1):
    torch.manual_seed(seed)
    layers = [torch.nn.Linear(5, 12)]
    if bn:
        layers.append(torch.nn.BatchNorm1d(12, momentum=momentum))
    layers += [torch.nn.Tanh(), torch.nn.Linear(12, 3)]
    return torch.nn.Sequential(*layers)


def _batch(n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g), torch.randint(0, 3, (n,), generator=g)


def _loss_of(f, b, scale=1.0):
    return F.cross_entropy(f(b[0]), b[1]) * scale


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def _assert_grads(model, ref, rtol=1e-9):
    """Max error relative to the largest reference entry (a bias before BatchNorm has a zero
    gradient in exact arithmetic, so per-tensor relative errors would be meaningless)."""
    scale = max(float(r.abs().max()) for r in ref.values())
    for n, p in model.named_parameters():
        err = float((p.grad - ref[n]).abs().max()) / scale
        assert err < rtol, (n, err)


# -- epsilon placement (loop, vmap, closure) ---------------------------------------------------
@pytest.mark.parametrize("strategy", STRATEGIES + ["closure"])
@pytest.mark.parametrize("adaptive", [False, True])
def test_tiny_gradients_match_reference_epsilon(strategy, adaptive):
    """Mutants: ``rho g / ||g|| + eps``, ``rho g / max(||g||, eps)``, another eps, in either
    strategy. With ||g|| about 1e-12 the epsilon changes e_j by a factor of about 2."""
    scale = 1e-12
    model = _mlp()
    batch = _batch()
    m = 1 if strategy == "closure" else 3
    kw = {"rho": 0.2, "adaptive": adaptive, "eta": 0.05}
    ref, _ = reference_msam_grad(model, lambda f, b: _loss_of(f, b, scale), batch, m, **kw)
    if strategy == "closure":
        msam.msam_gradient(lambda: _loss_of(model, batch, scale), None, model.parameters(), **kw)
    else:
        msam.msam_gradient(lambda b: _loss_of(model, b, scale), batch, model.parameters(),
                           micro_batches=m, strategy=strategy, model=model, **kw)
    _assert_grads(model, ref)


def test_tiny_gradient_epsilon_is_visible():
    """Guard for the test above: at this scale e_j with and without eps differ clearly."""
    model = _mlp()
    batch = _batch()
    g = torch.autograd.grad(_loss_of(model, batch, 1e-12), list(model.parameters()))
    norm = torch.sqrt(sum((x ** 2).sum() for x in g))
    assert 0.1 < float(norm / (norm + 1e-12)) < 0.9


# -- the GradScaler unscale of the ascent gradient ---------------------------------------------
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_grad_scaler_unscales_the_ascent_gradient(strategy):
    """Mutant: e_j computed from the scaled ascent gradient. Scale-invariant except through the
    epsilon, so the gradients are made as small as it."""
    scale = 1e-12
    model = _mlp()
    batch = _batch()
    opt = msam.MSAM(model.parameters(), torch.optim.SGD, rho=0.2, micro_batches=2, lr=0.0,
                    strategy=strategy, model=model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 24)
    opt.step(lambda b: _loss_of(model, b, scale), batch, scaler=scaler)
    assert opt.skipped_steps == 0
    ref, _ = reference_msam_grad(model, lambda f, b: _loss_of(f, b, scale), batch, 2, 0.2)
    _assert_grads(model, ref)   # scaler.step unscaled .grad in place


# -- perturb= through the optimizer --------------------------------------------------------------
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_optimizer_perturb_subset_matches_reference(strategy):
    """Mutant: ``MSAM(perturb=...)`` ignoring the subset (only msam_gradient was compared)."""
    model, ref_model = _mlp(), _mlp()
    subset = [model[0].weight, model[2].bias]
    names = ["0.weight", "2.bias"]
    opt = msam.MSAM(model.parameters(), torch.optim.SGD, rho=0.3, micro_batches=3, lr=0.1,
                    momentum=0.9, perturb=subset, strategy=strategy, model=model)
    ref_opt = torch.optim.SGD(ref_model.parameters(), lr=0.1, momentum=0.9)
    for s in range(3):
        batch = _batch(seed=s)
        opt.step(lambda b: _loss_of(model, b), batch)
        grads, _ = reference_msam_grad(ref_model, _loss_of, batch, 3, 0.3, perturb=names)
        for n, p in ref_model.named_parameters():
            p.grad = grads[n]
        ref_opt.step()
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


# -- the accumulation weight ----------------------------------------------------------------
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("rho", [0.0, 0.1])
def test_accumulation_weights_match_reference(strategy, rho):
    """Mutants: ``grad_weight`` ignored by vmap, or by the rho = 0 path."""
    model = _mlp()
    opt = msam.MSAM(model.parameters(), torch.optim.SGD, rho=rho, micro_batches=2, lr=0.0,
                    strategy=strategy, model=model)
    b1, b2 = _batch(seed=1), _batch(seed=2)
    opt.accumulate(lambda b: _loss_of(model, b), b1, scale=0.25)
    opt.accumulate(lambda b: _loss_of(model, b), b2, scale=0.75)
    r1, _ = reference_msam_grad(model, _loss_of, b1, 2, rho)
    r2, _ = reference_msam_grad(model, _loss_of, b2, 2, rho)
    _assert_grads(model, {k: 0.25 * r1[k] + 0.75 * r2[k] for k in r1})
    opt.step()
    assert opt.steps == 1


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_failed_accumulate_rolls_back_grad(strategy):
    """Mutant: a failed ``accumulate()`` leaves a partial gradient added to ``.grad``."""
    model = _mlp()
    opt = msam.MSAM(model.parameters(), torch.optim.SGD, rho=0.1, micro_batches=3, lr=0.0,
                    strategy=strategy, model=model)
    b1, b2 = _batch(seed=1), _batch(seed=2)
    opt.accumulate(lambda b: _loss_of(model, b), b1, scale=0.5)
    after_first = _grads(model)
    calls = []
    fail_at = 4 if strategy == "loop" else 2   # after micro-batch 0 was added / vmap's descent

    def failing(b):
        calls.append(1)
        if len(calls) == fail_at:
            raise RuntimeError("boom")
        return _loss_of(model, b)

    with pytest.raises(RuntimeError, match="boom"):
        opt.accumulate(failing, b2, scale=0.5)
    for n, p in model.named_parameters():
        assert torch.equal(p.grad, after_first[n]), n
    opt.accumulate(lambda b: _loss_of(model, b), b2, scale=0.5)
    r1, _ = reference_msam_grad(model, _loss_of, b1, 3, 0.1)
    r2, _ = reference_msam_grad(model, _loss_of, b2, 3, 0.1)
    _assert_grads(model, {k: 0.5 * r1[k] + 0.5 * r2[k] for k in r1})


# -- the two non-finite gradient checks ------------------------------------------------------------
class _InfGradOnCall(torch.autograd.Function):
    """Identity whose backward returns inf on the ``n``-th backward call (counted in ``box``)."""

    @staticmethod
    def forward(ctx, x, box):
        ctx.box = box
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        ctx.box["calls"] += 1
        if ctx.box["calls"] == ctx.box["at"]:
            return torch.full_like(grad, float("inf")), None
        return grad, None


@pytest.mark.parametrize("strategy", ["loop", "closure"])
@pytest.mark.parametrize("at,phase", [(1, "ascent"), (2, "perturbed")])
def test_nonfinite_gradient_with_finite_losses_is_caught_and_named(strategy, at, phase):
    """Mutants: the ascent-norm check removed (the error then comes later and names the
    perturbed pass), or the final gradient check removed (inf reaches the base optimizer)."""
    model = _mlp()
    box = {"calls": 0, "at": at}

    def loss_fn(b):
        x = _InfGradOnCall.apply(model[0](b[0]), box)
        return F.cross_entropy(model[2](model[1](x)), b[1])

    opt = msam.MSAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batch = _batch()
    with pytest.raises(msam.NonFiniteLossError) as err:
        if strategy == "closure":
            opt.step(lambda: loss_fn(batch))
        else:
            opt.step(loss_fn, batch)
    assert err.value.phase == phase and err.value.what == "gradient"
    assert opt.steps == 0 and not opt.state
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert all(p.grad is None for p in model.parameters())


# -- BatchNorm after a weight layer ----------------------------------------------------------------
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("m", [1, 3])
def test_batchnorm_after_linear_matches_reference(strategy, momentum, m):
    """Mutant: running statistics taken from the perturbed pass (or from both passes). After a
    Linear layer they depend on the weights, so w and w + e_j give different statistics."""
    model = _mlp(bn=True, momentum=momentum)
    ref_model = _mlp(bn=True, momentum=momentum)
    bn = model[1]
    opt = msam.MSAM(model.parameters(), torch.optim.SGD, rho=0.5, micro_batches=m, lr=0.1,
                    strategy=strategy, model=model)
    ref_opt = torch.optim.SGD(ref_model.parameters(), lr=0.1)
    mean, var = bn.running_mean.clone(), bn.running_var.clone()
    for s in range(3):
        x, y = _batch(n=12, seed=s)
        mean, var = reference_linear_bn_running_stats(
            ref_model[0].weight.detach(), ref_model[0].bias.detach(), x, m, mean, var,
            momentum, s)
        grads = reference_msam_grad_bn(ref_model, _loss_of, (x, y), m, 0.5)
        opt.step(lambda b: _loss_of(model, b), (x, y))
        for n, p in ref_model.named_parameters():
            p.grad = grads[n]
        ref_opt.step()
        torch.testing.assert_close(bn.running_mean, mean, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(bn.running_var, var, rtol=1e-10, atol=1e-12)
        assert int(bn.num_batches_tracked) == s + 1
        for p, q in zip(model.parameters(), ref_model.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


# -- auto with each candidate --------------------------------------------------------------------
class _Forced(AutoStrategy):
    def __init__(self, pick):
        super().__init__()
        self.pick = pick

    def _probe(self, trial):
        for candidate in self.candidates.values():   # run the real trials too
            trial(candidate)
        return self.pick


@pytest.mark.parametrize("pick", ["loop", "vmap"])
def test_auto_with_either_choice_matches_reference(pick):
    """Weak test before: "auto equals loop" compared loop with loop when auto picked loop."""
    model = _mlp(bn=True)
    ref_model = _mlp(bn=True)
    strat = _Forced(pick)
    opt = msam.MSAM(model.parameters(), torch.optim.SGD, rho=0.3, micro_batches=3, lr=0.0,
                    strategy=strat, model=model)
    batch = _batch()
    opt.step(lambda b: _loss_of(model, b), batch)
    assert strat.choice == pick
    _assert_grads(model, reference_msam_grad_bn(ref_model, _loss_of, batch, 3, 0.3))
    assert int(model[1].num_batches_tracked) == 1   # the trials committed nothing


# -- exact split sizes -----------------------------------------------------------------------------
@pytest.mark.parametrize("n,m,sizes", [(10, 4, [3, 3, 2, 2]), (7, 3, [3, 2, 2]), (5, 5, [1] * 5),
                                       (12, 1, [12])])
def test_split_sizes_are_the_documented_ones(n, m, sizes):
    x = torch.arange(n)
    parts = split_batch(x, m)
    assert [nj for _, nj in parts] == sizes
    assert torch.equal(torch.cat([p for p, _ in parts]), x)
