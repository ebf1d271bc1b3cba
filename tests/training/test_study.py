"""Studies: grid runs, resumability, summary / CSV / plots, failures, sharpness columns."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

import msam.training.study as study_mod
from msam.training import ConfigError, TrainConfig, load_study_config, train
from msam.training.study import expand_grid, run_study

STUDY = """
name: tiny
out_dir: {out}
dataset: digits
train_subset: 120
val_fraction: 0.2
model: mlp
model_options: {{hidden: [16]}}
epochs: 2
max_steps_per_epoch: 2
batch_size: 16
lr: 0.05
progress: false
grid:
  optimizer: [sgd, sam, msam]
  rho: [0.05]
  micro_batches: [1, 2]
  seed: [0, 1]
"""


def _study(tmp_path: Path, overrides=(), text: str = STUDY):
    path = tmp_path / "study.yaml"
    path.write_text(text.format(out=tmp_path / "out"))
    return load_study_config(path, list(overrides))


def test_study_runs_summarises_and_resumes(tmp_path, monkeypatch, capsys):
    study = _study(tmp_path)
    root = run_study(study, quiet=True)
    out = capsys.readouterr().out
    names = ["sgd_s0", "sgd_s1", "sam_rho0.05_s0", "sam_rho0.05_s1", "msam_rho0.05_m2_s0",
             "msam_rho0.05_m2_s1"]
    for n in names:
        assert (root / "runs" / n / "done.json").is_file(), n
    # summary table: one line per cell, n = 2 seeds, mean ± std
    assert "| method | rho | m | n | test acc (%)" in out
    summary = (root / "summary.md").read_text()
    assert "| sgd | – | – | 2 |" in summary and "±" in summary
    assert "| sam | 0.05 | 1 | 2 |" in summary
    assert "| msam | 0.05 | 2 | 2 |" in summary
    with open(root / "runs.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["run"] for r in rows] == names
    assert all(0 <= float(r["test_acc"]) <= 1 and r["status"] == "done" for r in rows)
    for png in ("test_acc_vs_m.png", "acc_vs_time.png", "curves.png"):
        data = (root / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
        assert f"plot: {root / png}" in out
    assert (root / "study.yaml").is_file()

    # Second invocation: nothing is trained again (train would raise), results are reused.
    mtimes = {n: (root / "runs" / n / "done.json").stat().st_mtime_ns for n in names}

    def no_training(*a, **k):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(study_mod, "train", no_training)
    run_study(study)
    assert {n: (root / "runs" / n / "done.json").stat().st_mtime_ns for n in names} == mtimes
    assert (root / "summary.md").read_text() == summary  # same results, same summary
    assert "finished earlier; skipped" in capsys.readouterr().out

    # Export: the reviewable files, no checkpoints.
    dest = study_mod.export_study(root, tmp_path / "results" / "tiny")
    assert (dest / "summary.md").read_text() == summary
    assert {p.name for p in dest.glob("*.png")} == {
        "test_acc_vs_m.png", "acc_vs_time.png", "curves.png"}
    assert (dest / "runs.csv").is_file() and (dest / "study.yaml").is_file()
    assert (dest / "runs" / "sgd_s0" / "metrics.csv").is_file()
    assert (dest / "runs" / "sgd_s0" / "done.json").is_file()
    assert not list(dest.rglob("*.pt"))
    # The exported run records are enough to resume the study on another machine: copied into
    # a fresh out_dir, every finished run is skipped (train still raises), same summary.
    fresh = tmp_path / "elsewhere"
    shutil.copytree(dest / "runs", fresh / "runs")
    run_study(_study(tmp_path, [f"out_dir={fresh}"]), quiet=True)
    assert (fresh / "runs.csv").read_text().replace(str(fresh), str(root)) == \
        (root / "runs.csv").read_text()
    with pytest.raises(FileNotFoundError, match="no summary.md"):
        study_mod.export_study(tmp_path / "nothing", tmp_path / "x")


def test_interrupted_run_is_resumed(tmp_path, monkeypatch):
    study = _study(tmp_path, ["grid.optimizer=[msam]", "grid.micro_batches=[2]",
                              "grid.seed=[0]"])
    (run,) = expand_grid(study)
    part = train(run.config, quiet=True, stop_after_epochs=1)  # "interrupted" after epoch 1
    assert not part.completed
    calls = []
    real_train = study_mod.train

    def spy(cfg, **kw):
        calls.append(kw["resume"])
        return real_train(cfg, **kw)

    monkeypatch.setattr(study_mod, "train", spy)
    run_study(study, quiet=True)
    assert calls == [True]
    done = json.loads((Path(run.config.out_dir) / "done.json").read_text())
    assert done["final"]["epoch"] == 2
    straight = train(run.config.replace(out_dir=str(tmp_path / "straight")), quiet=True)
    assert done["final"]["test_loss"] == straight.final["test_loss"]


def test_finished_run_with_other_config_is_an_error(tmp_path):
    study = _study(tmp_path, ["grid.optimizer=[sgd]", "grid.seed=[0]"])
    run_study(study, quiet=True)
    changed = _study(tmp_path, ["grid.optimizer=[sgd]", "grid.seed=[0]", "lr=0.2"])
    with pytest.raises(ConfigError, match="different config.*lr"):
        run_study(changed, quiet=True)


def _sgd_diverges(monkeypatch) -> None:
    """Every SGD run of the study fails; the others train."""
    real_train = study_mod.train

    def flaky(cfg: TrainConfig, **kw):
        if cfg.optimizer == "sgd":
            raise FloatingPointError("simulated divergence")
        return real_train(cfg, **kw)

    monkeypatch.setattr(study_mod, "train", flaky)


def test_failed_run_does_not_stop_the_others(tmp_path, monkeypatch, capsys):
    study = _study(tmp_path, ["grid.optimizer=[sgd, sam]", "grid.seed=[0]"])
    _sgd_diverges(monkeypatch)
    with pytest.raises(RuntimeError, match="1 run\\(s\\) failed: sgd_s0"):
        run_study(study, quiet=True)
    root = Path(study.train.out_dir)
    assert "simulated divergence" in (root / "runs" / "sgd_s0" / "error.txt").read_text()
    assert (root / "runs" / "sam_rho0.05_s0" / "done.json").is_file()
    with open(root / "runs.csv") as f:
        status = {r["run"]: r["status"] for r in csv.DictReader(f)}
    assert status == {"sgd_s0": "failed", "sam_rho0.05_s0": "done"}
    assert "FAILED" in capsys.readouterr().out


def test_sharpness_columns_and_dry_run(tmp_path, capsys):
    pytest.importorskip("msam.analysis")
    study = _study(tmp_path, ["grid.optimizer=[sgd, msam]", "grid.micro_batches=[2]",
                              "grid.seed=[0]", "sharpness.metrics=[loss, grad_norm]",
                              "sharpness.examples=32", "plots=false"])
    run_study(study, quiet=True, dry_run=True)
    assert "msam_rho0.05_m2_s0" in capsys.readouterr().out
    assert not Path(study.train.out_dir).exists()
    root = run_study(study, quiet=True)
    summary = (root / "summary.md").read_text()
    assert "| grad_norm | loss |" in summary
    with open(root / "runs.csv") as f:
        rows = list(csv.DictReader(f))
    assert all(float(r["sharpness.grad_norm"]) >= 0 for r in rows)
    assert not list(root.glob("*.png"))


def test_adding_sharpness_to_a_finished_study_measures_without_retraining(tmp_path):
    pytest.importorskip("msam.analysis")
    base = ["grid.optimizer=[sgd]", "grid.seed=[0]", "plots=false"]
    root = run_study(_study(tmp_path, base), quiet=True)
    run_dir = root / "runs" / "sgd_s0"
    before = (run_dir / "metrics.jsonl").read_text()
    ckpt_mtime = (run_dir / "last.pt").stat().st_mtime_ns
    run_study(_study(tmp_path, [*base, "sharpness.metrics=[loss]", "sharpness.examples=16"]),
              quiet=True)
    done = json.loads((run_dir / "done.json").read_text())
    assert done["sharpness_metrics"] == ["loss"] and done["sharpness"]["loss"] > 0
    assert (run_dir / "metrics.jsonl").read_text() == before
    assert (run_dir / "last.pt").stat().st_mtime_ns == ckpt_mtime  # no epoch was trained
    assert "| loss |" in (root / "summary.md").read_text()


# Made-up results: rho = 0.1 wins on validation for SAM and m = 2, rho = 0.05 wins on *test*,
# so a selection that peeked at the test set would pick the other value.
_FAKE = {  # (method, rho, m) -> (val_acc by seed, test_acc by seed)
    ("sgd", None, 1): ([0.70, 0.72], [0.69, 0.71]),
    ("sam", 0.05, 1): ([0.74, 0.76], [0.80, 0.82]),
    ("sam", 0.1, 1): ([0.78, 0.80], [0.75, 0.77]),
    ("msam", 0.05, 2): ([0.79, 0.77], [0.90, 0.92]),
    ("msam", 0.1, 2): ([0.81, 0.81], [0.85, 0.87]),
}


def _fake_train(cfg: TrainConfig, **kw):
    from msam.training.trainer import RunResult

    key = (cfg.optimizer, None if cfg.optimizer == "sgd" else cfg.rho,
           cfg.micro_batches if cfg.optimizer == "msam" else 1)
    val, test = _FAKE[key]
    row = {"epoch": 1, "val_acc": val[cfg.seed], "test_acc": test[cfg.seed],
           "train_loss": 0.1 * (cfg.seed + 1)}
    return RunResult(run_dir=Path(cfg.out_dir), config=cfg, history=[row], completed=True,
                     train_time_s=1.0, sharpness={"lambda_max": 10.0 + cfg.seed})


def test_select_chooses_rho_on_validation_never_on_test(tmp_path, monkeypatch):
    study = _study(tmp_path, ["grid.rho=[0.05, 0.1]", "grid.micro_batches=[2]",
                              "select={by: val_acc, over: [rho]}",
                              "description='Why **this** size.'"])
    monkeypatch.setattr(study_mod, "train", _fake_train)
    root = run_study(study, quiet=True, printer=lambda s: None,
                     command="msam study configs/x.yaml")
    chosen = {tuple(sel["group"]): sel for sel in study_mod.select_cells(
        study, _finished(study))}
    assert chosen[(("optimizer", "sam"),)]["chosen"] == {"rho": 0.1}
    assert chosen[(("optimizer", "msam"), ("micro_batches", 2))]["chosen"] == {"rho": 0.1}
    assert chosen[(("optimizer", "sgd"),)]["chosen"] == {}
    summary = (root / "summary.md").read_text()
    assert "## Selected: rho chosen per method on mean val_acc" in summary
    assert "\nWhy **this** size.\n" in summary
    # SAM at rho 0.1: test 76.00 ± 1.41, selection score 79.00, lambda_max 10.5 ± 0.707
    assert "| SAM (m = 1) | 0.1 | 2 | 76.00 ± 1.41 | 79.00 ± 1.41 |" in summary
    assert "| 10.500 ± 0.707 |" in summary
    assert "| mSAM (m = 2) | 0.1 | 2 | 86.00 ± 1.41 | 81.00 ± 0.00 |" in summary
    assert "| SGD | – | 2 | 70.00 ± 1.41 |" in summary
    assert "0.05 → 75.00, 0.1 → 79.00" in summary  # the candidates, for the record
    assert "## Reproduce" in summary and "msam study configs/x.yaml" in summary
    assert "summed over the 10 finished runs: 0.2 min" in summary  # 10 runs x 1.0 s
    with open(root / "runs.csv") as f:
        sel = {r["run"]: r["selected"] for r in csv.DictReader(f)}
    assert sel["sam_rho0.1_s0"] == sel["msam_rho0.1_m2_s1"] == sel["sgd_s0"] == "True"
    assert sel["sam_rho0.05_s0"] == sel["msam_rho0.05_m2_s0"] == "False"
    assert (root / "selected.png").stat().st_size > 0


def test_select_over_a_key_set_by_cases(tmp_path, monkeypatch):
    """rho may come from ``cases`` (cells that are not a full product) and still be selected
    over; before, only grid axes were accepted."""
    text = STUDY.split("grid:")[0] + (
        "grid:\n  optimizer: [msam]\n  seed: [0, 1]\n"
        "cases:\n  - {{micro_batches: 2, rho: 0.05}}\n  - {{micro_batches: 2, rho: 0.1}}\n"
        "select: {{by: val_acc, over: [rho]}}\n")
    study = _study(tmp_path, text=text)
    monkeypatch.setattr(study_mod, "train", _fake_train)
    chosen = study_mod.select_cells(study, _finished(study))
    assert [(tuple(c["group"]), c["chosen"]) for c in chosen] == [
        ((("optimizer", "msam"), ("micro_batches", 2)), {"rho": 0.1})]


def _finished(study):
    runs = expand_grid(study)
    for r in runs:
        r.result = _fake_train(r.config)
    return runs


@pytest.mark.parametrize("select, match", [
    ("{by: test_acc, over: [rho]}", "never test"),
    ("{by: val_acc, over: [lr]}", "not a grid axis"),
    ("{by: val_acc, over: [seed]}", "not a grid axis"),
    ("{by: val_acc}", "must list grid keys"),
    ("{by: val_acc, over: [rho], how: max}", "select.how"),
])
def test_select_errors_name_the_key(tmp_path, select, match):
    with pytest.raises(ConfigError, match=match):
        _study(tmp_path, [f"select={select}"])


def test_accuracy_curve_uses_validation_even_when_the_first_epoch_has_none():
    hists = [[{"test_acc": 0.5}, {"val_acc": 0.6, "test_acc": 0.7}, {"test_acc": 0.8},
              {"val_acc": 0.8, "test_acc": 0.9}],
             [{"test_acc": 0.5}, {"val_acc": 0.7, "test_acc": 0.7}, {"test_acc": 0.8},
              {"val_acc": 0.9, "test_acc": 0.9}]]
    key, points = study_mod.accuracy_curve(hists)
    assert key == "val_acc"
    assert [e for e, _ in points] == [2, 4]
    assert [round(v, 6) for _, v in points] == [65.0, 85.0]
    key, points = study_mod.accuracy_curve([[{"test_acc": 0.5}, {"test_acc": 0.25}]])
    assert key == "test_acc" and points == [(1, 50.0), (2, 25.0)]


# -- a grid over a mapping (issue 27: model_options: [{norm: batch}, {norm: group}]) -----------

_MAPPING_STUDY = STUDY.split("grid:")[0] + """grid:
  optimizer: [sgd, sam]
  rho: [0.05, 0.1]
  model_options: [{{hidden: [16]}}, {{hidden: [8], dropout: 0.5}}]
  seed: [0, 1]
