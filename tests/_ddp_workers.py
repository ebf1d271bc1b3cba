"""Multi-process scenarios for the msam.distributed tests (no tests here, only workers).

``spawn(name, out_dir)`` starts ``WORLD`` processes with the "spawn" start method; each joins a
gloo process group on 127.0.0.1 (free port, collective timeout ``PG_TIMEOUT_S``), runs
``SCENARIOS[name]`` and writes its result to ``out_dir/rank{r}.pt``. The parent waits at most
``JOIN_TIMEOUT_S`` and kills whatever is left, so a hang fails the test.
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
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel as DDP

import msam
from _ranks import run_ranks  # tests/ is on sys.path in the spawned workers too
from msam.distributed import (
    DistributedMSAM,
    UnsupportedWrapperError,
    average_batchnorm_buffers,
    ddp_kwargs,
    load_checkpoint,
    save_checkpoint,
)

from reference import (  # noqa: E402 - tests/ is on sys.path in the spawned workers too
    VariantReference,
    reference_linear_bn_running_stats,
    reference_msam_grad,
    reference_msam_grad_bn,
)

WORLD = 2
PG_TIMEOUT_S = 30
JOIN_TIMEOUT_S = 120

# -- harness ----------------------------------------------------------------------------------


def _entry(rank: int, world: int, port: int, name: str, out_dir: str, kwargs: dict) -> None:
    torch.set_num_threads(1)
    out = Path(out_dir) / f"rank{rank}.pt"
    try:
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
            timeout=datetime.timedelta(seconds=PG_TIMEOUT_S),
        )
        try:
            result = SCENARIOS[name](rank, world, Path(out_dir), **kwargs)
        finally:
            dist.destroy_process_group()
        torch.save(result, out)
    except BaseException:  # noqa: BLE001 - reported to the parent
        torch.save({"__error__": traceback.format_exc()}, out)
        raise SystemExit(1) from None


def spawn(name: str, out_dir: Path, world: int = WORLD, timeout: float = JOIN_TIMEOUT_S,
          **kwargs: Any) -> list[dict]:
    """Run scenario ``name`` on ``world`` ranks; returns each rank's result dict."""
    return run_ranks(_entry, lambda r, port: (r, world, port, name, str(out_dir), kwargs),
                     out_dir, world, timeout, label=f"scenario {name!r}")


# -- models and data --------------------------------------------------------------------------

N_GLOBAL = 16


def _mlp(seed: int, bn: bool = False, dropout: float = 0.0, unused: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Linear(6, 16)]
    if bn:
        layers.append(nn.BatchNorm1d(16))
    layers.append(nn.Tanh())
    if dropout:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(16, 3))
    model: nn.Module = nn.Sequential(*layers)
    if unused:
        model = _WithUnused(model)
    return model.double()


class _WithUnused(nn.Module):
    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body
        self.unused = nn.Linear(2, 2)  # a parameter no forward uses

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def _global_batch(step: int, n: int = N_GLOBAL) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return (torch.randn(n, 6, generator=g, dtype=torch.float64),
            torch.randint(0, 3, (n,), generator=g))


def _shard(batch: tuple, rank: int, world: int) -> tuple:
    """Rank ``rank``'s contiguous shard of the global batch."""
    return tuple(torch.tensor_split(t, world)[rank] for t in batch)


def _loss_fn(model: nn.Module):
    def loss_fn(b):
        return nn.functional.cross_entropy(model(b[0]), b[1])
    return loss_fn


BASES = {
    "sgd": (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4}),
    "adamw": (torch.optim.AdamW, {"lr": 1e-2, "weight_decay": 0.01}),
}


def _ddp(model: nn.Module, counter: list[int] | None = None, **kw: Any) -> DDP:
    ddp = DDP(model, bucket_cap_mb=1000, **{**ddp_kwargs(), **kw})
    if counter is not None:
        def counting_hook(state, bucket):
            counter[0] += 1
            return allreduce_hook(state, bucket)
        ddp.register_comm_hook(None, counting_hook)
    return ddp


def _max_diff(a: nn.Module, b: nn.Module) -> float:
    return max(float((p - q).detach().abs().max())
               for p, q in zip(a.parameters(), b.parameters()))


