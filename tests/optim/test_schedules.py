"""Schedules (every, start_step, LookSAM-style reuse) against an independent float64 reference.

The reference trajectory is written from the equations: on perturbation steps the mSAM
gradient of ``tests/reference.py``; on the other steps the plain full-batch gradient taken
with ``torch.func.functional_call`` (reuse: ``g + alpha ||g|| / ||g_v|| g_v`` with ``g_v``
the part of the last mSAM gradient orthogonal to that step's clean gradient); each handed to
a fresh ``torch.optim.SGD`` with momentum. No msam code is used by the reference.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch.func import functional_call

import msam

from reference import reference_msam_grad

pytestmark = pytest.mark.usefixtures("float64")

M = 4
RHO = 0.1
SGD = {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4}


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 12), torch.nn.Tanh(), torch.nn.Linear(12, 3))


def _data(step, n=12):
    g = torch.Generator().manual_seed(200 + step)
    return torch.randn(n, 5, generator=g), torch.randint(0, 3, (n,), generator=g)


def _loss_of(f, b):
    return torch.nn.functional.cross_entropy(f(b[0]), b[1])


def _plain_grad(model, batch):
    names = [n for n, _ in model.named_parameters()]
    w = {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters()}
    loss = _loss_of(lambda x: functional_call(model, w, (x,)), batch)
    return dict(zip(names, torch.autograd.grad(loss, [w[n] for n in names]))), float(loss.detach())


def _dot(a, b):
    return sum((a[k] * b[k]).sum() for k in a)


def _reference(steps, perturb_at, reuse_alpha=None, m=M):
    """Parameters after ``steps`` steps; ``perturb_at(t)`` says whether step t is mSAM."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), **SGD)
    g_v = None
    for t in range(steps):
        batch = _data(t)
        if perturb_at(t):
            grads, _ = reference_msam_grad(model, _loss_of, batch, m, RHO)
            if reuse_alpha is not None:
                g, _ = _plain_grad(model, batch)
                coef = _dot(grads, g) / _dot(g, g)
                g_v = {k: grads[k] - coef * g[k] for k in g}
        else:
            grads, _ = _plain_grad(model, batch)
            if reuse_alpha is not None and g_v is not None:
                scale = reuse_alpha * torch.sqrt(_dot(grads, grads)) / torch.sqrt(_dot(g_v, g_v))
                grads = {k: grads[k] + scale * g_v[k] for k in grads}
        for n, p in model.named_parameters():
            p.grad = grads[n].clone()
        opt.step()
    return model


def _train(steps, strategy="loop", first=0, model=None, opt=None, calls=None, **sched):
    model = model or _model()
    opt = opt or msam.MSAM(model.parameters(), torch.optim.SGD, rho=RHO, micro_batches=M,
                           strategy=strategy, model=model, **sched, **SGD)

    def loss_fn(b):
        if calls is not None:
            calls[-1] += 1
        return _loss_of(model, b)

    for t in range(first, first + steps):
        if calls is not None:
            calls.append(0)
        opt.step(loss_fn, _data(t))
    return model, opt


def _assert_same(a, b, tol=1e-10):
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=tol, atol=tol, msg=n)


CASES = {
    "every3": ({"every": 3}, lambda t: t % 3 == 0),
    "start3": ({"start_step": 3}, lambda t: t >= 3),
    "start2_every2": ({"start_step": 2, "every": 2}, lambda t: t >= 2 and t % 2 == 0),
}


