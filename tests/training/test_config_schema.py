"""The config schema and the CLI's one error path: every bad input exits 2 with
``msam: error: ...`` naming the key, file or path, and never a traceback."""

from __future__ import annotations

import gzip
import json
import struct

import numpy as np
import pytest

from msam.cli.main import main
from msam.training import ConfigError, TrainConfig, load_config, load_study_config
from msam.training.study import expand_grid

TINY = ("dataset: digits\ntrain_subset: 160\nval_fraction: 0.2\nmodel: mlp\n"
        "model_options: {hidden: [16]}\nepochs: 1\nbatch_size: 32\nmicro_batches: 2\n"
        "progress: false\n")


def _cli_error(capsys, argv: list[str]) -> str:
    """Run the CLI; it must exit 2 with one ``msam: error:`` message and no traceback."""
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("msam: error: "), err
    assert "Traceback" not in err
    return err


# Every numeric key that must be finite, by the value to use for the others.
FINITE_KEYS = ["val_fraction", "label_noise", "rho", "eta", "lr", "momentum", "weight_decay",
               "adam_eps", "max_grad_norm", "warmup_epochs", "min_lr", "gamma",
               "label_smoothing", "sharpness.rho"]


@pytest.mark.parametrize("key", FINITE_KEYS)
@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan"])
def test_non_finite_numbers_are_refused_for_every_numeric_key(tmp_path, capsys, key, value):
    path = tmp_path / "run.yaml"
    base = "".join(line + "\n" for line in TINY.splitlines() if not line.startswith(key + ":"))
    if key.startswith("sharpness."):
        path.write_text(base + f"sharpness: {{{key.split('.')[1]}: {value}}}\n")
    else:
        path.write_text(base + f"{key}: {value}\n")
    err = _cli_error(capsys, ["train", str(path), "--out", str(tmp_path / "out")])
    assert f"key '{key}' must be a finite number" in err and str(path) in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("key", ["betas", "milestones"])
def test_non_finite_list_items_are_refused(key):
    with pytest.raises(ConfigError, match=rf"key '{key}\[1\]' must be a finite number"):
        TrainConfig(**{key: [0.5, float("inf")]})