select: {{by: val_acc, over: [rho]}}
"""


def _fake_train_by_width(cfg: TrainConfig, **kw):
    """val: hidden [16] prefers rho 0.05, hidden [8] prefers rho 0.1; test the other way."""
    from msam.training.trainer import RunResult

    h = cfg.model_options["hidden"][0]
    val = {("sgd", 16): 0.60, ("sgd", 8): 0.50, ("sam", 16, 0.05): 0.70,
           ("sam", 16, 0.1): 0.65, ("sam", 8, 0.05): 0.55, ("sam", 8, 0.1): 0.58}
    key = (cfg.optimizer, h) if cfg.optimizer == "sgd" else (cfg.optimizer, h, cfg.rho)
    v = val[key] + 0.01 * cfg.seed
    row = {"epoch": 1, "val_acc": v, "test_acc": 1.5 - v, "train_loss": 0.1}
    return RunResult(run_dir=Path(cfg.out_dir), config=cfg, history=[row], completed=True,
                     train_time_s=1.0, sharpness={"lambda_max": 10.0 * h})


def test_grid_over_a_mapping_names_summarises_and_selects(tmp_path, monkeypatch):
    """Before the fix, every interim summary was skipped and the final one raised
    ``TypeError: unhashable type: 'dict'``; run names read ``model_optionshidden-16``."""
    study = _study(tmp_path, text=_MAPPING_STUDY)
    runs = expand_grid(study)
    assert sorted(r.name for r in runs) == sorted(
        f"{m}{rho}_{opt}_s{s}" for s in (0, 1)
        for m, rho in (("sgd", ""), ("sam_rho0.05", ""), ("sam_rho0.1", ""))
        for opt in ("hidden16", "hidden8_dropout0.5"))
    # every run trains with the mapping it was given, as a plain dict
    by_name = {r.name: r.config.model_options for r in runs}
    assert by_name["sam_rho0.1_hidden8_dropout0.5_s1"] == {"hidden": [8], "dropout": 0.5}
    assert by_name["sgd_hidden16_s0"] == {"hidden": [16]}
    assert all(type(r.config.model_options) is dict for r in runs)

    printed: list[str] = []
    monkeypatch.setattr(study_mod, "train", _fake_train_by_width)
    root = run_study(study, quiet=True, printer=printed.append)
    assert not [p for p in printed if "skipped" in p], printed  # interim summaries written
    for r in runs:
        r.result = _fake_train_by_width(r.config)
    chosen = [(sel["group"], sel["chosen"]) for sel in study_mod.select_cells(study, runs)]
    assert chosen == [
        ((("optimizer", "sgd"), ("model_options", {"hidden": [16]})), {}),
        ((("optimizer", "sgd"), ("model_options", {"hidden": [8], "dropout": 0.5})), {}),
        ((("optimizer", "sam"), ("model_options", {"hidden": [16]})), {"rho": 0.05}),
        ((("optimizer", "sam"), ("model_options", {"hidden": [8], "dropout": 0.5})),
         {"rho": 0.1})]
    summary = (root / "summary.md").read_text()
    # one selected row per (method, mapping), told apart in its label
    assert "| SAM (m = 1, hidden = 16) | 0.05 | 2 | 79.50 ± 0.71 | 70.50 ± 0.71 |" in summary
    assert "| SAM (m = 1, hidden = 8, dropout = 0.5) | 0.1 | 2 |" in summary
    assert "| SGD (hidden = 16) | – | 2 | 89.50 ± 0.71 |" in summary
    assert "| sam | hidden=8 dropout=0.5 | 0.1 | 2 |" in summary  # the all-cells table
    with open(root / "runs.csv") as f:
        rows = {r["run"]: r for r in csv.DictReader(f)}
    assert json.loads(rows["sam_rho0.1_hidden8_dropout0.5_s0"]["model_options"]) == {
        "hidden": [8], "dropout": 0.5}
    assert rows["sam_rho0.1_hidden8_dropout0.5_s0"]["selected"] == "True"
    assert rows["sam_rho0.1_hidden16_s0"]["selected"] == "False"


def test_dotted_grid_key_is_named_by_its_last_part(tmp_path):
    study = _study(tmp_path, ["grid={optimizer: [sgd], model_options.hidden: [[16], [8]]}"])
    assert [r.name for r in expand_grid(study)] == ["sgd_hidden16_s0", "sgd_hidden8_s0"]


def test_summary_reproduce_line_is_a_real_command(tmp_path):
    """Issue 25 case 13: without a recorded command line (the Python API), the summary's
    Reproduce section names the study config it wrote, not a placeholder."""
    study = _study(tmp_path, ["grid.optimizer=[sgd]", "grid.seed=[0]", "grid.micro_batches=[1]",
                              "epochs=1", "plots=false"])
    root = run_study(study, quiet=True, printer=lambda s: None)
    summary = (root / "summary.md").read_text()
    assert "<config>" not in summary
    assert f"msam study {root / 'study.yaml'}" in summary and (root / "study.yaml").is_file()


def test_plotting_lives_in_one_module():
    """Issue 25: one matplotlib setup (msam.plotting); studies, the bench and msam.analysis use
    it, and nothing selects a backend or uses pyplot's global state."""
    src = Path(study_mod.__file__).resolve().parents[1]
    users = sorted(str(p.relative_to(src)) for p in src.rglob("*.py")
                   if "import matplotlib" in p.read_text() or "from matplotlib" in p.read_text())
    assert users == ["plotting.py"]
    text = (src / "plotting.py").read_text()
    assert "matplotlib.pyplot" not in text and "matplotlib.use(" not in text


