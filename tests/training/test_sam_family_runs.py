"""The SAM family (GSAM, FriendlySAM, WSAM, GCSAM) in the config schema, the trainer, studies
and the ``msam train`` / ``msam study`` commands (docs/variants.md, docs/training.md)."""

from __future__ import annotations

import pytest
import torch

from msam.cli.main import main
from msam.training import ConfigError, TrainConfig
from msam.training.config import VARIANT_KEYS, study_from_dict
from msam.training.study import expand_grid
from msam.training.trainer import build_optimizer

RUN = """
dataset: digits
train_subset: 100
val_fraction: 0.2
model: mlp
model_options: {hidden: [16]}
micro_batches: 2
epochs: 1
max_steps_per_epoch: 2
batch_size: 16
lr: 0.05
"""

BASE = dict(dataset="digits", model="mlp", model_options={"hidden": [8]}, batch_size=16)


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 3))


@pytest.mark.parametrize("method, keys, expect", [
    ("gsam", {"gsam_alpha": 0.2}, {"alpha": 0.2}),
    ("friendlysam", {"friendly_sigma": 0.7, "friendly_lambda": 0.95},
     {"sigma": 0.7, "lmbda": 0.95}),
    ("wsam", {"wsam_gamma": 0.8}, {"gamma": 0.8, "decoupled": True}),
    ("wsam", {"wsam_decoupled": False}, {"decoupled": False}),
    ("gcsam", {}, {}),
])
def test_trainer_builds_each_variant(method, keys, expect):
    cfg = TrainConfig(**BASE, optimizer=method, micro_batches=4, rho=0.1, **keys).resolved()
    opt = build_optimizer(cfg, _model())
    rule = opt.engine.rule
    assert rule.name == method and opt.micro_batches == 4
    assert opt.param_groups[0]["rho"] == 0.1
    for k, v in expect.items():
        assert getattr(rule, k) == v
    assert "rho_max" not in opt.param_groups[0]


def test_default_hyperparameters_match_the_rules():
    from msam.core import FriendlySAMRule, GSAMRule, WSAMRule

    cfg = TrainConfig()
    assert cfg.gsam_alpha == GSAMRule().alpha and cfg.wsam_gamma == WSAMRule().gamma
    assert cfg.wsam_decoupled == WSAMRule().decoupled
    assert (cfg.friendly_sigma, cfg.friendly_lambda) == (FriendlySAMRule().sigma,
                                                         FriendlySAMRule().lmbda)


def test_gsam_rho_schedule_is_tied_to_the_lr():
    cfg = TrainConfig(**BASE, optimizer="gsam", rho=0.2, gsam_rho_min=0.05, lr=0.1,
                      min_lr=0.01).resolved()
    opt = build_optimizer(cfg, _model())
    g = opt.param_groups[0]
    assert (g["rho_max"], g["rho_min"], g["lr_max"], g["lr_min"]) == (0.2, 0.05, 0.1, 0.01)
    from msam.core.gsam import scheduled_rho

    assert scheduled_rho(g) == pytest.approx(0.2)
    g["lr"] = 0.055
    assert scheduled_rho(g) == pytest.approx(0.125)


@pytest.mark.parametrize("keys, needle", [
    ({"optimizer": "wsam", "wsam_gamma": 1.0}, "wsam_gamma"),
    ({"optimizer": "wsam", "wsam_decoupled": "sometimes"}, "wsam_decoupled"),
    ({"optimizer": "wsam", "every": 2, "reuse": "looksam"}, "reuse"),   # decoupled: refused
    ({"optimizer": "friendlysam", "friendly_sigma": 1.5}, "friendly_sigma"),
    ({"optimizer": "friendlysam", "friendly_lambda": -0.1}, "friendly_lambda"),
    ({"optimizer": "gsam", "gsam_alpha": -1}, "gsam_alpha"),
    ({"optimizer": "gsam", "rho": 0.1, "gsam_rho_min": 0.2}, "gsam_rho_min"),
    ({"optimizer": "gsam", "gsam_rho_min": 0.01, "lr": 0.1, "min_lr": 0.1}, "min_lr < lr"),
    ({"optimizer": "gcsam", "micro_batches": 32}, "micro_batches"),
    ({"optimizer": "fsam"}, "optimizer"),
])
def test_bad_values_name_the_key(keys, needle):
    with pytest.raises(ConfigError, match=needle):
        TrainConfig(**{**BASE, **keys}).resolved()


