"""Checks of msam on one GPU, each printed as a Markdown section (benchmarks/gpu.sh runs it).

    python benchmarks/gpu_checks.py --device cuda          # on a GPU machine (about 1 minute)
    python benchmarks/gpu_checks.py --device cpu --dry-run # the same code path on CPU, tiny

1. **Equivalence**: one step of every strategy (loop, vmap, batched, lowrank, auto) at m = 4 on
   the device equals the same step in float64 on the CPU (max parameter difference).
2. **Host syncs per step**, counted with ``torch.cuda.set_sync_debug_mode("warn")`` (each
   synchronising call warns once): SGD, SAM and mSAM m = 1, 4, 8 with the loop strategy. The
   design says one finiteness read per gradient computation.
3. **Mixed precision**: the fp16 ``GradScaler`` path (a forced overflow is skipped and lowers
   the scale; finite steps move the weights) and bf16 ``autocast`` (the loss stays within a
   tolerance of float32's after 5 steps).

On CPU (``--dry-run``) the sync count is not measurable (no CUDA) and is reported as such.
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn

import msam

STRATEGIES = ("loop", "vmap", "batched", "lowrank", "auto")


def _mlp(width: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width),
                         nn.ReLU(), nn.Linear(width, 10))


def _batch(n: int, device: torch.device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 64, generator=g), torch.randint(0, 10, (n,), generator=g)
    return x.to(device), y.to(device)


def _step(model: nn.Module, strategy: str, m: int, batch, **kw) -> msam.MSAM:
    opt = msam.MSAM(model.parameters(), torch.optim.SGD, rho=0.05, micro_batches=m,
                    strategy=strategy, model=model, lr=0.1, momentum=0.9, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt.step(lambda b: F.cross_entropy(model(b[0]), b[1]), batch)
    return opt


def equivalence(device: torch.device, width: int, n: int) -> list[str]:
    ref = _mlp(width).double()
    _step(ref, "loop", 4, tuple(t.double() if t.is_floating_point() else t
                                for t in _batch(n, torch.device("cpu"))))
    rows = ["| strategy | max abs diff vs float64 CPU |", "|---|---:|"]
    for s in STRATEGIES:
        model = _mlp(width).to(device)
        _step(model, s, 4, _batch(n, device))
        diff = max(float((p.detach().double().cpu() - q.detach()).abs().max())
                   for p, q in zip(model.parameters(), ref.parameters()))
        rows.append(f"| {s} | {diff:.2e} |")
    return rows


def host_syncs(device: torch.device, width: int, n: int) -> list[str]:
    rows = ["| method | host syncs per step |", "|---|---:|"]
    if device.type != "cuda":
        return rows + ["| (not measurable on CPU) | - |"]
    cases = [("SGD", None, 1), ("SAM", "loop", 1), ("mSAM m=4", "loop", 4),
             ("mSAM m=8", "loop", 8)]
    for label, strategy, m in cases:
        model = _mlp(width).to(device)
        batch = _batch(n, device)
        if strategy is None:
            opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

            def step(model=model, opt=opt, batch=batch):
                opt.zero_grad()
                F.cross_entropy(model(batch[0]), batch[1]).backward()
                opt.step()
        else:
            mo = msam.MSAM(model.parameters(), torch.optim.SGD, rho=0.05, micro_batches=m,
                           strategy=strategy, model=model, lr=0.1, momentum=0.9)

            def step(model=model, mo=mo, batch=batch):
                mo.step(lambda b: F.cross_entropy(model(b[0]), b[1]), batch)
        step()
        step()  # warm
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                for _ in range(3):
                    step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        syncs = sum("synchroniz" in str(w.message).lower() for w in caught) / 3
        rows.append(f"| {label} | {syncs:g} |")
    return rows


def mixed_precision(device: torch.device, width: int, n: int) -> list[str]:
    rows = ["| check | result |", "|---|---|"]
    model = _mlp(width).to(device)
    opt = msam.MSAM(model.parameters(), torch.optim.SGD, rho=0.05, micro_batches=4,
                    model=model, lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler(device.type, init_scale=2.0 ** 16)
    batch = _batch(n, device)
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16

    def loss_fn(b):
        with torch.autocast(device.type, dtype=dtype):
            return F.cross_entropy(model(b[0]), b[1])

    before = [p.detach().clone() for p in model.parameters()]
    opt.step(lambda b: loss_fn(b) * float("inf"), batch, scaler=scaler)   # an overflow
    scale0 = scaler.get_scale()
    scaler.update()
    skipped = opt.skipped_steps == 1 and all(
        torch.equal(a, p) for a, p in zip(before, model.parameters()))
    rows.append(f"| {dtype} GradScaler: overflow skipped, weights unchanged | {skipped} |")
    rows.append(f"| scale lowered after the overflow | {scaler.get_scale() < scale0} |")
    for _ in range(3):
        opt.step(loss_fn, batch, scaler=scaler)
        scaler.update()
    moved = any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    rows.append(f"| finite scaled steps move the weights | {moved} |")

    def run(autocast: bool) -> float:
        m = _mlp(width).to(device)
        o = msam.MSAM(m.parameters(), torch.optim.SGD, rho=0.05, micro_batches=4, model=m,
                      lr=0.1, momentum=0.9)

        def lf(b):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                return F.cross_entropy(m(b[0]), b[1])

        for t in range(5):
            o.step(lf, _batch(n, device, seed=t))
        with torch.no_grad():
            return float(F.cross_entropy(m(batch[0]), batch[1]))

    fp32, bf16 = run(False), run(True)
    rows.append(f"| bf16 autocast: loss after 5 steps vs float32 | {bf16:.4f} vs {fp32:.4f} "
                f"(diff {abs(bf16 - fp32):.1e}) |")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes (a CPU smoke run)")
    args = ap.parse_args()
    device = torch.device(args.device)
    width, n = (32, 16) if args.dry_run else (1024, 512)
    t0 = time.perf_counter()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"# msam GPU checks\n\ndevice: {name}; torch {torch.__version__}; "
          f"msam {msam.__version__}; MLP width {width}, batch {n}\n")
    for title, fn in (("Equivalence (m = 4, one step)", equivalence),
                      ("Host syncs per step", host_syncs),
                      ("Mixed precision", mixed_precision)):
        print(f"## {title}\n")
        print("\n".join(fn(device, width, n)) + "\n", flush=True)
    print(f"({time.perf_counter() - t0:.1f} s)")


if __name__ == "__main__":
    main()