def _bn_diff(a: nn.Module, b: nn.Module) -> float:
    out = 0.0
    for (_, x), (_, y) in zip(a.named_buffers(), b.named_buffers()):
        out = max(out, float((x.double() - y.double()).abs().max()))
    return out


# -- scenario: equivalence and communication counts --------------------------------------------


def _reference_step(ref: nn.Module, ref_opt: torch.optim.Optimizer, batch: tuple, m: int,
                    rho: float, bn: bool, loss_scale: float = 1.0) -> dict:
    """One step of the independent reference (tests/reference.py) on the global batch."""
    def loss_of(f, b):
        return nn.functional.cross_entropy(f(b[0]), b[1]) * loss_scale

    if bn:
        grads = reference_msam_grad_bn(ref, loss_of, batch, m, rho)
    else:
        grads, _ = reference_msam_grad(ref, loss_of, batch, m, rho)
    for n, p in ref.named_parameters():
        p.grad = grads[n].clone()
    ref_opt.step()
    return grads


def _local_vs_single(rank: int, world: int, base: str, steps: int = 3) -> dict:
    cls, kw = BASES[base]
    model = _mlp(0, bn=True)
    counter = [0]
    ddp = _ddp(model, counter)
    opt = DistributedMSAM(ddp, None, cls, rho=0.1, micro_batches=2, **kw)
    ref = _mlp(0, bn=True)
    ref_opt = cls(ref.parameters(), **kw)
    mean, var = ref[1].running_mean.clone(), ref[1].running_var.clone()
    diffs, calls = [], []
    for s in range(steps):
        batch = _global_batch(s)
        before = counter[0]
        opt.step(_loss_fn(ddp), _shard(batch, rank, world))
        calls.append(counter[0] - before)
        mean, var = reference_linear_bn_running_stats(
            ref[0].weight.detach(), ref[0].bias.detach(), batch[0], 2 * world, mean, var,
            ref[1].momentum, s)
        _reference_step(ref, ref_opt, batch, 2 * world, 0.1, bn=True)
        diffs.append(_max_diff(model, ref))
    # per-rank statistics differ; their average is the single-process statistics
    running = model[1].running_mean.clone()
    gathered = [torch.zeros_like(running) for _ in range(world)]
    dist.all_gather(gathered, running)
    spread = float((gathered[0] - gathered[1]).abs().max())
    average_batchnorm_buffers(ddp)
    bn_diff = max(float((model[1].running_mean - mean).abs().max()),
                  float((model[1].running_var - var).abs().max()))
    return {
        "param_diff": diffs, "hook_calls_per_step": calls, "bn_diff": bn_diff,
        "bn_rank_spread": spread, "comm_counts": dict(opt.comm_counts),
        "global_micro_batches": opt.global_micro_batches,
        "params": [p.detach().clone() for p in model.parameters()],
    }


def _synchronized(rank: int, world: int, steps: int = 3) -> dict:
    cls, kw = BASES["sgd"]
    model = _mlp(1)
    counter = [0]
    ddp = _ddp(model, counter)
    opt = DistributedMSAM(ddp, None, cls, rho=0.1, mode="synchronized", **kw)
    ref = _mlp(1)
    ref_opt = cls(ref.parameters(), **kw)
    loc = _mlp(1)
    loc_ddp = _ddp(loc)
    loc_opt = DistributedMSAM(loc_ddp, None, cls, rho=0.1, **kw)
    diffs, calls, ascent = [], [], []
    for s in range(steps):
        batch = _global_batch(s)
        before, before_a = counter[0], opt.comm_counts["ascent_allreduce"]
        opt.step(_loss_fn(ddp), _shard(batch, rank, world))
        calls.append(counter[0] - before)
        ascent.append(opt.comm_counts["ascent_allreduce"] - before_a)
        _reference_step(ref, ref_opt, batch, 1, 0.1, bn=False)
        loc_opt.step(_loss_fn(loc_ddp), _shard(batch, rank, world))
        diffs.append(_max_diff(model, ref))
    # Gradients as small as the perturbation's epsilon: the ascent all-reduce must average
    # (a sum gives the same direction, so only the epsilon can tell them apart).
    tiny = _mlp(1)
    tiny_ddp = _ddp(tiny)
    tiny_opt = DistributedMSAM(tiny_ddp, None, torch.optim.SGD, rho=0.1, mode="synchronized",
                               lr=0.0)
    tiny_ref = _mlp(1)
    batch = _global_batch(0)
    tiny_opt.step(lambda b: _loss_fn(tiny_ddp)(b) * 1e-12, _shard(batch, rank, world))
    grads = _reference_step(tiny_ref, torch.optim.SGD(tiny_ref.parameters(), lr=0.0), batch, 1,
                            0.1, bn=False, loss_scale=1e-12)
    top = max(float(g.abs().max()) for g in grads.values())
    tiny_err = max(float((p.grad - grads[n]).abs().max()) / top
                   for n, p in tiny.named_parameters())
    return {"param_diff": diffs, "hook_calls_per_step": calls, "ascent_allreduce_per_step": ascent,
            "local_vs_sam": _max_diff(loc, ref), "tiny_grad_rel_err": tiny_err}


