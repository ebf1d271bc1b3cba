"""The core speed-ups made for the benchmarks keep the math: fused norms, in-place perturbation
(safe against aliased / expanded / sliced gradients), the one-sync non-finite check, and the
``auto`` strategy's rules (no probe for m = 1 or loop-only hooks, interleaved probe, margin)."""

from __future__ import annotations

import contextlib

import pytest
import torch

import msam
from msam.core.perturbation import perturbation, perturbation_norm
from msam.optim.engine import first_nonfinite
from msam.strategies.auto import _CACHE, AutoStrategy


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
def test_inplace_perturbation_equals_out_of_place_even_with_aliasing(adaptive):
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
    got, norm = perturbation(grads, params, rhos, adaptive, [0.01] * 5, inplace=True)
    assert torch.equal(norm, ref_norm)
    for r, g in zip(ref, got):
        assert torch.equal(r, g)
    assert got[2] is transposed                       # written in place
    assert torch.equal(expanded, before[3]) and torch.equal(sliced, before[4])
    assert (got[0] is shared) != (got[1] is shared)    # the shared tensor is written once


def test_out_of_place_perturbation_leaves_gradients_alone():
    g = torch.randn(4)
    keep = g.clone()
    e, _ = perturbation([g], [torch.zeros(4)], [0.05])
    assert e[0] is not g and torch.equal(g, keep)


def test_first_nonfinite():
    ok = [torch.ones(3), None, torch.zeros(0), torch.ones(2, dtype=torch.float16)]
    assert first_nonfinite(ok) is None
    assert first_nonfinite([]) is None
    assert first_nonfinite([torch.ones(2), torch.tensor([1.0, float("nan")])]) == 1
    assert first_nonfinite([torch.tensor([float("-inf")]), torch.tensor([float("nan")])]) == 0
    big = torch.full((4,), 3e38)   # finite, but its sum overflows: the exact check decides
    assert first_nonfinite([big]) is None
    assert first_nonfinite([torch.full((4,), 60000.0, dtype=torch.float16)]) is None


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
    n = len(_CACHE)
    _step(strat, 1)
    assert strat.choice == "loop" and strat.reason == "one micro-batch" and not strat.timings
    assert len(_CACHE) == n


def test_auto_uses_loop_when_the_job_has_loop_only_hooks():
    strat = AutoStrategy()
    model = _model()
    # A custom ascent context, like msam.distributed's DDP no_sync, which vmap would bypass.
    engine = msam.GradientEngine(micro_batches=3, strategy=strat, model=model,
                                 ascent_context=lambda: contextlib.nullcontext())
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    params = list(model.parameters())
    engine.compute(lambda b: torch.nn.functional.cross_entropy(model(b[0]), b[1]), (x, y),
                   params, rhos=[0.1] * len(params), etas=[0.01] * len(params),
                   perturb=[True] * len(params))
    assert strat.choice == "loop" and "hooks" in strat.reason


def test_auto_probe_times_both_and_matches_loop():
    _CACHE.clear()
    strat = AutoStrategy(repeats=1, margin=0.0)
    a = _step("loop", 4)
    b = _step(strat, 4)
    assert set(strat.timings) == {"loop", "vmap"}
    assert all(0 < t < float("inf") for t in strat.timings.values())
    assert strat.choice == min(strat.timings, key=strat.timings.get)
    for x, y in zip(a.state_dict().values(), b.state_dict().values()):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


def test_auto_margin_prefers_loop_on_a_tie():
    _CACHE.clear()
    strat = AutoStrategy(repeats=1, margin=1e9)   # vmap would have to be 1e9 times faster
    _step(strat, 4)
    assert strat.choice == "loop"
    with pytest.raises(ValueError):
        AutoStrategy(repeats=0)
    with pytest.raises(ValueError):
        AutoStrategy(margin=-0.1)
