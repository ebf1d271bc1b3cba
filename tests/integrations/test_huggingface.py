"""msam.integrations.huggingface.MSAMTrainer against the real transformers.Trainer.

The reference is msam.msam_gradient on the same batches at the same weights (a copy of the
model), computed outside the Trainer; the gradient compared is the one in .grad when Trainer
calls the optimizer step (its on_pre_optimizer_step callback: after its clipping).
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
from torch import nn

os.environ["HF_HUB_OFFLINE"] = "1"
transformers = pytest.importorskip("transformers")

import msam  # noqa: E402
from msam.integrations.huggingface import MSAMTrainer  # noqa: E402

MAX_DIFF: dict[str, float] = {}


class BNNet(nn.Module):
    """A tiny classifier with BatchNorm that returns {"loss", "logits"} like an HF model."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.bn = nn.BatchNorm1d(8)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x, labels=None):
        logits = self.fc2(torch.relu(self.bn(self.fc1(x))))
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = nn.functional.cross_entropy(logits, labels)
        return out


def _data(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    return [{"x": x[i], "labels": y[i]} for i in range(n)]


def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=8, learning_rate=0.05,
                max_steps=2, use_cpu=True, report_to=[], save_strategy="no",
                logging_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
                remove_unused_columns=False, seed=0, max_grad_norm=0.0,
                lr_scheduler_type="linear", warmup_steps=0)
    base.update(kw)
    return transformers.TrainingArguments(**base)


class Recorder(transformers.TrainerCallback):
    def __init__(self, trainer) -> None:
        self.trainer = trainer
        self.grads: list[list[torch.Tensor]] = []

    def on_pre_optimizer_step(self, args, state, control, **kw):
        self.grads.append([p.grad.detach().clone() for p in self.trainer.model.parameters()])


class RecordingTrainer(MSAMTrainer):
    """Records the weights (and buffers) and the inputs of each training_step."""

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.calls: list[tuple[dict, dict]] = []
        self.recorder = Recorder(self)
        self.add_callback(self.recorder)

    def training_step(self, model, inputs, num_items_in_batch=None):
        state = copy.deepcopy(model.state_dict())
        self.calls.append((state, {k: v.clone() for k, v in inputs.items()}))
        return super().training_step(model, inputs, num_items_in_batch)


def _reference(model, calls, k, **kw):
    """msam_gradient on the recorded batches of one optimizer step, at the recorded weights."""
    ref = copy.deepcopy(model)
    ref.load_state_dict(calls[0][0])
    ref.train()
    params = list(ref.parameters())
    for p in params:
        p.grad = None

    def loss_fn(mb):
        return ref(**mb)["loss"]

    for i, (_, inputs) in enumerate(calls):
        msam.msam_gradient(loss_fn, inputs, params, model=ref, accumulate=i > 0, scale=1 / k,
                           **kw)
    return [p.grad.detach().clone() for p in params], ref


@pytest.mark.parametrize("accum", [1, 2])
def test_hf_trainer_gradient_equals_msam_gradient(tmp_path, accum):
    torch.manual_seed(0)
    model = BNNet()
    trainer = RecordingTrainer(
        model=model, args=_args(tmp_path, gradient_accumulation_steps=accum),
        train_dataset=_data(), rho=0.1, micro_batches=4,
    )
    trainer.train()
    assert trainer.state.global_step == 2
    assert len(trainer.recorder.grads) == 2 and len(trainer.calls) == 2 * accum
    worst = 0.0
    for step in range(2):
        calls = trainer.calls[step * accum:(step + 1) * accum]
        want, ref = _reference(model, calls, accum, rho=0.1, micro_batches=4)
        got = trainer.recorder.grads[step]
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
            worst = max(worst, (g - w).abs().max().item())
        # plain SGD's gradient differs: the test can fail
        assert any((g - w0).abs().max() > 1e-4 for g, w0 in zip(got, _plain_grad(model, calls)))
        # BatchNorm running statistics: one update per training_step (loader batch)
        nbt = calls[0][0]["bn.num_batches_tracked"].item()
        assert ref.bn.num_batches_tracked.item() == nbt + accum
    assert model.bn.num_batches_tracked.item() == 2 * accum
    MAX_DIFF[f"accum={accum}"] = worst
    print(f"HF Trainer accum={accum}: max |grad_trainer - msam_gradient| = {worst:.3e}")


def _plain_grad(model, calls):
    ref = copy.deepcopy(model)
    ref.load_state_dict(calls[0][0])
    ref.zero_grad(set_to_none=True)
    for _, inputs in calls:
        (ref(**inputs)["loss"] / len(calls)).backward()
    return [p.grad for p in ref.parameters()]


def test_hf_trainer_clipping_acts_on_the_msam_gradient(tmp_path):
    torch.manual_seed(0)
    model = BNNet()
    trainer = RecordingTrainer(model=model, args=_args(tmp_path, max_grad_norm=0.05, max_steps=1),
                               train_dataset=_data(), rho=0.1, micro_batches=2)
    trainer.train()
    want, _ = _reference(model, trainer.calls, 1, rho=0.1, micro_batches=2)
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(w) for w in want]))
    assert norm > 0.05
    for g, w in zip(trainer.recorder.grads[0], want):
        torch.testing.assert_close(g, w * (0.05 / (norm + 1e-6)), rtol=1e-5, atol=1e-7)


