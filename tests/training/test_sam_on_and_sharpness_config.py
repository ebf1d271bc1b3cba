"""Config key ``perturb: norm`` (SAM-ON, Mueller et al. 2023) and ``sharpness.rho`` (one fixed
m-sharpness radius for every run of a study): issue 27."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from msam.training import ConfigError, TrainConfig, load_study_config, train
from msam.training.study import expand_grid
from msam.training.trainer import build_optimizer


def _cfg(**kw) -> TrainConfig:
    base = dict(model="small_cnn", model_options={"norm": "group", "width": 0.25},
                optimizer="sam", rho=0.5, lr=0.1, momentum=0.0, weight_decay=0.0)
    return TrainConfig(**{**base, **kw}).resolved()


def _one_step(cfg: TrainConfig) -> dict[str, torch.Tensor]:
    from msam.models import build_model

    torch.manual_seed(0)
    model = build_model("small_cnn", num_classes=10, **cfg.model_options)
    x, y = torch.randn(6, 1, 28, 28), torch.arange(6) % 10
    opt = build_optimizer(cfg, model)
    opt.step(lambda b: F.cross_entropy(model(b[0]), b[1]), (x, y))
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _by_hand(perturbed: set[str], rho: float, lr: float) -> dict[str, torch.Tensor]:
    """SAM with e on ``perturbed`` only: e = rho g_P / ||g_P||; w <- w - lr grad L(w + e)."""
    from msam.models import build_model

    torch.manual_seed(0)
    model = build_model("small_cnn", num_classes=10, norm="group", width=0.25)
    x, y = torch.randn(6, 1, 28, 28), torch.arange(6) % 10
    named = dict(model.named_parameters())
    w0 = {n: p.detach().clone() for n, p in named.items()}
    grads = torch.autograd.grad(F.cross_entropy(model(x), y), list(named.values()))
    g = dict(zip(named, grads))
    norm = torch.sqrt(sum((g[n] ** 2).sum() for n in perturbed))
    with torch.no_grad():
        for n in perturbed:
            named[n].add_(rho * g[n] / norm)
    h = dict(zip(named, torch.autograd.grad(F.cross_entropy(model(x), y),
                                            list(named.values()))))
    return {n: w0[n] - lr * h[n] for n in named}


def test_perturb_norm_perturbs_only_the_normalisation_layers():
    from msam.models import build_model

    model = build_model("small_cnn", num_classes=10, norm="group", width=0.25)
    norm_names = {n for n, _ in model.named_parameters()
                  if isinstance(model.get_submodule(n.rsplit(".", 1)[0]), nn.GroupNorm)}
    assert norm_names and len(norm_names) < len(dict(model.named_parameters()))
    got = _one_step(_cfg(perturb="norm"))
    want = _by_hand(norm_names, rho=0.5, lr=0.1)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-6, msg=n)
    # and the default perturbs everything (the same check fails for SAM-ON)
    got_all = _one_step(_cfg())
    want_all = _by_hand(set(want), rho=0.5, lr=0.1)
    for n in want_all:
        torch.testing.assert_close(got_all[n], want_all[n], rtol=1e-5, atol=1e-6, msg=n)
    assert any(not torch.allclose(got[n], got_all[n]) for n in got)


def test_perturb_bad_values_are_named():
    with pytest.raises(ConfigError, match="perturb"):
        TrainConfig(perturb="bn").resolved()
    with pytest.raises(ConfigError, match="'perturb'.*no (trainable )?normalisation"):
        build_optimizer(_cfg(model="mlp", model_options={"hidden": [8]}, perturb="norm"),
                        nn.Sequential(nn.Flatten(), nn.Linear(784, 10)))
    with pytest.raises(ConfigError, match="perturb"):
        TrainConfig(perturb="norm", every=2, reuse="looksam", optimizer="msam").resolved()
    assert TrainConfig(optimizer="sgd", perturb="norm").resolved().perturb == "all"


def test_perturb_in_a_grid_names_runs_and_sgd_ignores_it(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(f"out_dir: {tmp_path / 'out'}\nmodel: small_cnn\n"
                    "grid: {optimizer: [sgd, sam], perturb: [all, norm], seed: [0]}\n")
    names = [r.name for r in expand_grid(load_study_config(path))]
    assert names == ["sgd_s0", "sam_perturball_s0", "sam_perturbnorm_s0"]


def test_sharpness_rho_is_one_radius_for_every_run(tmp_path, monkeypatch):
    """m-sharpness at ``sharpness.rho`` whatever the run's own rho; without it, 0.05 for every
    run (so that a study's runs compare)."""
    import msam.analysis

    seen: list[float] = []

    def fake_measure(model, loss_fn, batches, *, metrics, rho, micro_batches, seed, **kw):
        seen.append(rho)
        return {"m_sharpness": 0.0}

    monkeypatch.setattr(msam.analysis, "measure", fake_measure)
    base = dict(dataset="digits", train_subset=60, model="mlp",
                model_options={"hidden": [8]}, epochs=1, max_steps_per_epoch=1,
                batch_size=16, progress=False, optimizer="sam")
    for i, (rho, fixed) in enumerate([(0.1, 0.02), (0.4, 0.02), (0.4, None)]):
        sharp = {"metrics": ["m_sharpness"], "examples": 16, "rho": fixed, "m": 4}
        train(TrainConfig(**base, rho=rho, sharpness=sharp,
                          out_dir=str(Path(tmp_path) / f"r{i}")), quiet=True)
    assert seen == [0.02, 0.02, 0.05]


def _fashion_mnist_found() -> bool:
    from msam.data.sources import find_fashion_mnist

    try:
        return find_fashion_mnist() is not None
    except Exception:
        return False


@pytest.mark.skipif(not _fashion_mnist_found(), reason="Fashion-MNIST files not found")
def test_sam_on_with_groupnorm_trains_on_one_channel_images(tmp_path):
    """Fashion-MNIST batches (N, 1, 28, 28) have strides (784, 1, 28, 1), which count as
    channels_last; torch's CPU GroupNorm backward in that layout, asked only for weight and bias
    gradients (SAM-ON's ascent), segfaulted (torch 2.13). In a subprocess: a crash is a -11."""
    import os
    import subprocess
    import sys

    import msam

    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"out_dir: {tmp_path / 'run'}\ndataset: fashion_mnist\ntrain_subset: 200\n"
                   "val_fraction: 0\ntest_subset: 100\nmodel: small_cnn\n"
                   "model_options: {norm: group, width: 0.25}\noptimizer: sam\nperturb: norm\n"
                   "rho: 0.1\nepochs: 1\nmax_steps_per_epoch: 2\nbatch_size: 16\nthreads: 1\n"
                   "progress: false\n")
    env = {**os.environ, "PYTHONPATH": str(Path(msam.__file__).parents[1])}
    proc = subprocess.run([sys.executable, "-m", "msam.cli.main", "train", str(cfg), "-q"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
    assert (tmp_path / "run" / "done.json").is_file()
