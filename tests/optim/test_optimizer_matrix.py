"""One generic suite over variant x base optimizer x runner (all described as data).

A runner is a way to take the step: the ``loop``, ``vmap`` and ``auto`` strategies, DDP's
evaluator (``DistributedMSAM`` on a one-rank gloo group), ``step(closure)`` and the two-step API
(both ``m = 1``). Each cell trains a few steps and compares the parameters with an independent
reference: the reference mSAM gradient (``tests/reference.py``) handed to a fresh base optimizer.
The SAM family (GSAM, WSAM, FriendlySAM, GCSAM; docs/variants.md) are variants like any other,
checked against ``reference.VariantReference``; where a runner cannot take a rule's step (the
two-step API with a rule that combines ``g_j`` and ``h_j``) the cell asserts the refusal
instead.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import pytest
import torch

import msam
from msam.core import RULES

from reference import VariantReference, reference_msam_grad

pytestmark = pytest.mark.usefixtures("float64")


@dataclass(frozen=True)
class Variant:
    name: str
    kwargs: dict = field(default_factory=dict)
    perturb: tuple[str, ...] | None = None    # parameter names for perturb= (SAM-ON style)
    rule: tuple[str, tuple[tuple[str, float | bool], ...]] | None = None  # (name, hyperparams)

    def make_rule(self):
        """A fresh rule object (rules may keep state) or None."""
        return None if self.rule is None else RULES[self.rule[0]](**dict(self.rule[1]))

    @property
    def combines(self) -> bool:
        return self.rule is not None and RULES[self.rule[0]].combines

    @property
    def m(self) -> int:
        if "micro_batch_size" in self.kwargs:
            return -(-10 // self.kwargs["micro_batch_size"])
        return self.kwargs.get("micro_batches", 1)


VARIANTS = [
    Variant("base_rho0_m4", {"rho": 0.0, "micro_batches": 4}),
    Variant("sam", {"rho": 0.1}),
    Variant("msam_m4", {"rho": 0.1, "micro_batches": 4}),
    Variant("msam_size3", {"rho": 0.1, "micro_batch_size": 3}),
    Variant("asam_m2", {"rho": 0.5, "micro_batches": 2, "adaptive": True, "eta": 0.05}),
    Variant("perturb_first_layer_m2", {"rho": 0.2, "micro_batches": 2}, perturb=("0.weight",
                                                                                 "0.bias")),
    # The SAM family on the rule abstraction (docs/variants.md).
    Variant("gsam", {"rho": 0.1}, rule=("gsam", (("alpha", 0.3),))),
    Variant("gsam_m4", {"rho": 0.1, "micro_batches": 4}, rule=("gsam", (("alpha", 0.3),))),
    Variant("wsam", {"rho": 0.1}, rule=("wsam", (("gamma", 0.8),))),   # decoupled (default)
    Variant("wsam_m4", {"rho": 0.1, "micro_batches": 4}, rule=("wsam", (("gamma", 0.8),))),
    Variant("wsam_coupled_m4", {"rho": 0.1, "micro_batches": 4},
            rule=("wsam", (("gamma", 0.8), ("decoupled", False)))),
    Variant("friendlysam", {"rho": 0.1}, rule=("friendlysam", (("sigma", 1.0), ("lmbda", 0.6)))),
    Variant("friendlysam_m4", {"rho": 0.1, "micro_batches": 4},
            rule=("friendlysam", (("sigma", 0.8), ("lmbda", 0.9)))),
    Variant("gcsam_m4", {"rho": 0.1, "micro_batches": 4}, rule=("gcsam", ())),
]
#: (runner, what the refusal says) for a rule that combines g_j and h_j (GSAM, WSAM): the
#: two-step API returns between the passes, so it never sees g_j and h_j together.
REFUSES_COMBINING = {"two_step": "two-step"}
BASES = {
    "sgd": (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4}),
    "sgd_nesterov": (torch.optim.SGD, {"lr": 0.05, "momentum": 0.9, "nesterov": True}),
    "adamw": (torch.optim.AdamW, {"lr": 1e-2, "weight_decay": 0.01}),
}
STRATEGIES = ["loop", "vmap", "batched", "lowrank"]


def _make_model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 12), torch.nn.Tanh(), torch.nn.Linear(12, 3))


def _data(step):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(10, 5, generator=g), torch.randint(0, 3, (10,), generator=g)


def _loss_of(f, b):
    return torch.nn.functional.cross_entropy(f(b[0]), b[1])


# -- runners: the ways to take an mSAM step, as data -------------------------------------------
def _build(model, cls, variant, base_kwargs, **kw):
    extra = dict(variant.kwargs)
    if variant.rule:
        extra["rule"] = variant.make_rule()
    if variant.perturb:
        named = dict(model.named_parameters())
        extra["perturb"] = [named[n] for n in variant.perturb]
    return msam.MSAM(model.parameters(), cls, model=model, **kw, **extra, **base_kwargs)


def _strategy_runner(strategy):
    def make(model, cls, variant, base_kwargs):
        opt = _build(model, cls, variant, base_kwargs, strategy=strategy)
        return lambda batch: opt.step(lambda b: _loss_of(model, b), batch)
    return make


def _closure_runner(model, cls, variant, base_kwargs):
    opt = _build(model, cls, variant, base_kwargs)

    def step(batch):
        def closure():
            opt.zero_grad()
            loss = _loss_of(model, batch)
            loss.backward()
            return loss
        return opt.step(closure)
    return step


def _two_step_runner(model, cls, variant, base_kwargs):
    opt = _build(model, cls, variant, base_kwargs)

    def step(batch):
        loss = _loss_of(model, batch)
        loss.backward()
        opt.first_step(zero_grad=True)
        _loss_of(model, batch).backward()
        opt.second_step(zero_grad=True)
        return loss.detach()
    return step


def _ddp_runner(model, cls, variant, base_kwargs):
    """DistributedMSAM around DDP on a one-rank gloo group (the DDP evaluator's schedule)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from msam.distributed import DistributedMSAM, ddp_kwargs

    ddp = DDP(model, **ddp_kwargs())
    extra = dict(variant.kwargs)
    if variant.rule:
        extra["rule"] = variant.make_rule()
    if variant.perturb:
        named = dict(model.named_parameters())
        extra["perturb"] = [named[n] for n in variant.perturb]
    opt = DistributedMSAM(ddp, None, cls, **extra, **base_kwargs)
    assert opt.engine.strategy.name == "ddp"
    return lambda batch: opt.step(lambda b: _loss_of(ddp, b), batch)


RUNNERS = {
    "loop": _strategy_runner("loop"),
    "vmap": _strategy_runner("vmap"),
    "batched": _strategy_runner("batched"),
    "lowrank": _strategy_runner("lowrank"),
    "auto": _strategy_runner("auto"),
    "ddp": _ddp_runner,
    "closure": _closure_runner,        # m = 1 only
    "two_step": _two_step_runner,      # m = 1 only
}
M1_ONLY = {"closure", "two_step"}


@pytest.fixture
def one_rank_group():
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _cells():
    for v in VARIANTS:
        for base in sorted(BASES):
            for runner in RUNNERS:
                if runner in M1_ONLY and v.m != 1:
                    continue
                yield pytest.param(v, base, runner, id=f"{v.name}-{base}-{runner}")


@pytest.mark.parametrize("variant,base,runner", list(_cells()))
def test_matches_reference(variant, base, runner, request):
    if runner == "ddp":
        request.getfixturevalue("one_rank_group")
    cls, base_kwargs = BASES[base]
    model = _make_model()
    if variant.combines and runner in REFUSES_COMBINING:
        # The runner cannot see g_j and h_j together: a clear error, before anything moves.
        w0 = [p.detach().clone() for p in model.parameters()]
        with pytest.raises(ValueError, match=REFUSES_COMBINING[runner]):
            RUNNERS[runner](model, cls, variant, base_kwargs)(_data(0))
        assert all(torch.equal(p, q) for p, q in zip(model.parameters(), w0))
        return
    step = RUNNERS[runner](model, cls, variant, base_kwargs)
    ref_model = _make_model()
    ref_opt = cls(ref_model.parameters(), **base_kwargs)
    rho = variant.kwargs["rho"]
    ref_rule = None if variant.rule is None else VariantReference(
        variant.rule[0], rho, **dict(variant.rule[1]))
    for s in range(3):
        batch = _data(s)
        loss = step(batch)
        if ref_rule is not None:
            grads, ref_loss = ref_rule.grad_and_loss(ref_model, batch, variant.m)
        else:
            grads, ref_loss = reference_msam_grad(
                ref_model, _loss_of, batch, variant.m, rho,
                adaptive=variant.kwargs.get("adaptive", False),
                eta=variant.kwargs.get("eta", 0.01), perturb=variant.perturb)
        for n, p in ref_model.named_parameters():
            p.grad = grads[n]
        ref_opt.step()
        if ref_rule is not None:
            ref_rule.after_base_step(ref_model, ref_opt.param_groups[0]["lr"])
        assert abs(float(loss) - ref_loss) < 1e-10
    for (n, p), q in zip(model.named_parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-10, msg=n)


def _bn_cnn(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
        torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 3))