def _accumulate(rank: int, world: int, steps: int = 2, k: int = 3) -> dict:
    cls, kw = BASES["sgd"]
    out = {}
    for variant in ("sync_kw", "no_sync_ctx", "all_unsynced"):
        model = _mlp(2, bn=True)
        counter = [0]
        ddp = _ddp(model, counter)
        opt = DistributedMSAM(ddp, None, cls, rho=0.1, micro_batches=2, **kw)
        ref = _mlp(2, bn=True)
        ref_opt = msam.MSAM(ref.parameters(), cls, rho=0.1, micro_batches=2 * world, **kw)
        diffs, calls, grad_sync = [], [], []
        for s in range(steps):
            before, before_g = counter[0], opt.comm_counts["grad_sync"]
            for i in range(k):
                batch = _global_batch(100 * s + i)
                local = _shard(batch, rank, world)
                last = i == k - 1
                if variant == "sync_kw":
                    opt.accumulate(_loss_fn(ddp), local, scale=1 / k, sync=last)
                elif variant == "no_sync_ctx":
                    if last:
                        opt.accumulate(_loss_fn(ddp), local, scale=1 / k)
                    else:
                        with ddp.no_sync():
                            opt.accumulate(_loss_fn(ddp), local, scale=1 / k)
                else:
                    opt.accumulate(_loss_fn(ddp), local, scale=1 / k, sync=False)
                ref_opt.accumulate(_loss_fn(ref), batch, scale=1 / k)
            opt.step()
            ref_opt.step()
            calls.append(counter[0] - before)
            grad_sync.append(opt.comm_counts["grad_sync"] - before_g)
            diffs.append(_max_diff(model, ref))
        out[variant] = {"param_diff": diffs, "hook_calls_per_step": calls,
                        "grad_sync_per_step": grad_sync}
    return out


def _ddp_variant(rank: int, world: int, steps: int = 3, **ddp_kw: Any) -> dict:
    cls, kw = BASES["sgd"]
    unused = ddp_kw.get("find_unused_parameters", False)
    model = _mlp(3, unused=unused)
    ddp = _ddp(model, **ddp_kw)
    params = [p for n, p in model.named_parameters() if not n.startswith("unused")]
    opt = DistributedMSAM(ddp, params, cls, rho=0.1, micro_batches=2, **kw)
    ref = _mlp(3, unused=unused)
    ref_params = [p for n, p in ref.named_parameters() if not n.startswith("unused")]
    ref_opt = msam.MSAM(ref_params, cls, rho=0.1, micro_batches=2 * world, **kw)
    diffs = []
    for s in range(steps):
        batch = _global_batch(s)
        opt.step(_loss_fn(ddp), _shard(batch, rank, world))
        ref_opt.step(_loss_fn(ref), batch)
        diffs.append(_max_diff(model, ref))
    return {"param_diff": diffs}


#: Rules that combine g_j and h_j (docs/variants.md): (rule, reference kind, hyperparameters).
COMBINING = {
    "gsam": (lambda: msam.core.GSAMRule(alpha=0.3), "gsam", {"alpha": 0.3}),
    "wsam": (lambda: msam.core.WSAMRule(gamma=0.8), "wsam", {"gamma": 0.8}),
    "wsam_coupled": (lambda: msam.core.WSAMRule(gamma=0.8, decoupled=False), "wsam",
                     {"gamma": 0.8, "decoupled": False}),
}


