"""ShardedMSAM (FSDP2 fully_shard) on 2 CPU ranks (gloo), float64: equivalence with an
independent single-process reference, communication counts, DCP resume, faults, bf16.

One 2-process launch (torch.multiprocessing "spawn") runs every scenario of
``_fsdp_workers.py``; a 30 s collective timeout and a 150 s join deadline bound it, so a hang
fails the test. The reference is ``tests/reference.py`` (the mSAM equations with
``functional_call``) on the global batch reordered so that its j-th micro-batch is the union
of the ranks' j-th local micro-batches, followed by a plain torch optimizer step.
"""

from __future__ import annotations

import pytest

from _fsdp_workers import spawn

TOL = 1e-10


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return spawn(tmp_path_factory.mktemp("fsdp"))


@pytest.mark.parametrize("name,m", [("sam_sgd", 1), ("sam_adamw", 1), ("msam_sgd", 4),
                                    ("msam_adamw", 4), ("asam_adamw", 2), ("gcsam_adamw", 2),
                                    ("clip_sgd", 2)])
def test_sharded_equals_single_process_reference(ranks, name, m):
    for r in ranks:
        res = r["equivalence"][name]
        assert len(res["param_diff"]) == 3
        assert max(res["param_diff"]) < TOL, res["param_diff"]
        if res["grad_diff"] is not None:  # the first step's averaged gradient itself
            assert res["grad_diff"] < TOL
        assert res["moved"] > 1e-3  # the steps did something
        # one scalar norm all-reduce per micro-batch, one flag agreement per forward + 1
        for c in res["counts"]:
            assert c["norm_allreduce"] == m
            assert c["error_check"] == 2 * m + 1
            assert c["clip_allreduce"] == (1 if name.startswith("clip") else 0)
    # uneven shards: fc1 has 5 rows (3 + 2), fc2 3 rows (2 + 1)
    assert ranks[0]["equivalence"][name]["shapes"] != ranks[1]["equivalence"][name]["shapes"]


def test_accumulate_then_step_equals_reference(ranks):
    for r in ranks:
        assert max(r["accumulate"]["param_diff"]) < TOL, r["accumulate"]


def test_resume_is_bit_identical(ranks):
    for r in ranks:
        res = r["resume"]
        assert res["bitwise"], res
        assert res["n_tensors"] >= 24
        assert res["steps"] == (6, 6)
        assert res["extra"] == {"step": 3}


@pytest.mark.parametrize("name,failing,message", [
    ("raise_ascent", 1, "ValueError: boom on rank 1"),
    ("raise_perturbed", 0, "ValueError: boom on rank 0"),
])
def test_failing_micro_batch_restores_every_shard_and_raises_everywhere(ranks, name, failing,
                                                                        message):
    for rank, r in enumerate(ranks):
        res = r["faults"][name]
        if rank == failing:
            assert res["outcome"] == message, res
        else:
            assert res["outcome"].startswith("DistributedStepError:"), res
            assert f"rank {failing}: {message}" in res["outcome"]
        assert res["unchanged"], res      # params, optimizer state: bit-identical
        assert res["recovery"], res       # and the next step equals an undisturbed run's


def test_nonfinite_is_agreed(ranks):
    for r in ranks:
        res = r["faults"]["nan_skip"]
        assert res["outcome"] == "ok" and res["skipped"] == 1
        assert res["unchanged"] and res["recovery"]
    own, other = ranks[1]["faults"]["nan_raise"], ranks[0]["faults"]["nan_raise"]
    assert own["outcome"].startswith("NonFiniteLossError:")
    assert other["outcome"].startswith("RemoteNonFiniteError:") and "rank 1" in other["outcome"]
    assert own["unchanged"] and other["unchanged"]


def test_bf16_compute_fp32_shards(ranks):
    for r in ranks:
        res = r["mixed_precision"]
        assert res["dtypes"] == ["torch.float32"]      # shards and their gradients stay fp32
        assert res["moved"] > 1e-2
        assert res["diff_vs_fp32"] < 5e-3, res         # close to fp32 single-process mSAM


@pytest.mark.parametrize("key,match", [
    ("ddp_class", "use msam.distributed.ShardedMSAM"),
    ("gsam", "'gsam' is not supported by ShardedMSAM"),
    ("vmap", "supports 'loop' only"),
    ("plain", "not an FSDP2 module"),
    ("batchnorm", "BatchNorm ('1') is not supported by ShardedMSAM"),
    ("scaler", "GradScaler is not supported"),
    ("two_step", "two-step API"),
])
def test_unsupported_combinations_are_clear_errors(ranks, key, match):
    assert match in ranks[0]["errors"][key], ranks[0]["errors"][key]
