"""Edge cases of the step as one transaction, found by a red-team review of Core v3.

Each test compares against an independent expectation (float64 by hand, plain torch, or the
previous version's documented behaviour) and fails on the reviewed HEAD.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from torch import nn

import msam

SRC = os.path.dirname(os.path.dirname(os.path.abspath(msam.__file__)))  # the msam under test


def _pending(opt) -> bool:
    return bool(getattr(opt, "pending", getattr(opt, "_pending", None)))


def _bn_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))


# -- F1: reuse off-step + failed base step after accumulate() ---------------------------------
@pytest.mark.parametrize("max_grad_norm", [0.01, None])
def test_accumulate_offstep_reuse_failed_base_step_keeps_accumulated_grad(max_grad_norm):
    """step() after accumulate(): if the base optimizer raises, the accumulated gradient is kept
    for another step() (MSAM._finish, keep=True). On a LookSAM off-step the reuse term is now
    added into .grad in place and "undone" by subtracting it again -- after clipping scaled the
    gradient in place, so .grad ends up neither the accumulated gradient nor anything useful
    (169fef2 put the untouched tensors back: exact)."""
    model = _bn_model()
    x, y = torch.randn(16, 4), torch.randint(0, 2, (16,))
    lf = lambda b: nn.functional.cross_entropy(model(b[0]), b[1])  # noqa: E731
    opt = msam.MSAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9,
                    every=2, reuse="looksam", max_grad_norm=max_grad_norm)
    opt.step(lf, (x, y))                      # step 0 perturbs: the reuse direction exists
    opt.accumulate(lf, (x[:8], y[:8]), scale=0.5)
    opt.accumulate(lf, (x[8:], y[8:]), scale=0.5)   # step 1 is an off-step
    accumulated = [p.grad.clone() for p in model.parameters()]

    def boom(*args, **kwargs):
        raise RuntimeError("base optimizer failed")

    opt.base_optimizer.step = boom
    with pytest.raises(RuntimeError, match="base optimizer failed"):
        opt.step()
    assert _pending(opt)
    for p, g in zip(model.parameters(), accumulated):
        assert torch.equal(p.grad, g), (p.grad - g).abs().max()


# -- F2: reuse off-step writes into .grad tensors that alias each other ------------------------
def test_offstep_reuse_with_shared_autograd_gradients_is_correct():
    """loss_fn without a batch (ClosureStrategy, autograd.grad): for ``(a + b)`` autograd hands
    the *same* gradient tensor to a and b, and it is stored as both a.grad and b.grad. The
    off-step's in-place ``g.addcmul_(v, c)`` (Schedule.prepare) then adds a's reuse term to b's
    gradient too (and vice versa). Expected: grad = g + alpha ||g||/||g_v|| g_v per parameter."""
    torch.manual_seed(0)
    dt = torch.float64
    a = nn.Parameter(torch.randn(3, dtype=dt))
    b = nn.Parameter(torch.randn(3, dtype=dt))
    x = torch.randn(3, dtype=dt)
    fn = lambda: ((a + b) * x).sin().sum()  # noqa: E731
    opt = msam.MSAM([a, b], torch.optim.SGD, rho=0.05, lr=0.1, every=2, reuse="looksam")
    opt.step(fn)                                   # step 0: perturbation step
    v = [d.clone() for d in opt.schedule.direction]
    wa, wb = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    ga, gb = torch.autograd.grad(((wa + wb) * x).sin().sum(), [wa, wb])
    c = 0.7 * torch.sqrt((ga ** 2).sum() + (gb ** 2).sum()) / (
        torch.sqrt(sum((t ** 2).sum() for t in v)) + 1e-12)
    opt.step(fn)                                   # step 1: off-step
    torch.testing.assert_close(a.grad, ga + c * v[0])
    torch.testing.assert_close(b.grad, gb + c * v[1])


def test_offstep_reuse_with_expanded_autograd_gradient_does_not_crash():
    """``b.sum()`` gives b an expanded (stride-0) gradient from autograd.grad; the in-place
    off-step ``addcmul_`` raises "more than one element of the written-to tensor refers to a
    single memory location" (169fef2 built a new tensor: fine)."""
    torch.manual_seed(0)
    w, b = nn.Parameter(torch.randn(3)), nn.Parameter(torch.zeros(3))
    x = torch.randn(3)
    fn = lambda: (w * x).sin().sum() + b.sum()  # noqa: E731
    opt = msam.MSAM([w, b], torch.optim.SGD, rho=0.05, lr=0.1, every=2, reuse="looksam")
    for _ in range(4):
        opt.step(fn)
    assert opt.steps == 4


