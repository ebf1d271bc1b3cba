"""The SAM family (GSAM, FriendlySAM, WSAM, GCSAM) against float64 references written from the
papers' update equations (docs/variants.md), sharing no code with msam."""

from __future__ import annotations

import io

import pytest
import torch

import msam
from msam.core import RULES

from reference import VariantReference as Reference

pytestmark = pytest.mark.usefixtures("float64")


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 12), torch.nn.Tanh(), torch.nn.Linear(12, 3))


def _data(step, n=12):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(n, 5, generator=g), torch.randint(0, 3, (n,), generator=g)


def _loss(f, b):
    return torch.nn.functional.cross_entropy(f(b[0]), b[1])


CASES = {
    "gsam": (lambda: msam.core.GSAMRule(alpha=0.3), {"alpha": 0.3}),
    "friendlysam": (lambda: msam.core.FriendlySAMRule(sigma=0.8, lmbda=0.7),
                    {"sigma": 0.8, "lmbda": 0.7}),
    "wsam": (lambda: msam.core.WSAMRule(gamma=0.8), {"gamma": 0.8}),   # decoupled (default)
    "wsam_coupled": (lambda: msam.core.WSAMRule(gamma=0.8, decoupled=False),
                     {"gamma": 0.8, "decoupled": False}),
    "gcsam": (lambda: msam.core.GCSAMRule(), {}),
}
MAX_DIFF: dict[tuple[str, int], float] = {}


@pytest.mark.parametrize("strategy", ["loop", "vmap", "batched"])
@pytest.mark.parametrize("m", [1, 4])
@pytest.mark.parametrize("kind", sorted(CASES))
def test_matches_paper_reference(kind, m, strategy):
    make, hp = CASES[kind]
    model, ref_model = _model(), _model()
    opt = msam.MSAM(model.parameters(), torch.optim.SGD, rho=0.2, micro_batches=m,
                    rule=make(), strategy=strategy, model=model, lr=0.1, momentum=0.9)
    ref_opt = torch.optim.SGD(ref_model.parameters(), lr=0.1, momentum=0.9)
    ref = Reference(kind.removesuffix("_coupled"), 0.2, **hp)
    for s in range(4):
        batch = _data(s)
        opt.step(lambda b: _loss(model, b), batch)
        for p in ref_model.parameters():
            p.grad = None
        grads = ref.grad(ref_model, batch, m)
        for nm, p in ref_model.named_parameters():
            p.grad = grads[nm]
        ref_opt.step()
        ref.after_base_step(ref_model, 0.1)
    diff = max(float((p - q).detach().abs().max()) for p, q in zip(model.parameters(),
                                                            ref_model.parameters()))
    MAX_DIFF[(kind, m)] = max(diff, MAX_DIFF.get((kind, m), 0.0))
    print(f"max|diff| {kind} m={m} {strategy}: {diff:.3g}")
    assert diff < 1e-10
    # The variant differs from SAM here (the reference is not trivially SAM's).
    sam_model = _model()
    sam = msam.MSAM(sam_model.parameters(), torch.optim.SGD, rho=0.2, micro_batches=m, lr=0.1,
                    momentum=0.9)
    for s in range(4):
        sam.step(lambda b: _loss(sam_model, b), _data(s))
    assert max(float((p - q).abs().max())
               for p, q in zip(sam_model.parameters(), model.parameters())) > 1e-6


def test_gsam_rho_follows_the_learning_rate():
    model, ref_model = _model(), _model()
    opt = msam.MSAM(model.parameters(), torch.optim.SGD, rho=0.0, micro_batches=2,
                    rule="gsam", lr=0.1)
    for g in opt.param_groups:
        g.update(rho_max=0.3, rho_min=0.05, lr_max=0.1, lr_min=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 - 0.2 * t)
    ref_opt = torch.optim.SGD(ref_model.parameters(), lr=0.1)
    ref = Reference("gsam", None, alpha=0.05, sched=(0.3, 0.05, 0.1, 0.0))
    for s in range(4):
        lr = opt.param_groups[0]["lr"]
        opt.step(lambda b: _loss(model, b), _data(s))
        grads = ref.grad(ref_model, _data(s), 2, lr=lr)
        for nm, p in ref_model.named_parameters():
            p.grad = grads[nm]
        ref_opt.param_groups[0]["lr"] = lr
        ref_opt.step()
        sched.step()
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-10)
    opt.param_groups[0]["rho_min"] = 0.5
    with pytest.raises(ValueError, match="rho_min"):
        opt.step(lambda b: _loss(model, b), _data(0))
    del opt.param_groups[0]["rho_min"]
    with pytest.raises(ValueError, match="missing"):
        opt.step(lambda b: _loss(model, b), _data(0))


