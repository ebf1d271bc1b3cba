"""Typed run and study configuration: dataclasses loaded from YAML / TOML / JSON plus overrides.

A run is described by one :class:`TrainConfig`; a study (a grid of runs) by a
:class:`StudyConfig`, which is a ``TrainConfig`` plus the keys ``grid``, ``per_method`` and
``name``. Files are flat mappings of the field names below (``model_options`` and
``sharpness`` are nested mappings)::

    dataset: fashion_mnist
    train_subset: 5000
    model: small_cnn
    model_options: {width: 0.5}
    optimizer: msam
    micro_batches: 4

Command-line overrides are ``key=value`` strings (``--set lr=0.05``, ``--set
model_options.width=0.5``, ``--set grid.rho=[0.05,0.1]``). The value is parsed as YAML and then
checked against the field type. Every problem raises :class:`ConfigError`, whose message names
the key and where it came from (the file or the ``--set`` argument).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import types
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

__all__ = [
    "METHODS",
    "ConfigError",
    "SharpnessConfig",
    "StudyConfig",
    "TrainConfig",
    "apply_overrides",
    "config_reference",
    "load_config",
    "load_study_config",
    "parse_override",
    "read_config_file",
    "study_from_dict",
    "train_config_from_dict",
]

METHODS = ("sgd", "sam", "msam", "asam")
BASES = ("sgd", "adamw")
SCHEDULES = ("cosine", "step", "constant")
STRATEGIES = ("loop", "vmap", "auto")
PRECISIONS = ("fp32", "bf16", "fp16")
NONFINITE = ("raise", "skip")
STUDY_KEYS = ("grid", "per_method", "name", "plots", "select", "description")
#: Metrics a study may select on, and whether larger is better. Validation only: choosing a
#: hyperparameter on the test set would make the reported test accuracy optimistic.
SELECT_METRICS = {"val_acc": True, "val_loss": False}

# Keys that may change between a checkpoint and the run that resumes it (they do not change
# what is computed, or, for ``epochs``, extend / shorten the run on purpose).
RESUMABLE_CHANGES = frozenset({
    "epochs", "out_dir", "progress", "threads", "tensorboard", "device", "eval_batch_size",
    "eval_every", "sharpness", "data_dir", "download",
})


class ConfigError(ValueError):
    """An invalid configuration; the message names the key and its source."""


def _f(default: Any, doc: str, choices: tuple | None = None) -> Any:
    meta = {"help": doc, "choices": choices}
    if isinstance(default, (list, dict)) or dataclasses.is_dataclass(default):
        factory = (lambda d=default: copy.deepcopy(d))
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class SharpnessConfig:
    """Sharpness measured on the trained model (``msam.analysis.measure``); off when empty."""

    metrics: list[str] = _f([], "metrics of msam.analysis.measure, e.g. [lambda_max, "
                                "m_sharpness]; [] = off")
    examples: int = _f(2048, "training examples used (a fixed seeded subset)")
    batch_size: int = _f(256, "batch size of the measurement batches")
    rho: float | None = _f(None, "radius for m_sharpness (null: the run's rho, or 0.05)")
    m: int | None = _f(None, "micro-batch size for m_sharpness (null: one batch)")
    seed: int = _f(0, "seed of the measurement (subset, probes)")
    options: dict[str, Any] = _f({}, "extra keyword arguments of measure (e.g. num_probes)")


@dataclass
class TrainConfig:
    """Everything one training run needs. See ``docs/training.md`` for the full reference."""

    # data
    dataset: str = _f("fashion_mnist", "dataset name (msam.data.DATASETS)")
    data_dir: str | None = _f(None, "folder searched first for file-based datasets")
    download: bool = _f(False, "download Fashion-MNIST if not found")
    train_subset: int | None = _f(None, "stratified subset of N training examples")
    val_fraction: float = _f(0.1, "fraction of the training set held out for validation")
    label_noise: float = _f(0.0, "symmetric label noise rate on train/val labels")
    augment: bool = _f(False, "random crop + flip (images only)")
    test_subset: int | None = _f(None, "evaluate on a fixed stratified test subset of N")
    max_length: int = _f(64, "text: tokens per example (padded / truncated)")
    min_freq: int = _f(1, "text, word tokenizer: minimum token count")
    max_vocab: int | None = _f(30000, "text, word tokenizer: vocabulary size cap")
    # model
    model: str = _f("small_cnn", "model name (msam.models.MODELS)")
    model_options: dict[str, Any] = _f({}, "keyword options of build_model")
    # optimizer
    optimizer: str = _f("msam", "method; sgd means the base optimizer alone (no SAM)", METHODS)
    base: str = _f("sgd", "base optimizer", BASES)
    rho: float = _f(0.05, "SAM neighbourhood radius (ignored by sgd)")
    micro_batches: int = _f(4, "m for msam/asam (sgd and sam use 1)")
    strategy: str = _f("loop", "mSAM execution strategy", STRATEGIES)
    eta: float = _f(0.01, "ASAM offset")
    lr: float = _f(0.1, "peak learning rate")
    momentum: float = _f(0.9, "SGD momentum")
    nesterov: bool = _f(False, "SGD Nesterov momentum")
    weight_decay: float = _f(5e-4, "weight decay (coupled for sgd, decoupled for adamw)")
    betas: list[float] = _f([0.9, 0.999], "AdamW betas")
    adam_eps: float = _f(1e-8, "AdamW epsilon")
    max_grad_norm: float | None = _f(None, "clip the (averaged) gradient to this L2 norm")
    nonfinite: str = _f("raise", "on an inf/NaN loss: raise, or skip the step", NONFINITE)
    # schedule
    schedule: str = _f("cosine", "per-step learning-rate schedule", SCHEDULES)
    warmup_epochs: float = _f(0.0, "linear warmup length in epochs (may be fractional)")
    min_lr: float = _f(0.0, "cosine: final learning rate")
    milestones: list[float] = _f([], "step: epochs at which lr *= gamma ([] = 50%, 75%)")
    gamma: float = _f(0.1, "step: decay factor")
    label_smoothing: float = _f(0.0, "label smoothing of the training loss")
    # loop
    epochs: int = _f(10, "number of epochs")
    batch_size: int = _f(128, "training batch size (split into micro-batches by msam)")
    eval_batch_size: int = _f(512, "evaluation batch size")
    drop_last: bool = _f(True, "drop the last incomplete training batch")
    max_steps_per_epoch: int | None = _f(None, "cap on steps per epoch (quick runs)")
    eval_every: int = _f(1, "evaluate val/test every N epochs (the last epoch always)")
    # run
    seed: int = _f(0, "seed of data subset/split/noise, batch order, init, dropout")
    device: str = _f("auto", "auto, cpu, cuda or cuda:N")
    precision: str = _f("fp32", "autocast dtype; fp16 adds a GradScaler (CUDA only)",
                        PRECISIONS)
    deterministic: bool = _f(True, "torch.use_deterministic_algorithms(warn_only=True)")
    threads: int | None = _f(None, "torch.set_num_threads for the run (null: unchanged)")
    out_dir: str = _f("runs/train", "run directory (study: the study directory)")
    progress: bool = _f(True, "tqdm progress bar (only shown on a terminal)")
    tensorboard: bool = _f(False, "also log to TensorBoard (skipped if not installed)")
    sharpness: SharpnessConfig = _f(SharpnessConfig(), "sharpness after training")

    def __post_init__(self) -> None:
        if isinstance(self.sharpness, Mapping):  # TrainConfig(sharpness={"metrics": [...]})
            self.sharpness = _build(SharpnessConfig, self.sharpness, "sharpness.",
                                    lambda _key: "config")

    # -- helpers ----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def resolved(self, source: str = "config") -> TrainConfig:
        """Validated copy with method rules applied (sgd: rho 0, m 1; sam: m 1)."""
        cfg = copy.deepcopy(self)
        validate(cfg, source)
        if cfg.optimizer == "sgd":
            cfg.rho, cfg.micro_batches = 0.0, 1
        elif cfg.optimizer == "sam":
            cfg.micro_batches = 1
        return cfg


@dataclass
class StudyConfig:
    """A grid of runs around one base :class:`TrainConfig`."""

    train: TrainConfig
    grid: dict[str, list[Any]] = field(default_factory=dict)
    per_method: dict[str, dict[str, list[Any]]] = field(default_factory=dict)
    name: str = "study"
    plots: bool = True
    #: ``{"by": "val_acc", "over": ["rho"]}``: per method (and the other grid keys), report
    #: the value of the ``over`` keys whose cell has the best mean ``by`` over seeds.
    select: dict[str, Any] | None = None
    #: Markdown shown at the top of summary.md: what the study is and why it is sized so.
    description: str = ""
    raw: dict[str, Any] = field(default_factory=dict, repr=False)  # training keys, for cells
    source: str = "config"

    def to_dict(self) -> dict[str, Any]:
        out = self.train.to_dict()
        out.update(grid=copy.deepcopy(self.grid), per_method=copy.deepcopy(self.per_method),
                   name=self.name, plots=self.plots)
        if self.select is not None:
            out["select"] = copy.deepcopy(self.select)
        if self.description:
            out["description"] = self.description
        return out


# -- type checking -----------------------------------------------------------------------------

def _hints(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if tp is type(None):
        return "null"
    if origin is list:
        return f"list of {_type_name(get_args(tp)[0])}"
    if origin is dict:
        return "mapping"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


class _Mismatch(Exception):
    pass


def _coerce(value: Any, tp: Any, key: str, where: Any) -> Any:
    """Check ``value`` against ``tp`` and convert where lossless (int -> float, '1e-3')."""
    if tp is Any:
        return value
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise _Mismatch
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key, where)
            except _Mismatch:
                continue
        raise _Mismatch
    if value is None:
        raise _Mismatch
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false", "yes", "no"):
            return value.strip().lower() in ("true", "yes")
        raise _Mismatch
    if tp is int:
        if isinstance(value, bool):
            raise _Mismatch
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                try:
                    f = float(value.strip())
                except ValueError:
                    raise _Mismatch from None
                if f.is_integer():
                    return int(f)
        raise _Mismatch
    if tp is float:
        if isinstance(value, bool):
            raise _Mismatch
        if isinstance(value, (int, float)):
            out = float(value)
        elif isinstance(value, str):
            try:
                out = float(value.strip())
            except ValueError:
                raise _Mismatch from None
        else:
            raise _Mismatch
        if math.isnan(out):
            raise _Mismatch
        return out
    if tp is str:
        if isinstance(value, str):
            return value
        raise _Mismatch
    if origin is list:
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise _Mismatch
        (item,) = get_args(tp)
        out_list = []
        for i, v in enumerate(value):
            try:
                out_list.append(_coerce(v, item, f"{key}[{i}]", where))
            except _Mismatch:
                raise ConfigError(
                    f"{where(key)}: key '{key}[{i}]' must be {_type_name(item)}, got {v!r}"
                ) from None
        return out_list
    if origin is dict:
        if not isinstance(value, Mapping):
            raise _Mismatch
        bad = [k for k in value if not isinstance(k, str)]
        if bad:
            raise ConfigError(f"{where(key)}: key '{key}' has non-string key(s) {bad!r}")
        return copy.deepcopy(dict(value))
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return copy.deepcopy(value)
        if not isinstance(value, Mapping):
            raise _Mismatch
        return _build(tp, value, key + ".", where)
    raise TypeError(f"unsupported config type {tp!r}")  # pragma: no cover - programming error


def _build(cls: type, raw: Mapping[str, Any], prefix: str, where: Any) -> Any:
    hints = _hints(cls)
    names = [f.name for f in fields(cls)]
    unknown = [k for k in raw if k not in names]
    if unknown:
        k = unknown[0]
        full = prefix + str(k)
        hint = _suggest(str(k), names)
        raise ConfigError(
            f"{where(full)}: unknown key '{full}'{hint}; valid keys: {', '.join(names)}"
        )
    kwargs = {}
    for name in names:
        if name not in raw:
            continue
        full = prefix + name
        try:
            kwargs[name] = _coerce(raw[name], hints[name], full, where)
        except _Mismatch:
            raise ConfigError(
                f"{where(full)}: key '{full}' must be {_type_name(hints[name])}, "
                f"got {raw[name]!r}"
            ) from None
    return cls(**kwargs)


def _suggest(key: str, names: Iterable[str]) -> str:
    import difflib

    close = difflib.get_close_matches(key, list(names), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


# -- validation --------------------------------------------------------------------------------

def _check(cond: bool, where: Any, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{_at(where, key)}: key '{key}' {msg}")


def _at(where: Any, key: str) -> str:
    return where(key) if callable(where) else str(where)


def validate(cfg: TrainConfig, where: Any = "config") -> None:
    """Cross-field checks; raises :class:`ConfigError` naming the key.

    ``where`` is the source label, or a function ``key -> label`` (file or ``--set``).
    """
    from msam.data.loading import DATASETS, _canonical_name

    try:
        cfg.dataset = _canonical_name(cfg.dataset)
    except ValueError:
        raise ConfigError(f"{_at(where, 'dataset')}: key 'dataset' is {cfg.dataset!r}; "
                          f"choose one of {', '.join(DATASETS)}") from None
    for f in fields(cfg):
        choices = f.metadata.get("choices")
        if choices:
            val = getattr(cfg, f.name)
            if isinstance(val, str):
                val = val.lower()
                setattr(cfg, f.name, val)
            _check(val in choices, where, f.name,
                   f"is {getattr(cfg, f.name)!r}; choose one of {', '.join(choices)}")
    from msam.models import MODELS, is_text_model, model_options

    _check(cfg.model in MODELS, where, "model",
           f"is {cfg.model!r}; choose one of {', '.join(MODELS)}")
    valid_opts = model_options(cfg.model)
    for k in cfg.model_options:
        if k not in valid_opts:
            raise ConfigError(
                f"{_at(where, 'model_options.' + k)}: unknown key 'model_options.{k}' for model "
                f"{cfg.model!r}; valid "
                f"options: {', '.join(valid_opts) or '(none)'}"
            )
    text_data = cfg.dataset == "rotten_tomatoes"
    if text_data != is_text_model(cfg.model):
        kind = "image" if text_data else "text"
        raise ConfigError(
            f"{_at(where, 'model')}: key 'model' is {cfg.model!r}, a {kind} model, but dataset "
            f"{cfg.dataset!r} is {'text' if text_data else 'images'}"
        )
    _check(not (text_data and cfg.augment), where, "augment", "must be false for text data")
    _check(cfg.train_subset is None or cfg.train_subset >= 2, where, "train_subset",
           "must be >= 2 or null")
    _check(cfg.test_subset is None or cfg.test_subset >= 1, where, "test_subset",
           "must be >= 1 or null")
    _check(0.0 <= cfg.val_fraction < 1.0, where, "val_fraction", "must be in [0, 1)")
    _check(0.0 <= cfg.label_noise <= 1.0, where, "label_noise", "must be in [0, 1]")
    _check(cfg.max_length >= 1, where, "max_length", "must be >= 1")
    _check(cfg.min_freq >= 1, where, "min_freq", "must be >= 1")
    _check(cfg.max_vocab is None or cfg.max_vocab >= 2, where, "max_vocab", "must be >= 2")
    _check(math.isfinite(cfg.rho) and cfg.rho >= 0, where, "rho", "must be a finite number >= 0")
    _check(cfg.micro_batches >= 1, where, "micro_batches", "must be >= 1")
    _check(cfg.eta > 0, where, "eta", "must be > 0")
    _check(math.isfinite(cfg.lr) and cfg.lr > 0, where, "lr", "must be a finite number > 0")
    _check(0.0 <= cfg.momentum < 1.0, where, "momentum", "must be in [0, 1)")
    _check(not (cfg.nesterov and cfg.momentum == 0), where, "nesterov",
           "needs momentum > 0")
    _check(cfg.weight_decay >= 0, where, "weight_decay", "must be >= 0")
    _check(len(cfg.betas) == 2 and all(0 <= b < 1 for b in cfg.betas), where, "betas",
           "must be two numbers in [0, 1)")
    _check(cfg.adam_eps > 0, where, "adam_eps", "must be > 0")
    _check(cfg.max_grad_norm is None or cfg.max_grad_norm > 0, where, "max_grad_norm",
           "must be > 0 or null")
    _check(cfg.epochs >= 1, where, "epochs", "must be >= 1")
    _check(0 <= cfg.warmup_epochs <= cfg.epochs, where, "warmup_epochs",
           f"must be in [0, epochs={cfg.epochs}]")
    _check(0 <= cfg.min_lr <= cfg.lr, where, "min_lr", "must be in [0, lr]")
    _check(all(m >= 0 for m in cfg.milestones), where, "milestones", "must be >= 0")
    _check(0 < cfg.gamma <= 1, where, "gamma", "must be in (0, 1]")
    _check(0 <= cfg.label_smoothing < 1, where, "label_smoothing", "must be in [0, 1)")
    _check(cfg.batch_size >= 1, where, "batch_size", "must be >= 1")
    _check(cfg.eval_batch_size >= 1, where, "eval_batch_size", "must be >= 1")
    _check(cfg.max_steps_per_epoch is None or cfg.max_steps_per_epoch >= 1, where,
           "max_steps_per_epoch", "must be >= 1 or null")
    _check(cfg.eval_every >= 1, where, "eval_every", "must be >= 1")
    if cfg.optimizer in ("msam", "asam"):
        _check(cfg.micro_batches <= cfg.batch_size, where, "micro_batches",
               f"is {cfg.micro_batches}, more than batch_size={cfg.batch_size}")
    dev = cfg.device.lower()
    _check(dev in ("auto", "cpu", "cuda") or (dev.startswith("cuda:") and dev[5:].isdigit()),
           where, "device", f"is {cfg.device!r}; use auto, cpu, cuda or cuda:N")
    _check(cfg.threads is None or cfg.threads >= 1, where, "threads", "must be >= 1 or null")
    _check(bool(cfg.out_dir), where, "out_dir", "must not be empty")
    s = cfg.sharpness
    _check(s.examples >= 1, where, "sharpness.examples", "must be >= 1")
    _check(s.batch_size >= 1, where, "sharpness.batch_size", "must be >= 1")
    _check(s.m is None or s.m >= 1, where, "sharpness.m", "must be >= 1 or null")
    _check(s.rho is None or s.rho >= 0, where, "sharpness.rho", "must be >= 0 or null")
    if s.metrics:
        try:
            from msam.analysis import AVAILABLE_METRICS
        except ImportError:  # the analysis layer is optional here
            AVAILABLE_METRICS = None
        if AVAILABLE_METRICS is not None:
            bad = [m for m in s.metrics if m not in AVAILABLE_METRICS]
            _check(not bad, where, "sharpness.metrics",
                   f"has unknown metric(s) {bad}; available: {', '.join(AVAILABLE_METRICS)}")


# -- files and overrides -----------------------------------------------------------------------

def read_config_file(path: str | Path) -> dict[str, Any]:
    """Parse a YAML (``.yaml``/``.yml``), TOML (``.toml``) or JSON (``.json``) mapping."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} not found")
    suffix = path.suffix.lower()
    text = path.read_text(encoding="utf-8")
    try:
        if suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        elif suffix == ".toml":
            try:
                import tomllib
            except ImportError:  # Python 3.10
                try:
                    import tomli as tomllib  # type: ignore[no-redef]
                except ImportError:
                    raise ConfigError(f"{path}: TOML configs need Python 3.11+ or the "
                                      "package tomli (pip install tomli)") from None
            data = tomllib.loads(text)
        elif suffix == ".json":
            data = json.loads(text)
        else:
            raise ConfigError(f"{path}: unknown config format {suffix!r}; use .yaml, .toml or "
                              ".json")
    except ConfigError:
        raise
    except Exception as err:  # parser errors: yaml.YAMLError, tomllib.TOMLDecodeError, ...
        raise ConfigError(f"{path}: cannot parse: {err}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got "
                          f"{type(data).__name__}")
    return data


