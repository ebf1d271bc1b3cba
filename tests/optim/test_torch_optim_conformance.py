"""MSAM as a conforming ``torch.optim`` optimizer (issue 24, "Core v3"): one group per case.

Every test compares against something outside msam's optimizer: torch's own behaviour (a plain
``torch.optim.SGD``, torch's hooks and schedulers), a plain SGD stepped on the gradient of
``msam.msam_gradient``, or float64 math written out here. Each test's docstring names its case.
"""

from __future__ import annotations

import copy
import math
import pickle
import warnings

import pytest
import torch
from torch.optim import SGD
from torch.optim.lr_scheduler import LambdaLR, StepLR

import msam
from msam.core import FriendlySAMRule
from msam.core.gsam import GSAMRule

F64 = torch.float64


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(),
                               torch.nn.Linear(6, 1)).double()


def _batch(seed: int, n: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + seed)
    return (torch.randn(n, 4, generator=g, dtype=F64),
            torch.randn(n, 1, generator=g, dtype=F64))


def _loss(model: torch.nn.Module):
    return lambda b: torch.nn.functional.mse_loss(model(b[0]), b[1])


def _same(a: torch.nn.Module, b: torch.nn.Module, atol: float = 0.0) -> None:
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=0.0, atol=atol)


def _trained(rule=None, steps: int = 2, **kw):
    model = _model()
    kw = {"rho": 0.05, "micro_batches": 2, "lr": 0.1, "momentum": 0.9, **kw}
    opt = msam.MSAM(model.parameters(), SGD, rule=rule, **kw)
    for s in range(steps):
        opt.step(_loss(model), _batch(s))
    return model, opt


# -- case 4: nothing changes before everything is checked ---------------------------------------
def test_case4_friendlysam_state_with_other_param_count_changes_nothing():
    """Case 4: a FriendlySAM state whose parameter count differs is refused before the rule's
    EMA (or anything else) is replaced."""
    _, saved = _trained(FriendlySAMRule())
    sd = saved.state_dict()
    model = _model(1)
    params = list(model.parameters())[:2]
    opt = msam.MSAM(params, SGD, rho=0.05, rule=FriendlySAMRule(), lr=0.1, momentum=0.9)
    opt.step(_loss(model), _batch(5))
    ema = {i: t.clone() for i, t in opt.rule.m.items()}
    base = copy.deepcopy(opt.base_optimizer.state_dict())
    with pytest.raises(ValueError) as err:
        opt.load_state_dict(sd)
    assert sorted(opt.rule.m) == sorted(ema) == [0, 1]
    for i, t in ema.items():
        assert torch.equal(opt.rule.m[i], t)
    assert opt.steps == 1
    now = opt.base_optimizer.state_dict()
    for pid, st in base["state"].items():
        assert torch.equal(now["state"][pid]["momentum_buffer"], st["momentum_buffer"])
    assert "param_groups[0] has 4 parameters, this optimizer's 2" in str(err.value)


# -- case 5: missing keys --------------------------------------------------------------------------
def test_case5_state_without_micro_batches_is_refused():
    """Case 5: an msam entry without 'micro_batches' no longer turns m = 4 into SAM."""
    _, opt = _trained(micro_batches=4)
    sd = opt.state_dict()
    del sd["msam"]["micro_batches"]
    model = _model()
    fresh = msam.MSAM(model.parameters(), SGD, rho=0.05, micro_batches=4, lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match="missing 'micro_batches'"):
        fresh.load_state_dict(sd)
    assert fresh.micro_batches == 4 and fresh.steps == 0 and not fresh.state


def test_case5_version_only_entry_names_the_missing_keys():
    """Case 5: {'version': 2} is refused naming the missing keys (it used to say "strategy must
    name one of [...], got 'loop'")."""
    _, opt = _trained()
    sd = opt.state_dict()
    sd["msam"] = {"version": 2}
    with pytest.raises(ValueError, match="missing 'micro_batches', 'micro_batch_size', 'rule', "
                                         "'strategy', 'max_grad_norm', 'nonfinite', 'steps', "
                                         "'skipped_steps'"):
        opt.load_state_dict(sd)


