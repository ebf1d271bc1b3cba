"""msam.distributed in one process: validation, wrapper detection, checkpoint files.

The multi-rank behaviour is in ``tests/distributed/test_ddp.py``; here a one-rank gloo group (an
in-memory store, no sockets) is enough to build DDP and FSDP wrappers.
"""

from __future__ import annotations

import os
import random
import warnings

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import msam
from msam.distributed import (
    CheckpointError,
    DistributedMSAM,
    UnsupportedWrapperError,
    average_batchnorm_buffers,
    ddp_kwargs,
    load_checkpoint,
    save_checkpoint,
)


@pytest.fixture
def group():
    """A one-rank gloo process group for the duration of one test."""
    assert not dist.is_initialized()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _net(bn: bool = True, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    layers = [nn.Linear(4, 8)] + ([nn.BatchNorm1d(8)] if bn else []) + [nn.ReLU(), nn.Linear(8, 3)]
    return nn.Sequential(*layers)


def _batch(seed: int = 0, n: int = 12):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g)


def _loss(model):
    return lambda b: nn.functional.cross_entropy(model(b[0]), b[1])


# -- wrappers -----------------------------------------------------------------------------------


def test_fsdp_rejected(group):
    from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapped = FullyShardedDataParallel(_net(bn=False), device_id=torch.device("cpu"))
    with pytest.raises(UnsupportedWrapperError, match="FSDP is not supported.*DistributedData"):
        DistributedMSAM(wrapped, None, torch.optim.SGD, lr=0.1)
    sharded = _net(bn=False)
    fully_shard(sharded)
    with pytest.raises(UnsupportedWrapperError, match="FSDP is not supported"):
        DistributedMSAM(sharded, None, torch.optim.SGD, lr=0.1)


def test_other_wrappers_rejected(group):
    with pytest.raises(UnsupportedWrapperError, match="DataParallel is not supported"):
        DistributedMSAM(nn.DataParallel(_net()), None, torch.optim.SGD, lr=0.1)
    with pytest.raises(UnsupportedWrapperError, match="static_graph"):
        DistributedMSAM(DDP(_net(), static_graph=True, **ddp_kwargs()), None, torch.optim.SGD,
                        lr=0.1)
    inner = nn.Sequential(DDP(_net(), **ddp_kwargs()))
    with pytest.raises(UnsupportedWrapperError, match="nested DistributedDataParallel"):
        DistributedMSAM(DDP(inner, **ddp_kwargs()), None, torch.optim.SGD, lr=0.1)
    with pytest.raises(UnsupportedWrapperError, match="must be a DistributedDataParallel"):
        DistributedMSAM("model", None, torch.optim.SGD, lr=0.1)


def test_buffer_broadcast_with_batchnorm_rejected(group):
    with pytest.raises(ValueError, match="forward_sync_buffers=False"):
        DistributedMSAM(DDP(_net(bn=True)), None, torch.optim.SGD, lr=0.1)
    # no BatchNorm: DDP's buffer broadcast is harmless and allowed
    DistributedMSAM(DDP(_net(bn=False)), None, torch.optim.SGD, lr=0.1)


def test_syncbatchnorm_needs_cuda(group):
    model = nn.SyncBatchNorm.convert_sync_batchnorm(_net(bn=True))
    # torch's own DDP refuses SyncBatchNorm on CPU; msam says so for the unwrapped module too
    with pytest.raises(ValueError, match="SyncBatchNorm"):
        DDP(model, **ddp_kwargs())
    with pytest.raises(ValueError, match="SyncBatchNorm.*CUDA"):
        DistributedMSAM(model, None, torch.optim.SGD, lr=0.1)


def test_argument_validation(group):
    ddp = DDP(_net(), **ddp_kwargs())
    with pytest.raises(ValueError, match="local micro_batches must be 1"):
        DistributedMSAM(ddp, None, torch.optim.SGD, mode="synchronized", micro_batches=2, lr=0.1)
    with pytest.raises(ValueError, match="mode must be one of"):
        DistributedMSAM(ddp, None, torch.optim.SGD, mode="global", lr=0.1)
    with pytest.raises(ValueError, match="'loop' only"):
        DistributedMSAM(ddp, None, torch.optim.SGD, strategy="vmap", lr=0.1)
    with pytest.raises(ValueError, match="do not belong to the model"):
        DistributedMSAM(ddp, [nn.Parameter(torch.zeros(2))], torch.optim.SGD, lr=0.1)
    opt = DistributedMSAM(ddp, None, torch.optim.SGD, micro_batches=3, lr=0.1)
    assert opt.global_micro_batches == 3 and opt.world_size == 1
    with ddp.no_sync(), pytest.raises(RuntimeError, match="inside ddp.no_sync"):
        opt.step(_loss(ddp), _batch())
    with pytest.raises(RuntimeError, match="did not call the DistributedDataParallel model"):
        opt.step(_loss(ddp.module), _batch())
    before = [p.detach().clone() for p in ddp.parameters()]
    opt.step(_loss(ddp), _batch())  # still usable, and the failed call changed nothing
    assert opt.steps == 1 and not all(
        torch.equal(a, b) for a, b in zip(before, ddp.parameters()))