@pytest.mark.parametrize("strategy", ["loop", "vmap", "batched", "lowrank"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_schedule_trajectory_matches_reference(case, strategy):
    kwargs, at = CASES[case]
    model, _ = _train(7, strategy, **kwargs)
    _assert_same(model, _reference(7, at))
    # The reference really depends on the schedule: all-mSAM differs.
    with pytest.raises(AssertionError):
        _assert_same(model, _reference(7, lambda t: True))


def test_reuse_perturbation_steps_take_lowrank_fused_path():
    """Issue 26: a reuse schedule's perturbation steps run on lowrank's fused path (they fell
    back to the ordinary per-micro-batch path, which needs every g_j, because the fused path
    did not return the clean gradient the reuse direction is built from)."""
    model = _model()
    opt = msam.MSAM(model.parameters(), torch.optim.SGD, rho=RHO, micro_batches=M,
                    strategy="lowrank", model=model, every=3, reuse="looksam", reuse_alpha=0.5,
                    **SGD)
    strategy = opt.engine.strategy
    fused, ordinary = [], []
    real_fused, real_ascent = strategy._fused, strategy.ascent
    strategy._fused = lambda *a, **k: fused.append(1) or real_fused(*a, **k)
    strategy.ascent = lambda *a, **k: ordinary.append(1) or real_ascent(*a, **k)
    _train(7, model=model, opt=opt)
    assert len(fused) == 3 and not ordinary   # steps 0, 3, 6; one chunk each
    _assert_same(model, _reference(7, lambda t: t % 3 == 0, reuse_alpha=0.5))


def test_issue_examples_every5_and_late_phase():
    model, _ = _train(7, every=5)
    _assert_same(model, _reference(7, lambda t: t % 5 == 0))
    model, _ = _train(7, start_step=5)
    _assert_same(model, _reference(7, lambda t: t >= 5))


@pytest.mark.parametrize("strategy", ["loop", "vmap", "batched", "lowrank", "auto"])
def test_looksam_reuse_matches_reference(strategy):
    model, opt = _train(7, strategy, every=3, reuse="looksam", reuse_alpha=0.5)
    _assert_same(model, _reference(7, lambda t: t % 3 == 0, reuse_alpha=0.5))
    with pytest.raises(AssertionError):  # reuse changes the off-steps
        _assert_same(model, _reference(7, lambda t: t % 3 == 0))
    assert opt.schedule.direction is not None
    assert len(opt.schedule.direction) == len(list(model.parameters()))


def test_looksam_late_phase_is_plain_before_the_first_perturbation():
    model, _ = _train(6, every=2, start_step=3, reuse="looksam", reuse_alpha=0.7)
    _assert_same(model, _reference(6, lambda t: t >= 3 and (t - 3) % 2 == 0, reuse_alpha=0.7))


@pytest.mark.parametrize("kwargs,expected", [
    ({"every": 3}, [2 * M, 1, 1, 2 * M, 1, 1, 2 * M]),
    ({"start_step": 5}, [1, 1, 1, 1, 1, 2 * M, 2 * M]),
    ({"every": 2, "reuse": "looksam"}, [2 * M, 1, 2 * M, 1, 2 * M, 1, 2 * M]),
])
def test_loss_fn_calls_per_step(kwargs, expected):
    calls: list[int] = []
    _train(7, calls=calls, **kwargs)
    assert calls == expected


def test_accumulation_counts_optimizer_steps():
    model = _model()
    opt = msam.MSAM(model.parameters(), torch.optim.SGD, rho=RHO, micro_batches=M, every=2,
                    **SGD)
    calls = [0]

    def loss_fn(b):
        calls[0] += 1
        return _loss_of(model, b)

    per_step = []
    for t in range(3):
        calls[0] = 0
        opt.accumulate(loss_fn, _data(2 * t), scale=0.5)
        opt.accumulate(loss_fn, _data(2 * t + 1), scale=0.5)
        opt.step()
        per_step.append(calls[0])
    assert per_step == [4 * M, 2, 4 * M] and opt.steps == 3
    # Step 3 is an off-step: its accumulated gradient is the mean of the two plain batch gradients.
    ref = _model()
    ref.load_state_dict(model.state_dict())
    g1, _ = _plain_grad(ref, _data(100))
    g2, _ = _plain_grad(ref, _data(101))
    opt.accumulate(lambda b: _loss_of(model, b), _data(100), scale=0.5)
    opt.accumulate(lambda b: _loss_of(model, b), _data(101), scale=0.5)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, 0.5 * (g1[n] + g2[n]), rtol=1e-12, atol=1e-14)


def test_looksam_with_accumulation_matches_reference_of_the_sums():
    """Reuse over accumulated calls: g_s and g are the scale-weighted sums of the calls'."""
    model = _model()
    opt = msam.MSAM(model.parameters(), torch.optim.SGD, rho=RHO, micro_batches=2, every=2,
                    reuse="looksam", reuse_alpha=0.5, **SGD)
    ref = _model()
    ref_opt = torch.optim.SGD(ref.parameters(), **SGD)
    g_v = None
    for t in range(4):
        b1, b2 = _data(2 * t), _data(2 * t + 1)
        if t % 2 == 0:
            s1, _ = reference_msam_grad(ref, _loss_of, b1, 2, RHO)
            s2, _ = reference_msam_grad(ref, _loss_of, b2, 2, RHO)
            c1, _ = _plain_grad(ref, b1)
            c2, _ = _plain_grad(ref, b2)
            gs = {k: 0.5 * (s1[k] + s2[k]) for k in s1}
            g = {k: 0.5 * (c1[k] + c2[k]) for k in c1}
            g_v = {k: gs[k] - _dot(gs, g) / _dot(g, g) * g[k] for k in g}
            grads = gs
        else:
            c1, _ = _plain_grad(ref, b1)
            c2, _ = _plain_grad(ref, b2)
            g = {k: 0.5 * (c1[k] + c2[k]) for k in c1}
            c = 0.5 * torch.sqrt(_dot(g, g)) / torch.sqrt(_dot(g_v, g_v))
            grads = {k: g[k] + c * g_v[k] for k in g}
        for n, p in ref.named_parameters():
            p.grad = grads[n].clone()
        ref_opt.step()
        opt.accumulate(lambda b: _loss_of(model, b), b1, scale=0.5)
        opt.accumulate(lambda b: _loss_of(model, b), b2, scale=0.5)
        opt.step()
    _assert_same(model, ref)


def _bn_model(momentum=0.1):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.BatchNorm1d(8, momentum=momentum),
                               torch.nn.Tanh(), torch.nn.Linear(8, 3))