# -- case 6: shapes are checked at load ------------------------------------------------------------
def test_case6_momentum_buffer_of_wrong_shape_is_refused_at_load():
    """Case 6: a momentum buffer of the wrong shape is refused at load, naming the parameter
    and both shapes (torch.optim.SGD loads it and fails at the next step)."""
    _, opt = _trained()
    sd = opt.state_dict()
    sd["state"][0]["momentum_buffer"] = torch.zeros(3, dtype=F64)
    plain = SGD(_model().parameters(), lr=0.1, momentum=0.9)  # torch's behaviour: loads it
    plain.load_state_dict({k: v for k, v in sd.items() if k != "msam"})
    model = _model()
    fresh = msam.MSAM(model.parameters(), SGD, rho=0.05, micro_batches=2, lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match=r"parameter 0 \(param_groups\[0\] parameter 0\): "
                                         r"'momentum_buffer' has shape \(3,\), the parameter "
                                         r"\(6, 4\)"):
        fresh.load_state_dict(sd)
    assert not fresh.state and fresh.steps == 0


def test_case6_friendlysam_ema_of_wrong_shape_is_refused_at_load():
    """Case 6: a FriendlySAM EMA of the wrong shape is refused at load (it used to fail at the
    next step with a broadcast error)."""
    _, opt = _trained(FriendlySAMRule())
    sd = opt.state_dict()
    sd["msam"]["rule"]["m"][2] = torch.zeros(5, dtype=F64)
    model = _model()
    fresh = msam.MSAM(model.parameters(), SGD, rho=0.05, micro_batches=2,
                      rule=FriendlySAMRule(), lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match=r"'m' of perturbed parameter 2 has shape \(5,\), the "
                                         r"parameter \(1, 6\)"):
        fresh.load_state_dict(sd)
    assert fresh.rule.m == {} and not fresh.state


# -- case 7: a parameter twice in one group --------------------------------------------------------
def test_case7_parameter_twice_in_a_group_is_refused():
    """Case 7: torch.optim only warns about a parameter listed twice in one group (and steps it
    twice); MSAM refuses it, in the constructor and in add_param_group."""
    w = torch.nn.Parameter(torch.randn(3, dtype=F64))
    v = torch.nn.Parameter(torch.randn(2, dtype=F64))
    with pytest.warns(UserWarning, match="duplicate"):
        SGD([w, w], lr=0.1)   # torch's own behaviour
    with pytest.raises(ValueError, match=r"param_groups\[0\] lists one parameter twice "
                                         r"\(positions 0 and 1, shape \(3,\)"):
        msam.MSAM([w, w], SGD, lr=0.1)
    with pytest.raises(ValueError, match="twice"):
        msam.MSAM([{"params": [v]}, {"params": (p for p in [w, v, w])}], SGD, lr=0.1)
    with pytest.raises(ValueError, match="more than one parameter group"):  # torch's error
        msam.MSAM([{"params": [w]}, {"params": [w]}], SGD, lr=0.1)
    opt = msam.MSAM([w], SGD, lr=0.1)
    with pytest.raises(ValueError, match=r"param_groups\[1\] lists one parameter twice"):
        opt.add_param_group({"params": [v, v]})
    assert len(opt.param_groups) == 1
    with pytest.warns(UserWarning, match="duplicate"):
        base = SGD([w, w], lr=0.1)
    with pytest.raises(ValueError, match="twice"):
        msam.MSAM(None, base)