def test_check_errors_false_refuses_to_go_on_after_a_failure(group):
    """Core v3 case 2: with check_errors=False a failed step used to be followed by more steps
    whose collectives no longer pair with the other ranks'; the failed rank now refuses."""
    ddp = DDP(_net(), **ddp_kwargs())
    opt = DistributedMSAM(ddp, None, torch.optim.SGD, micro_batches=2, check_errors=False,
                          lr=0.1)

    def boom(b):
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        opt.step(boom, _batch())
    with pytest.raises(RuntimeError, match="check_errors=False.*out of step"):
        opt.step(_loss(ddp), _batch())
    with pytest.raises(RuntimeError, match="out of step"):
        opt.accumulate(_loss(ddp), _batch())
    # check_errors=True (the default): the same failure leaves the optimizer usable
    ok = DistributedMSAM(DDP(_net(), **ddp_kwargs()), None, torch.optim.SGD, micro_batches=2,
                         lr=0.1)
    with pytest.raises(ValueError, match="boom"):
        ok.step(boom, _batch())
    ok.step(_loss(ok.ddp), _batch())


# -- one rank behaves like MSAM -----------------------------------------------------------------


@pytest.mark.parametrize("wrap", ["ddp", "plain"])
def test_one_rank_equals_msam(request, wrap):
    if wrap == "ddp":
        request.getfixturevalue("group")
    model, ref = _net(seed=1), _net(seed=1)
    runner = DDP(model, **ddp_kwargs()) if wrap == "ddp" else model
    opt = DistributedMSAM(runner, None, torch.optim.SGD, rho=0.1, micro_batches=3, lr=0.1,
                          momentum=0.9)
    ref_opt = msam.MSAM(ref.parameters(), torch.optim.SGD, rho=0.1, micro_batches=3, lr=0.1,
                        momentum=0.9)
    for s in range(3):
        opt.step(_loss(runner), _batch(s))
        ref_opt.step(_loss(ref), _batch(s))
    for a, b in zip(model.state_dict().values(), ref.state_dict().values()):
        assert torch.equal(a, b)
    assert average_batchnorm_buffers(runner) == 1


# -- checkpoints --------------------------------------------------------------------------------


def _trained(seed: int = 2):
    model = _net(seed=seed)
    opt = DistributedMSAM(model, None, torch.optim.SGD, rho=0.1, micro_batches=2, lr=0.1,
                          momentum=0.9)
    opt.step(_loss(model), _batch(seed))
    return model, opt


def test_checkpoint_roundtrip_restores_rng(tmp_path):
    model, opt = _trained()
    path = tmp_path / "ck.pt"
    torch.manual_seed(5)
    random.seed(5)
    np.random.seed(5)
    save_checkpoint(path, model, opt, extra={"step": 1, "note": "x"})
    expect = (torch.rand(3), random.random(), np.random.rand())
    model2, opt2 = _trained(seed=3)
    torch.manual_seed(0)
    extra = load_checkpoint(path, model2, opt2)
    assert extra == {"step": 1, "note": "x"}
    assert torch.equal(torch.rand(3), expect[0])
    assert random.random() == expect[1] and np.random.rand() == expect[2]
    for a, b in zip(model.state_dict().values(), model2.state_dict().values()):
        assert torch.equal(a, b)
    assert opt2.steps == 1
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]


def test_failed_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    model, opt = _trained()
    path = tmp_path / "ck.pt"
    save_checkpoint(path, model, opt, extra={"step": 1})
    before = path.read_bytes()

    def broken_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr("msam.distributed.checkpoint.torch.save", broken_save)
    with pytest.raises(CheckpointError, match="disk full.*previous checkpoint"):
        save_checkpoint(path, model, opt, extra={"step": 2})
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["ck.pt"]


def test_load_rejects_foreign_file_and_warns_on_other_world_size(tmp_path):
    model, opt = _trained()
    other = tmp_path / "other.pt"
    torch.save({"weights": 1}, other)
    with pytest.raises(CheckpointError, match="not a msam.distributed checkpoint"):
        load_checkpoint(other, model, opt)
    path = tmp_path / "ck.pt"
    save_checkpoint(path, model, opt)
    payload = torch.load(path, weights_only=True)
    payload["world_size"], payload["ranks"] = 2, payload["ranks"] * 2
    torch.save(payload, path)
    with pytest.warns(UserWarning, match="written by 2 ranks, this run has 1"):
        load_checkpoint(path, model, opt)
