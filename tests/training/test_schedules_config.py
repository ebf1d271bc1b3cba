"""Schedule keys in configs, the trainer and studies: validation, start_step, run names, and
resuming a study whose records predate the keys."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import msam
from msam.training import ConfigError, TrainConfig, build_optimizer, load_study_config
from msam.training.config import config_diff, train_config_from_dict
from msam.training.study import _check_matches, expand_grid, run_study
from msam.training.trainer import start_step

BASE = dict(dataset="digits", train_subset=120, val_fraction=0.2, model="mlp",
            model_options={"hidden": [16]}, epochs=4, batch_size=16, progress=False)


@pytest.mark.parametrize("changes,key", [
    ({"every": 0}, "every"),
    ({"every": 1.5}, "every"),
    ({"start_fraction": 1.0}, "start_fraction"),
    ({"start_fraction": -0.1}, "start_fraction"),
    ({"start_epoch": 4}, "start_epoch"),
    ({"start_epoch": 1, "start_fraction": 0.5}, "start_epoch"),
    ({"reuse": "looksam"}, "reuse"),
    ({"reuse": "lookahead", "every": 2}, "reuse"),
    ({"reuse_alpha": -1, "every": 2, "reuse": "looksam"}, "reuse_alpha"),
])
def test_schedule_keys_are_validated_naming_the_key(changes, key):
    with pytest.raises(ConfigError, match=f"key '{key}'"):
        train_config_from_dict({**BASE, **changes})


def test_start_step_from_fraction_or_epoch_and_the_optimizer_gets_the_schedule():
    cfg = train_config_from_dict({**BASE, "start_fraction": 0.75}).resolved()
    assert start_step(cfg, 10) == 30  # 75% of 4 epochs x 10 steps
    cfg = train_config_from_dict({**BASE, "start_epoch": 1.5}).resolved()
    assert start_step(cfg, 10) == 15
    assert start_step(train_config_from_dict(BASE).resolved(), None) == 0
    with pytest.raises(ValueError, match="steps_per_epoch"):
        start_step(cfg, None)
    cfg = train_config_from_dict({**BASE, "every": 5, "reuse": "looksam", "reuse_alpha": 0.5,
                                  "start_fraction": 0.5}).resolved()
    model = msam.models.build_model("mlp", num_classes=10, input_shape=(1, 8, 8), hidden=[16])
    opt = build_optimizer(cfg, model, steps_per_epoch=6)
    assert isinstance(opt, msam.MSAM)
    assert opt.schedule.state_dict() == {"every": 5, "start_step": 12, "reuse": "looksam",
                                         "reuse_alpha": 0.5, "direction": None}
    # sgd has no perturbation steps: the keys are reset, so its runs match old records
    sgd = train_config_from_dict({**BASE, "optimizer": "sgd", "every": 5}).resolved()
    assert sgd.every == 1 and sgd.reuse == "none"


def test_records_without_the_new_keys_match_their_defaults():
    cfg = train_config_from_dict(BASE).resolved()
    new = cfg.to_dict()
    old = {k: v for k, v in new.items()
           if k not in ("every", "start_fraction", "start_epoch", "reuse", "reuse_alpha")}
    assert config_diff(old, new) == [] and config_diff(new, old) == []
    assert config_diff(old, {**new, "every": 2}) == ["every"]
    assert config_diff({**old, "lr": 0.5}, new) == ["lr"]  # present keys still count

    class Run:
        config = cfg
    _check_matches(Run, old)  # an old done.json: no "different config" error
    with pytest.raises(ConfigError, match="different config"):
        _check_matches(Run, {**old, "lr": 0.5})


STUDY = """
name: sched
out_dir: {out}
dataset: digits
train_subset: 120
val_fraction: 0.2
model: mlp
model_options: {{hidden: [16]}}
epochs: 2
max_steps_per_epoch: 4
batch_size: 16
micro_batches: 4
rho: 0.1
lr: 0.05
progress: false
grid:
  optimizer: [sgd, msam]
  seed: [0]
