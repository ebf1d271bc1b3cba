"""The ``lowrank`` strategy (factored SAM on ``Linear`` layers) against ``tests/reference.py``
(float64): MLPs with uneven micro-batches, with / without bias, ``perturb=`` subsets,
accumulation, ``rho = 0``, mixed models (explicit gradients for the other layers), loss
scaling, non-finite values, and its announced fallback to ``batched``."""

from __future__ import annotations

import warnings

import pytest
import torch
from test_batched import KINDS, _batch, _loss_of, _model
from torch import nn

import msam
from msam.core.nonfinite import NonFiniteLossError
from msam.strategies import LowRankFallbackWarning, LowRankStrategy

from reference import reference_msam_grad, reference_msam_grad_bn

pytestmark = pytest.mark.usefixtures("float64")
F = nn.functional


def _mlp(bias: bool = True, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 9, bias=bias), nn.Tanh(), nn.Linear(9, 8, bias=bias),
                         nn.ReLU(), nn.Linear(8, 3, bias=bias))


def _data(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


class _Spy(LowRankStrategy):
    """Counts the chunks that ran the factored path."""

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.fused_chunks = 0

    def _fused(self, ctx, idx, groups, keep_clean=False):
        out = super()._fused(ctx, idx, groups, keep_clean)
        self.fused_chunks += 1
        return out


def _grad(model, batch, m, rho, strategy, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("error", LowRankFallbackWarning)
        return msam.msam_gradient(lambda b: _loss_of(model, b), batch, model.parameters(),
                                  rho=rho, micro_batches=m, strategy=strategy, model=model,
                                  **kw)


def _close(model, ref, scale=1.0):
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, scale * ref[name], rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("n, m", [(12, 1), (10, 2), (10, 3), (10, 4), (12, 4), (9, 4)])
def test_mlp_matches_reference(bias, n, m):
    model, batch = _mlp(bias), _data(n)
    strategy = _Spy()
    loss = _grad(model, batch, m, 0.3, strategy)
    ref, ref_loss = reference_msam_grad(_mlp(bias), _loss_of, batch, m, 0.3)
    _close(model, ref)
    assert abs(float(loss) - ref_loss) < 1e-10
    sizes = {len(t) for t in torch.tensor_split(torch.arange(n), m)}
    assert strategy.fused_chunks == len(sizes) and strategy.reason == ""


def test_large_rho_differs_from_sam_so_the_test_can_fail():
    """The micro-batch perturbations matter here: mSAM (m=4) is not SAM (m=1) or SGD."""
    a, b, c = _mlp(), _mlp(), _mlp()
    batch = _data(12)
    _grad(a, batch, 4, 0.5, "lowrank")
    _grad(b, batch, 1, 0.5, "lowrank")
    _grad(c, batch, 4, 0.0, "lowrank")
    for pa, pb, pc in zip(a.parameters(), b.parameters(), c.parameters()):
        assert (pa.grad - pb.grad).abs().max() > 1e-4
        assert (pa.grad - pc.grad).abs().max() > 1e-4


@pytest.mark.parametrize("subset", [("0.weight",), ("2.bias", "4.weight"), ("0.bias",)])
def test_perturb_subset(subset):
    model, batch = _mlp(), _data(10)
    named = dict(model.named_parameters())
    strategy = _Spy()
    _grad(model, batch, 4, 0.4, strategy, perturb=[named[k] for k in subset])
    ref, _ = reference_msam_grad(_mlp(), _loss_of, batch, 4, 0.4, perturb=subset)
    _close(model, ref)
    assert strategy.fused_chunks == 2


def test_per_group_rho_matches_loop():
    batch = _data(12)

    def run(strategy):
        model = _mlp()
        opt = msam.MSAM([{"params": [model[0].weight, model[2].bias], "rho": 0.1},
                         {"params": [model[0].bias, model[2].weight, *model[4].parameters()],
                          "rho": 0.6}],
                        torch.optim.SGD, lr=0.1, micro_batches=4, model=model,
                        strategy=strategy)
        opt.accumulate(lambda b: _loss_of(model, b), batch)
        return model

    spy = _Spy()
    a, b = run("loop"), run(spy)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-10, atol=1e-12, msg=name)
    assert spy.fused_chunks == 1
    c = run("lowrank")  # differs from a single rho
    ref, _ = reference_msam_grad(_mlp(), _loss_of, batch, 4, 0.1)
    assert max(float((p.grad - ref[n]).abs().max()) for n, p in c.named_parameters()) > 1e-4


def test_accumulation_and_step():
    model = _mlp()
    opt = msam.MSAM(model.parameters(), torch.optim.SGD, rho=0.2, micro_batches=3, lr=0.1,
                    strategy="lowrank", model=model)
    b1, b2 = _data(12, 1), _data(11, 2)
    opt.accumulate(lambda b: _loss_of(model, b), b1, scale=0.5)
    opt.accumulate(lambda b: _loss_of(model, b), b2, scale=0.5)
    g1, _ = reference_msam_grad(_mlp(), _loss_of, b1, 3, 0.2)
    g2, _ = reference_msam_grad(_mlp(), _loss_of, b2, 3, 0.2)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, 0.5 * (g1[n] + g2[n]), rtol=1e-10, atol=1e-12)