@pytest.mark.parametrize("momentum", [0.1, None])
def test_off_step_batchnorm_equals_an_ordinary_training_step(momentum):
    model = _bn_model(momentum)
    opt = msam.MSAM(model.parameters(), torch.optim.SGD, rho=RHO, micro_batches=M,
                    start_step=10, model=model, **SGD)
    plain = copy.deepcopy(model)
    plain_opt = torch.optim.SGD(plain.parameters(), **SGD)
    for t in range(3):
        batch = _data(t)
        loss = opt.step(lambda b: _loss_of(model, b), batch)
        plain_opt.zero_grad()
        ref_loss = _loss_of(plain, batch)   # an ordinary train-mode step
        ref_loss.backward()
        plain_opt.step()
        assert abs(float(loss) - float(ref_loss.detach())) < 1e-12
    sa, sb = model.state_dict(), plain.state_dict()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=1e-12, atol=1e-14, msg=k)
    assert int(model[1].num_batches_tracked) == 3


def _roundtrip(opt_state, model_state, **sched):
    buf = io.BytesIO()
    torch.save({"opt": opt_state, "model": model_state}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    model = _bn_model()
    model.load_state_dict(ckpt["model"])
    opt = msam.MSAM(model.parameters(), torch.optim.SGD, rho=RHO, micro_batches=M, model=model,
                    **sched, **SGD)
    opt.load_state_dict(ckpt["opt"])
    return model, opt


@pytest.mark.parametrize("sched", [{"every": 3}, {"start_step": 4},
                                   {"every": 3, "reuse": "looksam", "reuse_alpha": 0.5}],
                         ids=["every3", "start4", "looksam3"])
def test_resume_mid_schedule_is_bit_identical(sched):
    def build():
        model = _bn_model()
        return model, msam.MSAM(model.parameters(), torch.optim.SGD, rho=RHO,
                                micro_batches=M, model=model, **sched, **SGD)

    def run(model, opt, steps):
        for t in steps:
            opt.step(lambda b: _loss_of(model, b), _data(t))

    model_a, opt_a = build()
    run(model_a, opt_a, range(8))
    model_b, opt_b = build()
    run(model_b, opt_b, range(5))
    # The fresh optimizer is built with the default schedule: the state brings it back.
    model_c, opt_c = _roundtrip(opt_b.state_dict(), model_b.state_dict())
    assert opt_c.schedule.state_dict()["every"] == sched.get("every", 1)
    run(model_c, opt_c, range(5, 8))
    sa, sc = model_a.state_dict(), model_c.state_dict()
    for k in sa:
        assert torch.equal(sa[k], sc[k]), k
    assert opt_c.steps == 8


def test_states_without_a_schedule_still_load():
    model = _bn_model()
    opt = msam.MSAM(model.parameters(), torch.optim.SGD, rho=RHO, micro_batches=M, model=model,
                    **SGD)
    opt.step(lambda b: _loss_of(model, b), _data(0))
    sd = opt.state_dict()
    del sd["msam"]["schedule"]  # a version-2 state written before schedules existed
    _, fresh = _roundtrip(sd, model.state_dict(), every=4)
    assert fresh.schedule.trivial and fresh.steps == 1
    v1 = opt.state_dict()
    v1["msam"] = {"version": 1, "micro_batches": M, "adaptive": False, "strategy": "loop",
                  "steps": 1}
    _, fresh = _roundtrip(v1, model.state_dict())
    assert fresh.schedule.trivial
    bad = opt.state_dict()
    bad["msam"]["schedule"] = {"every": 0}
    with pytest.raises(ValueError, match="every"):
        fresh.load_state_dict(bad)
    bad["msam"]["schedule"] = {"every": 2, "direction": [torch.zeros(3)]}
    with pytest.raises(ValueError, match="direction"):
        fresh.load_state_dict(bad)


@pytest.mark.parametrize("kwargs,match", [
    ({"every": 0}, "every must be an integer >= 1"),
    ({"every": 2.5}, "every"),
    ({"start_step": -1}, "start_step must be an integer >= 0"),
    ({"reuse": "lookahead", "every": 2}, "reuse must be None or one of"),
    ({"reuse": "looksam"}, "reuse='looksam' needs every >= 2"),
    ({"reuse": "looksam", "every": 2, "reuse_alpha": -1.0}, "reuse_alpha"),
    ({"schedule": msam.Schedule(every=2), "every": 3}, "schedule"),
    ({"schedule": "every2"}, "schedule must be a msam.Schedule"),
])
def test_validation_names_the_argument(kwargs, match):
    model = _model()
    with pytest.raises(ValueError, match=match):
        msam.MSAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=0.1, **kwargs)


