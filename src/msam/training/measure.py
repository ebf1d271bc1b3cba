"""Sharpness of a trained run, from its checkpoint: the engine behind ``msam sharpness``.

Rebuilds the run's data and model from the configuration stored in the checkpoint
(``final.pt`` or ``last.pt``, or a run folder holding them), takes a fixed seeded subset of the
training split and calls :func:`msam.analysis.measure` on it. The model is measured in eval mode
(BatchNorm uses its running statistics), see ``docs/sharpness.md``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from msam.data import iterate_batches
from msam.data._seeding import make_generator

from .config import ConfigError, train_config_from_dict
from .rundir import RunFiles

__all__ = ["load_trained_model", "measure_checkpoint", "resolve_checkpoint"]


def resolve_checkpoint(path: str | Path) -> Path:
    """``path`` itself if it is a file, else ``final.pt`` or ``last.pt`` inside the folder."""
    p = Path(path)
    if p.is_dir():
        for name in ("final.pt", "last.pt"):
            if (p / name).is_file():
                return p / name
        raise FileNotFoundError(f"checkpoint: {p} holds neither final.pt nor last.pt")
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint: {p} does not exist")
    return p


def load_trained_model(path: str | Path) -> tuple[nn.Module, Any, Any]:
    """``(model, data, config)`` rebuilt from a run checkpoint, weights loaded, on the CPU."""
    from .trainer import _build_model, _prepare_data

    ckpt_path = resolve_checkpoint(path)
    other = "last.pt" if ckpt_path.name == "final.pt" else "final.pt"
    hint = (f"; measure {ckpt_path.parent / other} instead, or train the run again"
            if (ckpt_path.parent / other).is_file() else "; train the run again")
    RunFiles(ckpt_path.parent).check(ckpt_path.name, hint)  # no-op outside a run directory
    try:
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"checkpoint: {ckpt_path} cannot be read: {err}") from err
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise ValueError(f"checkpoint: {ckpt_path} is not an msam run checkpoint")
    cfg = train_config_from_dict(ckpt["config"], f"{ckpt_path}:config")
    data = _prepare_data(cfg, torch.device("cpu"), ckpt.get("tokenizer"))
    model = _build_model(cfg, data)
    model.load_state_dict(ckpt["model"])
    return model, data, cfg


def measure_checkpoint(
    path: str | Path,
    *,
    metrics: list[str],
    examples: int = 2048,
    batch_size: int = 256,
    seed: int = 0,
    rho: float | None = None,
    m: int | None = None,
    options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Measure ``metrics`` on ``examples`` training examples of the run at ``path``.

    ``rho`` defaults to 0.05 for every run (not the run's own rho), so that m-sharpness is
    comparable across runs; ``m`` is the number of micro-batches per measurement batch (a
    count, as for the optimizer; None: 1).
    """
    from msam.analysis import measure

    if examples < 1:
        raise ValueError(f"examples must be >= 1, got {examples}")
    model, data, cfg = load_trained_model(path)
    n = min(examples, len(data.train))
    idx = torch.randperm(len(data.train), generator=make_generator(seed, "sharpness"))[:n]
    subset = data.train.subset(idx.sort().values)
    batches = [data.batch("train", x, y) for x, y in
               iterate_batches(subset, batch_size, shuffle=False, seed=0, epoch=0)]
    if rho is None:
        rho = 0.05

    def loss_fn(batch: Any) -> torch.Tensor:
        return F.cross_entropy(model(batch[0]).float(), batch[1])

    try:
        result = dict(measure(model, loss_fn, batches, metrics=list(metrics), rho=rho,
                              micro_batches=m, seed=seed, **(options or {})))
    except TypeError as err:
        raise ConfigError(f"sharpness option: {err}") from err
    result["examples"] = n
    result["checkpoint"] = str(resolve_checkpoint(path))
    return result