def test_summarize_only_summarises_a_partly_run_grid_without_training(tmp_path, capsys):
    """A grid extended cell by cell with --set overrides: --summarize-only writes the full
    grid's summary from what is finished, lists the rest as pending and trains nothing."""
    root = run_study(_study(tmp_path, ["grid.optimizer=[sgd]", "plots=false"]), quiet=True,
                     command="msam study part")
    before = sorted(p.name for p in (root / "runs").iterdir())
    assert before == ["sgd_s0", "sgd_s1"]
    capsys.readouterr()
    run_study(_study(tmp_path, ["plots=false"]), summarize_only=True, command="msam study all")
    out = capsys.readouterr().out
    assert "2 of 6 runs finished (nothing trained)" in out
    assert sorted(p.name for p in (root / "runs").iterdir()) == before  # nothing started
    with open(root / "runs.csv") as f:
        status = {r["run"]: r["status"] for r in csv.DictReader(f)}
    assert status == {"sgd_s0": "done", "sgd_s1": "done", "sam_rho0.05_s0": "pending",
                      "sam_rho0.05_s1": "pending", "msam_rho0.05_m2_s0": "pending",
                      "msam_rho0.05_m2_s1": "pending"}
    assert "| sgd | – | – | 2 |" in (root / "summary.md").read_text()
    assert (root / "command.txt").read_text() == "msam study part\n"  # the training command