@pytest.mark.parametrize("kind", sorted(CASES))
def test_resume_is_bit_identical(kind):
    make, _ = CASES[kind]

    def build():
        model = _model()
        return model, msam.MSAM(model.parameters(), torch.optim.SGD, rho=0.2, micro_batches=4,
                                rule=make(), lr=0.1, momentum=0.9)

    def train(model, opt, steps):
        for s in steps:
            opt.step(lambda b: _loss(model, b), _data(s))

    a, opt_a = build()
    train(a, opt_a, range(6))
    b, opt_b = build()
    train(b, opt_b, range(3))
    buf = io.BytesIO()
    torch.save({"model": b.state_dict(), "opt": opt_b.state_dict()}, buf)
    buf.seek(0)
    ck = torch.load(buf, weights_only=True)
    c, opt_c = build()
    c.load_state_dict(ck["model"])
    opt_c.load_state_dict(ck["opt"])
    train(c, opt_c, range(3, 6))
    for p, q in zip(a.parameters(), c.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("bad", [
    (msam.core.GSAMRule, {"alpha": -1.0}, "alpha"),
    (msam.core.GSAMRule, {"alpha": float("nan")}, "alpha"),
    (msam.core.WSAMRule, {"gamma": 1.0}, "gamma"),
    (msam.core.FriendlySAMRule, {"sigma": 1.5}, "sigma"),
    (msam.core.FriendlySAMRule, {"lmbda": float("inf")}, "lmbda"),
])
def test_hyperparameters_are_validated(bad):
    cls, kw, name = bad
    with pytest.raises(ValueError, match=name):
        cls(**kw)


def test_registered_and_refused_where_unsupported():
    assert {"gsam", "friendlysam", "wsam", "gcsam"} <= set(RULES)
    model = _model()
    opt = msam.MSAM(model.parameters(), torch.optim.SGD, rule="wsam", lr=0.1)
    _loss(model, _data(0)).backward()
    with pytest.raises(ValueError, match="two-step"):
        opt.first_step()


def test_friendlysam_skipped_step_leaves_the_ema():
    model = _model()
    rule = msam.core.FriendlySAMRule()
    opt = msam.MSAM(model.parameters(), torch.optim.SGD, rule=rule, micro_batches=2, lr=0.1,
                    nonfinite="skip")
    opt.step(lambda b: _loss(model, b), _data(0))
    before = {i: t.clone() for i, t in rule.m.items()}
    assert before
    opt.step(lambda b: _loss(model, b) * float("nan"), _data(1))
    assert opt.skipped_steps == 1
    assert all(torch.equal(before[i], rule.m[i]) for i in before)


# -- WSAM, decoupled (the paper's form): the sharpness step after the base step ---------------
def _wsam_reference_run(batches_per_step, m, base, base_kw, gamma=0.8, rho=0.2, steps=3):
    """The paper's decoupled update, by hand: the base optimizer on the mean clean gradient,
    then ``w -= lr * beta * mean_j (h_j - g_j)``; several loader batches per step average
    both parts (accumulation)."""
    model = _model()
    opt = base(model.parameters(), **base_kw)
    ref = Reference("wsam", rho, gamma=gamma)
    for s in range(steps):
        total, dec = None, None
        for b in batches_per_step(s):
            k = len(batches_per_step(s))
            g = ref.grad(model, b, m)
            d, ref.decoupled = ref.decoupled, None
            total = {n: v / k for n, v in g.items()} if total is None else \
                {n: total[n] + v / k for n, v in g.items()}
            dec = {n: v / k for n, v in d.items()} if dec is None else \
                {n: dec[n] + v / k for n, v in d.items()}
        for n, p in model.named_parameters():
            p.grad = total[n]
        opt.step()
        ref.decoupled = dec
        ref.after_base_step(model, opt.param_groups[0]["lr"])
    return model


@pytest.mark.parametrize("m", [1, 4])
@pytest.mark.parametrize("base", ["adamw", "sgd_wd"])
def test_wsam_decoupled_keeps_the_sharpness_step_out_of_the_base_optimizer(base, m):
    cls, kw = {"adamw": (torch.optim.AdamW, {"lr": 0.01, "weight_decay": 0.1}),
               "sgd_wd": (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9,
                                            "weight_decay": 0.01})}[base]
    ref = _wsam_reference_run(lambda s: [_data(s)], m, cls, kw)
    model = _model()
    opt = msam.MSAM(model.parameters(), cls, rho=0.2, micro_batches=m,
                    rule=msam.core.WSAMRule(gamma=0.8), **kw)
    for s in range(3):
        opt.step(lambda b: _loss(model, b), _data(s))
    diff = max(float((p - q).abs().max()) for p, q in zip(model.parameters(), ref.parameters()))
    assert diff < 1e-10
    # ... and the coupled form is a different update here (momentum / Adam see h - g).
    coupled = _model()
    opt_c = msam.MSAM(coupled.parameters(), cls, rho=0.2, micro_batches=m,
                      rule=msam.core.WSAMRule(gamma=0.8, decoupled=False), **kw)
    for s in range(3):
        opt_c.step(lambda b: _loss(coupled, b), _data(s))
    assert max(float((p - q).abs().max())
               for p, q in zip(coupled.parameters(), model.parameters())) > 1e-4


