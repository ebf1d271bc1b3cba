"""The core speed-ups made for the benchmarks keep the math: fused norms, the one-sync
non-finite flags, and the ``auto`` strategy's rules (no probe for m = 1 or without a model,
interleaved probe, margin, choice kept per optimizer and saved)."""

from __future__ import annotations

import pytest
import torch

import msam
from msam.core.nonfinite import NonFiniteFlags
from msam.core.perturbation import perturbation, perturbation_norm
from msam.strategies.auto import AutoStrategy


def _reference_norm(grads):
    return sum((g.double() ** 2).sum() for g in grads if g is not None).sqrt()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_perturbation_norm_matches_float64_reference(dtype):
    torch.manual_seed(0)
    grads = [torch.randn(30, 20).to(dtype), None, torch.randn(7).to(dtype)]
    params = [torch.zeros(30, 20), torch.zeros(3), torch.zeros(7)]
    got = perturbation_norm(grads, params)
    assert got.dtype == torch.float64
    rtol = 1e-15 if dtype == torch.float64 else 1e-6
    torch.testing.assert_close(got, _reference_norm(grads), rtol=rtol, atol=0)


def test_perturbation_norm_of_half_does_not_overflow():
    g = torch.full((8,), 60000.0, dtype=torch.float16)
    assert float(perturbation_norm([g], [g])) == pytest.approx(60000.0 * 8 ** 0.5)


@pytest.mark.parametrize("adaptive", [False, True])
def test_owned_perturbation_equals_out_of_place_even_with_aliasing(adaptive):
    torch.manual_seed(1)
    params = [torch.randn(5), torch.randn(5), torch.randn(2, 3), torch.randn(4), torch.randn(2)]
    rhos = [0.1, 0.1, 0.1, 0.2, 0.1]
    shared = torch.randn(5)
    transposed = torch.randn(3, 2).t()      # like a Linear weight gradient from autograd.grad
    expanded = torch.randn(1).expand(4)     # stride 0: must not be written
    sliced = torch.randn(6)[:2]             # part of a bigger buffer: must not be written
    grads = [shared, shared, transposed, expanded, sliced]
    before = [g.clone() for g in grads]
    ref, ref_norm = perturbation([g.clone() for g in grads], params, rhos, adaptive,
                                 [0.01] * 5)
    got, norm = perturbation(grads, params, rhos, adaptive, [0.01] * 5, owned=True)
    assert torch.equal(norm, ref_norm)
    for r, g in zip(ref, got):
        assert torch.equal(r, g)
    if not adaptive:
        assert got[2] is transposed                   # written in place
        assert (got[0] is shared) != (got[1] is shared)  # the shared tensor is written once
    assert torch.equal(expanded, before[3]) and torch.equal(sliced, before[4])


def test_perturbation_leaves_gradients_alone():
    g = torch.randn(4)
    keep = g.clone()
    e, _ = perturbation([g], [torch.zeros(4)], [0.05])
    assert e[0] is not g and torch.equal(g, keep)


def _first(tensors):
    flags = NonFiniteFlags()
    flags.check_grads(tensors)
    return flags.first()


def test_nonfinite_flags_exact_and_one_sync(monkeypatch):
    ok = [torch.ones(3), None, torch.zeros(0), torch.ones(2, dtype=torch.float16)]
    assert _first(ok) is None
    assert _first([]) is None
    assert _first([torch.ones(2), torch.tensor([1.0, float("nan")])]) is not None
    assert _first([torch.tensor([float("-inf")])]) is not None
    big = torch.full((4,), 3e38)   # finite, but its sum and its squared norm overflow
    assert _first([big]) is None
    assert _first([torch.full((4,), 60000.0, dtype=torch.float16)]) is None
    flags = NonFiniteFlags()
    flags.check(torch.tensor(1.0), "ascent", 0, "loss")
    flags.check(torch.tensor(float("nan")), "perturbed", 2, "loss")
    flags.check(torch.tensor(float("inf")), "perturbed", 3, "loss")
    assert flags.first() == ("perturbed", 2, "loss")   # the first failed check is named
def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(),
                               torch.nn.Linear(8, 3))


def _step(strategy, m):
    model = _model()
    opt = msam.MSAM(model.parameters(), torch.optim.SGD, rho=0.1, micro_batches=m, lr=0.1,
                    strategy=strategy, model=model)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(12, 4, generator=g), torch.randint(0, 3, (12,), generator=g)
    opt.step(lambda b: torch.nn.functional.cross_entropy(model(b[0]), b[1]), (x, y))
    return model


def test_auto_skips_the_probe_for_one_micro_batch():
    strat = AutoStrategy()
    _step(strat, 1)
    assert strat.choice == "loop" and strat.reason == "one micro-batch" and not strat.timings
    assert strat.choices == {}


def test_auto_uses_loop_without_a_model():
    strat = AutoStrategy()
    model = _model()
    opt = msam.MSAM(model.parameters(), torch.optim.SGD, rho=0.1, micro_batches=3, lr=0.1,
                    strategy=strat)
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    opt.step(lambda b: torch.nn.functional.cross_entropy(model(b[0]), b[1]), (x, y))
    assert strat.choice == "loop" and strat.reason == "no model" and not strat.timings


def test_auto_choice_is_per_optimizer_and_saved_in_state_dict():
    strat = AutoStrategy(repeats=1, margin=0.0)
    model = _step(strat, 4)
    assert len(strat.choices) == 1
    other = AutoStrategy()
    assert other.choices == {}          # no process-wide cache: a new optimizer measures anew
    opt = msam.MSAM(model.parameters(), torch.optim.SGD, rho=0.1, micro_batches=4, lr=0.1,
                    strategy=strat, model=model)
    opt2 = msam.MSAM(model.parameters(), torch.optim.SGD, rho=0.1, micro_batches=4, lr=0.1,
                     strategy="loop", model=model)
    opt2.load_state_dict(opt.state_dict())
    assert opt2.strategy == "auto" and opt2.engine.strategy.choices == strat.choices


def test_auto_probe_times_every_candidate_and_matches_loop():
    strat = AutoStrategy(repeats=1, margin=0.0)
    a = _step("loop", 4)
    b = _step(strat, 4)
    assert set(strat.timings) == {"loop", "vmap", "batched", "lowrank"}
    assert all(0 < t < float("inf") for t in strat.timings.values())
    assert strat.choice == min(strat.timings, key=strat.timings.get)
    for x, y in zip(a.state_dict().values(), b.state_dict().values()):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


def test_auto_margin_prefers_loop_on_a_tie():
    strat = AutoStrategy(repeats=1, margin=1e9)   # vmap would have to be 1e9 times faster
    _step(strat, 4)
    assert strat.choice == "loop"
    with pytest.raises(ValueError):
        AutoStrategy(repeats=0)
    with pytest.raises(ValueError):
        AutoStrategy(margin=-0.1)
