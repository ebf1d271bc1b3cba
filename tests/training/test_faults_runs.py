"""Fault injection on run directories: SIGKILL at many points (inside checkpoint writes too)
must resume bit-identically; flipped bytes must be detected; two writers must not share a run.

Every run here is the same tiny digits run (about 0.3 s per run in-process); a killed child
costs about 3 s (interpreter and torch start-up). The reference is one uninterrupted run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch

from msam.cli.main import main
from msam.training import TrainConfig, expand_grid, load_study_config, train
from msam.training.checkpoint import remove_stale_temp_files
from msam.training.rundir import IntegrityError, RunFiles, RunLockedError, run_lock
from msam.training.trainer import RunResult, TrainingError

ROOT = Path(__file__).resolve().parents[2]
CHILD = Path(__file__).resolve().parents[1] / "_fault_child.py"
TIME_KEYS = ("epoch_time_s", "elapsed_s")


def tiny(out_dir: Path, **kw) -> TrainConfig:
    base = dict(dataset="digits", train_subset=160, val_fraction=0.2, model="small_cnn",
                model_options={"width": 0.25}, optimizer="msam", micro_batches=2, epochs=3,
                batch_size=32, lr=0.05, warmup_epochs=1, out_dir=str(out_dir), progress=False,
                threads=1)
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """One uninterrupted run: what every faulted run must end up identical to."""
    out = tmp_path_factory.mktemp("reference") / "run"
    train(tiny(out), quiet=True)
    return out


def _strip(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in TIME_KEYS} for row in history]


def _tensors(obj, prefix=""):
    """Every tensor in a nested state dict, by path."""
    if isinstance(obj, torch.Tensor):
        return {prefix: obj}
    out = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(_tensors(v, f"{prefix}/{k}"))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            out.update(_tensors(v, f"{prefix}/{i}"))
    return out


def assert_identical_to(reference: Path, run_dir: Path) -> None:
    """Same final model, same last checkpoint (model, optimizer state, RNG), same metrics."""
    for name, key in (("final.pt", "model"), ("last.pt", "model"), ("last.pt", "optimizer"),
                      ("last.pt", "rng")):
        a = _tensors(torch.load(reference / name, weights_only=True)[key])
        b = _tensors(torch.load(run_dir / name, weights_only=True)[key])
        assert a.keys() == b.keys(), (name, key)
        for k in a:
            assert torch.equal(a[k], b[k]), f"{name} {key}{k} differs"
    ref = RunResult.from_dir(reference)
    got = RunResult.from_dir(run_dir)
    assert _strip(got.history) == _strip(ref.history)


def _child(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(CHILD), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


# -- SIGKILL at many points --------------------------------------------------------------------

# (point, n): with 3 epochs of 4 steps, n=2 of a per-epoch point is the second epoch's write.
KILL_POINTS = [
    ("replace:config.json", 1),   # the first file of a fresh run, no checkpoint yet
    ("step", 6),                  # mid-epoch 2
    ("manifest:pending", 2),      # epoch 2: new digests recorded as pending, nothing written
    ("replace:prev.pt", 1),       # epoch 2: the previous checkpoint half-way to prev.pt
    ("link", 1),                  # epoch 2: prev.pt made, last.pt still the old one
    ("torn", 2),                  # epoch 2: last.pt's temp file half written
    ("replace:last.pt", 2),       # epoch 2: last.pt's temp file complete, not moved
    ("replace:metrics.jsonl", 2),  # epoch 2: checkpoint in place, metrics not
    ("manifest:commit", 2),       # epoch 2: all files written, digests still pending
    ("replace:final.pt", 1),      # the end: final.pt not in place
    ("replace:done.json", 1),     # the end: done.json not in place
]


@pytest.mark.parametrize("point, n", KILL_POINTS, ids=[f"{p}#{n}" for p, n in KILL_POINTS])
def test_sigkill_then_resume_is_bit_identical(reference, tmp_path, point, n):
    out = tmp_path / "run"
    cfg = tiny(out)
    proc = _child("train", json.dumps(cfg.to_dict()), point, str(n))
    assert proc.returncode == -9, f"not killed at {point}#{n}: {proc.stderr[-2000:]}"
    assert not (out / "done.json").exists() or point == "never"
    # Whatever the kill left must verify: no file contradicts checksums.json.
    files = RunFiles(out)
    for p in out.iterdir():
        if p.is_file() and not p.name.startswith(".") and p.name not in ("checksums.json",
                                                                          "run.lock"):
            assert files.verify(p.name) is not False, f"{p.name} fails its checksum"
    res = train(cfg, quiet=True, resume=True)
    assert res.completed
    assert_identical_to(reference, out)
    assert not list(out.glob(".*.tmp-*")), "the dead writer's temp files were not removed"
    assert all(files.verify(p.name) is not False for p in out.iterdir() if p.suffix == ".pt")


# -- flipped bytes -----------------------------------------------------------------------------

def _entry_offset(path: Path, suffix: str) -> tuple[int, int]:
    """(offset, size) of the data of the zip member ending in ``suffix`` (torch stores them
    uncompressed)."""
    with zipfile.ZipFile(path) as z:
        info = next(i for i in z.infolist() if i.filename.endswith(suffix))
    raw = path.read_bytes()
    start = info.header_offset
    name_len = int.from_bytes(raw[start + 26:start + 28], "little")
    extra_len = int.from_bytes(raw[start + 28:start + 30], "little")
    return start + 30 + name_len + extra_len, info.file_size


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def _half_done(tmp_path: Path, name: str = "run") -> tuple[TrainConfig, Path]:
    out = tmp_path / name
    cfg = tiny(out)
    train(cfg, quiet=True, stop_after_epochs=2)  # last.pt = epoch 2, prev.pt = epoch 1
    return cfg, out


def _where(out: Path, where: str) -> int:
    path = out / "last.pt"
    if where == "tensor":
        off, size = _entry_offset(path, "data/0")
        return off + size // 2
    if where == "data.pkl":
        off, size = _entry_offset(path, "data.pkl")
        return off + size // 2
    if where == "zip header":
        return 10
    return path.stat().st_size - 3  # the zip's end record


@pytest.mark.parametrize("where", ["tensor", "data.pkl", "zip header", "zip end"])
def test_flipped_byte_in_last_checkpoint_falls_back_to_the_previous(reference, tmp_path,
                                                                    capsys, where):
    cfg, out = _half_done(tmp_path)
    _flip(out / "last.pt", _where(out, where))
    assert RunFiles(out).verify("last.pt") is False
    res = train(cfg, resume=True)
    log = capsys.readouterr().err  # a warning: on stderr, even with quiet=True
    assert "last.pt does not match its SHA-256" in log and "resuming from prev.pt (epoch 1)" in log
    assert res.completed and (out / "last.pt.corrupt").is_file()
    assert_identical_to(reference, out)


def test_both_checkpoints_corrupted_exits_2_and_changes_nothing(tmp_path, capsys):
    cfg, out = _half_done(tmp_path)
    for name in ("last.pt", "prev.pt"):
        off, size = _entry_offset(out / name, "data/0")
        _flip(out / name, off + size // 2)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    cfg_path = tmp_path / "run.json"
    cfg_path.write_text(json.dumps(cfg.to_dict()))
    assert main(["train", str(cfg_path), "--resume", "-q"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("msam: error: cannot resume") and "Traceback" not in err
    assert "last.pt does not match its SHA-256" in err and "prev.pt does not match" in err
    assert "--rerun" in err
    after = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert before == after
    with pytest.raises(IntegrityError):
        train(cfg, quiet=True, resume=True)


def test_corrupted_result_files_are_named(reference, tmp_path, capsys):
    import shutil

    detected = 0
    for name, damage in (("final.pt", "flip"), ("done.json", "truncate"),
                         ("done.json", "flip"), ("metrics.jsonl", "flip"),
                         ("checksums.json", "truncate")):
        run = tmp_path / f"{name}-{damage}"
        shutil.copytree(reference, run)
        path = run / name
        if damage == "flip":
            _flip(path, path.stat().st_size // 2)
        else:
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        if name == "final.pt":
            assert main(["sharpness", str(run), "--metrics", "loss", "--examples", "8"]) == 2
            err = capsys.readouterr().err
            assert err.startswith("msam: error:") and "final.pt does not match" in err
            assert "last.pt instead" in err
        else:
            with pytest.raises(IntegrityError, match=name.replace(".", r"\.")):
                RunResult.from_dir(run)
            with pytest.raises(IntegrityError, match=name.replace(".", r"\.")):
                train(tiny(run), quiet=True, resume=True)
        detected += 1
    assert detected == 5


# -- one writer per run directory --------------------------------------------------------------

def test_second_writer_is_refused_and_the_live_run_is_untouched(reference, tmp_path, capsys):
    out = tmp_path / "run"
    cfg = tiny(out)
    cfg_path = tmp_path / "run.json"
    cfg_path.write_text(json.dumps(cfg.to_dict()))
    live = subprocess.Popen([sys.executable, str(CHILD), "train", json.dumps(cfg.to_dict()),
                             "sleep", "150"], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        while not (out / "last.pt").exists() and time.time() < deadline:
            time.sleep(0.02)
        assert live.poll() is None, live.stderr.read() if live.stderr else ""
        assert main(["train", str(cfg_path), "--resume", "-q"]) == 2
        err = capsys.readouterr().err
        assert f"in use by process {live.pid}" in err and "Traceback" not in err
        with pytest.raises(RunLockedError):
            train(cfg, quiet=True, resume=True)
        assert live.wait(timeout=120) == 0, live.stderr.read() if live.stderr else ""
    finally:
        if live.poll() is None:
            live.kill()
    assert_identical_to(reference, out)


def test_temp_files_of_live_writers_are_kept(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = tmp_path / f".last.pt.tmp-{sleeper.pid}"
        mine = tmp_path / f".metrics.csv.tmp-{os.getpid()}"
        dead_pid = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                                  capture_output=True, text=True).stdout.strip()
        dead = tmp_path / f".final.pt.tmp-{dead_pid}"
        for p in (live, mine, dead):
            p.write_bytes(b"x")
        removed = remove_stale_temp_files(tmp_path)
        assert sorted(removed) == sorted([mine, dead]) and live.exists()
    finally:
        sleeper.kill()
        sleeper.wait()


def test_lock_is_released_on_exit_and_reentrant(tmp_path):
    out = tmp_path / "run"
    with run_lock(out):
        with run_lock(out):  # the same process may take it again (study -> train)
            pass
        held = _child_lock_attempt(out)
        assert held == "locked"
    assert _child_lock_attempt(out) == "free"


def _child_lock_attempt(out: Path) -> str:
    code = ("import sys; from msam.training.rundir import run_lock, RunLockedError\n"
            "try:\n    with run_lock(sys.argv[1]): print('free')\n"
            "except RunLockedError: print('locked')\n")
    return subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True,
                          text=True, cwd=ROOT).stdout.strip()


def test_two_study_processes_split_the_runs(tmp_path):
    root = tmp_path / "study"
    cfg = tiny(root, epochs=2).to_dict()
    cfg.update(plots=False, name="split",
               grid={"optimizer": ["sgd", "sam", "msam"], "seed": [0, 1]})
    path = tmp_path / "study.json"
    path.write_text(json.dumps(cfg))
    procs = [subprocess.Popen([sys.executable, str(CHILD), "study", str(path), "0.05"],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    names = [r.name for r in expand_grid(load_study_config(path))]
    assert len(names) == 6
    # A run that starts training logs its set-up line "... on digits (128 train) with ...".
    starts = [{name: sum(1 for line in o.splitlines()
                         if f" {name}] " in line and " on digits (" in line) for name in names}
              for o, _ in outs]
    assert {n: starts[0][n] + starts[1][n] for n in names} == dict.fromkeys(names, 1), starts
    assert all(sum(s.values()) >= 1 for s in starts), "one process did all the work"
    for name in names:
        assert (root / "runs" / name / "done.json").is_file()
    assert "| sgd" in (root / "summary.md").read_text()


# -- finished runs -----------------------------------------------------------------------------

def test_resume_never_overwrites_a_finished_run(reference, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(reference, run)
    (run / "last.pt").unlink()
    (run / "prev.pt").unlink()
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    cfg_path = tmp_path / "run.json"
    cfg_path.write_text(json.dumps(tiny(run).to_dict()))
    # returned as it is (never retrained), even with its checkpoints gone ...
    assert main(["train", str(cfg_path), "--resume", "-q"]) == 0
    assert before == {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    # ... but it cannot be extended without them
    assert main(["train", str(cfg_path), "--resume", "-q", "--epochs", "4"]) == 2
    err = capsys.readouterr().err
    assert "finished run" in err and "--rerun" in err and "Traceback" not in err
    assert before == {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    # with the checkpoint still there, --resume returns the finished run untouched
    shutil.rmtree(run)
    shutil.copytree(reference, run)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    assert main(["train", str(cfg_path), "--resume", "-q"]) == 0
    assert before == {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    # --rerun is the explicit way to train it again
    assert main(["train", str(cfg_path), "--rerun", "-q"]) == 0
    assert_identical_to(reference, run)


# -- a failing step ----------------------------------------------------------------------------

def test_a_failing_step_keeps_the_last_checkpoint(reference, tmp_path, monkeypatch):
    import msam

    out = tmp_path / "run"
    cfg = tiny(out)
    real_step = msam.MSAM.step
    calls = {"n": 0}

    def failing_step(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 6:  # in epoch 2
            raise RuntimeError("simulated failure inside the optimizer")
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(msam.MSAM, "step", failing_step)
    with pytest.raises(TrainingError, match=r"step 6 \(epoch 2\) failed.*simulated.*epoch 1"):
        train(cfg, quiet=True)
    monkeypatch.setattr(msam.MSAM, "step", real_step)
    files = RunFiles(out)
    assert files.verify("last.pt") is True and files.verify("metrics.jsonl") is True
    assert torch.load(out / "last.pt", weights_only=True)["epoch"] == 1
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1
    assert "simulated failure" in (out / "error.txt").read_text()
    train(cfg, quiet=True, resume=True)
    assert_identical_to(reference, out)
