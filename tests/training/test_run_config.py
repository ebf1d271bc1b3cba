"""Config loading, validation, overrides and grid expansion (no training)."""

from __future__ import annotations

from pathlib import Path

import pytest

from msam.training import (
    ConfigError,
    SharpnessConfig,
    TrainConfig,
    config_reference,
    load_config,
    load_study_config,
    train_config_from_dict,
)
from msam.training.config import parse_override
from msam.training.schedule import lr_factor_fn
from msam.training.study import expand_grid

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml")) + sorted((ROOT / "configs").glob("*.toml"))


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_validate():
    cfg = TrainConfig().resolved()
    assert cfg.optimizer == "msam" and cfg.micro_batches == 4


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    import yaml

    raw = yaml.safe_load(path.read_text())
    if "grid" in raw:
        study = load_study_config(path)
        runs = expand_grid(study)  # builds and validates every cell's config
        assert runs and len({r.name for r in runs}) == len(runs)
        assert all(Path(r.config.out_dir).parent == Path(study.train.out_dir) / "runs"
                   for r in runs)
    else:
        load_config(path).resolved()


def test_shipped_paper_configs_match_the_protocol():
    for name, rho in (("cifar10_wrn28_10.yaml", 0.05), ("cifar100_wrn28_10.yaml", 0.1)):
        cfg = load_study_config(ROOT / "configs" / name).train
        assert (cfg.model, cfg.epochs, cfg.batch_size, cfg.lr, cfg.schedule) == \
            ("wrn28_10", 200, 256, 0.1, "cosine")
        assert (cfg.momentum, cfg.weight_decay, cfg.rho, cfg.augment) == (0.9, 5e-4, rho, True)
    noisy = load_study_config(ROOT / "configs" / "fashion_mnist_noisy.yaml").train
    assert noisy.label_noise == 0.4
    demo = load_study_config(ROOT / "configs" / "demo.yaml")
    assert demo.grid.get("seed", [demo.train.seed]) == [0, 1]
    assert set(demo.grid["optimizer"]) == {"sgd", "sam", "msam"}
    # Bundled data (no Debian package, no download) with the noise that shows mSAM's effect.
    assert (demo.train.dataset, demo.train.label_noise, demo.train.download) == \
        ("mnist5k", 0.4, False)