def test_reuse_and_two_step_refusals():
    model = _model()
    with pytest.raises(ValueError, match="reuse"):
        msam.MSAM(model.parameters(), torch.optim.SGD, every=2, reuse="looksam",
                  perturb=[model[0].weight], lr=0.1)
    opt = msam.SAM(model.parameters(), torch.optim.SGD, every=2, lr=0.1)
    _loss_of(model, _data(0)).backward()
    with pytest.raises(ValueError, match="first_step"):
        opt.first_step()
    params = list(model.parameters())
    with pytest.raises(ValueError, match="step must be"):
        msam.msam_gradient(lambda b: _loss_of(model, b), _data(0), params,
                           schedule=msam.Schedule(every=2))
    with pytest.raises(ValueError, match="step: given without schedule"):
        msam.msam_gradient(lambda b: _loss_of(model, b), _data(0), params, step=3)
    with pytest.raises(ValueError, match="accumulate"):
        msam.msam_gradient(lambda b: _loss_of(model, b), _data(0), params, accumulate=True,
                           schedule=msam.Schedule(every=2, reuse="looksam"), step=0)


@pytest.mark.parametrize("sched", [{"every": 3}, {"every": 3, "reuse": "looksam",
                                                  "reuse_alpha": 0.5}])
def test_functional_entry_point_follows_the_schedule(sched):
    model = _model()
    base = torch.optim.SGD(model.parameters(), **SGD)
    schedule = msam.Schedule(**sched)
    for t in range(7):
        msam.msam_gradient(lambda b: _loss_of(model, b), _data(t), model.parameters(),
                           rho=RHO, micro_batches=M, schedule=schedule, step=t)
        base.step()
    _assert_same(model, _reference(7, lambda t: t % 3 == 0, reuse_alpha=sched.get(
        "reuse_alpha")))