# -- F3: DistributedMSAM.load_state_dict no longer refuses a reuse schedule -------------------
_DDP_SCRIPT = textwrap.dedent("""
    import os, sys, tempfile, warnings, torch, torch.distributed as dist
    import torch.multiprocessing as mp
    from torch import nn

    def worker(rank, world, initf, outf):
        dist.init_process_group("gloo", init_method="file://" + initf, rank=rank,
                                world_size=world)
        import msam
        from msam.distributed import DistributedMSAM
        torch.manual_seed(0)
        model = nn.Linear(4, 1)
        ddp = nn.parallel.DistributedDataParallel(model)
        single = msam.MSAM(nn.Linear(4, 1).parameters(), torch.optim.SGD, rho=0.05, lr=0.1,
                           every=2, reuse="looksam")
        sd = single.state_dict()          # e.g. a single-GPU LookSAM run, resumed on 2 ranks
        opt = DistributedMSAM(ddp, None, torch.optim.SGD, rho=0.05, lr=0.1)
        res = "loaded"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                opt.load_state_dict(sd)
        except ValueError as e:
            res = "refused"
        if res == "loaded":
            torch.manual_seed(100 + rank)
            for i in range(4):
                x, y = torch.randn(8, 4), torch.randn(8, 1)
                opt.step(lambda b: ((ddp(b[0]) - b[1]) ** 2).mean(), (x, y))
            w = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
            allw = [torch.zeros_like(w) for _ in range(world)]
            dist.all_gather(allw, w)
            res += " diverged=%.3g" % float((allw[0] - allw[1]).abs().max())
        if rank == 0:
            open(outf, "w").write(res)
        dist.barrier()  # no rank tears gloo down while the other still uses it (SIGABRT)
        dist.destroy_process_group()

    if __name__ == "__main__":
        d = sys.argv[1]
        mp.spawn(worker, args=(2, os.path.join(d, "init"), os.path.join(d, "out")), nprocs=2)
""")


def test_ddp_load_state_dict_refuses_reuse_schedule_with_two_ranks(tmp_path):
    """169fef2's DistributedMSAM.load_state_dict re-ran _check_schedule (reuse is refused for
    world_size > 1: each rank would build its reuse direction from its own clean gradient).
    The new DistributedMSAM checks only in __init__; MSAM.load_state_dict replaces the
    schedule and DDPDistribution.check_settings only compares the ranks with each other, so a
    loaded LookSAM schedule runs and the replicas' weights diverge."""
    script = tmp_path / "ddp_reuse.py"
    script.write_text(_DDP_SCRIPT)
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, str(script), str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = (tmp_path / "out").read_text()
    assert result == "refused", result


# -- F4: Momentum-SAM never perturbs when one parameter has no momentum -----------------------
def test_momentumsam_perturbs_when_a_parameter_has_no_momentum():
    """MomentumSAMRule.offset returns None (plain step) as soon as ONE parameter has no
    momentum_buffer -- e.g. a trainable parameter the loss does not use (SGD keeps no state for
    a parameter whose grad is None). Momentum-SAM then silently degrades to plain SGD for the
    whole run. Expected (v = 0 where no momentum exists): the gradient at w - rho v/||v||."""
    torch.manual_seed(0)
    dt = torch.float64
    lin = nn.Linear(4, 1).to(dt)
    unused = nn.Parameter(torch.zeros(3, dtype=dt))
    x, y = torch.randn(8, 4, dtype=dt), torch.randn(8, 1, dtype=dt)
    lf = lambda b: ((lin(b[0]) - b[1]) ** 2).mean()  # noqa: E731
    rho = 0.5
    opt = msam.MSAM(list(lin.parameters()) + [unused], torch.optim.SGD, rho=rho,
                    rule="momentumsam", lr=0.1, momentum=0.9)
    opt.step(lf, (x, y))                         # first step: plain (no momentum yet)
    w = [p.detach().clone() for p in lin.parameters()]
    v = [opt.base_optimizer.state[p]["momentum_buffer"].clone() for p in lin.parameters()]
    norm = torch.sqrt(sum((t ** 2).sum() for t in v))
    pw = [(wi - rho * vi / (norm + 1e-12)).requires_grad_() for wi, vi in zip(w, v)]
    expected = torch.autograd.grad(((x @ pw[0].T + pw[1] - y) ** 2).mean(), pw)
    opt.step(lf, (x, y))
    for p, g in zip(lin.parameters(), expected):
        torch.testing.assert_close(p.grad, g)