# -- case 9: complex parameters, sparse gradients --------------------------------------------------
def test_case9_complex_parameter_is_refused_at_construction():
    """Case 9: a complex parameter is refused when the optimizer is built (it failed deep
    inside the perturbation's norm)."""
    real = torch.nn.Parameter(torch.randn(2))
    z = torch.nn.Parameter(torch.randn(4, 2, dtype=torch.complex64))
    with pytest.raises(ValueError, match=r"parameter 1 \(shape \(4, 2\), dtype complex64\) is "
                                         "complex.*view_as_real"):
        msam.MSAM([real, z], SGD, lr=0.1)


def test_case9_sparse_gradient_is_a_clear_error_and_changes_nothing():
    """Case 9: a sparse-gradient Embedding gives a clear error at the step naming the parameter
    and what to do; weights and .grad are as before."""
    torch.manual_seed(0)
    emb = torch.nn.Embedding(10, 3, sparse=True)
    lin = torch.nn.Linear(3, 1)
    params = list(emb.parameters()) + list(lin.parameters())
    opt = msam.MSAM(params, SGD, rho=0.05, lr=0.1)
    before = [p.detach().clone() for p in params]
    batch = (torch.randint(0, 10, (8,)), torch.randn(8, 1))
    with pytest.raises(ValueError, match=r"perturbed parameter 0 \(shape \(10, 3\)\) has a "
                                         r"sparse gradient.*sparse=False"):
        opt.step(lambda b: ((lin(emb(b[0])) - b[1]) ** 2).mean(), batch)
    for p, b in zip(params, before):
        assert torch.equal(p, b) and p.grad is None


# -- case 10: base_optimizer type, schedule message ------------------------------------------------
def test_case10_base_optimizer_must_be_an_optimizer():
    """Case 10: a module class (or a factory returning something else) is refused with a clear
    message instead of "unexpected keyword argument 'lr'"."""
    params = list(torch.nn.Linear(2, 2).parameters())
    with pytest.raises(ValueError, match=r"torch.optim.Optimizer subclass.*got the class "
                                         r"torch.nn.modules.linear.Linear"):
        msam.MSAM(params, torch.nn.Linear, lr=0.1)
    with pytest.raises(ValueError, match="the function returned dict"):
        msam.MSAM(params, lambda groups, **kw: {}, lr=0.1)
    with pytest.raises(ValueError, match="got int"):
        msam.MSAM(params, 3)


def test_case10_schedule_error_shows_the_value():
    """Case 10: the reuse-needs-every message shows the value, not a literal '{every}'."""
    with pytest.raises(ValueError, match=r"got every=1$"):
        msam.Schedule(every=1, reuse="looksam")


# -- case 11: param_groups / state are always the base optimizer's ---------------------------------
def test_case11_lr_schedule_survives_a_base_optimizer_load():
    """Case 11: after opt.base_optimizer.load_state_dict (new param_groups list) a StepLR on opt
    still drives the base step: same weights as plain SGD + StepLR on msam_gradient."""
    model, ref = _model(), _model()
    opt = msam.MSAM(model.parameters(), SGD, rho=0.05, micro_batches=2, lr=0.1, momentum=0.9)
    sched = StepLR(opt, step_size=1, gamma=0.5)
    sgd = SGD(ref.parameters(), lr=0.1, momentum=0.9)
    ref_sched = StepLR(sgd, step_size=1, gamma=0.5)
    for s in range(5):
        if s == 2:
            opt.base_optimizer.load_state_dict(opt.base_optimizer.state_dict())
        b = _batch(s)
        opt.step(_loss(model), b)
        sched.step()
        msam.msam_gradient(_loss(ref), b, ref.parameters(), rho=0.05, micro_batches=2)
        sgd.step()
        ref_sched.step()
    _same(model, ref, atol=1e-12)
    assert opt.param_groups[0]["lr"] == sgd.param_groups[0]["lr"] == 0.1 * 0.5 ** 5
    assert opt.param_groups is opt.base_optimizer.param_groups
    assert opt.state is opt.base_optimizer.state


