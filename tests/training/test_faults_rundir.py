"""Fault suite for run directories (issue 25): planted symbolic links, a deleted checksum
manifest, a full disk (ENOSPC) and a read-only run directory (EROFS), quiet warnings, and
finished runs that --resume must never retrain.

Every run is the tiny digits run of ``test_faults_runs`` (well under a second in-process); the
disk faults are injected ``OSError``s (the file system is not actually filled, and a real
read-only mount needs root), raised from the same call a real one comes from.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from test_faults_runs import _flip, _half_done, assert_identical_to, reference, tiny  # noqa: F401

from msam.cli.main import main
from msam.training import train, trainer
from msam.training.rundir import IntegrityError, RunDirError, RunFiles, run_lock


def _files(run: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and not p.is_symlink()}


def _config_file(tmp_path: Path, cfg) -> Path:
    path = tmp_path / "run.json"
    path.write_text(json.dumps(cfg.to_dict()))
    return path


# -- 1: planted symbolic links -----------------------------------------------------------------

def test_symlinked_lock_file_is_refused_and_its_target_untouched(tmp_path, capsys):
    victim = tmp_path / "precious.txt"
    victim.write_text("keep me\n")
    out = tmp_path / "run"
    out.mkdir()
    (out / "run.lock").symlink_to(victim)
    cfg = tiny(out)
    assert main(["train", str(_config_file(tmp_path, cfg)), "-q"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("msam: error:") and "run.lock" in err and "Traceback" not in err
    assert "not a plain file" in err
    assert victim.read_text() == "keep me\n"
    with pytest.raises(RunDirError, match="not a plain file"):
        train(cfg, quiet=True)
    assert victim.read_text() == "keep me\n"


def test_hard_linked_lock_file_is_refused(tmp_path):
    victim = tmp_path / "precious.txt"
    victim.write_text("keep me\n")
    out = tmp_path / "run"
    out.mkdir()
    os.link(victim, out / "run.lock")
    with pytest.raises(RunDirError, match="not a plain file"), run_lock(out):
        pass
    assert victim.read_text() == "keep me\n"


def test_symlinked_run_files_never_write_through(tmp_path):
    """A planted temp file (its name is predictable) and planted run files: the writes replace
    the links themselves, the link targets are never written."""
    victim = tmp_path / "precious.txt"
    victim.write_text("keep me\n")
    out = tmp_path / "run"
    out.mkdir()
    for name in (f".config.json.tmp-{os.getpid()}", f".last.pt.tmp-{os.getpid()}",
                 "metrics.csv", "error.txt"):
        (out / name).symlink_to(victim)
    train(tiny(out, epochs=1), quiet=True)
    assert victim.read_text() == "keep me\n"
    assert not (out / "metrics.csv").is_symlink() and RunFiles(out).verify("metrics.csv")


def test_symlinked_manifest_is_refused_and_rerun_replaces_it(tmp_path):
    victim = tmp_path / "precious.txt"
    victim.write_text("keep me\n")
    cfg, out = _half_done(tmp_path)
    (out / "checksums.json").unlink()
    (out / "checksums.json").symlink_to(victim)
    with pytest.raises(IntegrityError, match="symbolic link"):
        train(cfg, quiet=True, resume=True)
    train(cfg, quiet=True, rerun=True)
    assert victim.read_text() == "keep me\n"
    assert not (out / "checksums.json").is_symlink() and RunFiles(out).verify("last.pt")


# -- 2: a deleted checksum manifest ------------------------------------------------------------

def test_deleted_manifest_does_not_turn_verification_off(tmp_path, capsys):
    cfg, out = _half_done(tmp_path)
    (out / "checksums.json").unlink()
    _flip(out / "last.pt", (out / "last.pt").stat().st_size // 2)
    before = _files(out)
    assert main(["train", str(_config_file(tmp_path, cfg)), "--resume", "-q"]) == 2
    err = capsys.readouterr().err
    assert "checksums.json is missing" in err and "last.pt" in err and "Traceback" not in err
    assert "--accept-unverified" in err and "--rerun" in err
    assert _files(out) == before  # nothing changed
    with pytest.raises(IntegrityError, match="checksums.json is missing"):
        train(cfg, quiet=True, resume=True)


def test_accept_unverified_resumes_an_intact_run_without_manifest(reference, tmp_path):  # noqa: F811
    cfg, out = _half_done(tmp_path)
    (out / "checksums.json").unlink()
    assert main(["train", str(_config_file(tmp_path, cfg)), "--resume", "-q",
                 "--accept-unverified"]) == 0
    assert_identical_to(reference, out)
    assert RunFiles(out).verify("last.pt") is True  # recorded again from here on


# -- 3: a warning is never quiet ---------------------------------------------------------------

def test_quiet_still_warns_about_the_corrupted_checkpoint(tmp_path, capsys):
    cfg, out = _half_done(tmp_path)
    _flip(out / "last.pt", (out / "last.pt").stat().st_size // 2)
    assert main(["train", str(_config_file(tmp_path, cfg)), "--resume", "-q"]) == 0
    err = capsys.readouterr().err
    assert "WARNING" in err and "last.pt does not match its SHA-256" in err
    assert "resuming from prev.pt (epoch 1)" in err and "last.pt.corrupt" in err


# -- 4: --resume never retrains a finished run -------------------------------------------------

def test_resume_of_finished_run_without_last_checkpoint_keeps_it(reference, tmp_path,  # noqa: F811
                                                                 capsys):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    (run / "last.pt").unlink()  # prev.pt (epoch 2 of 3) is still there
    before = _files(run)
    cfg_path = _config_file(tmp_path, tiny(run))
    assert main(["train", str(cfg_path), "--resume", "-q"]) == 0
    assert _files(run) == before  # done.json and final.pt not rewritten, nothing retrained
    # extending it would retrain epoch 3 from prev.pt: refused, with the explicit way out
    assert main(["train", str(cfg_path), "--resume", "-q", "--epochs", "4"]) == 2
    err = capsys.readouterr().err
    assert "finished run of 3 epochs" in err and "epoch 2" in err and "--rerun" in err
    assert _files(run) == before


def test_resume_of_finished_run_with_another_m_is_refused(reference, tmp_path,  # noqa: F811
                                                          capsys):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    before = _files(run)
    for gone in ((), ("last.pt",), ("last.pt", "prev.pt")):
        for name in gone:
            (run / name).unlink(missing_ok=True)
        cfg_path = _config_file(tmp_path, tiny(run, micro_batches=4))
        assert main(["train", str(cfg_path), "--resume", "-q"]) == 2
        err = capsys.readouterr().err
        assert "differs in micro_batches" in err and "--rerun" in err, gone
    assert {k: v for k, v in _files(run).items() if k in before} == \
        {k: v for k, v in before.items() if k in _files(run)}


# -- 6: disk full, read-only run directory -----------------------------------------------------

@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS])
def test_disk_full_or_read_only_mid_run_says_what_to_do(reference, tmp_path, monkeypatch,  # noqa: F811
                                                        capsys, code):
    import msam.training.checkpoint as ck

    out = tmp_path / "run"
    cfg = tiny(out)
    real_fsync = os.fsync
    state = {"armed": False}

    def failing_fsync(fd):
        # the second epoch's checkpoint: its temp file is written, then the disk is full
        if state["armed"] and os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).startswith(
                ".last.pt"):
            raise OSError(code, os.strerror(code))
        return real_fsync(fd)

    real_write = ck.atomic_write

    def arming_write(path, write):
        if Path(path).name == "last.pt" and (Path(path).parent / "last.pt").exists():
            state["armed"] = True
        return real_write(path, write)

    monkeypatch.setattr(ck.os, "fsync", failing_fsync)
    monkeypatch.setattr("msam.training.rundir.atomic_write", arming_write)
    cfg_path = _config_file(tmp_path, cfg)
    assert main(["train", str(cfg_path), "-q"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("msam: error: cannot write") and "Traceback" not in err
    assert os.strerror(code) in err and "last.pt" in err
    assert "completed epochs are safe" in err and "holds epoch 1" in err and "--resume" in err
    monkeypatch.undo()
    assert torch.load(out / "last.pt", weights_only=True)["epoch"] == 1
    assert main(["train", str(cfg_path), "--resume", "-q"]) == 0
    assert_identical_to(reference, out)


def test_storage_error_names_the_file_in_the_api(tmp_path, monkeypatch):
    out = tmp_path / "run"

    def full(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("msam.training.checkpoint.os.fsync", full)
    with pytest.raises(getattr(trainer, "StorageError", ()),
                       match=r"No space left.*No epoch was completed yet"):
        train(tiny(out), quiet=True)
