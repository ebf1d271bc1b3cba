"""Built-in copy of ``configs/demo.yaml`` (used when msam runs outside its source tree).

``tests/test_cli.py`` checks that the two stay identical.
"""

from __future__ import annotations

from typing import Any

DEMO_CONFIG: dict[str, Any] = {
    "name": "demo",
    "out_dir": "runs/demo",
    "dataset": "fashion_mnist",
    "train_subset": 4000,
    "val_fraction": 0.1,
    "test_subset": 2000,
    "model": "small_cnn",
    "model_options": {"width": 0.5},
    "base": "sgd",
    "lr": 0.2,
    "momentum": 0.9,
    "weight_decay": 5.0e-4,
    "schedule": "cosine",
    "epochs": 5,
    "batch_size": 128,
    "eval_batch_size": 500,
    "rho": 0.05,
    "seed": 0,
    "threads": 1,
    "grid": {
        "optimizer": ["sgd", "sam", "msam"],
        "micro_batches": [4, 8],
    },
}