def test_case11_assignment_writes_through():
    """Case 11: assigning opt.param_groups / opt.state writes the base optimizer's."""
    model = _model()
    opt = msam.MSAM(model.parameters(), SGD, rho=0.05, lr=0.1)
    groups = [dict(g) for g in opt.param_groups]
    opt.param_groups = groups
    assert opt.base_optimizer.param_groups is groups
    state: dict = {}
    opt.state = state
    assert opt.base_optimizer.state is state


# -- case 12: torch.distributed.checkpoint's optimizer state dicts ---------------------------------
def test_case12_dcp_optimizer_state_dict_round_trip():
    """Case 12: get_optimizer_state_dict / set_optimizer_state_dict round-trip (single process);
    the loaded optimizer steps exactly like the original (schedule position included)."""
    from torch.distributed.checkpoint.state_dict import (
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )
    kw = {"rho": 0.05, "micro_batches": 2, "every": 2, "lr": 0.1, "momentum": 0.9}
    model = _model()
    opt = msam.MSAM(model.parameters(), SGD, **kw)
    for s in range(3):
        opt.step(_loss(model), _batch(s))
    osd = copy.deepcopy(get_optimizer_state_dict(model, opt))  # as if saved: no shared buffers
    model2 = _model(7)
    model2.load_state_dict(model.state_dict())
    opt2 = msam.MSAM(model2.parameters(), SGD, **kw)
    set_optimizer_state_dict(model2, opt2, osd)
    assert {g["msam_steps"] for g in osd["param_groups"]} == {3}
    assert opt2.steps == 3 and opt2.param_groups[0]["lr"] == 0.1
    assert all(p.grad is None for p in model2.parameters())
    assert "msam_steps" not in opt2.param_groups[0]
    for s in (3, 4):  # step 3 is an off-step of every=2, step 4 perturbs
        opt.step(_loss(model), _batch(s))
        opt2.step(_loss(model2), _batch(s))
    _same(model, model2)