def test_study_grid_has_no_duplicates_and_readable_names():
    raw = {**BASE, "grid": {
        "optimizer": ["sgd", "msam", "gsam", "wsam", "friendlysam", "gcsam"],
        "rho": [0.1], "micro_batches": [1, 4], "gsam_alpha": [0.1, 0.3],
        "wsam_gamma": [0.8], "seed": [0]}}
    runs = expand_grid(study_from_dict(raw))
    names = [r.name for r in runs]
    assert len(names) == len(set(names))
    assert names == [
        "sgd_s0",
        "sam_rho0.1_s0", "msam_rho0.1_m4_s0",
        "gsam_rho0.1_m1_alpha0.1_s0", "gsam_rho0.1_m1_alpha0.3_s0",
        "gsam_rho0.1_m4_alpha0.1_s0", "gsam_rho0.1_m4_alpha0.3_s0",
        "wsam_rho0.1_m1_wgamma0.8_s0", "wsam_rho0.1_m4_wgamma0.8_s0",
        "friendlysam_rho0.1_m1_s0", "friendlysam_rho0.1_m4_s0",
        "gcsam_rho0.1_m1_s0", "gcsam_rho0.1_m4_s0",
    ]
    by_name = {r.name: r for r in runs}
    assert by_name["gsam_rho0.1_m1_alpha0.3_s0"].config.gsam_alpha == 0.3
    assert by_name["wsam_rho0.1_m4_wgamma0.8_s0"].config.micro_batches == 4
    assert {"gsam", "wsam", "friendlysam", "gcsam"} <= {r.method for r in runs}


@pytest.mark.parametrize("method", sorted(VARIANT_KEYS))
def test_msam_train_smoke(method, tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text(RUN + f"optimizer: {method}\n")
    out = tmp_path / "run"
    assert main(["train", str(path), "--out", str(out), "--no-progress", "-q"]) == 0
    assert "done: 1 epochs" in capsys.readouterr().out
    # resumable like any run: one more epoch from the checkpoint (rule state included)
    assert main(["train", str(path), "--out", str(out), "--resume", "--epochs", "2", "-q"]) == 0
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2


def test_msam_study_smoke(tmp_path, capsys):
    path = tmp_path / "s.yaml"
    path.write_text(RUN + "grid:\n  optimizer: [gsam, friendlysam, wsam, gcsam]\n"
                    "  micro_batches: [1, 2]\n")
    assert main(["study", str(path), "--out", str(tmp_path / "st"), "--dry-run"]) == 0
    listed = capsys.readouterr().out
    assert "gsam_m1_s0" in listed and "gcsam_m2_s0" in listed
    assert main(["study", str(path), "--out", str(tmp_path / "st"), "-q"]) == 0
    out = capsys.readouterr().out
    assert "summary:" in out
    summary = (tmp_path / "st" / "summary.md").read_text()
    assert "| gsam |" in summary and "| friendlysam |" in summary


def test_noisy_variants_study_config_expands_to_the_intended_runs():
    from pathlib import Path

    from msam.training import load_study_config

    root = Path(__file__).resolve().parents[2]
    runs = expand_grid(load_study_config(root / "configs" / "fashion_mnist_noisy_variants.yaml"))
    cells = {(r.method, r.config.micro_batches, r.config.rho) for r in runs}
    grid = {(m, r) for m in (1, 4) for r in (0.05, 0.1, 0.2, 0.4)} | {(16, 0.05), (16, 0.1)}
    assert len(runs) == 150 and len(cells) == 50
    assert {(m, r) for (x, m, r) in cells if x in ("sam", "msam")} == grid
    for v in ("gsam", "friendlysam", "wsam", "gcsam"):   # the study's four variants
        assert {(m, r) for (x, m, r) in cells if x == v} == grid
    assert all(r.config.wsam_decoupled for r in runs)   # WSAM in the paper's form
    # Run names match those of the studies whose runs it reuses (same configs).
    names = {r.name for r in runs}
    assert {"sam_rho0.4_s0", "msam_m4_rho0.2_s1", "gsam_m1_rho0.1_s0", "wsam_m16_rho0.05_s2"
            } <= names
    # the data / model / training keys are the equal-budget protocol's
    cfg = runs[0].config
    assert (cfg.label_noise, cfg.train_subset, cfg.epochs, cfg.lr, cfg.batch_size) == \
        (0.4, 5000, 50, 0.05, 128)


def test_bench_methods_for_each_variant(tmp_path):
    import json

    from msam.bench import cli
    from msam.bench.workloads import make_methods

    keys = [m.key for m in make_methods([1, 2], ["loop", "vmap"], accum=False,
                                        variants=["gsam", "wsam"])]
    assert keys[-8:] == ["gsam-loop-m1", "gsam-loop-m2", "gsam-vmap-m1", "gsam-vmap-m2",
                         "wsam-loop-m1", "wsam-loop-m2", "wsam-vmap-m1", "wsam-vmap-m2"]
    out = tmp_path / "b"
    assert cli.main(["--models", "mlp", "--m", "1", "--strategies", "loop", "--variants",
                     ",".join(sorted(VARIANT_KEYS)), "--steps", "1", "--no-accum",
                     "--no-memory", "--no-plot", "--batch-size", "8", "--out", str(out),
                     "-q"]) == 0
    data = json.loads((out / "bench.json").read_text())
    res = {r["key"]: r for r in data["models"][0]["results"]}
    for v in VARIANT_KEYS:
        assert res[f"{v}-loop-m1"]["ratio_sam"] > 0 and "error" not in res[f"{v}-loop-m1"]
    md = (out / "bench.md").read_text()
    assert "## SAM family" in md and "| mlp | FriendlySAM | loop | 1 |" in md
    assert "|  | GSAM | loop | 1 |" in md
    assert cli.main(["--models", "mlp", "--variants", "fsam", "--out", str(out)]) == 2
