"""Where users train: autocast, schedulers, param-group validation, GradScaler overflow in the
perturbed pass, trainers that call ``step()`` after their own backward, ``torch.compile``,
``load_state_dict`` validation, host syncs per step, and the two-step SAM API.

Each test checks an independent expectation (the reference mSAM gradient of
``tests/reference.py``, PyTorch's own autocast / scheduler / dynamo behaviour, or hand-written
state), and each failed on the core before these fixes.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import msam

from reference import reference_msam_grad


def _mlp(seed=0, bn=False):
    torch.manual_seed(seed)
    layers = [torch.nn.Linear(5, 12)]
    if bn:
        layers.append(torch.nn.BatchNorm1d(12))
    layers += [torch.nn.Tanh(), torch.nn.Linear(12, 3)]
    return torch.nn.Sequential(*layers)


def _batch(n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g), torch.randint(0, 3, (n,), generator=g)


def _loss_of(f, b):
    return F.cross_entropy(f(b[0]), b[1])


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


# -- 1: autocast around the step -------------------------------------------------------------
@pytest.mark.parametrize("m", [1, 2])
def test_autocast_around_step_equals_autocast_inside_loss_fn(m):
    batch = _batch()
    a, b, plain = _mlp(), _mlp(), _mlp()
    kw = {"rho": 0.5, "micro_batches": m, "lr": 0.5}
    opt_a = msam.MSAM(a.parameters(), torch.optim.SGD, **kw)
    opt_b = msam.MSAM(b.parameters(), torch.optim.SGD, **kw)
    opt_plain = msam.MSAM(plain.parameters(), torch.optim.SGD, **{**kw, "rho": 0.0})

    def inside(model):
        def loss_fn(mb):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return _loss_of(model, mb).float()
        return loss_fn

    with torch.autocast("cpu", dtype=torch.bfloat16):
        opt_a.step(lambda mb: _loss_of(a, mb).float(), batch)
        opt_plain.step(lambda mb: _loss_of(plain, mb).float(), batch)
    opt_b.step(inside(b), batch)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    # and the perturbation mattered: the rho = 0 step under the same autocast differs
    assert any(not torch.equal(pa, pp) for pa, pp in zip(a.parameters(), plain.parameters()))


# -- 2: schedulers that read optimizer.defaults -----------------------------------------------
@pytest.mark.parametrize("base,kw,key", [
    (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}, "momentum"),
    (torch.optim.AdamW, {"lr": 1e-3}, "betas"),
])
def test_one_cycle_lr_works_and_cycles_the_base_optimizers_momentum(base, kw, key):
    model = _mlp()
    opt = msam.MSAM(model.parameters(), base, rho=0.05, **kw)
    assert opt.defaults[key] == opt.base_optimizer.defaults[key]
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=10)
    seen = set()
    batch = _batch()
    for _ in range(5):
        opt.step(lambda mb: _loss_of(model, mb), batch)
        sched.step()
        value = opt.base_optimizer.param_groups[0][key]
        seen.add(value if key == "momentum" else value[0])
    assert len(seen) == 5  # the schedule really reaches the base optimizer


# -- 3: every param group validated when the optimizer is built -------------------------------
@pytest.mark.parametrize("group", [
    {"rho": -0.5}, {"rho": float("nan")}, {"rho": "0.1"}, {"rho": float("inf")},
    {"eta": -1.0}, {"eta": 0.0}, {"eta": True},
])
def test_param_groups_validated_at_build_with_add_param_groups_message(group):
    p = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError) as built:
        msam.MSAM([{"params": [p], **group}], torch.optim.SGD, lr=0.1)
    other = msam.MSAM([torch.nn.Parameter(torch.zeros(2))], torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError) as added:
        other.add_param_group({"params": [p], **group})
    assert str(built.value).startswith("params[0]: ")
    assert str(added.value).startswith("add_param_group: ")
    assert str(built.value).split(": ", 1)[1] == str(added.value).split(": ", 1)[1]
    prebuilt = torch.optim.SGD([{"params": [p], **group}], lr=0.1)
    with pytest.raises(ValueError, match=r"base_optimizer\.param_groups\[0\]"):
        msam.MSAM(None, prebuilt)


# -- 4: a GradScaler overflow in the perturbed pass skips the whole step ----------------------
@pytest.mark.parametrize("strategy", ["loop", "vmap", "batched"])
def test_overflow_in_perturbed_pass_skips_whole_step(strategy):
    model = _mlp(bn=True)
    opt = msam.MSAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9,
                    strategy=strategy, model=model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    batch = _batch()
    opt.step(lambda mb: _loss_of(model, mb), batch, scaler=scaler)   # a good step first
    scaler.update()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    momentum = [opt.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    grads = [p.grad.clone() for p in model.parameters()]
    scale = scaler.get_scale()
    calls = []

    def loss_fn(mb):
        calls.append(1)
        loss = _loss_of(model, mb)
        # finite loss, but its scaled gradient overflows float32 -- in the perturbed pass only
        return loss * 1e36 if len(calls) % 2 == 0 else loss

    loss = opt.step(loss_fn, batch, scaler=scaler)
    scaler.update()
    assert torch.isnan(loss) and opt.skipped_steps == 1 and opt.steps == 1
    for k, v in model.state_dict().items():   # weights and BatchNorm buffers
        assert torch.equal(v, state[k]), k
    for p, mom, g in zip(model.parameters(), momentum, grads):
        assert torch.equal(opt.state[p]["momentum_buffer"], mom) and torch.equal(p.grad, g)
    assert scaler.get_scale() == scale * 0.5   # the scaler saw the overflow


# -- 5: a trainer's own backward followed by step() -------------------------------------------
def test_step_after_own_backward_raises_instead_of_plain_sgd():
    model = _mlp()
    opt = msam.MSAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    before = _params(model)
    _loss_of(model, _batch()).backward()      # what Trainer(optimizers=(opt, None)) does
    with pytest.raises(RuntimeError, match=r"opt\.base_step\(\)") as err:
        opt.step()
    assert "opt.step(loss_fn, batch)" in str(err.value)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    # the explicit way to step on a gradient filled by hand
    msam.msam_gradient(lambda mb: _loss_of(model, mb), _batch(), model.parameters(), rho=0.05)
    opt.base_step()
    assert opt.steps == 1


# -- 6: torch.compile compiles a bounded number of graphs --------------------------------------
@pytest.mark.parametrize("give_model", [True, False])
def test_torch_compile_bounded_graphs_and_batchnorm_policy(give_model):
    torch._dynamo.reset()
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    eager = _mlp(bn=True)
    model = _mlp(bn=True)
    compiled = torch.compile(model, backend=counting_backend)
    kw = {"rho": 0.1, "micro_batches": 2, "lr": 0.1}
    opt = msam.MSAM(model.parameters(), torch.optim.SGD, model=compiled if give_model else None,
                    **kw)
    ref = msam.MSAM(eager.parameters(), torch.optim.SGD, model=eager, **kw)
    for s in range(20):
        batch = _batch(seed=s)
        opt.step(lambda mb: _loss_of(compiled, mb), batch)
        ref.step(lambda mb: _loss_of(eager, mb), batch)
    assert 1 <= len(graphs) <= 4, len(graphs)
    for (k, a), b in zip(model.state_dict().items(), eager.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=k)
    assert int(model[1].num_batches_tracked) == 20


# -- 7: load_state_dict validates what it loads -----------------------------------------------
def test_load_state_dict_rejects_foreign_and_broken_state_and_restores_strategy():
    model = _mlp()
    opt = msam.MSAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    opt.step(lambda mb: _loss_of(model, mb), _batch())
    good = opt.state_dict()

    foreign = {"state": {0: {"old_p": torch.zeros(1), "momentum_buffer": torch.zeros(1)}},
               "param_groups": good["param_groups"]}
    with pytest.raises(ValueError, match="old_p"):
        opt.load_state_dict(foreign)
    with pytest.raises(ValueError, match="not saved by msam.MSAM"):
        opt.load_state_dict(opt.base_optimizer.state_dict())
    for key, value, match in [("micro_batches", 0, "micro_batches"),
                              ("strategy", {"name": "warp"}, "strategy"),
                              ("version", 99, "version"),
                              ("steps", -1, "steps")]:
        broken = {**good, "msam": {**good["msam"], key: value}}
        with pytest.raises(ValueError, match=match):
            opt.load_state_dict(broken)
    bad_group = {**good, "param_groups": [{**good["param_groups"][0], "rho": -1.0}]}
    with pytest.raises(ValueError, match="rho"):
        opt.load_state_dict(bad_group)
    # nothing was changed by the refused loads
    assert opt.steps == 1 and opt.strategy == "loop"

    vm = msam.MSAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9,
                   strategy="vmap", model=model)
    opt.load_state_dict(vm.state_dict())
    assert opt.strategy == "vmap"


# -- 8: one host sync per step, whatever m is ----------------------------------------------------
class _SyncCounter:
    NAMES = ("__bool__", "item", "tolist", "__float__", "__int__", "__index__")

    def __init__(self, monkeypatch):
        self.count = 0
        for name in self.NAMES:
            orig = getattr(torch.Tensor, name)

            def wrapped(t, *a, _orig=orig, **k):
                self.count += 1
                return _orig(t, *a, **k)

            monkeypatch.setattr(torch.Tensor, name, wrapped)


@pytest.mark.parametrize("strategy", ["loop", "vmap", "batched"])
@pytest.mark.parametrize("m", [1, 4, 16])
def test_one_host_sync_per_step(monkeypatch, m, strategy):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 12), torch.nn.BatchNorm1d(12, momentum=None),
                                torch.nn.Tanh(), torch.nn.Linear(12, 3))
    opt = msam.MSAM(model.parameters(), torch.optim.SGD, rho=0.05, micro_batches=m, lr=0.1,
                    momentum=0.9, strategy=strategy, model=model)
    batch = _batch(n=32)
    opt.step(lambda mb: _loss_of(model, mb), batch)
    counter = _SyncCounter(monkeypatch)
    opt.step(lambda mb: _loss_of(model, mb), batch)
    assert counter.count == 1


# -- 9: the two-step SAM API and step(closure) -------------------------------------------------
def _reference_sgd_step(model, batch, rho, lr, m=1):
    grads, _ = reference_msam_grad(model, _loss_of, batch, m, rho)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p -= lr * grads[n]


@pytest.mark.usefixtures("float64")
def test_two_step_api_equals_reference_sam_and_restores_exactly():
    model, ref = _mlp(), _mlp()
    opt = msam.SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1)
    for s in range(3):
        batch = _batch(seed=s)
        _loss_of(model, batch).backward()
        opt.first_step(zero_grad=True)
        _loss_of(model, batch).backward()
        opt.second_step(zero_grad=True)
        _reference_sgd_step(ref, batch, 0.1, 0.1)
        for p, q in zip(model.parameters(), ref.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)
        assert all(p.grad is None for p in model.parameters())
    # the weights come back bit for bit (lr = 0: only the restore moves them)
    still = msam.SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.0)
    before = _params(model)
    _loss_of(model, _batch()).backward()
    still.first_step(zero_grad=True)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    _loss_of(model, _batch()).backward()
    still.second_step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.usefixtures("float64")
def test_step_with_closure_equals_reference_sam():
    model, ref = _mlp(), _mlp()
    opt = msam.SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1)
    for s in range(3):
        batch = _batch(seed=s)

        def closure(batch=batch):
            opt.zero_grad()
            loss = _loss_of(model, batch)
            loss.backward()
            return loss

        loss = opt.step(closure) if s % 2 == 0 else opt.step(closure=closure)
        assert torch.isclose(loss, _loss_of(ref, batch).detach())
        _reference_sgd_step(ref, batch, 0.1, 0.1)
        for p, q in zip(model.parameters(), ref.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)


def test_two_step_api_freezes_batchnorm_in_the_perturbed_pass():
    model = _mlp(bn=True)
    bn = model[1]
    opt = msam.SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, model=model)
    batch = _batch()
    _loss_of(model, batch).backward()           # at w: PyTorch updates the statistics once
    after_first = (bn.running_mean.clone(), int(bn.num_batches_tracked))
    opt.first_step(zero_grad=True)
    _loss_of(model, batch).backward()           # at w + e: must not touch them
    opt.second_step(zero_grad=True)
    assert torch.equal(bn.running_mean, after_first[0])
    assert int(bn.num_batches_tracked) == after_first[1] == 1
    assert bn.momentum == 0.1


def test_two_step_api_misuse_is_an_error():
    model = _mlp()
    opt = msam.MSAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, micro_batches=2)
    _loss_of(model, _batch()).backward()
    with pytest.raises(ValueError, match="m = 1"):
        opt.first_step()
    sam = msam.SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1)
    with pytest.raises(RuntimeError, match="without first_step"):
        sam.second_step()
    sam.zero_grad()
    with pytest.raises(RuntimeError, match="backward"):
        sam.first_step()
    _loss_of(model, _batch()).backward()
    sam.first_step()
    with pytest.raises(RuntimeError, match="second_step"):
        sam.step(lambda mb: _loss_of(model, mb), _batch())


# -- a failing base step (issue: runs that cannot lose results, case 6) ----------------------------
class _FailingSGD(torch.optim.SGD):
    fail = False

    def step(self, closure=None):
        if self.fail:
            raise RuntimeError("base optimizer failed")
        return super().step(closure)


def test_base_step_failure_leaves_batchnorm_grad_and_counters_as_before():
    """What is restored when the base optimizer's step raises: BatchNorm running statistics
    (committed only after the base step), ``.grad`` (the gradients from before the call) and
    the step counter. Not restored: anything the base optimizer wrote before it raised (torch's
    optimizers check their inputs first; msam keeps no copy of their state)."""
    model = _mlp(bn=True)
    opt = msam.MSAM(model.parameters(), _FailingSGD, rho=0.1, micro_batches=2, lr=0.1,
                    momentum=0.9, model=model)
    batch = _batch()
    opt.step(lambda mb: _loss_of(model, mb), batch)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [p.grad for p in model.parameters()]
    grad_values = [g.clone() for g in grads]
    opt.base_optimizer.fail = True
    with pytest.raises(RuntimeError, match="base optimizer failed"):
        opt.step(lambda mb: _loss_of(model, mb), _batch(seed=3))
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    for p, g, gv in zip(model.parameters(), grads, grad_values):
        assert p.grad is g and torch.equal(p.grad, gv)
    assert opt.steps == 1
    opt.base_optimizer.fail = False
    opt.step(lambda mb: _loss_of(model, mb), _batch(seed=3))
    assert opt.steps == 2 and int(model[1].num_batches_tracked) == 2
