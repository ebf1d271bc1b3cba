"""Multi-process scenarios for the ShardedMSAM (FSDP2) tests; no tests here, only workers.

``spawn(out_dir)`` starts ``WORLD`` processes ("spawn" start method) that join a gloo group on
127.0.0.1 (free port, collective timeout ``PG_TIMEOUT_S``), run every scenario of
``SCENARIOS`` in order and write their results to ``out_dir/rank{r}.pt``; the parent waits at
most ``JOIN_TIMEOUT_S`` and kills what is left, so a hang fails the test instead of blocking.
"""

from __future__ import annotations

import datetime
import time
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from _ranks import run_ranks  # tests/ is on sys.path in the spawned workers too

WORLD = 2
PG_TIMEOUT_S = 30
JOIN_TIMEOUT_S = 150
N_GLOBAL = 16


def _entry(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    out = Path(out_dir) / f"rank{rank}.pt"
    try:
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
            timeout=datetime.timedelta(seconds=PG_TIMEOUT_S),
        )
        results: dict[str, Any] = {}
        try:
            for name, fn in SCENARIOS.items():
                t0 = time.perf_counter()
                results[name] = fn(rank, world, Path(out_dir))
                results[name + "_s"] = time.perf_counter() - t0
        finally:
            dist.destroy_process_group()
        torch.save(results, out)
    except BaseException:  # noqa: BLE001 - reported to the parent
        torch.save({"__error__": traceback.format_exc()}, out)
        raise SystemExit(1) from None


def spawn(out_dir: Path, world: int = WORLD, timeout: float = JOIN_TIMEOUT_S) -> list[dict]:
    return run_ranks(_entry, lambda r, port: (r, world, port, str(out_dir)), out_dir, world,
                     timeout)


# -- models and data --------------------------------------------------------------------------


class _Net(nn.Module):
    """Odd sizes so that the shards are uneven (5 rows -> 3 + 2, 3 rows -> 2 + 1)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 5)
        self.norm = nn.LayerNorm(5)
        self.fc2 = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.norm(torch.tanh(self.fc1(x))))


def _net(seed: int, dtype: torch.dtype = torch.float64) -> nn.Module:
    torch.manual_seed(seed)
    return _Net().to(dtype)


def _sharded(seed: int, dtype: torch.dtype = torch.float64, mp_policy: Any = None) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    model = _net(seed, dtype)
    kw = {} if mp_policy is None else {"mp_policy": mp_policy}
    fully_shard(model.fc1, **kw)
    fully_shard(model.fc2, **kw)
    fully_shard(model, **kw)
    return model


def _global_batch(step: int, dtype: torch.dtype = torch.float64) -> tuple:
    g = torch.Generator().manual_seed(1000 + step)
    return (torch.randn(N_GLOBAL, 6, generator=g, dtype=dtype),
            torch.randint(0, 3, (N_GLOBAL,), generator=g))


def _local(batch: tuple, rank: int, world: int) -> tuple:
    return tuple(torch.tensor_split(t, world)[rank] for t in batch)


def _union_order(batch: tuple, world: int, m: int) -> tuple:
    """The global batch reordered so that its j-th of m blocks is the union over ranks of each
    rank's j-th local micro-batch (the membership ShardedMSAM uses)."""
    out = []
    for t in batch:
        per_rank = [torch.tensor_split(s, m) for s in torch.tensor_split(t, world)]
        out.append(torch.cat([per_rank[r][j] for j in range(m) for r in range(world)]))
    return tuple(out)


def _ce(f, b):
    return nn.functional.cross_entropy(f(b[0]), b[1])


BASES = {
    "sgd": (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4}),
    "adamw": (torch.optim.AdamW, {"lr": 1e-2, "weight_decay": 0.01}),
}


def _full(model: nn.Module) -> list[torch.Tensor]:
    return [p.full_tensor().detach() for p in model.parameters()]