def parse_override(text: str) -> tuple[str, Any]:
    """``"a.b=value"`` -> ``("a.b", parsed value)``; the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value")
    key, _, value = text.partition("=")
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {text!r}: empty key")
    try:
        import yaml

        parsed = yaml.safe_load(value) if value.strip() else ""
    except Exception:
        parsed = value
    return key, parsed


def apply_overrides(
    raw: dict[str, Any], overrides: Iterable[str | tuple]
) -> tuple[dict[str, Any], dict[str, str]]:
    """Apply overrides to a raw mapping (a deep copy).

    Each override is a ``"key=value"`` string, a ``(key, value)`` pair or a
    ``(key, value, label)`` triple (``label`` names it in error messages, e.g. ``"--out"``).
    Returns the new mapping and ``{dotted key: label}``.
    """
    out = copy.deepcopy(raw)
    sources: dict[str, str] = {}
    for item in overrides:
        if isinstance(item, str):
            key, value = parse_override(item)
            label = f"--set {item}"
        elif len(item) == 3:
            key, value, label = item  # type: ignore[misc]
        else:
            key, value = item
            label = f"--set {key}={value!r}"
        parts = key.split(".")
        node = out
        for i, part in enumerate(parts[:-1]):
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            elif not isinstance(nxt, dict):
                raise ConfigError(f"{label}: key '{'.'.join(parts[:i + 1])}' is not a mapping")
            node = nxt
        node[parts[-1]] = value
        sources[key] = label
    return out, sources


def _where_fn(file_label: str, sources: Mapping[str, str]):
    def where(key: str) -> str:
        for k, label in sources.items():
            if key == k or key.startswith(k + ".") or key.startswith(k + "[") \
                    or k.startswith(key + "."):
                return label
        return file_label

    return where


def train_config_from_dict(
    raw: Mapping[str, Any], source: str = "config", sources: Mapping[str, str] | None = None
) -> TrainConfig:
    """Build and validate a :class:`TrainConfig` from a raw mapping."""
    where = _where_fn(source, sources or {})
    study_keys = [k for k in STUDY_KEYS if k in raw]
    if study_keys:
        raise ConfigError(
            f"{where(study_keys[0])}: key '{study_keys[0]}' belongs to a study config; run it "
            "with `msam study` (or remove the key)"
        )
    cfg = _build(TrainConfig, raw, "", where)
    validate(cfg, where)
    return cfg


def load_config(
    path: str | Path, overrides: Iterable[str | tuple] = ()
) -> TrainConfig:
    """Load a run config file and apply ``key=value`` overrides (validated)."""
    raw = read_config_file(path)
    raw, sources = apply_overrides(raw, overrides)
    return train_config_from_dict(raw, str(path), sources)


def study_from_dict(
    raw: Mapping[str, Any], source: str = "config", sources: Mapping[str, str] | None = None
) -> StudyConfig:
    """Build and validate a :class:`StudyConfig` (grid axes are checked cell by cell later)."""
    sources = dict(sources or {})
    where = _where_fn(source, sources)
    raw = dict(raw)
    grid = raw.pop("grid", None) or {}
    per_method = raw.pop("per_method", None) or {}
    name = raw.pop("name", "study")
    plots = raw.pop("plots", True)
    select = raw.pop("select", None)
    description = raw.pop("description", "") or ""
    train = train_config_from_dict(raw, source, sources)
    if not isinstance(description, str):
        raise ConfigError(f"{where('description')}: key 'description' must be a string")
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{where('name')}: key 'name' must be a non-empty string")
    if not isinstance(plots, bool):
        raise ConfigError(f"{where('plots')}: key 'plots' must be true or false")
    train_keys = {f.name for f in fields(TrainConfig)}
    hints = _hints(TrainConfig)

    def check_axes(axes: Any, prefix: str) -> dict[str, list[Any]]:
        if not isinstance(axes, Mapping):
            raise ConfigError(f"{where(prefix)}: key '{prefix}' must be a mapping of key: [values]")
        out: dict[str, list[Any]] = {}
        for key, values in axes.items():
            full = f"{prefix}.{key}"
            top = str(key).split(".")[0]
            if top not in train_keys or top == "out_dir":
                raise ConfigError(
                    f"{where(full)}: unknown key '{full}'{_suggest(top, train_keys)}; grid axes "
                    "must be training keys (e.g. optimizer, rho, micro_batches, seed)"
                )
            if not isinstance(values, (list, tuple)):
                values = [values]
            if not values:
                raise ConfigError(f"{where(full)}: key '{full}' has no values")
            checked = []
            for i, v in enumerate(values):
                if "." not in str(key):
                    try:
                        v = _coerce(v, hints[top], f"{full}[{i}]", where)
                    except _Mismatch:
                        raise ConfigError(
                            f"{where(full)}: key '{full}[{i}]' must be "
                            f"{_type_name(hints[top])}, got {v!r}"
                        ) from None
                checked.append(v)
            out[str(key)] = checked
        return out

    grid_axes = check_axes(grid, "grid")
    if "optimizer" in grid_axes:
        for i, v in enumerate(grid_axes["optimizer"]):
            grid_axes["optimizer"][i] = v = v.lower()
            if v not in METHODS:
                raise ConfigError(f"{where('grid.optimizer')}: key 'grid.optimizer[{i}]' is "
                                  f"{v!r}; choose from {', '.join(METHODS)}")
    if not isinstance(per_method, Mapping):
        raise ConfigError(f"{where('per_method')}: key 'per_method' must be a mapping "
                          "method: {key: [values]}")
    pm: dict[str, dict[str, list[Any]]] = {}
    for method, axes in per_method.items():
        if method not in METHODS:
            raise ConfigError(f"{where(f'per_method.{method}')}: unknown key "
                              f"'per_method.{method}'; methods: {', '.join(METHODS)}")
        pm[method] = check_axes(axes or {}, f"per_method.{method}")
        if "optimizer" in pm[method]:
            raise ConfigError(f"{where(f'per_method.{method}.optimizer')}: key "
                              f"'per_method.{method}.optimizer' is not allowed")
    if select is not None:
        select = _check_select(select, grid_axes, pm, where)
    return StudyConfig(train=train, grid=grid_axes, per_method=pm, name=name, plots=plots,
                       select=select, description=description.strip(), raw=dict(raw),
                       source=source)


def _check_select(select: Any, grid: Mapping[str, list[Any]],
                  per_method: Mapping[str, Mapping[str, list[Any]]],
                  where: Callable[[str], str]) -> dict[str, Any]:
    if not isinstance(select, Mapping):
        raise ConfigError(f"{where('select')}: key 'select' must be a mapping "
                          "{by: val_acc, over: [rho]}")
    unknown = sorted(set(select) - {"by", "over"})
    if unknown:
        raise ConfigError(f"{where('select')}: unknown key 'select.{unknown[0]}'; "
                          "valid keys: by, over")
    by = select.get("by", "val_acc")
    if by not in SELECT_METRICS:
        raise ConfigError(f"{where('select.by')}: key 'select.by' is {by!r}; choose from "
                          f"{', '.join(SELECT_METRICS)} (validation metrics only, never test)")
    over = select.get("over")
    if isinstance(over, str):
        over = [over]
    if not isinstance(over, (list, tuple)) or not over:
        raise ConfigError(f"{where('select.over')}: key 'select.over' must list grid keys, "
                          "e.g. [rho]")
    axes = set(grid) | {k for m in per_method.values() for k in m}
    for k in over:
        if k not in axes or k in ("optimizer", "seed"):
            raise ConfigError(f"{where('select.over')}: key 'select.over' names {k!r}, which "
                              "is not a grid axis (other than optimizer and seed)")
    return {"by": by, "over": [str(k) for k in over]}


def load_study_config(
    path: str | Path, overrides: Iterable[str | tuple] = ()
) -> StudyConfig:
    """Load a study config file (training keys + ``grid`` / ``per_method`` / ``name``)."""
    raw = read_config_file(path)
    raw, sources = apply_overrides(raw, overrides)
    return study_from_dict(raw, str(path), sources)


def config_diff(a: Mapping[str, Any], b: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two config dicts."""
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, Mapping) and isinstance(vb, Mapping) and k != "model_options":
            out.extend(config_diff(va, vb, f"{prefix}{k}."))
        elif va != vb:
            out.append(prefix + k)
    return out


def config_reference() -> str:
    """The Markdown reference table of every key (used for ``docs/training.md``)."""
    hints = _hints(TrainConfig)
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]

    def add(cls: type, prefix: str) -> None:
        h = _hints(cls)
        for f in fields(cls):
            if dataclasses.is_dataclass(h[f.name]):
                add(h[f.name], f"{prefix}{f.name}.")
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            help_text = f.metadata.get("help", "")
            choices = f.metadata.get("choices")
            if choices:
                help_text += f" ({' / '.join(choices)})"
            rows.append(f"| `{prefix}{f.name}` | {_type_name(h[f.name])} | "
                        f"`{json.dumps(default)}` | {help_text} |")

    del hints
    add(TrainConfig, "")
    return "\n".join(rows)