def test_case12_dcp_initialises_a_fresh_optimizer():
    """Case 12: DCP's state initialisation (step(closure=None) at lr 0 on zero gradients) no
    longer raises "step() without loss_fn" and leaves no lr 0.0 / zero grads behind."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    model = _model()
    opt = msam.MSAM(model.parameters(), SGD, rho=0.05, lr=0.1, momentum=0.9)
    before = [p.detach().clone() for p in model.parameters()]
    osd = get_optimizer_state_dict(model, opt)
    assert opt.param_groups[0]["lr"] == 0.1 and opt.steps == 0
    assert all(p.grad is None for p in model.parameters())
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)
    assert len(osd["state"]) == 4   # momentum buffers exist, as for a plain SGD
    with pytest.raises(RuntimeError, match="step\\(\\) without loss_fn"):
        opt.step()                  # lr 0.1: still refused


# -- case 13: deepcopy and pickle ------------------------------------------------------------------
def test_case13_deepcopy_and_pickle_step_like_the_original():
    """Case 13: deepcopy((model, opt)) and pickle keep the base optimizer, engine, schedule and
    perturb= subset; the copies' next steps equal the original's."""
    model = _model()
    opt = msam.MSAM(model.parameters(), SGD, rho=0.05, micro_batches=2, every=2,
                    perturb=[model[0].weight, model[2].weight], lr=0.1, momentum=0.9)
    sched = StepLR(opt, step_size=1, gamma=0.5)   # patches opt.step on the instance
    for s in range(3):
        opt.step(_loss(model), _batch(s))
        sched.step()
    copies = [copy.deepcopy((model, opt)), pickle.loads(pickle.dumps((model, opt)))]
    for m, o in copies:
        assert o.base_optimizer is not opt.base_optimizer
        assert o.param_groups[0]["params"][0] is m[0].weight
        assert o.steps == 3 and o.schedule.every == 2
        assert o._perturb_ids == {id(m[0].weight), id(m[2].weight)}
    for s in (3, 4):
        opt.step(_loss(model), _batch(s))
        for m, o in copies:
            o.step(_loss(m), _batch(s))
    for m, _ in copies:
        _same(model, m)


def test_case13_copies_rediscover_batchnorm():
    """Case 13: without model=, the BatchNorm modules found in the first step are weak
    references to the original's; a copy finds its own (its next steps, running statistics
    included, equal the original's, and the original's buffers are not touched by the copy)."""
    def make():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.BatchNorm1d(8),
                                   torch.nn.ReLU(), torch.nn.Linear(8, 1)).double()
    model = make()
    opt = msam.MSAM(model.parameters(), SGD, rho=0.05, micro_batches=2, lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(3)
    data = [(torch.randn(16, 5, generator=g, dtype=F64), torch.randn(16, 1, generator=g,
                                                                    dtype=F64))
            for _ in range(4)]
    for d in data[:2]:
        opt.step(_loss(model), d)
    copies = [copy.deepcopy((model, opt)), pickle.loads(pickle.dumps((model, opt)))]
    for d in data[2:]:
        for m, o in copies:
            o.step(_loss(m), d)
        opt.step(_loss(model), d)
    for m, _ in copies:
        for (k, x), y in zip(model.state_dict().items(), m.state_dict().values()):
            assert torch.equal(x, y), k


# -- case 15: hooks --------------------------------------------------------------------------------
def _hooked(opt, calls):
    name = type(opt).__name__
    opt.register_state_dict_pre_hook(lambda o: calls.append((name, "sd_pre")))

    def sd_post(o, sd):
        calls.append((name, "sd_post"))
        return {**sd, "extra": 1}

    def load_pre(o, sd):
        calls.append((name, "load_pre"))
        return {k: v for k, v in sd.items() if k != "extra"}

    opt.register_state_dict_post_hook(sd_post)
    opt.register_load_state_dict_pre_hook(load_pre)
    opt.register_load_state_dict_post_hook(lambda o: calls.append((name, "load_post")))


def test_case15_state_dict_hooks_fire_as_in_torch():
    """Case 15: state_dict / load_state_dict pre and post hooks fire, in torch.optim's order,
    and a post hook's returned dict is what state_dict returns."""
    model = _model()
    opt = msam.MSAM(model.parameters(), SGD, rho=0.05, lr=0.1, momentum=0.9)
    plain = SGD(_model().parameters(), lr=0.1, momentum=0.9)
    calls: list = []
    for o in (opt, plain):
        _hooked(o, calls)
        sd = o.state_dict()
        assert sd["extra"] == 1
        o.load_state_dict(sd)
    assert [c for n, c in calls if n == "MSAM"] == [c for n, c in calls if n == "SGD"] == [
        "sd_pre", "sd_post", "load_pre", "load_post"]


def test_case15_global_step_hooks_fire_once_per_step():
    """Case 15: global optimizer step hooks fire once per MSAM step, with the MSAM optimizer
    (as once per step for a plain SGD); instance step hooks once too."""
    from torch.optim.optimizer import (
        register_optimizer_step_post_hook,
        register_optimizer_step_pre_hook,
    )
    model = _model()
    opt = msam.MSAM(model.parameters(), SGD, rho=0.05, micro_batches=2, lr=0.1)
    plain = SGD(_model().parameters(), lr=0.1)
    seen: list = []
    handles = [register_optimizer_step_pre_hook(lambda o, a, k: seen.append(("pre", o))),
               register_optimizer_step_post_hook(lambda o, a, k: seen.append(("post", o)))]
    own: list = []
    opt.register_step_post_hook(lambda o, a, k: own.append(o))
    try:
        opt.step(_loss(model), _batch(0))
        assert seen == [("pre", opt), ("post", opt)] and own == [opt]
        seen.clear()
        plain.zero_grad()
        _loss(_model())(_batch(0)).backward()
        for p, q in zip(plain.param_groups[0]["params"], _model().parameters()):
            p.grad = torch.zeros_like(p) if q.grad is None else q.grad
        plain.step()
        assert seen == [("pre", plain), ("post", plain)]
        seen.clear()
        with pytest.raises(ZeroDivisionError):   # a failing step leaves the hooks registered
            opt.step(lambda b: 1 / 0, _batch(1))
        opt.step(_loss(model), _batch(1))
        assert seen == [("pre", opt), ("pre", opt), ("post", opt)]
    finally:
        for h in handles:
            h.remove()