def test_hf_trainer_tiny_bert_bf16(tmp_path):
    """A 2-layer BERT from a config (random weights): float32 gradient equality, then bf16 runs."""
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=32,
                                  max_position_embeddings=16, num_labels=2,
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(cfg)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 50, (8, 10), generator=g)
    ds = [{"input_ids": ids[i], "attention_mask": torch.ones(10, dtype=torch.long),
           "labels": torch.tensor(i % 2)} for i in range(8)]
    trainer = RecordingTrainer(model=model, args=_args(tmp_path, per_device_train_batch_size=4,
                                                       max_steps=1),
                               train_dataset=ds, rho=0.05, micro_batches=2)
    trainer.train()

    ref = copy.deepcopy(model)
    ref.load_state_dict(trainer.calls[0][0])
    ref.train()
    for p in ref.parameters():
        p.grad = None
    msam.msam_gradient(lambda mb: ref(**mb).loss, trainer.calls[0][1], list(ref.parameters()),
                       rho=0.05, micro_batches=2)
    worst = 0.0
    for gt, p in zip(trainer.recorder.grads[0], ref.parameters()):
        want = torch.zeros_like(p) if p.grad is None else p.grad
        torch.testing.assert_close(gt, want, rtol=1e-5, atol=1e-6)
        worst = max(worst, (gt - want).abs().max().item())
    print(f"HF Trainer tiny BERT: max |grad_trainer - msam_gradient| = {worst:.3e}")

    before = [p.detach().clone() for p in model.parameters()]
    bf = MSAMTrainer(model=model, args=_args(tmp_path / "bf16", per_device_train_batch_size=4,
                                             max_steps=2, bf16=True),
                     train_dataset=ds, rho=0.05, micro_batches=2)
    out = bf.train()
    assert torch.isfinite(torch.tensor(out.training_loss))
    assert bf.msam_optimizer.steps == 2
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def _run(tmp_path, max_steps, resume=None, save=False):
    torch.manual_seed(0)
    model = BNNet()
    kw = dict(max_steps=4, per_device_train_batch_size=4, lr_scheduler_type="linear")
    if save:
        kw.update(save_strategy="steps", save_steps=2)
    trainer = MSAMTrainer(
        model=model, args=_args(tmp_path, optim="adamw_torch", **kw), train_dataset=_data(8),
        rho=0.1, micro_batches=2,
    )
    if max_steps < 4:
        trainer.args.max_steps = max_steps
    trainer.train(resume_from_checkpoint=resume)
    return model, trainer


def test_hf_trainer_resume_continues_exactly(tmp_path):
    full, _ = _run(tmp_path / "full", 4)
    _, first = _run(tmp_path / "part", 4, save=True)
    ckpt = tmp_path / "part" / "checkpoint-2"
    assert ckpt.is_dir()
    saved = torch.load(ckpt / "optimizer.pt", weights_only=False)
    assert "msam" in saved and saved["msam"]["steps"] == 2
    assert all("exp_avg" in st for st in saved["state"].values())
    resumed, second = _run(tmp_path / "part2", 4, resume=str(ckpt))
    assert second.state.global_step == 4
    # AdamW's moments came back through the msam state
    assert second.msam_optimizer.steps == 4
    for a, b in zip(full.state_dict().values(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_plain_trainer_with_msam_optimizer_raises_and_names_the_subclass(tmp_path):
    torch.manual_seed(0)
    model = BNNet()
    opt = msam.MSAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    trainer = transformers.Trainer(model=model, args=_args(tmp_path, max_steps=1),
                                   train_dataset=_data(), optimizers=(opt, None))
    with pytest.raises(RuntimeError, match="MSAMTrainer"):
        trainer.train()


def test_msam_trainer_accepts_an_msam_optimizer_and_rejects_double_config(tmp_path):
    torch.manual_seed(0)
    model = BNNet()
    opt = msam.MSAM(model.parameters(), torch.optim.SGD, rho=0.05, micro_batches=2, lr=0.1)
    with pytest.raises(ValueError, match="rho"):
        MSAMTrainer(model=model, args=_args(tmp_path), train_dataset=_data(),
                    optimizers=(opt, None), rho=0.1)
    trainer = MSAMTrainer(model=model, args=_args(tmp_path, max_steps=1), train_dataset=_data(),
                          optimizers=(opt, None))
    trainer.train()
    assert opt.steps == 1


@pytest.mark.parametrize("rule", ["wsam", "gsam"])
def test_hf_trainer_combining_rules_step_as_a_plain_loop(tmp_path, rule):
    """GSAM and decoupled WSAM (the sharpness step after AdamW's) inside Trainer.train take
    the steps MSAM takes in a plain loop on the same batches."""
    torch.manual_seed(0)
    model = BNNet()
    start = copy.deepcopy(model.state_dict())
    trainer = RecordingTrainer(
        model=model, args=_args(tmp_path, max_steps=3, lr_scheduler_type="constant",
                                optim="adamw_torch"),
        train_dataset=_data(24), rho=0.1, micro_batches=4, msam_kwargs={"rule": rule},
    )
    trainer.train()
    assert trainer.state.global_step == 3
    ref = BNNet()
    ref.load_state_dict(start)
    opt = msam.MSAM(ref.parameters(), torch.optim.AdamW, rho=0.1, micro_batches=4, model=ref,
                    rule=rule, lr=0.05, weight_decay=0.0)
    for _, inputs in trainer.calls:
        opt.step(lambda mb: ref(**mb)["loss"], inputs)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