def test_summarize_only_without_a_study_is_a_named_error(tmp_path):
    with pytest.raises(ConfigError, match="out_dir"):
        run_study(_study(tmp_path), summarize_only=True)
    assert not (tmp_path / "out").exists()
    (tmp_path / "out").mkdir()  # an existing folder that holds no study: nothing written
    with pytest.raises(ConfigError, match="no study to summarise"):
        run_study(_study(tmp_path), summarize_only=True)
    assert not list((tmp_path / "out").iterdir())
    with pytest.raises(ConfigError, match="--dry-run and --summarize-only"):
        run_study(_study(tmp_path), summarize_only=True, dry_run=True)


def test_summarize_only_never_replaces_a_summary_with_an_empty_one(tmp_path, capsys):
    """Runs finished with other epochs are not counted, with a warning; when none is
    finished the summary and the CSV stay as they were."""
    base = ["grid.optimizer=[sgd]", "plots=false"]
    root = run_study(_study(tmp_path, base), quiet=True)
    before = {f: (root / f).read_text() for f in ("summary.md", "runs.csv", "study.yaml")}
    capsys.readouterr()
    with pytest.raises(ConfigError, match="none of the 2 runs"):
        run_study(_study(tmp_path, [*base, "epochs=3"]), summarize_only=True)
    assert "sgd_s0: not counted: finished with 2 epochs" in capsys.readouterr().out
    assert {f: (root / f).read_text() for f in before} == before
    with pytest.raises(ConfigError, match="lr"):  # another config's runs: a named error
        run_study(_study(tmp_path, [*base, "lr=0.2"]), summarize_only=True)
    assert {f: (root / f).read_text() for f in before} == before


def test_summarize_only_keeps_failed_runs_failed(tmp_path, monkeypatch):
    study = _study(tmp_path, ["grid.optimizer=[sgd, sam]", "grid.seed=[0]", "plots=false"])
    _sgd_diverges(monkeypatch)
    with pytest.raises(RuntimeError):
        run_study(study, quiet=True)
    root = run_study(study, summarize_only=True)
    with open(root / "runs.csv") as f:
        rows = {r["run"]: r for r in csv.DictReader(f)}
    assert rows["sgd_s0"]["status"] == "failed"
    assert "simulated divergence" in rows["sgd_s0"]["error"]
    assert rows["sam_rho0.05_s0"]["status"] == "done"
    assert "--summarize-only" in (root / "summary.md").read_text()