def test_wsam_decoupled_accumulation_averages_both_parts():
    batches = lambda s: [_data(10 * s), _data(10 * s + 1)]  # noqa: E731
    ref = _wsam_reference_run(batches, 2, torch.optim.SGD, {"lr": 0.1, "momentum": 0.9})
    model = _model()
    opt = msam.MSAM(model.parameters(), torch.optim.SGD, rho=0.2, micro_batches=2,
                    rule=msam.core.WSAMRule(gamma=0.8), lr=0.1, momentum=0.9)
    for s in range(3):
        for b in batches(s):
            opt.accumulate(lambda b: _loss(model, b), b, scale=0.5)
        opt.step()
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-10)


def test_wsam_decoupled_with_a_grad_scaler_equals_unscaled():
    def run(scaler):
        model = _model()
        opt = msam.MSAM(model.parameters(), torch.optim.SGD, rho=0.2, micro_batches=2,
                        rule="wsam", lr=0.1, momentum=0.9)
        for s in range(3):
            opt.step(lambda b: _loss(model, b), _data(s), scaler=scaler)
            if scaler is not None:
                scaler.update()
        return model

    plain = run(None)
    scaled = run(torch.amp.GradScaler("cpu", init_scale=2.0 ** 10))
    for p, q in zip(plain.parameters(), scaled.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)


def test_wsam_decoupled_skipped_or_failed_step_moves_nothing():
    model = _model()
    opt = msam.MSAM(model.parameters(), torch.optim.SGD, rho=0.2, micro_batches=2,
                    rule="wsam", lr=0.1, momentum=0.9, nonfinite="skip")
    opt.step(lambda b: _loss(model, b), _data(0))
    w = [p.detach().clone() for p in model.parameters()]
    calls = []

    def nan_in_second_perturbed_pass(b):
        calls.append(1)
        loss = _loss(model, b)
        return loss * float("nan") if len(calls) == 4 else loss

    opt.step(nan_in_second_perturbed_pass, _data(1))
    assert opt.skipped_steps == 1 and len(calls) == 4
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), w))
    # A base step that raises leaves the weights too, and the next step starts clean.
    real = opt.base_optimizer.step
    opt.base_optimizer.step = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("base"))
    with pytest.raises(RuntimeError, match="base"):
        opt.step(lambda b: _loss(model, b), _data(2))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), w))
    assert not opt.pending  # nothing of the failed step is left for the next one
    opt.base_optimizer.step = real
    opt.step(lambda b: _loss(model, b), _data(2))