def test_unknown_key_is_named_with_the_file(tmp_path):
    path = _write(tmp_path, "run.yaml", "dataset: digits\nmodel: mlp\nlearning_rate: 0.1\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert "learning_rate" in msg and str(path) in msg


def test_unknown_nested_key_is_named(tmp_path):
    path = _write(tmp_path, "run.yaml", "sharpness: {metrics: [loss], exampels: 3}\n")
    with pytest.raises(ConfigError, match=r"sharpness\.exampels.*did you mean 'examples'"):
        load_config(path)


@pytest.mark.parametrize("line, key", [
    ("lr: fast", "lr"), ("epochs: 1.5", "epochs"), ("augment: 3", "augment"),
    ("micro_batches: [2]", "micro_batches"), ("betas: [0.9, x]", "betas[1]"),
    ("model_options: 5", "model_options"), ("dataset: 7", "dataset"),
])
def test_bad_type_is_named(tmp_path, line, key):
    path = _write(tmp_path, "run.yaml", line + "\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert f"'{key}'" in str(err.value) and str(path) in str(err.value)


def test_yaml_scientific_notation_and_int_to_float(tmp_path):
    # PyYAML reads "1e-3" as a string; float fields accept it. Ints are fine for floats.
    path = _write(tmp_path, "run.yaml", "lr: 1e-3\nweight_decay: 0\nepochs: 3.0\n")
    cfg = load_config(path)
    assert cfg.lr == 1e-3 and isinstance(cfg.weight_decay, float) and cfg.epochs == 3


def test_toml_config(tmp_path):
    path = _write(tmp_path, "run.toml", """
dataset = "digits"
model = "mlp"
optimizer = "sam"
lr = 0.05
[model_options]
hidden = [32]
[sharpness]
metrics = ["loss"]
""")
    cfg = load_config(path)
    assert cfg.model_options == {"hidden": [32]} and cfg.sharpness.metrics == ["loss"]
    bad = _write(tmp_path, "bad.toml", 'datset = "digits"\n')
    with pytest.raises(ConfigError, match=r"'datset'.*bad\.toml|bad\.toml.*'datset'"):
        load_config(bad)


def test_json_config_and_unparsable_file(tmp_path):
    path = _write(tmp_path, "run.json", '{"dataset": "digits", "model": "mlp"}')
    assert load_config(path).dataset == "digits"
    broken = _write(tmp_path, "broken.yaml", "a: [1, 2\n")
    with pytest.raises(ConfigError, match="broken.yaml: cannot parse"):
        load_config(broken)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(_write(tmp_path, "list.yaml", "- 1\n- 2\n"))


def test_overrides(tmp_path):
    path = _write(tmp_path, "run.yaml", "dataset: digits\nmodel: small_cnn\n")
    cfg = load_config(path, ["lr=0.05", "model_options.width=0.5", "augment=true",
                             "sharpness.metrics=[loss, grad_norm]", "train_subset=null",
                             ("epochs", 3, "--epochs 3")])
    assert cfg.lr == 0.05 and cfg.model_options == {"width": 0.5} and cfg.augment
    assert cfg.sharpness.metrics == ["loss", "grad_norm"] and cfg.epochs == 3
    with pytest.raises(ConfigError, match=r"--set lrr=0\.1.*'lrr'.*did you mean 'lr'"):
        load_config(path, ["lrr=0.1"])
    with pytest.raises(ConfigError, match=r"--set epochs=many: key 'epochs'"):
        load_config(path, ["epochs=many"])
    with pytest.raises(ConfigError, match=r"--epochs 0: key 'epochs' must be >= 1"):
        train_config_from_dict({"epochs": 0}, "file.yaml", {"epochs": "--epochs 0"})
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_override("lr")


def test_cross_field_validation():
    with pytest.raises(ConfigError, match="'model'.*text"):
        TrainConfig(dataset="rotten_tomatoes", model="small_cnn").resolved()
    with pytest.raises(ConfigError, match="'micro_batches' is 64, more than batch_size=32"):
        TrainConfig(micro_batches=64, batch_size=32).resolved()
    with pytest.raises(ConfigError, match=r"'model_options\.depth'.*small_cnn"):
        TrainConfig(model="small_cnn", model_options={"depth": 3}).resolved()
    with pytest.raises(ConfigError, match="'dataset'"):
        TrainConfig(dataset="imagenet").resolved()
    with pytest.raises(ConfigError, match="'optimizer'.*sgd, sam, msam, asam"):
        TrainConfig(optimizer="adam").resolved()
    with pytest.raises(ConfigError, match="'sharpness.metrics'.*bogus"):
        TrainConfig(sharpness=SharpnessConfig(metrics=["bogus"])).resolved()
    with pytest.raises(ConfigError, match="'warmup_epochs'"):
        TrainConfig(epochs=2, warmup_epochs=3).resolved()


def test_method_rules_in_resolved_config():
    sgd = TrainConfig(optimizer="sgd", rho=0.1, micro_batches=8).resolved()
    assert (sgd.rho, sgd.micro_batches) == (0.0, 1)
    sam = TrainConfig(optimizer="sam", micro_batches=8).resolved()
    assert (sam.rho, sam.micro_batches) == (0.05, 1)
    assert TrainConfig(optimizer="MSAM").resolved().optimizer == "msam"


def test_study_key_in_run_config_points_to_study(tmp_path):
    path = _write(tmp_path, "s.yaml", "grid: {optimizer: [sgd, sam]}\n")
    with pytest.raises(ConfigError, match="msam study"):
        load_config(path)


def test_grid_expansion_rules(tmp_path):
    path = _write(tmp_path, "s.yaml", f"""
out_dir: {tmp_path / 'study'}
dataset: digits
model: mlp
batch_size: 32
grid:
  optimizer: [sgd, sam, msam, asam]
  rho: [0.05, 0.1]
  micro_batches: [1, 4]
  seed: [0, 1]
per_method:
  asam: {{rho: [0.5]}}
""")
    runs = expand_grid(load_study_config(path))
    names = [r.name for r in runs]
    # sgd: not duplicated over rho / m; msam m=1 is the sam run; asam uses its own rho.
    assert names == [
        "sgd_s0", "sgd_s1",
        "sam_rho0.05_s0", "sam_rho0.05_s1", "sam_rho0.1_s0", "sam_rho0.1_s1",
        "msam_rho0.05_m4_s0", "msam_rho0.05_m4_s1", "msam_rho0.1_m4_s0", "msam_rho0.1_m4_s1",
        "asam_rho0.5_m1_s0", "asam_rho0.5_m1_s1", "asam_rho0.5_m4_s0", "asam_rho0.5_m4_s1",
    ]
    by = {r.name: r for r in runs}
    assert by["sgd_s1"].config.rho == 0.0 and by["sgd_s1"].config.seed == 1
    assert by["msam_rho0.1_m4_s0"].config.micro_batches == 4
    assert by["asam_rho0.5_m4_s1"].config.rho == 0.5
    assert by["sam_rho0.05_s0"].cell == (("optimizer", "sam"), ("rho", 0.05))


def test_grid_errors_are_named(tmp_path):
    base = f"out_dir: {tmp_path}\ndataset: digits\nmodel: mlp\n"
    with pytest.raises(ConfigError, match=r"'grid\.rhoo'.*did you mean 'rho'"):
        load_study_config(_write(tmp_path, "a.yaml", base + "grid: {rhoo: [0.1]}\n"))
    with pytest.raises(ConfigError, match=r"'grid\.rho\[1\]'"):
        load_study_config(_write(tmp_path, "b.yaml", base + "grid: {rho: [0.1, big]}\n"))
    with pytest.raises(ConfigError, match=r"'grid\.optimizer\[0\]'"):
        load_study_config(_write(tmp_path, "c.yaml", base + "grid: {optimizer: [adam]}\n"))
    with pytest.raises(ConfigError, match=r"'per_method\.foo'"):
        load_study_config(_write(tmp_path, "d.yaml", base + "per_method: {foo: {}}\n"))
    study = load_study_config(_write(tmp_path, "e.yaml", base + "grid: {micro_batches: [64]}\n"),
                              ["batch_size=32"])
    with pytest.raises(ConfigError, match="micro_batches"):
        expand_grid(study)


def test_config_reference_is_documented():
    table = config_reference()
    doc = (ROOT / "docs" / "training.md").read_text()
    for name in TrainConfig.model_fields:
        assert f"`{name}" in table
        assert f"`{name}" in doc, f"docs/training.md does not mention {name}"


def test_lr_schedules():
    f = lr_factor_fn("cosine", total_steps=10, warmup_steps=2, lr=0.1, min_lr=0.01)
    assert f(0) == pytest.approx(1 / 3) and f(1) == pytest.approx(2 / 3)
    assert f(2) == pytest.approx(1.0) and f(10) == pytest.approx(0.1)
    assert f(6) == pytest.approx(0.1 + 0.9 * 0.5)
    s = lr_factor_fn("step", total_steps=100, milestone_steps=[50, 75], gamma=0.1)
    assert (s(49), s(50), s(75)) == (1.0, pytest.approx(0.1), pytest.approx(0.01))
    assert lr_factor_fn("constant", total_steps=5)(4) == 1.0