cases:
  - {{every: 2}}
  - {{start_fraction: 0.75}}
  - {{every: 2, reuse: looksam}}
"""


def test_study_cases_give_distinct_readable_names_and_run(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(STUDY.format(out=tmp_path / "out"))
    study = load_study_config(path)
    names = [r.name for r in expand_grid(study)]
    assert names == ["sgd_s0", "msam_every2_s0", "msam_late0.75_s0",
                     "msam_every2_reuselooksam_s0"]
    root = run_study(study, quiet=True)
    for n in names:
        done = json.loads((root / "runs" / n / "done.json").read_text())
        assert done["status"] == "done"
    assert json.loads((root / "runs" / "msam_late0.75_s0" / "done.json").read_text())[
        "config"]["start_fraction"] == 0.75
    # resuming the finished study (records now carry the keys) skips every run
    run_study(load_study_config(path), quiet=True)


def test_study_cases_are_validated(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(STUDY.format(out=tmp_path / "out") + "  - {bogus: 1}\n")
    with pytest.raises(ConfigError, match="cases"):
        load_study_config(path)
    text = STUDY.format(out=tmp_path / "out").replace("seed: [0]", "seed: [0]\n  every: [2]")
    path.write_text(text)
    with pytest.raises(ConfigError, match="grid axis"):
        load_study_config(path)


def test_the_schedules_study_config_expands():
    root = Path(__file__).resolve().parents[2]
    study = load_study_config(root / "configs" / "fashion_mnist_noisy_schedules.yaml")
    runs = expand_grid(study)
    assert len(runs) == 30 and len({r.name for r in runs}) == 30
    cfgs = {r.name: r.config for r in runs}
    assert cfgs["msam_every5_reuselooksam_s1"].reuse == "looksam"
    assert cfgs["msam_late0.875_s2"].start_fraction == 0.875
    assert cfgs["msam_s0"].every == 1 and cfgs["msam_every20_reuselooksam_s0"].every == 20
    assert all(c.micro_batches == 4 and c.rho == 0.2 for n, c in cfgs.items()
               if n.startswith("msam"))
    assert TrainConfig(**{**cfgs["sgd_s0"].to_dict()}).every == 1


def test_bench_schedule_methods_run_one_window_per_call():
    from msam.bench.workloads import build_workload, make_stepper, parse_schedules

    methods = parse_schedules("every5, late0.75,looksam3", 4)
    assert [m.key for m in methods] == ["msam-m4-every5", "msam-m4-late0.75",
                                        "msam-m4-every3-looksam"]
    assert [m.window for m in methods] == [5, 8, 3]
    for bad in ("every0", "late0.3", "looksam1", "sometimes"):
        with pytest.raises(ValueError, match="--schedules"):
            parse_schedules(bad, 4)
    wl = build_workload("mlp", 16, input_shape=(1, 8, 8))
    calls = [0]
    loss_fn = wl.loss_fn

    def counting(b):
        calls[0] += 1
        return loss_fn(b)

    wl.loss_fn = counting
    for meth, expected in zip(methods, (2 * 4 + 4, 2 * 2 * 4 + 6, 2 * 4 + 2)):
        st = make_stepper(wl, meth)
        for _ in range(2):  # every call replays the same window
            calls[0] = 0
            st.step()
            assert calls[0] == expected, meth.key
        assert st.window == meth.window


def test_bench_schedule_strategy_runs_the_perturbation_steps_with_it():
    from msam.bench.workloads import build_workload, make_stepper, parse_schedules

    (meth,) = parse_schedules("every2", 4, "lowrank")
    assert meth.key == "msam-m4-every2-lowrank" and "lowrank" in meth.label
    wl = build_workload("mlp", 16, input_shape=(1, 8, 8))
    st = make_stepper(wl, meth)
    st.step()
    assert type(st.optimizer.engine.strategy).__name__ == "LowRankStrategy"
