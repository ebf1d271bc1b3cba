"""msam.integrations.lightning against the real Lightning Trainer (CPU, tiny models).

The reference is msam.msam_gradient on the same batches at the same weights (a copy of the
model at the start of the optimizer step), computed outside Lightning; the gradient compared is
the one in .grad when the base optimizer steps (a step pre-hook on it: after Lightning's
clipping and accumulation).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

pl = pytest.importorskip("lightning.pytorch")

import msam  # noqa: E402
from msam.integrations import unwrap_msam  # noqa: E402
from msam.integrations.lightning import MSAMModule, manual_step  # noqa: E402

RHO, M, LR = 0.1, 2, 0.1
MAX_DIFF: dict[str, float] = {}


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(num_workers|does not have many workers|"
                                "GPU available|TPU available|LitLogger|litlogger).*")
        yield


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def _loader(n=32, bs=8):
    g = torch.Generator().manual_seed(0)
    ds = torch.utils.data.TensorDataset(torch.randn(n, 6, generator=g),
                                        torch.randint(0, 3, (n,), generator=g))
    return torch.utils.data.DataLoader(ds, batch_size=bs, shuffle=False)


def _loss(net, batch):
    x, y = batch
    return nn.functional.cross_entropy(net(x), y)


class Net(MSAMModule):
    """Records, per base step, the .grad the base optimizer sees, the weights (and buffers) at
    the start of the step and the batches of the step."""

    def __init__(self, manual=False, accum=1, clip=None):
        super().__init__()
        self.net = _net()
        self.automatic_optimization = not manual
        self.accum, self.clip = accum, clip
        self.grads: list[list[torch.Tensor]] = []
        self.starts: list[dict] = []
        self.batches: list[list] = []
        self.calls = 0

    def msam_loss(self, batch):
        return _loss(self.net, batch)

    def configure_optimizers(self):
        opt = msam.MSAM(self.parameters(), torch.optim.SGD, rho=RHO, micro_batches=M, model=self,
                        lr=LR, momentum=0.9, weight_decay=1e-3)
        opt.base_optimizer.register_step_pre_hook(
            lambda o, a, k: self.grads.append([p.grad.detach().clone()
                                               for p in self.net.parameters()]))
        sched = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.9)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_train_batch_start(self, batch, batch_idx):
        if self.calls % self.accum == 0:
            self.starts.append(copy.deepcopy(self.net.state_dict()))
            self.batches.append([])
        self.batches[-1].append([t.clone() for t in batch])
        self.calls += 1

    def training_step(self, batch, batch_idx):
        if self.automatic_optimization:
            loss = super().training_step(batch, batch_idx)
        else:
            k = self.accum
            loss = manual_step(self, self.msam_loss, batch, scale=1.0 / k,
                               step=(batch_idx + 1) % k == 0, gradient_clip_val=self.clip)
            self.lr_schedulers().step() if (batch_idx + 1) % k == 0 else None
        self.log("loss", loss)
        return loss


def _trainer(**kw):
    base = dict(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                enable_checkpointing=False, enable_model_summary=False, max_epochs=1)
    base.update(kw)
    return pl.Trainer(**base)


def _reference(model, step, accum, clip=None):
    """msam_gradient over the recorded batches of one step, at the recorded weights."""
    ref = _net()
    ref.load_state_dict(model.starts[step])
    ref.train()
    params = list(ref.parameters())
    for i, b in enumerate(model.batches[step]):
        msam.msam_gradient(lambda mb: _loss(ref, mb), b, params, rho=RHO, micro_batches=M,
                           model=ref, accumulate=i > 0, scale=1 / accum)
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(params, clip)
    return [p.grad.detach().clone() for p in params], ref


def _check(model, steps, accum, clip=None):
    assert len(model.grads) == steps
    worst = 0.0
    for s in range(steps):
        want, ref = _reference(model, s, accum, clip)
        for g, w in zip(model.grads[s], want):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
            worst = max(worst, (g - w).abs().max().item())
    return worst, ref


@pytest.mark.parametrize("manual", [False, True], ids=["automatic", "manual"])
@pytest.mark.parametrize("accum", [1, 2])
def test_lightning_gradient_equals_msam_gradient(manual, accum):
    model = Net(manual=manual, accum=accum)
    kw = {} if manual else {"accumulate_grad_batches": accum}
    trainer = _trainer(max_steps=2, **kw)
    trainer.fit(model, _loader())
    assert trainer.global_step == 2  # max_steps stopped the run, counted in optimizer steps
    assert unwrap_msam(trainer.optimizers[0]).steps == 2
    worst, _ = _check(model, 2, accum)
    name = f"{'manual' if manual else 'automatic'} accum={accum}"
    MAX_DIFF[name] = worst
    print(f"lightning {name}: max |grad_step - msam_gradient| = {worst:.3e}")
    assert model.net[1].num_batches_tracked.item() == 2 * accum  # once per batch


@pytest.mark.parametrize("manual", [False, True], ids=["automatic", "manual"])
def test_lightning_gradient_clip_acts_on_msam_gradient(manual):
    clip = 0.05  # far below the gradient norm, so clipping changes the gradient
    model = Net(manual=manual, clip=clip)
    trainer = _trainer(max_steps=2, **({} if manual else {"gradient_clip_val": clip}))
    trainer.fit(model, _loader())
    worst, _ = _check(model, 2, 1, clip=clip)
    for g in model.grads:
        assert torch.linalg.vector_norm(torch.stack(
            [torch.linalg.vector_norm(t) for t in g])).item() == pytest.approx(clip, rel=1e-4)
    print(f"lightning clip {'manual' if manual else 'automatic'}: max diff {worst:.3e}")


def test_lightning_batchnorm_running_stats_once_per_step():
    model = Net()
    trainer = _trainer(max_steps=1)
    trainer.fit(model, _loader())
    # An ordinary forward (train mode, whole batch) from the same start: the running mean is the
    # mean of equal-sized micro-batch means, i.e. the batch mean, updated once.
    plain = _net()
    plain.load_state_dict(model.starts[0])
    plain.train()
    plain(model.batches[0][0][0])
    torch.testing.assert_close(model.net[1].running_mean, plain[1].running_mean,
                               rtol=1e-5, atol=1e-6)
    assert model.net[1].num_batches_tracked.item() == 1
    _, ref = _reference(model, 0, 1)  # and all buffers exactly as msam_gradient's
    for key in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(model.net[1], key), getattr(ref[1], key),
                                   rtol=0, atol=0)


def test_lightning_max_steps_and_epochs_count_steps():
    model = Net(accum=2)
    trainer = _trainer(max_epochs=3, accumulate_grad_batches=2)
    trainer.fit(model, _loader())  # 4 batches per epoch: 2 optimizer steps per epoch
    assert trainer.global_step == 6
    assert unwrap_msam(trainer.optimizers[0]).steps == 6
    assert model.net[1].num_batches_tracked.item() == 12


def test_lightning_bf16_mixed_runs():
    model = Net()
    before = [p.detach().clone() for p in model.parameters()]
    trainer = _trainer(max_steps=3, precision="bf16-mixed", gradient_clip_val=1.0)
    trainer.fit(model, _loader())
    assert trainer.global_step == 3
    assert all(p.dtype == torch.float32 for p in model.parameters())  # fp32 weights perturbed
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    # bf16 autocast was on: the gradient differs from the float32 mSAM gradient, but not much.
    want, _ = _reference(model, 0, 1)
    got = torch.cat([g.flatten() for g in model.grads[0]])
    ref = torch.cat([w.flatten() for w in want])
    rel = ((got - ref).norm() / ref.norm()).item()
    print(f"lightning bf16-mixed: relative difference to the float32 msam_gradient {rel:.2e}")
    assert 0 < rel < 0.1


@pytest.mark.parametrize("manual", [False, True], ids=["automatic", "manual"])
def test_lightning_resume_from_ckpt_path_continues_exactly(tmp_path, manual):
    full = Net(manual=manual)
    _trainer(max_epochs=2).fit(full, _loader())
    half = Net(manual=manual)
    t1 = _trainer(max_epochs=1)
    t1.fit(half, _loader())
    t1.save_checkpoint(tmp_path / "half.ckpt")
    resumed = Net(manual=manual)
    t2 = _trainer(max_epochs=2)
    t2.fit(resumed, _loader(), ckpt_path=tmp_path / "half.ckpt")
    assert t2.global_step == 8
    assert unwrap_msam(t2.optimizers[0]).steps == 8
    for a, b in zip(full.state_dict().values(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    sa = unwrap_msam(t2.optimizers[0]).base_optimizer.state
    assert all("momentum_buffer" in s for s in sa.values())


def test_lightning_plain_module_with_msam_and_errors():
    class Plain(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = _net()

        def training_step(self, batch, batch_idx):
            return _loss(self.net, batch)

        def configure_optimizers(self):
            return msam.MSAM(self.parameters(), torch.optim.SGD, rho=RHO, micro_batches=2,
                             lr=LR)

    # A plain LightningModule cannot split Lightning's closure into micro-batches: it says so.
    with pytest.raises(ValueError, match="micro_batches > 1.*MSAMModule"):
        _trainer(max_steps=1).fit(Plain(), _loader())

    class NotMSAM(Net):
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=LR)

    with pytest.raises(TypeError, match="msam.MSAM"):
        _trainer(max_steps=1).fit(NotMSAM(), _loader())
    with pytest.raises(TypeError, match="LightningOptimizer"):
        manual_step(Net(), lambda b: b, None,
                    optimizer=torch.optim.SGD(_net().parameters(), lr=LR))


class CombiningNet(Net):
    """Net with a rule that combines g_j and h_j (GSAM, decoupled WSAM)."""

    def __init__(self, rule, manual=False):
        super().__init__(manual=manual)
        self.rule = rule

    def configure_optimizers(self):
        opt = msam.MSAM(self.parameters(), torch.optim.SGD, rho=RHO, micro_batches=M, model=self,
                        rule=self.rule, lr=LR, momentum=0.9, weight_decay=1e-3)
        sched = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.9)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


@pytest.mark.parametrize("manual", [False, True], ids=["automatic", "manual"])
@pytest.mark.parametrize("rule", ["wsam", "gsam"])
def test_lightning_combining_rules_step_as_a_plain_loop(rule, manual):
    """GSAM and decoupled WSAM (the sharpness step after the base step) through Lightning's
    optimizer step take the steps MSAM takes in a plain loop (with the same scheduler)."""
    model = CombiningNet(rule, manual=manual)
    start = copy.deepcopy(model.net.state_dict())
    trainer = _trainer(max_steps=3)
    trainer.fit(model, _loader())
    ref = _net()
    ref.load_state_dict(start)
    opt = msam.MSAM(ref.parameters(), torch.optim.SGD, rho=RHO, micro_batches=M, model=ref,
                    rule=rule, lr=LR, momentum=0.9, weight_decay=1e-3)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.9)
    for batch in list(_loader())[:3]:
        opt.step(lambda b: _loss(ref, b), batch)
        sched.step()
    for p, q in zip(model.net.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