def test_wsam_decoupled_refusals_name_the_argument():
    model = _model()
    with pytest.raises(ValueError, match="msam_gradient"):
        msam.msam_gradient(lambda b: _loss(model, b), _data(0), model.parameters(),
                           rule="wsam")
    msam.msam_gradient(lambda b: _loss(model, b), _data(0), model.parameters(),
                       rule=msam.core.WSAMRule(decoupled=False))   # the coupled form: fine
    with pytest.raises(ValueError, match="reuse"):
        msam.MSAM(model.parameters(), torch.optim.SGD, rule="wsam", every=2, reuse="looksam",
                  lr=0.1)
    with pytest.raises(ValueError, match="decoupled"):
        msam.core.WSAMRule(decoupled="yes")
    # A checkpoint of the other form is refused, not silently continued with another update.
    opt = msam.MSAM(model.parameters(), torch.optim.SGD, rule=msam.core.WSAMRule(
        decoupled=False), lr=0.1)
    opt.step(lambda b: _loss(model, b), _data(0))
    other = msam.MSAM(model.parameters(), torch.optim.SGD, rule="wsam", lr=0.1)
    with pytest.raises(ValueError, match="decoupled=False"):
        other.load_state_dict(opt.state_dict())


@pytest.mark.parametrize("kind", ["gsam", "wsam"])
def test_combining_rules_with_a_grad_scaler_keep_float64_weights(kind):
    """A float64 model in a float32-default process: the scaler's scale is a float32 tensor,
    and the combination's weights (n_j / n = 1/3, alpha) must not be rounded to float32 with it
    (that gave 5.6e-11 differences under DDP before)."""
    torch.set_default_dtype(torch.float32)  # the fixture restores the default afterwards

    def run(scaler):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(5, 12), torch.nn.Tanh(),
                                    torch.nn.Linear(12, 3)).double()
        opt = msam.MSAM(model.parameters(), torch.optim.SGD, rho=0.2, micro_batches=3,
                        rule=kind, lr=0.1, momentum=0.9)
        for s in range(3):
            x, y = _data(s)
            opt.step(lambda b: _loss(model, b), (x.double(), y), scaler=scaler)
            if scaler is not None:
                scaler.update()
        return model

    plain = run(None)
    scaled = run(torch.amp.GradScaler("cpu", init_scale=1.0))
    diff = max(float((p - q).abs().max()) for p, q in zip(plain.parameters(),
                                                          scaled.parameters()))
    assert diff < 1e-14


class _InfGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("inf")


@pytest.mark.parametrize("scaler", [False, True], ids=["raise", "grad_scaler"])
def test_wsam_decoupled_inf_in_a_perturbed_gradient_is_caught(scaler):
    """h_j reaches the weights only through d in the decoupled form: an inf there (finite
    loss, e.g. an fp16 overflow in the backward) raises, or with a GradScaler skips the step,
    and the weights stay as they were (before, they became non-finite)."""
    model = _model()
    opt = msam.MSAM(model.parameters(), torch.optim.SGD, rho=0.2, micro_batches=2, rule="wsam",
                    lr=0.1, momentum=0.9)
    calls = []

    def loss_fn(b):
        calls.append(1)
        out = model(b[0])
        if len(calls) == 4:  # the second micro-batch's perturbed pass
            out = _InfGrad.apply(out)
        return torch.nn.functional.cross_entropy(out, b[1])

    w = [p.detach().clone() for p in model.parameters()]
    if scaler:
        opt.step(loss_fn, _data(0), scaler=torch.amp.GradScaler("cpu"))
        assert opt.skipped_steps == 1
    else:
        with pytest.raises(msam.NonFiniteLossError):
            opt.step(loss_fn, _data(0))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), w))


def test_wsam_decoupled_refuses_a_group_without_a_numeric_lr_before_moving_anything():
    """Checked before the base step (before, the base step ran and then the decoupled step
    raised a TypeError, leaving the weights moved)."""

    class NoLR(torch.optim.SGD):
        def __init__(self, params):
            super().__init__(params, lr=0.1)
            for g in self.param_groups:
                g["lr"] = None

        def step(self, closure=None):
            for g in self.param_groups:
                for p in g["params"]:
                    p.data.add_(p.grad, alpha=-0.1)

    model = _model()
    opt = msam.MSAM(model.parameters(), NoLR, rho=0.2, rule="wsam")
    w = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['lr'\]"):
        opt.step(lambda b: _loss(model, b), _data(0))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), w)) and opt.steps == 0
    coupled = msam.MSAM(model.parameters(), NoLR, rho=0.2,
                        rule=msam.core.WSAMRule(decoupled=False))
    coupled.step(lambda b: _loss(model, b), _data(0))   # the coupled form needs no lr
