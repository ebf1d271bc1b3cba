"""Training runs, studies (grids of runs) and their configuration.

* :func:`train` -- one run from a :class:`TrainConfig` into a run directory (checkpoints,
  metrics, bit-exact resume);
* :func:`run_study` -- a grid of runs with a Markdown summary, a CSV and plots;
* :func:`load_config` / :func:`load_study_config` -- YAML / TOML / JSON files plus ``--set``
  overrides, validated against the dataclasses.

See ``docs/training.md``.
"""

from .checkpoint import atomic_save_torch, atomic_write, load_checkpoint
from .config import (
    METHODS,
    ConfigError,
    SharpnessConfig,
    TrainConfig,
    apply_overrides,
    config_reference,
    load_config,
    train_config_from_dict,
)
from .study import expand_grid, run_study
from .studyconfig import StudyConfig, load_study_config, study_from_dict
from .trainer import RunResult, build_optimizer, evaluate, is_finished, train

__all__ = [
    "METHODS",
    "ConfigError",
    "RunResult",
    "SharpnessConfig",
    "StudyConfig",
    "TrainConfig",
    "apply_overrides",
    "atomic_save_torch",
    "atomic_write",
    "build_optimizer",
    "config_reference",
    "evaluate",
    "expand_grid",
    "is_finished",
    "load_checkpoint",
    "load_config",
    "load_study_config",
    "run_study",
    "study_from_dict",
    "train",
    "train_config_from_dict",
]