def _locals(model: nn.Module, opt: Any, grads: bool = True) -> list[torch.Tensor]:
    """Every local shard: parameters, gradients, base-optimizer state (in a fixed order)."""
    out = []
    for p in model.parameters():
        out.append(p.to_local().detach().clone())
        if grads:
            out.append(torch.tensor([]) if p.grad is None else p.grad.to_local().clone())
        for _k, v in sorted(opt.base_optimizer.state.get(p, {}).items()):
            out.append(v.to_local().clone() if hasattr(v, "to_local") else torch.as_tensor(v))
    return out


def _bitwise(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(x.shape == y.shape and torch.equal(x, y)
                                    for x, y in zip(a, b))


# -- scenarios --------------------------------------------------------------------------------


def _equivalence(rank: int, world: int, base: str, m: int, rule: str = "sam",
                 clip: float | None = None, steps: int = 3) -> dict:
    from msam.distributed import ShardedMSAM

    from reference import VariantReference, reference_msam_grad

    cls, kw = BASES[base]
    rho = 0.1
    model = _sharded(0)
    opt = ShardedMSAM(model, cls, rho=rho, micro_batches=m, adaptive=(rule == "asam"),
                      max_grad_norm=clip, **({"rule": rule} if rule == "gcsam" else {}), **kw)
    ref = _net(0)
    ref_opt = cls(ref.parameters(), **kw)
    diffs, grad_diff, counts = [], None, []
    for step in range(steps):
        batch = _global_batch(step)
        before = dict(opt.comm_counts)

        def loss_fn(b):
            return nn.functional.cross_entropy(model(b[0]), b[1])

        opt.step(loss_fn, _local(batch, rank, world))
        counts.append({k: opt.comm_counts[k] - before[k] for k in before})
        if rule == "gcsam":  # the paper's equations (tests/reference.py)
            grads, _ = VariantReference("gcsam", rho).grad_and_loss(
                ref, _union_order(batch, world, m), m)
        else:
            grads, _ = reference_msam_grad(ref, _ce, _union_order(batch, world, m), m, rho,
                                           adaptive=(rule == "asam"))
        for n, p in ref.named_parameters():
            p.grad = grads[n].clone()
        if step == 0:
            got = [p.grad.full_tensor() for p in model.parameters()]
            if clip is None:
                grad_diff = max(float((a - grads[n]).abs().max())
                                for a, (n, _) in zip(got, ref.named_parameters()))
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(ref.parameters(), clip)
        ref_opt.step()
        diffs.append(max(float((a - b.detach()).abs().max())
                         for a, b in zip(_full(model), ref.parameters())))
    shapes = [tuple(p.to_local().shape) for p in model.parameters()]
    return {"param_diff": diffs, "grad_diff": grad_diff, "counts": counts, "shapes": shapes,
            "moved": max(float((a - b.detach()).abs().max())
                         for a, b in zip(_full(model), _net(0).parameters()))}


def scenario_equivalence(rank: int, world: int, out: Path) -> dict:
    return {
        "sam_sgd": _equivalence(rank, world, "sgd", 1),
        "sam_adamw": _equivalence(rank, world, "adamw", 1),
        "msam_sgd": _equivalence(rank, world, "sgd", 4),
        "msam_adamw": _equivalence(rank, world, "adamw", 4),
        "asam_adamw": _equivalence(rank, world, "adamw", 2, rule="asam"),
        "gcsam_adamw": _equivalence(rank, world, "adamw", 2, rule="gcsam"),
        "clip_sgd": _equivalence(rank, world, "sgd", 2, clip=0.05),
    }


def scenario_accumulate(rank: int, world: int, out: Path) -> dict:
    """accumulate() over 2 loader batches (scale 1/2) then step() = the reference's average."""
    from msam.distributed import ShardedMSAM

    from reference import reference_msam_grad

    cls, kw = BASES["sgd"]
    m, rho = 2, 0.1
    model = _sharded(0)
    opt = ShardedMSAM(model, cls, rho=rho, micro_batches=m, **kw)
    ref = _net(0)
    ref_opt = cls(ref.parameters(), **kw)
    diffs = []
    for step in range(2):
        batches = [_global_batch(10 + 2 * step + k) for k in range(2)]
        for b in batches:
            opt.accumulate(lambda mb: nn.functional.cross_entropy(model(mb[0]), mb[1]),
                           _local(b, rank, world), scale=0.5)
        opt.step()
        total = None
        for b in batches:
            g, _ = reference_msam_grad(ref, _ce, _union_order(b, world, m), m, rho)
            total = g if total is None else {k: total[k] + g[k] for k in g}
        for n, p in ref.named_parameters():
            p.grad = total[n] / 2
        ref_opt.step()
        diffs.append(max(float((a - b.detach()).abs().max())
                         for a, b in zip(_full(model), ref.parameters())))
    return {"param_diff": diffs}


def scenario_resume(rank: int, world: int, out: Path) -> dict:
    from msam.distributed import ShardedMSAM, load_sharded_checkpoint, save_sharded_checkpoint

    cls, kw = BASES["adamw"]

    def build(seed: int) -> tuple[nn.Module, Any]:
        model = _sharded(seed)
        return model, ShardedMSAM(model, cls, rho=0.1, micro_batches=2, max_grad_norm=1.0,
                                  **kw)

    def run(model: nn.Module, opt: Any, steps: range) -> None:
        for s in steps:
            opt.step(lambda b: nn.functional.cross_entropy(model(b[0]), b[1]),
                     _local(_global_batch(s), rank, world))

    model, opt = build(0)
    run(model, opt, range(3))
    ckpt = out / "ckpt"
    save_sharded_checkpoint(ckpt, model, opt, extra={"step": 3})
    run(model, opt, range(3, 6))
    straight = _locals(model, opt)
    model2, opt2 = build(7)  # other initial weights: everything must come from the file
    extra = load_sharded_checkpoint(ckpt, model2, opt2)
    run(model2, opt2, range(3, 6))
    resumed = _locals(model2, opt2)
    return {"bitwise": _bitwise(straight, resumed), "n_tensors": len(straight),
            "extra": extra, "steps": (opt.steps, opt2.steps)}


def scenario_faults(rank: int, world: int, out: Path) -> dict:
    from msam.distributed import ShardedMSAM

    cls, kw = BASES["sgd"]
    m = 4
    results: dict[str, Any] = {}

    def make_loss(model: nn.Module, plant: dict | None):
        calls: dict[int, int] = {}

        def loss_fn(b):
            j = int(b[2][0])
            calls[j] = calls.get(j, 0) + 1
            loss = nn.functional.cross_entropy(model(b[0]), b[1])
            if plant and rank == plant["rank"] and j == 2 and calls[j] == plant["call"]:
                if plant["kind"] == "raise":
                    raise ValueError(f"boom on rank {rank}")
                return loss * float("nan")
            return loss
        return loss_fn

    def batch(s: int) -> tuple:
        x, y = _local(_global_batch(s), rank, world)
        ids = torch.arange(x.shape[0]) // (x.shape[0] // m)  # local micro-batch index
        return x, y, ids

    for name, plant, nonfinite in [
        ("raise_ascent", {"rank": 1, "kind": "raise", "call": 1}, "raise"),
        ("raise_perturbed", {"rank": 0, "kind": "raise", "call": 2}, "raise"),
        ("nan_skip", {"rank": 0, "kind": "nan", "call": 2}, "skip"),
        ("nan_raise", {"rank": 1, "kind": "nan", "call": 1}, "raise"),
    ]:
        model = _sharded(0)
        opt = ShardedMSAM(model, cls, rho=0.1, micro_batches=m, nonfinite=nonfinite, **kw)
        control = _sharded(0)
        copt = ShardedMSAM(control, cls, rho=0.1, micro_batches=m, **kw)
        for mdl, o in ((model, opt), (control, copt)):
            o.step(make_loss(mdl, None), batch(0))
        snap = _locals(model, opt, grads=False)
        try:
            opt.step(make_loss(model, plant), batch(1))
            outcome = "ok"
        except Exception as err:  # noqa: BLE001 - recorded
            outcome = f"{type(err).__name__}: {err}"
        # weights and optimizer state as before; .grad dropped (ShardedMSAM frees it first)
        unchanged = _bitwise(snap, _locals(model, opt, grads=False)) and all(
            p.grad is None for p in model.parameters())
        # carry on: the next step equals the control run's next step, bit for bit
        for mdl, o in ((model, opt), (control, copt)):
            o.step(make_loss(mdl, None), batch(2))
        results[name] = {"outcome": outcome, "unchanged": unchanged,
                         "recovery": _bitwise(_locals(model, opt), _locals(control, copt)),
                         "skipped": opt.skipped_steps}
    return results


def scenario_mixed_precision(rank: int, world: int, out: Path) -> dict:
    from torch.distributed.fsdp import MixedPrecisionPolicy

    from msam.distributed import ShardedMSAM

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    model = _sharded(0, torch.float32, policy)
    opt = ShardedMSAM(model, torch.optim.SGD, rho=0.1, micro_batches=2, lr=0.1, momentum=0.9)
    ref = _net(0, torch.float32)
    ref_opt = __import__("msam").MSAM(ref.parameters(), torch.optim.SGD, rho=0.1,
                                      micro_batches=2, lr=0.1, momentum=0.9)
    dtypes = set()
    for s in range(2):
        batch = _global_batch(s, torch.float32)
        opt.step(lambda b: nn.functional.cross_entropy(model(b[0]).float(), b[1]),
                 _local(batch, rank, world))
        ref_opt.step(lambda b: nn.functional.cross_entropy(ref(b[0]), b[1]),
                     _union_order(batch, world, 2))
    dtypes |= {str(p.dtype) for p in model.parameters()}
    dtypes |= {str(p.grad.dtype) for p in model.parameters()}
    diff = max(float((a - b.detach()).abs().max())
               for a, b in zip(_full(model), ref.parameters()))
    moved = max(float((a - b.detach()).abs().max())
                for a, b in zip(_full(model), _net(0, torch.float32).parameters()))
    return {"dtypes": sorted(dtypes), "diff_vs_fp32": diff, "moved": moved}


def scenario_errors(rank: int, world: int, out: Path) -> dict:
    from msam.distributed import DistributedMSAM, ShardedMSAM

    model = _sharded(0)
    res = {}

    def catch(fn) -> str:
        try:
            fn()
        except Exception as err:  # noqa: BLE001 - recorded
            return f"{type(err).__name__}: {err}"
        return "no error"

    res["ddp_class"] = catch(lambda: DistributedMSAM(model, None, torch.optim.SGD, lr=0.1))
    res["gsam"] = catch(lambda: ShardedMSAM(model, torch.optim.SGD, rule="gsam", lr=0.1))
    res["vmap"] = catch(lambda: ShardedMSAM(model, torch.optim.SGD, strategy="vmap", lr=0.1))
    res["plain"] = catch(lambda: ShardedMSAM(_net(0), torch.optim.SGD, lr=0.1))

    def bn_model():
        from torch.distributed.fsdp import fully_shard

        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)).double()
        fully_shard(net)
        return ShardedMSAM(net, torch.optim.SGD, lr=0.1)

    res["batchnorm"] = catch(bn_model)
    opt = ShardedMSAM(model, torch.optim.SGD, lr=0.1)
    res["scaler"] = catch(lambda: opt.step(lambda b: model(b).sum(), torch.ones(2, 6,
                          dtype=torch.float64), scaler=object()))
    res["two_step"] = catch(lambda: opt.first_step())
    return res


SCENARIOS = {
    "equivalence": scenario_equivalence,
    "accumulate": scenario_accumulate,
    "resume": scenario_resume,
    "faults": scenario_faults,
    "mixed_precision": scenario_mixed_precision,
    "errors": scenario_errors,
}