def _combining(rank: int, world: int, steps: int = 3, k: int = 2) -> dict:
    """GSAM / WSAM under DDP: local micro-batches (2 per rank), every rank combining its own,
    against the papers' equations on the global batch with 2 x world micro-batches
    (tests/reference.py). ``accumulate`` runs k calls per step."""
    cls, kw = BASES["sgd"]
    out: dict[str, Any] = {}
    for name, (make, kind, hp) in COMBINING.items():
        for accumulate in (False, True):
            model = _mlp(5)
            counter = [0]
            ddp = _ddp(model, counter)
            opt = DistributedMSAM(ddp, None, cls, rho=0.2, micro_batches=2, rule=make(), **kw)
            ref = _mlp(5)
            ref_opt = cls(ref.parameters(), **kw)
            rule = VariantReference(kind, 0.2, **hp)
            diffs, hooks, syncs = [], [], []
            for s in range(steps):
                before, before_s = counter[0], opt.comm_counts["grad_sync"]
                batches = [_global_batch(10 * s + i) for i in range(k if accumulate else 1)]
                grads: dict[str, torch.Tensor] = {}
                dec: dict[str, torch.Tensor] = {}
                for batch in batches:
                    local = _shard(batch, rank, world)
                    if accumulate:
                        opt.accumulate(_loss_fn(ddp), local, scale=1 / k)
                    g, _ = rule.grad_and_loss(ref, batch, 2 * world)
                    d, rule.decoupled = rule.decoupled, None
                    for n, v in g.items():
                        grads[n] = grads.get(n, 0) + v / len(batches)
                        if d is not None:
                            dec[n] = dec.get(n, 0) + d[n] / len(batches)
                if accumulate:
                    opt.step()
                else:
                    opt.step(_loss_fn(ddp), _shard(batches[0], rank, world))
                for n, p in ref.named_parameters():
                    p.grad = grads[n]
                ref_opt.step()
                rule.decoupled = dec or None
                rule.after_base_step(ref, kw["lr"])
                diffs.append(_max_diff(model, ref))
                hooks.append(counter[0] - before)
                syncs.append(opt.comm_counts["grad_sync"] - before_s)
            out[f"{name}{'_accumulate' if accumulate else ''}"] = {
                "param_diff": diffs, "hook_calls_per_step": hooks, "grad_sync_per_step": syncs,
                "params": [p.detach().clone() for p in model.parameters()]}
    # AMP: a GradScaler (CPU) gives the unscaled steps (float64: to rounding), the rule's
    # combination and WSAM's decoupled part both unscaled.
    for name in ("gsam", "wsam"):
        runs = []
        for scaler in (None, torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)):
            model = _mlp(5)
            ddp = _ddp(model)
            opt = DistributedMSAM(ddp, None, cls, rho=0.2, micro_batches=2, rule=name, **kw)
            for s in range(steps):
                opt.step(_loss_fn(ddp), _shard(_global_batch(s), rank, world), scaler=scaler)
                if scaler is not None:
                    scaler.update()
            runs.append(model)
        out[f"{name}_scaler_diff"] = _max_diff(*runs)
    try:
        DistributedMSAM(_ddp(_mlp(5)), None, torch.optim.SGD, rho=0.1, rule="gsam",
                        mode="synchronized", lr=0.1)
        out["synchronized_error"] = ""
    except ValueError as err:
        out["synchronized_error"] = str(err)
    return out


def scenario_equivalence(rank: int, world: int, out_dir: Path) -> dict:
    out: dict[str, Any] = {}
    for base in BASES:
        out[f"local_{base}"] = _local_vs_single(rank, world, base)
    out["synchronized"] = _synchronized(rank, world)
    out["accumulate"] = _accumulate(rank, world)
    out["find_unused"] = _ddp_variant(rank, world, find_unused_parameters=True)
    out["bucket_view"] = _ddp_variant(rank, world, gradient_as_bucket_view=True)
    out["combining"] = _combining(rank, world)
    try:
        _ddp_variant(rank, world, static_graph=True)
        out["static_graph_error"] = ""
    except UnsupportedWrapperError as err:
        out["static_graph_error"] = str(err)
    try:
        DistributedMSAM(_mlp(0), None, torch.optim.SGD, lr=0.1)
        out["plain_module_error"] = ""
    except UnsupportedWrapperError as err:
        out["plain_module_error"] = str(err)
    return out