# -- F5: a failed step(loss_fn, batch) leaves a stale transaction behind ----------------------
def test_failed_step_does_not_leave_a_stale_transaction():
    """MSAM.step sets self._step before add(); when add raises, self._step stays (calls == 0)
    and the next accumulate() reuses it -- with the parameters, groups, perturb mask and scaler
    captured by the failed call. A parameter group added meanwhile gets no gradient (169fef2
    read the groups on every call)."""
    torch.manual_seed(0)
    a, b = nn.Linear(4, 1), nn.Linear(4, 1)
    x, y = torch.randn(8, 4), torch.randn(8, 1)
    opt = msam.MSAM(a.parameters(), torch.optim.SGD, rho=0.0, lr=0.1)

    def bad(batch):
        raise KeyError("bad batch")

    with pytest.raises(KeyError):
        opt.step(bad, (x, y))
    opt.add_param_group({"params": list(b.parameters())})
    lf = lambda bt: ((a(bt[0]) + b(bt[0]) - bt[1]) ** 2).mean()  # noqa: E731
    opt.accumulate(lf, (x, y))
    expected = torch.autograd.grad(lf((x, y)), list(b.parameters()))
    for p, g in zip(b.parameters(), expected):
        assert p.grad is not None
        torch.testing.assert_close(p.grad, g)


# -- F6: accumulate() + base_step() no longer ends the accumulation ---------------------------
def test_accumulate_then_base_step_finishes_the_accumulation():
    """169fef2's base step ended a pending accumulation (_pending = False): each accumulate()
    after it started from a fresh gradient, and BatchNorm was updated per call. Now base_step()
    leaves self._step pending: the next accumulate() ADDS to the previous iteration's gradient,
    BatchNorm statistics are never written, and opt.pending stays True. Expected (rho = 0):
    three plain SGD steps, num_batches_tracked == 3."""
    torch.manual_seed(0)
    dt = torch.float64
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 1)).to(dt)
    ref = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 1)).to(dt)
    ref.load_state_dict(model.state_dict())
    X, Y = torch.randn(3, 8, 4, dtype=dt), torch.randn(3, 8, 1, dtype=dt)
    opt = msam.MSAM(model.parameters(), torch.optim.SGD, rho=0.0, lr=0.1)
    sgd = torch.optim.SGD(ref.parameters(), lr=0.1)
    for i in range(3):
        opt.accumulate(lambda b: ((model(b[0]) - b[1]) ** 2).mean(), (X[i], Y[i]))
        opt.base_step()
        sgd.zero_grad()
        ((ref(X[i]) - Y[i]) ** 2).mean().backward()
        sgd.step()
    assert not _pending(opt)
    assert int(model[1].num_batches_tracked) == 3
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q)


# -- F7: zero_grad() between accumulate() calls drops their BatchNorm updates -----------------
def test_zero_grad_between_accumulate_calls_keeps_batchnorm_updates():
    """Behaviour change: 169fef2 (and plain PyTorch) updated BatchNorm running statistics for
    every training forward of an accumulate() call; now they are queued in the Step and a
    zero_grad() between calls throws them away (only the gradient should be dropped)."""
    model = _bn_model()
    x, y = torch.randn(16, 4), torch.randint(0, 2, (16,))
    lf = lambda b: nn.functional.cross_entropy(model(b[0]), b[1])  # noqa: E731
    opt = msam.MSAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    opt.accumulate(lf, (x[:8], y[:8]), scale=0.5)
    opt.zero_grad()
    opt.accumulate(lf, (x[8:], y[8:]), scale=0.5)
    opt.step()
    assert int(model[1].num_batches_tracked) == 2