def test_rho_zero_is_the_base_gradient():
    model, batch = _mlp(), _data(10)
    strategy = _Spy()
    _grad(model, batch, 4, 0.0, strategy)
    ref, _ = reference_msam_grad(_mlp(), _loss_of, batch, 4, 0.0)
    _close(model, ref)
    assert strategy.fused_chunks == 0  # rho = 0 is one pass at w: nothing to factor


def test_frozen_layer_and_unused_layer():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.unused = nn.Linear(6, 5), nn.Linear(5, 3), nn.Linear(5, 3)
            self.a.weight.requires_grad_(False)

        def forward(self, x):
            h = torch.tanh(self.a(x))
            return self.b(h) + 0.0 * self.unused(h).detach()

    torch.manual_seed(0)
    model = Net()
    torch.manual_seed(0)
    ref_model = Net()
    batch = _data(12)
    strategy = _Spy()
    with warnings.catch_warnings():
        warnings.simplefilter("error", LowRankFallbackWarning)
        msam.msam_gradient(lambda b: _loss_of(model, b), batch,
                           [p for p in model.parameters() if p.requires_grad], rho=0.3,
                           micro_batches=4, strategy=strategy, model=model)
    # the reference cannot differentiate an unused parameter: compare with the loop
    msam.msam_gradient(lambda b: _loss_of(ref_model, b), batch,
                       [p for p in ref_model.parameters() if p.requires_grad], rho=0.3,
                       micro_batches=4, strategy="loop", model=ref_model)
    for (name, p), q in zip(model.named_parameters(), ref_model.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-12, msg=name)
    assert model.b.weight.grad is not None and model.a.weight.grad is None
    assert strategy.fused_chunks == 1


@pytest.mark.parametrize("kind", KINDS)
def test_mixed_models_match_reference(kind):
    """Convolutions, norms, embeddings, BatchNorm: explicit g_j in the same norm."""
    model = _model(kind)
    batch = _batch(kind, 10)
    strategy = _Spy()
    loss = _grad(model, batch, 4, 0.1, strategy)
    if kind == "batchnorm":
        ref = reference_msam_grad_bn(_model(kind), _loss_of, batch, 4, 0.1)
    else:
        ref, ref_loss = reference_msam_grad(_model(kind), _loss_of, batch, 4, 0.1)
        assert abs(float(loss) - ref_loss) < 1e-10
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[name], rtol=1e-9, atol=1e-11, msg=name)
    assert strategy.fused_chunks == 2