@pytest.mark.parametrize("rule", ["gsam", "wsam"])
def test_combining_rule_with_every_off_steps_are_plain(rule):
    """GSAM and decoupled WSAM (rules that combine g_j and h_j) compose: their steps are the
    rule's (WSAM's sharpness step included), the others one plain pass and no decoupled
    step."""
    model = _model()
    opt = msam.MSAM(model.parameters(), torch.optim.SGD, rho=RHO, micro_batches=2,
                    rule=rule, every=2, **SGD)
    ref = _model()
    ref_opt = msam.MSAM(ref.parameters(), torch.optim.SGD, rho=RHO, micro_batches=2,
                        rule=rule, **SGD)
    ref_sgd = ref_opt.base_optimizer
    for t in range(4):
        opt.step(lambda b: _loss_of(model, b), _data(t))
        if t % 2 == 0:
            ref_opt.step(lambda b: _loss_of(ref, b), _data(t))
        else:
            g, _ = _plain_grad(ref, _data(t))
            for n, p in ref.named_parameters():
                p.grad = g[n].clone()
            ref_sgd.step()
    _assert_same(model, ref)


@pytest.fixture
def one_rank_group():
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("case", ["every3", "start3"])
def test_ddp_one_rank_schedule_matches_reference(case, one_rank_group):
    from torch.nn.parallel import DistributedDataParallel as DDP

    from msam.distributed import DistributedMSAM, ddp_kwargs

    kwargs, at = CASES[case]
    model = _model()
    ddp = DDP(model, **ddp_kwargs())
    opt = DistributedMSAM(ddp, None, torch.optim.SGD, rho=RHO, micro_batches=M, **kwargs, **SGD)
    for t in range(7):
        opt.step(lambda b: _loss_of(ddp, b), _data(t))
    _assert_same(model, _reference(7, at))
    sd = opt.state_dict()
    assert sd["msam"]["schedule"]["every"] == kwargs.get("every", 1)


def test_off_step_nonfinite_skip_and_grad_scaler():
    """Off-steps go through the same non-finite and GradScaler handling as every step."""
    model = _model()
    opt = msam.MSAM(model.parameters(), torch.optim.SGD, rho=RHO, micro_batches=M, every=2,
                    nonfinite="skip", **SGD)
    opt.step(lambda b: _loss_of(model, b), _data(0))          # step 0: mSAM
    before = [p.detach().clone() for p in model.parameters()]
    loss = opt.step(lambda b: _loss_of(model, b) * float("nan"), _data(1))  # an off-step
    assert torch.isnan(loss) and opt.steps == 1 and opt.skipped_steps == 1
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    # With a GradScaler the off-step's gradient is scaled and unscaled like any other.
    model_s, model_r = _model(), _model()
    opt_s = msam.MSAM(model_s.parameters(), torch.optim.SGD, rho=RHO, micro_batches=M, every=3,
                      reuse="looksam", **SGD)
    opt_r = msam.MSAM(model_r.parameters(), torch.optim.SGD, rho=RHO, micro_batches=M, every=3,
                      reuse="looksam", **SGD)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 4)
    for t in range(4):
        opt_s.step(lambda b: _loss_of(model_s, b), _data(t), scaler=scaler)
        scaler.update()
        opt_r.step(lambda b: _loss_of(model_r, b), _data(t))
    _assert_same(model_s, model_r, tol=1e-9)


def test_reuse_off_step_whose_base_step_fails_leaves_the_plain_gradient():
    """The reuse term is added to .grad in place (no copy of the gradient). When the base step
    then raises: after step(loss_fn, batch) .grad is as before the call; after accumulate() +
    step() it is the accumulated plain gradient again (the term taken out, to rounding), ready
    for another step(). The weights never move."""
    model = _model()
    opt = msam.MSAM(model.parameters(), torch.optim.SGD, rho=RHO, micro_batches=M, every=3,
                    reuse="looksam", **SGD)
    opt.step(lambda b: _loss_of(model, b), _data(0))               # step 0 makes g_v
    before = [p.grad.clone() for p in model.parameters()]
    w = [p.detach().clone() for p in model.parameters()]
    real = opt.base_optimizer.step
    opt.base_optimizer.step = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("base"))
    with pytest.raises(RuntimeError, match="base"):
        opt.step(lambda b: _loss_of(model, b), _data(1))           # an off-step
    for p, g, w0 in zip(model.parameters(), before, w):
        assert torch.equal(p.grad, g) and torch.equal(p.detach(), w0)
    opt.accumulate(lambda b: _loss_of(model, b), _data(1))
    with pytest.raises(RuntimeError, match="base"):
        opt.step()
    plain = torch.autograd.grad(_loss_of(model, _data(1)), list(model.parameters()))
    for p, g, w0 in zip(model.parameters(), plain, w):
        torch.testing.assert_close(p.grad, g, rtol=0, atol=1e-14)
        assert torch.equal(p.detach(), w0)
    opt.base_optimizer.step = real
    opt.step()                                                     # and it goes on
    assert opt.steps == 2