# -- F8 (pre-existing, also in 169fef2): ClosureStrategy stores autograd.grad outputs as .grad -
def test_accumulate_loss_fn_without_batch_with_shared_autograd_gradients():
    """ClosureStrategy.descent stores autograd.grad's outputs directly as p.grad; for (a + b)
    they are one tensor, so a.grad is b.grad and the next accumulate() call's add_ into a.grad
    also lands in b.grad. Expected: the plain gradient (rho = 0, two calls with scale 1/2)."""
    torch.manual_seed(0)
    dt = torch.float64
    a, b = nn.Parameter(torch.randn(3, dtype=dt)), nn.Parameter(torch.randn(3, dtype=dt))
    x = torch.randn(3, dtype=dt)
    fn = lambda: ((a + b) * x).sin().sum()  # noqa: E731
    opt = msam.MSAM([a, b], torch.optim.SGD, rho=0.0, lr=0.1)
    opt.accumulate(fn, scale=0.5)
    opt.accumulate(fn, scale=0.5)
    wa, wb = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    ga, gb = torch.autograd.grad(((wa + wb) * x).sin().sum(), [wa, wb])
    torch.testing.assert_close(a.grad, ga)
    torch.testing.assert_close(b.grad, gb)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copy_mid_accumulation_continues_like_the_original(how):
    """__getstate__ now keeps the pending Step (opt.pending is True on the copy, with call 1's
    BatchNorm record, clean gradient and `before`), but torch's Parameter deepcopy/pickle drop
    .grad: the copy's step() then applies only call 2's gradient while committing call 1's
    statistics. Expected: a copy of (model, opt) taken between the calls ends where the
    original does (or, at least, not pending with half of a gradient)."""
    import copy
    import pickle
    dt = torch.float64
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2)).to(dt)
    X, Y = torch.randn(2, 8, 4, dtype=dt), torch.randint(0, 2, (2, 8))
    opt = msam.MSAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9,
                    micro_batches=2)
    lf = lambda m: (lambda b: nn.functional.cross_entropy(m(b[0]), b[1]))  # noqa: E731
    opt.step(lf(model), (X[0], Y[0]))
    opt.accumulate(lf(model), (X[0], Y[0]), scale=0.5)
    m2, o2 = (copy.deepcopy((model, opt)) if how == "deepcopy"
              else pickle.loads(pickle.dumps((model, opt))))
    for m, o in ((model, opt), (m2, o2)):
        o.accumulate(lf(m), (X[1], Y[1]), scale=0.5)
        o.step()
    for a, b in zip(model.parameters(), m2.parameters()):
        torch.testing.assert_close(a, b)


# -- checked and correct (kept as regression guards) ------------------------------------------
def test_friendlysam_ema_once_per_step_scale_weighted_with_skipped_middle_call():
    """FriendlySAM's EMA after k accumulate() calls (one skipped): m = (1 - lambda) *
    sum over the kept calls of scale * sum_j (n_j / n) g_j(w). Passes on HEAD."""
    from msam.core.friendlysam import FriendlySAMRule
    torch.manual_seed(0)
    dt = torch.float64
    lin = nn.Linear(4, 1).to(dt)
    xs = [torch.randn(8, 4, dtype=dt) for _ in range(3)]
    ys = [torch.randn(8, 1, dtype=dt) for _ in range(3)]
    xs[1][0, 0] = float("nan")
    rule = FriendlySAMRule(sigma=1.0, lmbda=0.9)
    opt = msam.MSAM(lin.parameters(), torch.optim.SGD, rho=0.05, micro_batches=2, rule=rule,
                    lr=0.1, nonfinite="skip")
    w0 = [p.detach().clone() for p in lin.parameters()]

    def g(x, y):
        ps = [t.clone().requires_grad_() for t in w0]
        return torch.autograd.grad(((x @ ps[0].T + ps[1] - y) ** 2).mean(), ps)

    for i in range(3):
        opt.accumulate(lambda b: ((lin(b[0]) - b[1]) ** 2).mean(), (xs[i], ys[i]), scale=1 / 3)
    opt.step()
    for i, (ga, gc) in enumerate(zip(g(xs[0], ys[0]), g(xs[2], ys[2]))):
        torch.testing.assert_close(rule.m[i], (ga + gc) / 3 * 0.1)
    assert (opt.steps, opt.skipped_steps) == (1, 1)


if __name__ == "__main__":  # pragma: no cover
    warnings.simplefilter("default")
    sys.exit(pytest.main([__file__, "-q"]))