def test_token_inputs_factored_when_cheap():
    """A Linear over (batch, tokens, d): the Gram matrices span all tokens of a micro-batch."""
    class Tok(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(6, 16), nn.Linear(16, 3)

        def forward(self, x):
            return self.b(torch.tanh(self.a(x.reshape(x.shape[0], 2, 3).repeat(1, 1, 2)))
                          .mean(1))

    torch.manual_seed(0)
    model = Tok()
    torch.manual_seed(0)
    ref_model = Tok()
    batch = _data(8)  # 2 examples x 2 tokens per micro-batch: 4 (6 + 16) <= 6 x 16
    strategy = _Spy()
    _grad(model, batch, 4, 0.3, strategy)
    ref, _ = reference_msam_grad(ref_model, _loss_of, batch, 4, 0.3)
    _close(model, ref)
    assert strategy.fused_chunks == 1


def _tied():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(6, 6)
            self.head = nn.Linear(6, 3)

        def forward(self, x):
            return self.head(torch.tanh(self.a(torch.tanh(self.a(x)))))
    torch.manual_seed(0)
    return Tied()


def _many_tokens():
    class Many(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 2)
            self.head = nn.Linear(2, 3)

        def forward(self, x):
            return self.head(self.a(x.reshape(x.shape[0], 2, 3)).mean(1))
    torch.manual_seed(0)
    return Many()


@pytest.mark.parametrize("case, expect", [
    ("asam", "'asam'"), ("gsam", "'gsam'"), ("tied", "more than once"),
    ("tokens", "dearer"),
])
def test_fallback_to_batched_is_announced_and_correct(case, expect):
    make = {"tied": _tied, "tokens": _many_tokens}.get(case, _mlp)
    model, ref_model, batch = make(), make(), _data(12)
    kw: dict = {}
    if case == "asam":
        kw = {"adaptive": True}
    strategy = _Spy()
    if case == "gsam":
        from msam.core import GSAMRule
        opt = msam.MSAM(model.parameters(), torch.optim.SGD, lr=0.1, rho=0.1,
                        micro_batches=4, model=model, strategy=strategy,
                        rule=GSAMRule(alpha=0.0))
        with pytest.warns(LowRankFallbackWarning, match=expect):
            opt.accumulate(lambda b: _loss_of(model, b), batch)
        ref, _ = reference_msam_grad(ref_model, _loss_of, batch, 4, 0.1)  # alpha 0: SAM
    else:
        with pytest.warns(LowRankFallbackWarning, match=expect):
            msam.msam_gradient(lambda b: _loss_of(model, b), batch, model.parameters(),
                               rho=0.1, micro_batches=4, strategy=strategy, model=model, **kw)
        ref, _ = reference_msam_grad(ref_model, _loss_of, batch, 4, 0.1,
                                     adaptive=case == "asam")
    _close(model, ref)
    assert expect in strategy.reason and strategy.fused_chunks == 0
    # announced once
    with warnings.catch_warnings():
        warnings.simplefilter("error", LowRankFallbackWarning)
        if case != "gsam":
            msam.msam_gradient(lambda b: _loss_of(model, b), batch, model.parameters(),
                               rho=0.1, micro_batches=4, strategy=strategy, model=model, **kw)
    assert strategy.fused_chunks == 0


def test_nonfinite_raises_and_restores():
    model = _mlp()
    strategy = _Spy()
    opt = msam.MSAM(model.parameters(), torch.optim.SGD, rho=0.1, micro_batches=4, lr=0.1,
                    strategy=strategy, model=model)
    opt.step(lambda b: _loss_of(model, b), _data(12))  # (the loss contract is checked here)
    x, y = _data(12, 1)
    x[7, 2] = float("nan")
    w0 = [p.detach().clone() for p in model.parameters()]
    g0 = [p.grad.clone() for p in model.parameters()]
    with pytest.raises(NonFiniteLossError, match="non-finite"):  # (the chunk loss: all of them)
        opt.step(lambda b: _loss_of(model, b), (x, y))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), w0))
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), g0))
    assert strategy.fused_chunks == 2


