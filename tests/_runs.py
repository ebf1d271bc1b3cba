"""A tiny training run shared by the training and CLI tests."""

from __future__ import annotations

from pathlib import Path

from msam.training import TrainConfig


def tiny(tmp_path: Path, name: str = "run", **kw) -> TrainConfig:
    """A run of a fraction of a second per epoch: 128 digits, a 3-layer CNN at 1/4 width."""
    base = dict(dataset="digits", train_subset=160, val_fraction=0.2, model="small_cnn",
                model_options={"width": 0.25}, optimizer="msam", micro_batches=2, epochs=4,
                batch_size=32, eval_batch_size=512, lr=0.05, schedule="cosine",
                warmup_epochs=1, out_dir=str(tmp_path / name), progress=False)
    base.update(kw)
    return TrainConfig(**base)