def test_non_finite_overrides_and_grid_values(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text(TINY)
    err = _cli_error(capsys, ["train", str(path), "--set", "weight_decay=.inf"])
    assert ("--set weight_decay=.inf: key 'weight_decay' must be a finite number in "
            "[0, 3.4e+38]") in err
    study = tmp_path / "study.yaml"
    study.write_text(TINY + "grid: {rho: [0.1, .nan]}\n")
    err = _cli_error(capsys, ["study", str(study), "--dry-run"])
    assert "key 'grid.rho[1]' must be a finite number in [0, 3.4e+38]" in err


def test_a_boolean_is_not_a_number():
    with pytest.raises(ConfigError, match=r"key 'epochs' must be int, got True"):
        TrainConfig(epochs=True)
    with pytest.raises(ConfigError, match=r"key 'lr' must be float, got False"):
        TrainConfig(lr=False)


def test_bounds_come_from_the_schema_with_the_value():
    with pytest.raises(ConfigError, match=r"key 'momentum' must be a finite number in \[0, 1\), "
                                          r"got 1\.0"):
        TrainConfig(momentum=1.0)
    with pytest.raises(ConfigError, match=r"key 'sharpness\.m' must be >= 1 or null, got 0"):
        TrainConfig(sharpness={"m": 0})
    with pytest.raises(ConfigError, match=r"key 'betas' must have 2 items"):
        TrainConfig(betas=[0.9])


def test_duplicate_keys_are_an_error(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text(TINY + "lr: 0.1\nlr: 0.5\n")
    err = _cli_error(capsys, ["train", str(path)])
    assert "key 'lr' appears twice" in err and str(path) in err
    nested = tmp_path / "nested.yaml"
    nested.write_text(TINY.replace("{hidden: [16]}", "{hidden: [16], hidden: [8]}"))
    assert "key 'hidden' appears twice" in _cli_error(capsys, ["train", str(nested)])
    js = tmp_path / "run.json"
    js.write_text('{"lr": 0.1, "model": "mlp", "lr": 0.2}')
    assert "key 'lr' appears twice" in _cli_error(capsys, ["train", str(js)])


def test_config_file_problems(tmp_path, capsys):
    latin = tmp_path / "latin1.yaml"
    latin.write_bytes(TINY.encode() + "description: caf\xe9\n".encode("latin-1"))
    err = _cli_error(capsys, ["train", str(latin)])
    assert "not UTF-8" in err and str(latin) in err
    folder = tmp_path / "configs.yaml"
    folder.mkdir()
    err = _cli_error(capsys, ["train", str(folder)])
    assert "is a directory" in err and "not found" not in err
    assert "not found" in _cli_error(capsys, ["train", str(tmp_path / "missing.yaml")])


def test_out_dir_that_is_a_file(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text(TINY)
    blocker = tmp_path / "taken"
    blocker.write_text("not a directory")
    err = _cli_error(capsys, ["train", str(path), "--out", str(blocker)])
    assert "key 'out_dir'" in err and "is a file" in err
    err = _cli_error(capsys, ["train", str(path), "--out", str(blocker / "run")])
    assert str(blocker / "run") in err
    assert blocker.read_text() == "not a directory"


def test_oversized_train_subset(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text(TINY)
    err = _cli_error(capsys, ["train", str(path), "--set", "train_subset=100000",
                              "--out", str(tmp_path / "out")])
    assert "train_subset=100000 exceeds" in err and "digits" in err


def _idx_gz(array: np.ndarray) -> bytes:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim)
    header += b"".join(struct.pack(">I", d) for d in array.shape)
    return gzip.compress(header + array.astype(np.uint8).tobytes(), mtime=0)


@pytest.mark.parametrize("damage", ["truncated", "corrupted"])
def test_damaged_dataset_file_is_named(tmp_path, capsys, damage):
    data = tmp_path / "fmnist"
    data.mkdir()
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte.gz": rng.integers(0, 256, (60, 28, 28)),
        "train-labels-idx1-ubyte.gz": np.arange(60) % 10,
        "t10k-images-idx3-ubyte.gz": rng.integers(0, 256, (20, 28, 28)),
        "t10k-labels-idx1-ubyte.gz": np.arange(20) % 10,
    }
    for name, arr in arrays.items():
        (data / name).write_bytes(_idx_gz(arr))
    bad = data / "train-images-idx3-ubyte.gz"
    blob = bad.read_bytes()
    if damage == "truncated":
        bad.write_bytes(blob[: len(blob) // 2])
    else:
        bad.write_bytes(blob[:20] + bytes(b ^ 0xFF for b in blob[20:60]) + blob[60:])
    path = tmp_path / "run.yaml"
    path.write_text(TINY.replace("dataset: digits", "dataset: fashion_mnist")
                    .replace("train_subset: 160\n", "") + f"data_dir: {data}\n")
    err = _cli_error(capsys, ["train", str(path), "--out", str(tmp_path / "out")])
    assert str(bad) in err


def test_unknown_and_nested_keys_keep_their_location(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(TINY + "sharpness: {metrics: [loss], exampels: 3}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}: unknown key 'sharpness.exampels'")
    assert "did you mean 'examples'" in msg and "valid keys: metrics, examples" in msg
    ok = tmp_path / "ok.yaml"
    ok.write_text(TINY)
    with pytest.raises(ConfigError, match=r"^--set sharpness\.examples=x: key "
                                          r"'sharpness\.examples' must be int, got 'x'"):
        load_config(ok, ["sharpness.examples=x"])


# -- study run names ---------------------------------------------------------------------------

def test_grid_values_close_to_each_other_get_distinct_runs(tmp_path):
    path = tmp_path / "study.yaml"
    path.write_text(TINY + f"out_dir: {tmp_path / 's'}\ngrid: {{optimizer: [sam], "
                           "rho: [0.1, 0.1000001, 0.05]}\n")
    runs = expand_grid(load_study_config(path))
    assert [r.name for r in runs] == ["sam_rho0.1_s0", "sam_rho0.1000001_s0", "sam_rho0.05_s0"]
    assert [r.config.rho for r in runs] == [0.1, 0.1000001, 0.05]


def test_colliding_run_names_are_an_error_not_a_dropped_run(tmp_path):
    path = tmp_path / "study.yaml"
    path.write_text(TINY.replace("model: mlp\nmodel_options: {hidden: [16]}\n", "")
                    + "model: small_cnn\n"
                    + f"out_dir: {tmp_path / 's'}\n"
                    + "grid: {model_options.norm: [group, 'group ']}\n")
    with pytest.raises(ConfigError, match="share the run name"):
        expand_grid(load_study_config(path))


def test_corrupted_done_json_is_named_in_a_study(tmp_path, capsys):
    path = tmp_path / "study.yaml"
    path.write_text(TINY + f"out_dir: {tmp_path / 's'}\nplots: false\n"
                           "grid: {optimizer: [sgd]}\n")
    assert main(["study", str(path), "-q"]) == 0
    capsys.readouterr()
    done = tmp_path / "s" / "runs" / "sgd_s0" / "done.json"
    done.write_text(done.read_text()[:40])
    err = _cli_error(capsys, ["study", str(path), "-q"])
    assert str(done) in err and "different config" not in err
    assert "corrupted" in err


def test_config_json_round_trip_keeps_types():
    cfg = TrainConfig(lr="1e-3", epochs=3.0, optimizer="SAM")
    again = TrainConfig(**json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg and again.lr == 1e-3 and again.epochs == 3 and cfg.optimizer == "sam"


def test_docs_reference_table_is_generated_from_the_schema():
    from pathlib import Path

    from msam.training import config_reference

    doc = (Path(__file__).resolve().parents[2] / "docs" / "training.md").read_text()
    assert config_reference() in doc, "regenerate the table in docs/training.md"