def _img(step):
    g = torch.Generator().manual_seed(7 + step)
    return torch.randn(12, 1, 6, 6, generator=g), torch.randint(0, 3, (12,), generator=g)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("base", sorted(BASES))
@pytest.mark.parametrize("variant", [v for v in VARIANTS if v.name != "msam_size3"],
                         ids=lambda v: v.name)
def test_resume_is_bit_identical(variant, base, strategy):
    cls, base_kwargs = BASES[base]

    def build():
        model = _bn_cnn()
        rule = {} if variant.rule is None else {"rule": variant.make_rule()}
        opt = msam.MSAM(model.parameters(), cls, strategy=strategy, model=model,
                        **variant.kwargs, **rule, **base_kwargs)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
        return model, opt, sched

    def train(model, opt, sched, steps):
        for s in steps:
            opt.step(lambda b: _loss_of(model, b), _img(s))
            sched.step()

    model_a, opt_a, sched_a = build()
    train(model_a, opt_a, sched_a, range(10))

    model_b, opt_b, sched_b = build()
    train(model_b, opt_b, sched_b, range(5))
    buf = io.BytesIO()
    torch.save({"model": model_b.state_dict(), "opt": opt_b.state_dict(),
                "sched": sched_b.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    model_c, opt_c, sched_c = build()
    model_c.load_state_dict(ckpt["model"])
    opt_c.load_state_dict(ckpt["opt"])
    sched_c.load_state_dict(ckpt["sched"])
    train(model_c, opt_c, sched_c, range(5, 10))

    sa, sc = model_a.state_dict(), model_c.state_dict()
    for k in sa:
        assert torch.equal(sa[k], sc[k]), k
    assert opt_c.steps == 10
    assert opt_a.param_groups[0]["lr"] == opt_c.param_groups[0]["lr"]


def test_state_dict_holds_base_state_and_settings():
    model = _make_model()
    opt = msam.MSAM(model.parameters(), torch.optim.SGD, rho=0.1, micro_batches=2, lr=0.1,
                    momentum=0.9)
    opt.step(lambda b: _loss_of(model, b), _data(0))
    sd = opt.state_dict()
    assert all("momentum_buffer" in s for s in sd["state"].values())
    assert sd["msam"]["micro_batches"] == 2 and sd["param_groups"][0]["rho"] == 0.1
    fresh = msam.MSAM(_make_model().parameters(), torch.optim.SGD, rho=0.3, micro_batches=8,
                      lr=0.5, momentum=0.9)
    fresh.load_state_dict(sd)
    assert fresh.micro_batches == 2 and fresh.param_groups[0]["rho"] == 0.1
    assert fresh.param_groups is fresh.base_optimizer.param_groups
    torch.testing.assert_close(
        fresh.state[fresh.param_groups[0]["params"][0]]["momentum_buffer"],
        opt.state[opt.param_groups[0]["params"][0]]["momentum_buffer"])


def test_schedulers_and_add_param_group_share_groups():
    model = _make_model()
    opt = msam.MSAM(list(model[0].parameters()), torch.optim.SGD, rho=0.05, lr=1.0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.1)
    opt.step(lambda b: _loss_of(model, b), _data(0))
    sched.step()
    assert opt.base_optimizer.param_groups[0]["lr"] == pytest.approx(0.1)
    opt.add_param_group({"params": list(model[2].parameters()), "rho": 0.2})
    assert len(opt.base_optimizer.param_groups) == 2
    assert opt.param_groups[1]["rho"] == 0.2 and opt.param_groups[1]["lr"] == 1.0
    before = model[2].weight.detach().clone()
    opt.step(lambda b: _loss_of(model, b), _data(1))
    assert not torch.equal(before, model[2].weight)


def test_prebuilt_base_optimizer_and_sam_alias():
    model = _make_model()
    base = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opt = msam.SAM(None, base, rho=0.05)
    assert opt.param_groups is base.param_groups and opt.micro_batches is None
    opt.step(lambda b: _loss_of(model, b), _data(0))
    assert len(base.state) == 4
    with pytest.raises(ValueError, match="micro_batches"):
        msam.SAM(model.parameters(), torch.optim.SGD, micro_batches=2, lr=0.1)


def test_gradient_accumulation_equals_average_of_batch_gradients():
    model = _make_model()
    opt = msam.MSAM(model.parameters(), torch.optim.SGD, rho=0.1, micro_batches=2, lr=0.1)
    b1, b2 = _data(0), _data(1)
    opt.accumulate(lambda b: _loss_of(model, b), b1, scale=0.5)
    opt.accumulate(lambda b: _loss_of(model, b), b2, scale=0.5)
    g1, _ = reference_msam_grad(_make_model(), _loss_of, b1, 2, 0.1)
    g2, _ = reference_msam_grad(_make_model(), _loss_of, b2, 2, 0.1)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, 0.5 * (g1[n] + g2[n]), rtol=1e-12, atol=1e-14)
    with pytest.raises(RuntimeError, match="accumulate"):
        opt.step(lambda b: _loss_of(model, b), b1)
    w = [p.detach().clone() for p in model.parameters()]
    opt.step()
    for p, w0 in zip(model.parameters(), w):
        torch.testing.assert_close(p.detach(), w0 - 0.1 * p.grad)
    # The first accumulate() after a step starts from zero again.
    opt.accumulate(lambda b: _loss_of(model, b), b1)
    g1b, _ = reference_msam_grad(model, _loss_of, b1, 2, 0.1)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, g1b[n], rtol=1e-12, atol=1e-14)