# -- scenario: checkpoint and bit-identical resume ---------------------------------------------


def _snapshot(model: nn.Module, opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    out = [t.detach().clone() for t in model.state_dict().values()]
    for st in opt.state_dict()["state"].values():
        out.extend(v.detach().clone() for v in st.values() if isinstance(v, torch.Tensor))
    return out


def _resume(rank: int, world: int, out_dir: Path, steps: int = 6, at: int = 3,
            rule: str | None = None) -> dict:
    cls, kw = BASES["sgd"]
    ckpt = out_dir / "resume.pt"
    extra_kw = {} if rule is None else {"rule": rule}

    def make(seed: int):
        model = _mlp(seed, bn=True, dropout=0.2)
        ddp = _ddp(model)
        return model, ddp, DistributedMSAM(ddp, None, cls, rho=0.1, micro_batches=2, **kw,
                                           **extra_kw)

    model, ddp, opt = make(4)
    torch.manual_seed(10 + rank)  # each rank its own dropout stream
    for s in range(steps):
        if s == at:
            save_checkpoint(ckpt, ddp, opt, extra={"step": s})
        opt.step(_loss_fn(ddp), _shard(_global_batch(s), rank, world))
    full = _snapshot(model, opt)

    model2, ddp2, opt2 = make(5)       # different weights and RNG until loaded
    torch.manual_seed(12345)
    extra = load_checkpoint(ckpt, ddp2, opt2)
    for s in range(extra["step"], steps):
        opt2.step(_loss_fn(ddp2), _shard(_global_batch(s), rank, world))
    resumed = _snapshot(model2, opt2)
    return {
        "bitwise": len(full) == len(resumed) and all(
            torch.equal(a, b) for a, b in zip(full, resumed)),
        "n_tensors": len(full),
        "steps": (opt.steps, opt2.steps),
        "leftovers": sorted(p.name for p in out_dir.iterdir() if p.name.endswith(".tmp")),
    }


# -- scenario: a failing rank --------------------------------------------------------------------


class _Flaky:
    """loss_fn that raises (or returns NaN) on one rank at its ``call``-th call of a step."""

    def __init__(self, ddp: DDP, rank: int) -> None:
        self.ddp, self.rank, self.plan, self.calls = ddp, rank, None, 0

    def arm(self, rank: int | None = None, call: int = 0, kind: str = "raise") -> None:
        self.plan = None if rank is None else (rank, call, kind)
        self.calls = 0

    def __call__(self, b: tuple) -> torch.Tensor:
        self.calls += 1
        hit = self.plan is not None and self.plan[0] == self.rank and self.plan[1] == self.calls
        out = self.ddp(b[0])
        if hit and self.plan[2] == "grad_inf":  # a finite loss whose gradient is inf
            out = _InfGrad.apply(out)
        loss = nn.functional.cross_entropy(out, b[1])
        if hit and self.plan[2] == "raise":
            raise ValueError(f"boom on rank {self.rank}")
        if hit and self.plan[2] == "nan":
            return loss * float("nan")
        return loss


class _InfGrad(torch.autograd.Function):
    """Identity forward; an inf gradient backward (an overflow only the backward sees)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
        return g * float("inf")


def _params_equal_across_ranks(model: nn.Module, world: int) -> bool:
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    gathered = [torch.zeros_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    return all(torch.equal(gathered[0], g) for g in gathered[1:])


def _outcome(fn) -> str:
    try:
        fn()
    except Exception as err:  # noqa: BLE001 - recorded for the parent
        return f"{type(err).__name__}: {err}"
    return "ok"


def _faults(rank: int, world: int, out_dir: Path) -> dict:
    cls, kw = BASES["sgd"]
    out: dict[str, Any] = {}
    local = _shard(_global_batch(0), rank, world)

    def setup(seed: int, **opt_kw: Any):
        model = _mlp(seed, bn=True)
        ddp = _ddp(model)
        opt = DistributedMSAM(ddp, None, cls, rho=0.1, **{"micro_batches": 2, **kw, **opt_kw})
        return model, ddp, opt, _Flaky(ddp, rank)

    def case(name: str, model, opt, flaky, plan: tuple, run) -> None:
        before = [p.detach().clone() for p in model.parameters()]
        flaky.arm(*plan)
        outcome = _outcome(run)
        unchanged = all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
        flaky.arm()
        opt.zero_grad()
        recovery = _outcome(lambda: opt.step(flaky, local))   # the group still works
        out[name] = {"outcome": outcome, "unchanged": unchanged, "recovery": recovery,
                     "in_sync": _params_equal_across_ranks(model, world)}

    # non-finite values with nonfinite="skip": every rank skips the step
    model, ddp, opt, flaky = setup(6, nonfinite="skip")
    case("skip_ascent", model, opt, flaky, (1, 1, "nan"), lambda: opt.step(flaky, local))
    case("skip_final", model, opt, flaky, (0, 4, "nan"), lambda: opt.step(flaky, local))
    out["skipped_steps"] = opt.skipped_steps

    # an exception: the failing rank raises it, the others DistributedStepError
    model, ddp, opt, flaky = setup(7)
    opt.step(flaky, local)
    ckpt = out_dir / "faults.pt"
    save_checkpoint(ckpt, ddp, opt, extra={"step": 1})
    saved = _snapshot(model, opt)
    case("raise_ascent", model, opt, flaky, (1, 1, "raise"), lambda: opt.step(flaky, local))
    fresh, fresh_ddp, fresh_opt, _ = setup(8)
    load_checkpoint(ckpt, fresh_ddp, fresh_opt)
    out["checkpoint_intact"] = all(
        torch.equal(a, b) for a, b in zip(saved, _snapshot(fresh, fresh_opt)))
    case("raise_final", model, opt, flaky, (0, 4, "raise"), lambda: opt.step(flaky, local))
    case("raise_unsynced_accumulate", model, opt, flaky, (1, 2, "raise"),
         lambda: opt.accumulate(flaky, local, sync=False))
    case("nan_raise", model, opt, flaky, (1, 3, "nan"), lambda: opt.step(flaky, local))

    # a rule that combines g_j and h_j (every pass local): the same agreement
    model, ddp, opt, flaky = setup(10, rule="gsam", nonfinite="skip")
    case("gsam_skip_final", model, opt, flaky, (1, 4, "nan"), lambda: opt.step(flaky, local))
    model, ddp, opt, flaky = setup(11, rule="wsam")
    case("wsam_raise_final", model, opt, flaky, (0, 4, "raise"), lambda: opt.step(flaky, local))
    # an inf only in one rank's last perturbed gradient (every pass local): all ranks skip
    for rule in ("gsam", "wsam"):
        model, ddp, opt, flaky = setup(12, rule=rule, nonfinite="skip")
        case(f"{rule}_skip_grad_inf", model, opt, flaky, (1, 4, "grad_inf"),
             lambda opt=opt, flaky=flaky: opt.step(flaky, local))

    # a failure before any collective (a batch smaller than m on one rank): agreed on too
    model, ddp, opt, flaky = setup(13)
    short = (local[0][:1], local[1][:1]) if rank == 1 else local
    case("short_batch", model, opt, flaky, (), lambda: opt.step(flaky, short))

    # ranks built with different settings: refused on every rank, at construction
    out["mismatch_m"] = _outcome(lambda: setup(14, micro_batches=2 + 2 * rank))
    out["mismatch_rule"] = _outcome(lambda: setup(14, rule="gsam" if rank else "sam"))

    model, ddp, opt, flaky = setup(9, mode="synchronized", micro_batches=1)
    case("sync_raise_ascent", model, opt, flaky, (1, 1, "raise"), lambda: opt.step(flaky, local))
    case("sync_raise_descent", model, opt, flaky, (0, 2, "raise"),
         lambda: opt.step(flaky, local))
    return out


def scenario_all(rank: int, world: int, out_dir: Path) -> dict:
    t0 = time.perf_counter()
    out = scenario_equivalence(rank, world, out_dir)
    out["resume"] = _resume(rank, world, out_dir)
    out["resume_gsam"] = _resume(rank, world, out_dir, rule="gsam")
    out["resume_wsam"] = _resume(rank, world, out_dir, rule="wsam")
    out["faults"] = _faults(rank, world, out_dir)
    out["seconds"] = time.perf_counter() - t0
    return out


SCENARIOS = {
    "equivalence": scenario_equivalence,
    "all": scenario_all,
    "faults": lambda rank, world, out_dir: _faults(rank, world, out_dir),
}

__all__ = ["SCENARIOS", "spawn"]