@pytest.mark.parametrize("amp", ["scaler", "bf16"])
@pytest.mark.parametrize("kind", ["mlp", "batchnorm"])
def test_loss_scale_and_autocast_match_loop(kind, amp):
    torch.set_default_dtype(torch.float32)

    def run(strategy):
        model = (_mlp() if kind == "mlp" else _model("batchnorm")).float()
        opt = msam.MSAM(model.parameters(), torch.optim.SGD, rho=0.1, micro_batches=4, lr=0.1,
                        strategy=strategy, model=model)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8) if amp == "scaler" else None

        def loss_fn(b):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp == "bf16"):
                return _loss_of(model, b)

        for s in range(2):
            x, y = _data(12, s) if kind == "mlp" else _batch("batchnorm", 12, s)
            opt.step(loss_fn, (x.float(), y), scaler=scaler)
            if scaler is not None:
                scaler.update()
        return model.state_dict()

    a = run("loop")
    strategy = _Spy()
    b = run(strategy)
    assert strategy.fused_chunks == 2
    tol = 2e-2 if amp == "bf16" else 1e-5  # as for batched (bf16 matmuls, other order)
    for k in a:
        torch.testing.assert_close(a[k].float(), b[k].float(), rtol=tol, atol=tol, msg=k)


def test_auto_may_choose_lowrank_and_saves_it():
    from msam.strategies.auto import AutoStrategy

    model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 3))
    strat = AutoStrategy(repeats=1)
    assert "lowrank" in strat.candidates
    opt = msam.MSAM(model.parameters(), torch.optim.SGD, rho=0.1, micro_batches=4, lr=0.1,
                    strategy=strat, model=model)
    batch = (torch.randn(32, 64), torch.randint(0, 3, (32,)))
    opt.step(lambda b: _loss_of(model, b), batch)
    assert strat.timings["lowrank"] < float("inf")
    strat.choices = {k: "lowrank" for k in strat.choices}
    fresh = AutoStrategy()
    fresh.load_state_dict(opt.state_dict()["msam"]["strategy"])
    assert set(fresh.choices.values()) == {"lowrank"}


def test_state_dict_and_name():
    model = _mlp()
    opt = msam.MSAM(model.parameters(), torch.optim.SGD, rho=0.1, micro_batches=4, lr=0.1,
                    strategy=LowRankStrategy(chunk=2), model=model)
    opt.step(lambda b: _loss_of(model, b), _data(12))
    sd = opt.state_dict()
    assert sd["msam"]["strategy"] == {"name": "lowrank", "chunk": 2}
    assert opt.engine.strategy_name == "lowrank"


def test_fp16_autocast_with_grad_scaler_and_small_gradients_does_not_skip():
    """The factored output gradients D are kept unscaled; in fp16 small entries underflowed,
    ||g_j|| became 0, e_j overflowed and every step was skipped (4 of 6 here, the loss scale
    falling) while the loop strategy skipped none. D is now kept in fp32 under fp16, and
    c_j D_j is formed before any cast."""
    torch.set_default_dtype(torch.float32)   # the module's float64 fixture restores it after

    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(5, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(),
                             nn.Linear(32, 3))

    finals = {}
    for strategy in ("loop", "lowrank"):
        m = model()
        opt = msam.MSAM(m.parameters(), torch.optim.SGD, rho=0.1, micro_batches=4, lr=0.1,
                        strategy=strategy, model=m)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
        for t in range(6):
            g = torch.Generator().manual_seed(200 + t)
            batch = torch.randn(12, 5, generator=g), torch.randint(0, 3, (12,), generator=g)
            with torch.autocast("cpu", dtype=torch.float16):
                opt.step(lambda b, m=m: F.cross_entropy(m(b[0]), b[1]) * 1e-4, batch,
                         scaler=scaler)
            scaler.update()
        assert opt.skipped_steps == 0, strategy
        assert scaler.get_scale() == 2.0 ** 16
        finals[strategy] = torch.cat([p.detach().flatten() for p in m.parameters()])
    torch.testing.assert_close(finals["lowrank"], finals["loop"], rtol=1e-3, atol=1e-5)