# -- case 16: settings on load; rho = 0 ------------------------------------------------------------
def test_case16_load_warns_for_each_changed_setting():
    """Case 16: loading replaces the constructor's settings with the saved ones and warns,
    naming each changed setting; an unchanged configuration loads silently."""
    _, opt = _trained(micro_batches=4, max_grad_norm=1.0)
    sd = opt.state_dict()
    model = _model()
    fresh = msam.MSAM(model.parameters(), SGD, rho=0.05, micro_batches=8, max_grad_norm=None,
                      lr=0.1, momentum=0.9)
    with pytest.warns(UserWarning, match=r"micro_batches 8 -> 4, max_grad_norm None -> 1.0"):
        fresh.load_state_dict(sd)
    assert fresh.micro_batches == 4 and fresh.max_grad_norm == 1.0
    same = msam.MSAM(_model().parameters(), SGD, rho=0.05, micro_batches=4, max_grad_norm=1.0,
                     lr=0.1, momentum=0.9)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        same.load_state_dict(sd)


def test_case16_rho0_m1_is_sgd_weights_exact_batchnorm_up_to_rounding():
    """Case 16: rho = 0 at m = 1 gives plain SGD's weights bit for bit; BatchNorm running
    statistics agree up to rounding (msam blends them from the batch statistic PyTorch rounded
    to float32; PyTorch's kernel blends in higher precision): docs/core.md."""
    def make():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.BatchNorm1d(8),
                                   torch.nn.ReLU(), torch.nn.Linear(8, 1))
    a, b = make(), make()
    opt = msam.MSAM(a.parameters(), SGD, rho=0.0, lr=0.1, momentum=0.9, model=a)
    sgd = SGD(b.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    for _ in range(4):
        x, y = torch.randn(16, 5, generator=g), torch.randn(16, 1, generator=g)
        opt.step(lambda bt: ((a(bt[0]) - bt[1]) ** 2).mean(), (x, y))
        sgd.zero_grad()
        ((b(x) - y) ** 2).mean().backward()
        sgd.step()
    _same(a, b)
    for key in ("running_mean", "running_var"):
        torch.testing.assert_close(getattr(a[1], key), getattr(b[1], key), rtol=1e-6, atol=0)


def test_case16_rho0_group_counts_in_the_norm_of_the_others(float64):
    """Case 16 (docs/core.md): a param group with rho = 0 is not moved, but its gradient is
    taken at the other groups' perturbed weights and counts in their norm (as in the original
    SAM code). Float64 math by hand on a linear model."""
    torch.manual_seed(0)
    x, y = torch.randn(10, 3), torch.randn(10)
    w0, b0 = torch.randn(3), torch.randn(())
    w, b = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(b0.clone())
    opt = msam.MSAM([{"params": [w]}, {"params": [b], "rho": 0.0}], SGD, rho=0.1, lr=0.5)
    opt.step(lambda bt: ((bt[0] @ w + b - bt[1]) ** 2).mean(), (x, y))

    def grads(wv, bv):
        r = x @ wv + bv - y
        return 2 * x.T @ r / len(y), 2 * r.mean()

    gw, gb = grads(w0, b0)
    norm = math.sqrt(float(gw @ gw + gb * gb))     # b's gradient counts
    hw, hb = grads(w0 + 0.1 * gw / (norm + 1e-12), b0)   # b is not moved
    torch.testing.assert_close(w.detach(), w0 - 0.5 * hw, rtol=0, atol=1e-12)
    torch.testing.assert_close(b.detach(), b0 - 0.5 * hb, rtol=0, atol=1e-12)


# -- mutants: clipping after unscaling; GSAM's clipped rho schedule --------------------------------
def test_mutant_clipping_acts_on_the_unscaled_gradient():
    """Mutant no_unscale_before_clip: with a GradScaler (power-of-two scale, float64) and active
    clipping, the scaled run equals the unscaled run and plain SGD on the clipped msam_gradient
    (clip coefficient max_norm / (||g|| + 1e-6), torch's formula, by hand)."""
    max_norm = 0.05
    kw = {"rho": 0.05, "micro_batches": 2, "max_grad_norm": max_norm, "lr": 0.1,
          "momentum": 0.9}
    ma, mb, ref = _model(), _model(), _model()
    oa = msam.MSAM(ma.parameters(), SGD, **kw)
    ob = msam.MSAM(mb.parameters(), SGD, **kw)
    sgd = SGD(ref.parameters(), lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    for s in range(3):
        bt = _batch(s)
        oa.step(_loss(ma), bt, scaler=scaler)
        scaler.update()
        ob.step(_loss(mb), bt)
        msam.msam_gradient(_loss(ref), bt, ref.parameters(), rho=0.05, micro_batches=2)
        with torch.no_grad():
            total = math.sqrt(sum(float((p.grad ** 2).sum()) for p in ref.parameters()))
            assert total > 2 * max_norm   # clipping is active
            for p in ref.parameters():
                p.grad.mul_(max_norm / (total + 1e-6))
        sgd.step()
    assert scaler.get_scale() == 2.0 ** 10 and oa.skipped_steps == 0
    _same(ma, mb, atol=1e-12)
    _same(mb, ref, atol=1e-12)


def test_mutant_gsam_rho_schedule_is_clipped(float64):
    """Mutant gsam_rho_not_clipped: GSAM's lr-linked radius rho_t = rho_min + (rho_max -
    rho_min)(lr - lr_min)/(lr_max - lr_min), clipped to [rho_min, rho_max] (Zhuang et al.
    2022), under a warm-up whose lr goes below lr_min and above lr_max; each step by hand."""
    torch.manual_seed(0)
    x, y = torch.randn(16, 3), torch.randn(16)
    w0 = torch.randn(3)
    w = torch.nn.Parameter(w0.clone())
    alpha, rho_min, rho_max, lr_min, lr_max = 0.3, 0.02, 0.1, 0.05, 0.2
    group = {"params": [w], "rho_min": rho_min, "rho_max": rho_max, "lr_min": lr_min,
             "lr_max": lr_max}
    opt = msam.MSAM([group], SGD, rule=GSAMRule(alpha=alpha), lr=0.1)
    factors = [0.1, 0.3, 1.0, 4.0, 8.0]     # lr: 0.01, 0.03 (< lr_min), 0.1, 0.4, 0.8 (> lr_max)
    sched = LambdaLR(opt, lambda t: factors[min(t, len(factors) - 1)])

    def grad(v):
        return 2 * x.T @ (x @ v - y) / len(y)

    expected = w0.clone()
    rhos = []
    for _ in factors:
        lr = opt.param_groups[0]["lr"]
        rho = rho_min + (rho_max - rho_min) * min(1.0, max(0.0, (lr - lr_min)
                                                          / (lr_max - lr_min)))
        rhos.append(rho)
        g = grad(expected)
        h = grad(expected + rho * g / (g.norm() + 1e-12))
        g_perp = g - (g @ h) / (h @ h) * h
        expected = expected - lr * (h - alpha * g_perp)
        opt.step(lambda bt: ((bt[0] @ w - bt[1]) ** 2).mean(), (x, y))
        sched.step()
        torch.testing.assert_close(w.detach(), expected, rtol=0, atol=1e-12)
    assert rhos[0] == rhos[1] == rho_min and rhos[3] == rhos[4] == rho_max