def test_lowrank_reuse_on_a_conv_net_with_explicit_gradients_matches_loop():
    """The fused clean gradient of parameters lowrank does not factor (a convolution, a
    BatchNorm affine: explicit per-micro-batch gradients) matches the loop strategy's, whose
    trajectory is checked against the float64 reference above."""
    def build():
        torch.manual_seed(3)
        return torch.nn.Sequential(
            torch.nn.Conv2d(1, 3, 3), torch.nn.BatchNorm2d(3), torch.nn.ReLU(),
            torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 3))

    def run(strategy):
        model = build()
        opt = msam.MSAM(model.parameters(), torch.optim.SGD, rho=RHO, micro_batches=M,
                        strategy=strategy, model=model, every=2, reuse="looksam", **SGD)
        for t in range(5):
            g = torch.Generator().manual_seed(300 + t)
            batch = torch.randn(8, 1, 6, 6, generator=g), torch.randint(0, 3, (8,), generator=g)
            opt.step(lambda b: _loss_of(model, b), batch)
        return model, opt

    loop, _ = run("loop")
    low, opt = run("lowrank")
    assert opt.engine.strategy.lowrank_reason == ""
    _assert_same(low, loop)
    for a, b in zip(low.buffers(), loop.buffers()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("strategy", ["loop", "lowrank"])
def test_looksam_reuse_with_batchnorm_matches_reference(strategy):
    """Reuse on a BatchNorm model against the float64 reference: perturbation steps normalise
    each micro-batch with its own statistics (g_j, h_j and the clean gradient alike), off-steps
    the whole batch; g_v is made from the micro-batch gradients and added to the full-batch
    off-step gradient. (The BatchNorm CNN study found reuse unhelpful there; this pins that
    the schedule computes what the method says.)"""
    from reference import reference_msam_grad_bn, split

    def build():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(5, 12), torch.nn.BatchNorm1d(12),
                                   torch.nn.Tanh(), torch.nn.Linear(12, 3))

    def grad_at(model, batch):  # BatchNorm in training mode: the batch's own statistics
        names = [n for n, _ in model.named_parameters()]
        w = {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters()}
        state = {**w, **{k: b.detach().clone() for k, b in model.named_buffers()}}
        loss = _loss_of(lambda x: functional_call(model, state, (x,)), batch)
        return dict(zip(names, torch.autograd.grad(loss, [w[n] for n in names])))

    model = build()
    opt = msam.MSAM(model.parameters(), torch.optim.SGD, rho=RHO, micro_batches=M,
                    strategy=strategy, model=model, every=3, reuse="looksam", reuse_alpha=0.5,
                    **SGD)
    for t in range(7):
        opt.step(lambda b: _loss_of(model, b), _data(t))

    ref = build()
    ref_opt = torch.optim.SGD(ref.parameters(), **SGD)
    g_v = None
    for t in range(7):
        batch = _data(t)
        if t % 3 == 0:
            grads = reference_msam_grad_bn(ref, _loss_of, batch, M, RHO)
            n = batch[0].shape[0]
            g = {k: torch.zeros_like(v) for k, v in grads.items()}
            for mb in split(batch, M):
                for k, v in grad_at(ref, mb).items():
                    g[k] += v * (mb[0].shape[0] / n)
            coef = _dot(grads, g) / _dot(g, g)
            g_v = {k: grads[k] - coef * g[k] for k in g}
        else:
            grads = grad_at(ref, batch)
            scale = 0.5 * torch.sqrt(_dot(grads, grads)) / torch.sqrt(_dot(g_v, g_v))
            grads = {k: grads[k] + scale * g_v[k] for k in grads}
        for name, p in ref.named_parameters():
            p.grad = grads[name].clone()
        ref_opt.step()
    _assert_same(model, ref)
