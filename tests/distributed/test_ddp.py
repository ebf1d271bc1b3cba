"""msam.distributed on 2 CPU ranks (gloo): equivalence, communication, accumulation, resume, faults.

The module spawns two processes once (torch.multiprocessing, "spawn") that talk over gloo on
127.0.0.1; every process is bounded by a timeout (the process group's, and a join deadline in
the parent), so a hang fails the test instead of blocking the run. The ranks' results come
back as ``torch.save`` files. The scenarios live in ``_ddp_workers.py`` (importable
by the spawned children); they all run in one 2-rank launch, shared by the tests below.
"""

from __future__ import annotations

import pytest
import torch

from _ddp_workers import spawn


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """One 2-rank run of every scenario (process start-up dominates, so it is shared)."""
    return spawn("all", tmp_path_factory.mktemp("dist"))


@pytest.fixture
def equivalence(ranks):
    return ranks


@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_local_2x2_equals_single_process_m4(equivalence, base):
    r0, r1 = equivalence
    res = r0[f"local_{base}"]
    assert len(res["param_diff"]) >= 3
    assert max(res["param_diff"]) < 1e-10, res["param_diff"]
    # the weights stay identical on both ranks
    for a, b in zip(r0[f"local_{base}"]["params"], r1[f"local_{base}"]["params"]):
        assert torch.equal(a, b)
    # averaged per-rank BatchNorm statistics = single-process statistics
    assert res["bn_diff"] < 1e-10
    # and before averaging they really were per rank
    assert res["bn_rank_spread"] > 1e-3


def test_local_mode_one_allreduce_per_step(equivalence):
    for r in equivalence:
        res = r["local_sgd"]
        assert res["hook_calls_per_step"] == [1, 1, 1]
        assert res["comm_counts"]["ascent_allreduce"] == 0
        assert res["global_micro_batches"] == 4


def test_synchronized_equals_single_process_sam(equivalence):
    r0, r1 = equivalence
    res = r0["synchronized"]
    assert max(res["param_diff"]) < 1e-10, res["param_diff"]
    assert res["tiny_grad_rel_err"] < 1e-9, res["tiny_grad_rel_err"]
    # local mode on the same data differs (it is mSAM with 2 perturbations, not SAM)
    assert res["local_vs_sam"] > 1e-6
    for r in (r0, r1):
        s = r["synchronized"]
        assert s["hook_calls_per_step"] == [1, 1, 1]          # descent all-reduce (DDP)
        assert s["ascent_allreduce_per_step"] == [1, 1, 1]    # + the ascent all-reduce


def test_accumulation_syncs_once(equivalence):
    r0, _ = equivalence
    res = r0["accumulate"]
    for variant in ("sync_kw", "no_sync_ctx", "all_unsynced"):
        v = res[variant]
        assert max(v["param_diff"]) < 1e-10, (variant, v["param_diff"])
    assert res["sync_kw"]["hook_calls_per_step"] == [1, 1]
    assert res["no_sync_ctx"]["hook_calls_per_step"] == [1, 1]
    # nothing synchronised during the calls: step() all-reduces the gradient once itself
    assert res["all_unsynced"]["hook_calls_per_step"] == [0, 0]
    assert res["all_unsynced"]["grad_sync_per_step"] == [1, 1]


@pytest.mark.parametrize("case", ["gsam", "wsam", "wsam_coupled", "gsam_accumulate",
                                  "wsam_accumulate"])
def test_combining_rules_under_ddp_equal_the_papers_update(equivalence, case):
    """GSAM and WSAM (decoupled and coupled) on 2 ranks x 2 micro-batches = the papers'
    equations on the global batch with 4 micro-batches; each rank combines its own, and the
    step costs one explicit all-reduce (which carries WSAM's decoupled part too), none in
    DDP's backward."""
    r0, r1 = equivalence
    res = r0["combining"][case]
    assert max(res["param_diff"]) < 1e-10, res["param_diff"]
    for a, b in zip(res["params"], r1["combining"][case]["params"]):
        assert torch.equal(a, b)
    for r in (r0, r1):
        assert r["combining"][case]["hook_calls_per_step"] == [0, 0, 0]
        assert r["combining"][case]["grad_sync_per_step"] == [1, 1, 1]
    assert "mode='local'" in r0["combining"]["synchronized_error"]


@pytest.mark.parametrize("rule", ["gsam", "wsam"])
def test_combining_rules_under_ddp_with_a_grad_scaler(equivalence, rule):
    for r in equivalence:
        assert r["combining"][f"{rule}_scaler_diff"] < 1e-12


def test_plain_module_rejected_with_two_ranks(equivalence):
    for r in equivalence:
        assert "wrap it in DistributedDataParallel" in r["plain_module_error"]