def test_max_grad_norm_clips_the_averaged_gradient():
    model = _make_model()
    opt = msam.MSAM(model.parameters(), torch.optim.SGD, rho=0.1, micro_batches=2, lr=1.0,
                    max_grad_norm=1e-3)
    w = [p.detach().clone() for p in model.parameters()]
    batch = _data(0)
    ref, _ = reference_msam_grad(_make_model(), _loss_of, batch, 2, 0.1)
    opt.step(lambda b: _loss_of(model, b), batch)
    total = torch.sqrt(sum((g ** 2).sum() for g in ref.values()))
    assert total > 1e-3
    for (n, p), w0 in zip(model.named_parameters(), w):
        torch.testing.assert_close(p.detach(), w0 - ref[n] * (1e-3 / (total + 1e-6)),
                                   rtol=1e-9, atol=1e-12)


def test_closure_without_batch_for_m1():
    model = _make_model()
    x, y = _data(0)
    opt = msam.SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1)
    loss = opt.step(lambda: _loss_of(model, (x, y)))
    assert torch.isfinite(loss)
    opt2 = msam.MSAM(model.parameters(), torch.optim.SGD, micro_batches=2, lr=0.1)
    with pytest.raises(ValueError, match="batch"):
        opt2.step(lambda: _loss_of(model, (x, y)))