def test_ddp_options_find_unused_bucket_view_work_static_graph_rejected(equivalence):
    r0, _ = equivalence
    for variant in ("find_unused", "bucket_view"):
        assert max(r0[variant]["param_diff"]) < 1e-10, (variant, r0[variant])
    assert "(static_graph=True) is not supported" in r0["static_graph_error"]


@pytest.mark.parametrize("key", ["resume", "resume_gsam", "resume_wsam"])
def test_resume_is_bit_identical(ranks, key):
    """SAM-type mSAM, GSAM and decoupled WSAM under DDP (BatchNorm, dropout): a checkpoint at
    step 3 continued to step 6 equals the uninterrupted run bit for bit."""
    for r in ranks:
        res = r[key]
        assert res["bitwise"], res
        assert res["n_tensors"] > 10
        assert res["steps"] == (6, 6)
        assert res["leftovers"] == []


def _faults(ranks, name):
    return [r["faults"][name] for r in ranks]


def test_nonfinite_skip_is_agreed_by_every_rank(ranks):
    for name in ("skip_ascent", "skip_final", "gsam_skip_final", "gsam_skip_grad_inf",
                 "wsam_skip_grad_inf"):
        for res in _faults(ranks, name):
            assert res["outcome"] == "ok"
            assert res["unchanged"] and res["recovery"] == "ok" and res["in_sync"], (name, res)
    assert [r["faults"]["skipped_steps"] for r in ranks] == [2, 2]


@pytest.mark.parametrize("name,failing,message", [
    ("raise_ascent", 1, "ValueError: boom on rank 1"),
    ("raise_final", 0, "ValueError: boom on rank 0"),
    ("raise_unsynced_accumulate", 1, "ValueError: boom on rank 1"),
    ("wsam_raise_final", 0, "ValueError: boom on rank 0"),
    ("sync_raise_ascent", 1, "ValueError: boom on rank 1"),
    ("sync_raise_descent", 0, "ValueError: boom on rank 0"),
])
def test_failing_rank_stops_every_rank(ranks, name, failing, message):
    for rank, res in enumerate(_faults(ranks, name)):
        if rank == failing:
            assert res["outcome"] == message, res
        else:
            assert res["outcome"].startswith("DistributedStepError:"), res
            assert f"rank {failing}: {message}" in res["outcome"], res
        # nothing moved, and the ranks carry on together afterwards
        assert res["unchanged"] and res["recovery"] == "ok" and res["in_sync"], (name, res)


def test_failure_before_any_collective_stops_every_rank(ranks):
    """Core v3 case 1: a batch smaller than m on rank 1 fails in the split, before any
    collective; rank 0 must not finish its step alone (its collectives would pair with rank
    1's next step)."""
    r0, r1 = _faults(ranks, "short_batch")
    assert r1["outcome"].startswith("ValueError:") and "micro" in r1["outcome"], r1
    assert r0["outcome"].startswith("DistributedStepError:") and "rank 1" in r0["outcome"], r0
    for res in (r0, r1):
        assert res["unchanged"] and res["recovery"] == "ok" and res["in_sync"], res


@pytest.mark.parametrize("key,setting", [("mismatch_m", "micro_batches"),
                                         ("mismatch_rule", "rule")])
def test_ranks_with_different_settings_are_refused_on_every_rank(ranks, key, setting):
    """Core v3 case 3: ranks built with different m (or rule) used to train without a word."""
    for res in ranks:
        out = res["faults"][key]
        assert out.startswith("ValueError:") and setting in out and "rank 1" in out, out


def test_nonfinite_raise_names_the_rank(ranks):
    failing, other = _faults(ranks, "nan_raise")[1], _faults(ranks, "nan_raise")[0]
    assert failing["outcome"].startswith("NonFiniteLossError:")
    assert other["outcome"].startswith("RemoteNonFiniteError:") and "rank 1" in other["outcome"]
    assert failing["unchanged"] and other["unchanged"]


def test_failed_step_leaves_checkpoint_intact(ranks):
    assert all(r["faults"]["checkpoint_intact"] for r in ranks)


def test_ddp_example_writes_its_checkpoint_under_runs(tmp_path):
    """Issue 25 case 14: the example's default checkpoint is under runs/ (git-ignored), not in
    the directory it is started from."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, str(root / "examples" / "ddp_train.py"), "--epochs",
                           "1", "--batch-size", "256"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300,
                          env={**__import__("os").environ, "PYTHONPATH": str(root / "src")})
    assert proc.returncode == 0, proc.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["runs"]
    assert (tmp_path / "runs" / "ddp_train" / "checkpoint.pt").is_file()
    ignored = subprocess.run(["git", "check-ignore", "-q", "runs/ddp_train/checkpoint.pt"],
                             cwd=root)
    assert ignored.returncode == 0
