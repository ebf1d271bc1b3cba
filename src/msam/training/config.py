"""Run and study configuration: one declarative pydantic schema, files and overrides.

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

Every key's type, bounds and choices are declared once, on the fields of :class:`TrainConfig`
and :class:`SharpnessConfig` (pydantic v2 models). Every number must be finite (``.inf`` and
``.nan`` are refused), unknown keys are errors, and duplicate keys in a YAML or JSON file are
errors. Checks that need several keys or a registry (model names, model options, the dataset
list, sharpness metrics) are in :func:`validate`.

Command-line overrides are ``key=value`` strings (``--set lr=0.05``, ``--set
model_options.width=0.5``, ``--set grid.rho=[0.05,0.1]``). The value is parsed as YAML and then
checked against the field type. Every problem raises :class:`ConfigError`, whose message names
the key, the value, and where it came from (the file or the ``--set`` argument).
"""

from __future__ import annotations

import contextvars
import copy
import json
import types
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import annotated_types as at
from pydantic import (
    AllowInfNan,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
)
from pydantic_core import PydanticCustomError

__all__ = [
    "METHODS",
    "VARIANT_KEYS",
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

METHODS = ("sgd", "sam", "msam", "asam", "gsam", "friendlysam", "wsam", "gcsam")
#: The SAM family (docs/variants.md): each uses ``micro_batches`` as msam does (m = 1 is the
#: paper's method) and reads only its own keys below.
VARIANT_KEYS: dict[str, frozenset[str]] = {
    "gsam": frozenset({"gsam_alpha", "gsam_rho_min"}),
    "friendlysam": frozenset({"friendly_sigma", "friendly_lambda"}),
    "wsam": frozenset({"wsam_gamma", "wsam_decoupled"}),
    "gcsam": frozenset(),
}
BASES = ("sgd", "adamw")
SCHEDULES = ("cosine", "step", "constant")
STRATEGIES = ("loop", "vmap", "batched", "lowrank", "auto")
PRECISIONS = ("fp32", "bf16", "fp16")
NONFINITE = ("raise", "skip")
STUDY_KEYS = ("grid", "per_method", "name", "plots", "select", "description", "cases")
#: Perturbation-schedule keys (docs/schedules.md); the base optimizer alone (sgd) ignores them.
SCHEDULE_KEYS = ("every", "start_fraction", "start_epoch", "reuse", "reuse_alpha")
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


# -- field types -------------------------------------------------------------------------------

def _not_bool(value: Any) -> Any:
    # pydantic reads True as 1; a boolean where a number is expected is a mistake.
    if isinstance(value, bool):
        raise PydanticCustomError("bool_for_number", "a boolean is not a number")
    return value


def _lower(value: Any) -> Any:
    return value.strip().lower() if isinstance(value, str) else value


Int = Annotated[int, BeforeValidator(_not_bool)]
#: A finite float (ints and strings such as ``"1e-3"`` are accepted, inf / NaN are not).
Float = Annotated[float, AllowInfNan(False), BeforeValidator(_not_bool)]


def _choice(*options: str) -> Any:
    """A string that must be one of ``options`` (case-insensitive)."""
    return Annotated[Literal[options], BeforeValidator(_lower)]  # type: ignore[valid-type]


def _f(default: Any, doc: str, **bounds: Any) -> Any:
    """A field with a help text; ``bounds`` are pydantic's ``ge`` / ``gt`` / ``le`` / ``lt``."""
    if isinstance(default, (list, dict)):
        return Field(default_factory=lambda d=default: copy.deepcopy(d), description=doc,
                     **bounds)
    if isinstance(default, type) and issubclass(default, BaseModel):
        return Field(default_factory=default, description=doc)
    return Field(default, description=doc, **bounds)


def _opt(tp: Any, **bounds: Any) -> Any:
    """``tp`` with bounds, or null."""
    return Annotated[tp, Field(**bounds)] | None


#: Set while pydantic validates, so that only the outermost construction converts errors.
_VALIDATING: contextvars.ContextVar[bool] = contextvars.ContextVar("_VALIDATING", default=False)


class _Schema(BaseModel):
    """Shared behaviour: unknown keys are errors; construction errors are ConfigErrors."""

    model_config = ConfigDict(extra="forbid", validate_default=False)

    def __init__(self, **data: Any) -> None:
        if _VALIDATING.get():  # a nested model, or called by model_validate: plain pydantic
            super().__init__(**data)
            return
        token = _VALIDATING.set(True)
        try:
            super().__init__(**data)
        except ValidationError as err:
            raise _config_error(err, type(self), _constant("config")) from None
        finally:
            _VALIDATING.reset(token)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump()

    def replace(self, **changes: Any) -> Any:
        return type(self)(**{**self.model_dump(), **changes})


class SharpnessConfig(_Schema):
    """Sharpness measured on the trained model (``msam.analysis.measure``); off when empty."""

    metrics: list[str] = _f([], "metrics of msam.analysis.measure, e.g. [lambda_max, "
                                "m_sharpness]; [] = off")
    examples: Int = _f(2048, "training examples used (a fixed seeded subset)", ge=1)
    batch_size: Int = _f(256, "batch size of the measurement batches", ge=1)
    rho: _opt(Float, ge=0) = _f(None, "radius for m_sharpness (null: the run's rho, or 0.05)")
    m: _opt(Int, ge=1) = _f(None, "micro-batch size for m_sharpness (null: one batch)")
    seed: Int = _f(0, "seed of the measurement (subset, probes)")
    options: dict[str, Any] = _f({}, "extra keyword arguments of measure (e.g. num_probes)")


class TrainConfig(_Schema):
    """Everything one training run needs. See ``docs/training.md`` for the full reference."""

    # data
    dataset: str = _f("fashion_mnist", "dataset name (msam.data.DATASETS)")
    data_dir: str | None = _f(None, "folder searched first for file-based datasets")
    download: bool = _f(False, "download Fashion-MNIST if not found")
    train_subset: _opt(Int, ge=2) = _f(None, "stratified subset of N training examples")
    val_fraction: Float = _f(0.1, "fraction of the training set held out for validation",
                             ge=0, lt=1)
    label_noise: Float = _f(0.0, "symmetric label noise rate on train/val labels", ge=0, le=1)
    augment: bool = _f(False, "random crop + flip (images only)")
    test_subset: _opt(Int, ge=1) = _f(None, "evaluate on a fixed stratified test subset of N")
    max_length: Int = _f(64, "text: tokens per example (padded / truncated)", ge=1)
    min_freq: Int = _f(1, "text, word tokenizer: minimum token count", ge=1)
    max_vocab: _opt(Int, ge=2) = _f(30000, "text, word tokenizer: vocabulary size cap")
    # model
    model: str = _f("small_cnn", "model name (msam.models.MODELS)")
    model_options: dict[str, Any] = _f({}, "keyword options of build_model")
    # optimizer
    optimizer: _choice(*METHODS) = _f("msam", "method; sgd means the base optimizer alone "
                                              "(no SAM)")
    base: _choice(*BASES) = _f("sgd", "base optimizer")
    rho: Float = _f(0.05, "SAM neighbourhood radius (ignored by sgd)", ge=0)
    micro_batches: Int = _f(4, "m for msam, asam and the SAM family (sgd and sam use 1)", ge=1)
    strategy: _choice(*STRATEGIES) = _f("loop", "mSAM execution strategy")
    micro_batch_chunk: _opt(Int, ge=1) = _f(
        None, "batched strategy: micro-batches per batched pass (bounds memory; null: all)")
    eta: Float = _f(0.01, "ASAM offset", gt=0)
    perturb: _choice("all", "norm") = _f(
        "all", "parameters perturbed: all, or only the normalisation layers' (SAM-ON, Mueller "
               "et al. 2023; the others still get the averaged gradient); ignored by sgd")
    # the SAM family (docs/variants.md); each key is read by its method only
    gsam_alpha: Float = _f(0.05, "gsam: weight of the surrogate-gap (orthogonal) term", ge=0)
    gsam_rho_min: _opt(Float, ge=0) = _f(
        None, "gsam: rho follows the lr from rho_min (at min_lr) to rho (at lr); null: constant "
              "rho")
    friendly_sigma: Float = _f(1.0, "friendlysam: weight of the removed EMA (full-gradient) "
                                    "component", ge=0, le=1)
    friendly_lambda: Float = _f(0.9, "friendlysam: decay of the gradient EMA", ge=0, le=1)
    wsam_gamma: Float = _f(0.9, "wsam: sharpness weight gamma (gamma / (1 - gamma) times the "
                                "sharpness; 0.5 = SAM)", ge=0, lt=1)
    wsam_decoupled: bool = _f(True, "wsam: the sharpness term as a plain step after the base "
                                    "step (the paper's form); false: coupled into the gradient")
    lr: Float = _f(0.1, "peak learning rate", gt=0)
    momentum: Float = _f(0.9, "SGD momentum", ge=0, lt=1)
    nesterov: bool = _f(False, "SGD Nesterov momentum")
    weight_decay: Float = _f(5e-4, "weight decay (coupled for sgd, decoupled for adamw)", ge=0)
    betas: list[Annotated[Float, Field(ge=0, lt=1)]] = _f(
        [0.9, 0.999], "AdamW betas", min_length=2, max_length=2)
    adam_eps: Float = _f(1e-8, "AdamW epsilon", gt=0)
    max_grad_norm: _opt(Float, gt=0) = _f(None, "clip the (averaged) gradient to this L2 norm")
    nonfinite: _choice(*NONFINITE) = _f("raise", "on an inf/NaN loss: raise, or skip the step")
    # perturbation schedule (docs/schedules.md; ignored by sgd)
    every: Int = _f(1, "perturb on every N-th step only; plain steps in between", ge=1)
    start_fraction: Float = _f(0.0, "perturb only from this fraction of all steps on "
                                    "(late-phase SAM)", ge=0, lt=1)
    start_epoch: _opt(Float, ge=0) = _f(None, "alternatively: perturb from this epoch on")
    reuse: _choice("none", "looksam") = _f("none", "on the steps between perturbations "
                                                   "reuse the perturbation's gradient part")
    reuse_alpha: Float = _f(0.7, "LookSAM alpha (reuse: looksam)", ge=0)
    # schedule
    schedule: _choice(*SCHEDULES) = _f("cosine", "per-step learning-rate schedule")
    warmup_epochs: Float = _f(0.0, "linear warmup length in epochs (may be fractional)", ge=0)
    min_lr: Float = _f(0.0, "cosine: final learning rate", ge=0)
    milestones: list[Annotated[Float, Field(ge=0)]] = _f(
        [], "step: epochs at which lr *= gamma ([] = 50%, 75%)")
    gamma: Float = _f(0.1, "step: decay factor", gt=0, le=1)
    label_smoothing: Float = _f(0.0, "label smoothing of the training loss", ge=0, lt=1)
    # loop
    epochs: Int = _f(10, "number of epochs", ge=1)
    batch_size: Int = _f(128, "training batch size (split into micro-batches by msam)", ge=1)
    eval_batch_size: Int = _f(512, "evaluation batch size", ge=1)
    drop_last: bool = _f(True, "drop the last incomplete training batch")
    max_steps_per_epoch: _opt(Int, ge=1) = _f(None, "cap on steps per epoch (quick runs)")
    eval_every: Int = _f(1, "evaluate val/test every N epochs (the last epoch always)", ge=1)
    # run
    seed: Int = _f(0, "seed of data subset/split/noise, batch order, init, dropout")
    device: str = _f("auto", "auto, cpu, cuda or cuda:N")
    precision: _choice(*PRECISIONS) = _f("fp32", "autocast dtype; fp16 adds a GradScaler "
                                                 "(CUDA only)")
    deterministic: bool = _f(True, "torch.use_deterministic_algorithms(warn_only=True)")
    threads: _opt(Int, ge=1) = _f(None, "torch.set_num_threads for the run (null: unchanged)")
    out_dir: str = _f("runs/train", "run directory (study: the study directory)", min_length=1)
    progress: bool = _f(True, "tqdm progress bar (only shown on a terminal)")
    tensorboard: bool = _f(False, "also log to TensorBoard (skipped if not installed)")
    sharpness: SharpnessConfig = _f(SharpnessConfig, "sharpness after training")

    def resolved(self, source: str = "config") -> TrainConfig:
        """Validated copy with method rules applied (sgd: rho 0, m 1; sam: m 1)."""
        cfg = _build(TrainConfig, self.model_dump(), _constant(source))
        validate(cfg, source)
        if cfg.optimizer == "sgd":
            cfg.rho, cfg.micro_batches, cfg.perturb = 0.0, 1, "all"
            for key in SCHEDULE_KEYS:  # the base optimizer alone has no perturbation steps
                setattr(cfg, key, TrainConfig.model_fields[key].default)
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
    #: ``[{every: 2}, {start_fraction: 0.75}]``: alternative cells (training-key mappings),
    #: each crossed with the grid -- a union of settings where a grid would give a product.
    cases: list[dict[str, Any]] = field(default_factory=list)
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
        if self.cases:
            out["cases"] = copy.deepcopy(self.cases)
        return out


# -- pydantic errors -> messages ---------------------------------------------------------------

def _constant(label: str) -> Callable[[str], str]:
    return lambda _key: label


def _unwrap(tp: Any) -> tuple[Any, list[Any]]:
    """``Annotated[T, m1, m2]`` -> ``(T, [m1, m2])`` (nested Annotated flattened)."""
    meta: list[Any] = []
    while get_origin(tp) is Annotated:
        args = get_args(tp)
        tp, meta = args[0], [*args[1:], *meta]
    return tp, meta


def _type_name(tp: Any) -> str:
    tp, _ = _unwrap(tp)
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if origin is Literal:
        return "str"
    if tp is type(None):
        return "null"
    if origin is list:
        return f"list of {_type_name(get_args(tp)[0])}"
    if origin is dict or (isinstance(tp, type) and issubclass(tp, BaseModel)):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _bounds(meta: Iterable[Any]) -> str:
    """``[Ge(0), Lt(1)]`` -> ``"in [0, 1)"``; ``[Gt(0)]`` -> ``"> 0"``; no bounds -> ``""``."""
    lo = hi = None
    for m in meta:
        for item in (getattr(m, "metadata", None) or [m]):  # a FieldInfo holds its bounds
            if isinstance(item, at.Ge):
                lo = ("[", item.ge)
            elif isinstance(item, at.Gt):
                lo = ("(", item.gt)
            elif isinstance(item, at.Le):
                hi = ("]", item.le)
            elif isinstance(item, at.Lt):
                hi = (")", item.lt)
    if lo and hi:
        return f"in {lo[0]}{lo[1]:g}, {hi[1]:g}{hi[0]}"
    if lo:
        return f"{'>=' if lo[0] == '[' else '>'} {lo[1]:g}"
    if hi:
        return f"{'<=' if hi[0] == ']' else '<'} {hi[1]:g}"
    return ""


def _rule(tp: Any, meta: list[Any]) -> str:
    """What a value of this (annotated) type must be, e.g. ``a finite number in [0, 1)``."""
    inner, more = _unwrap(tp)
    meta = [*meta, *more]
    nullable = False
    if get_origin(inner) in (Union, types.UnionType):
        args = [a for a in get_args(inner) if a is not type(None)]
        nullable = len(args) < len(get_args(inner))
        inner, more = _unwrap(args[0])
        meta = [*meta, *more]
    bounds = _bounds(meta)
    if inner is float:
        text = "a finite number" + (f" {bounds}" if bounds else "")
    elif bounds:
        text = bounds
    else:
        text = _type_name(inner)
    return text + (" or null" if nullable else "")


def _locate(cls: type[BaseModel], loc: tuple) -> tuple[str, Any, list[Any], type | None]:
    """Dotted key, annotation and metadata of the value at ``loc`` (and the model holding the
    last named field, for unknown-key errors)."""
    key, tp, meta, owner = "", cls, [], cls
    for part in loc:
        if part == "[key]":
            break
        inner, more = _unwrap(tp)
        if get_origin(inner) in (Union, types.UnionType):
            inner, more = _unwrap(next(a for a in get_args(inner) if a is not type(None)))
        if isinstance(part, int):
            key += f"[{part}]"
            if get_origin(inner) is list:
                tp, meta = get_args(inner)[0], []
            continue
        key = f"{key}.{part}" if key else str(part)
        if isinstance(inner, type) and issubclass(inner, BaseModel):
            owner = inner
            info = inner.model_fields.get(str(part))
            if info is None:
                return key, Any, [], owner
            tp, meta = info.annotation, list(info.metadata)
        else:  # inside a free-form mapping (model_options)
            tp, meta = Any, []
    return key, tp, meta, owner


_TYPE_ERRORS = ("_type", "_parsing", "int_from_float", "bool_for_number", "union_tag")


def _problem(err: Mapping[str, Any], cls: type[BaseModel]) -> tuple[str, str]:
    """``(dotted key, what is wrong)`` for one pydantic error."""
    loc = tuple(err["loc"])
    key, tp, meta, owner = _locate(cls, loc[:-2] if "[key]" in loc else loc)
    kind, value = err["type"], err.get("input")
    if kind == "extra_forbidden":
        names = list(owner.model_fields) if owner is not None else []
        return key, (f"is an unknown key{_suggest(str(loc[-1]), names)}; valid keys: "
                     f"{', '.join(names)}")
    if "[key]" in loc:
        return key, f"has a non-string key {value!r}"
    if kind == "literal_error":
        choices = ", ".join(map(str, get_args(_unwrap(tp)[0])))
        return key, f"is {value!r}; choose one of {choices}"
    if kind in ("too_short", "too_long"):
        n = next((m.min_length for m in meta if getattr(m, "min_length", None)), None)
        return key, f"must have {n} items, got {value!r}"
    if kind == "finite_number":
        return key, f"must be {_rule(tp, meta)}, got {value!r}"
    if kind.endswith(_TYPE_ERRORS) or kind in _TYPE_ERRORS:
        return key, f"must be {_type_name(tp)}, got {value!r}"
    if kind.startswith(("greater_than", "less_than")) or kind == "string_too_short":
        rule = _rule(tp, meta) if kind != "string_too_short" else "a non-empty string"
        return key, f"must be {rule}, got {value!r}"
    return key, f"{err.get('msg', kind)}, got {value!r}"  # pragma: no cover - other kinds


def _config_error(err: ValidationError, cls: type[BaseModel],
                  where: Callable[[str], str], prefix: str = "") -> ConfigError:
    """The first problem of ``err`` as a ConfigError naming the key, value and source."""
    errors = err.errors()
    key, what = _problem(errors[0], cls)
    key = prefix + key
    if what.startswith("is an unknown key"):
        text = f"{where(key)}: unknown key '{key}'{what[len('is an unknown key'):]}"
    else:
        text = f"{where(key)}: key '{key}' {what}"
    if len(errors) > 1:
        text += f" (and {len(errors) - 1} more problem(s))"
    return ConfigError(text)


def _build(cls: type[BaseModel], raw: Mapping[str, Any], where: Callable[[str], str]) -> Any:
    token = _VALIDATING.set(True)
    try:
        return cls.model_validate(dict(raw))
    except ValidationError as err:
        raise _config_error(err, cls, where) from None
    finally:
        _VALIDATING.reset(token)


def _suggest(key: str, names: Iterable[str]) -> str:
    import difflib

    close = difflib.get_close_matches(key, list(names), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _value_checker(key: str) -> Callable[[Any], Any]:
    """Validate one value of the training key ``key`` (grid values)."""
    info = TrainConfig.model_fields[key]
    tp = Annotated[(info.annotation, *info.metadata)] if info.metadata else info.annotation
    adapter = TypeAdapter(tp)

    def check(value: Any) -> Any:
        try:
            return adapter.validate_python(value)
        except ValidationError as err:
            e = dict(err.errors()[0])
            e["loc"] = (key, *e["loc"])
            raise ConfigError(_problem(e, TrainConfig)[1]) from None

    return check


# -- cross-field validation --------------------------------------------------------------------

def _check(cond: bool, where: Any, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{_at(where, key)}: key '{key}' {msg}")


def _at(where: Any, key: str) -> str:
    return where(key) if callable(where) else str(where)


def validate(cfg: TrainConfig, where: Any = "config") -> None:
    """Checks that need several keys or a registry; raises :class:`ConfigError` naming the key.

    Types, bounds and choices are checked by the schema when ``cfg`` is built. ``where`` is
    the source label, or a function ``key -> label`` (file or ``--set``).
    """
    from msam.data.loading import DATASETS, _canonical_name

    try:
        cfg.dataset = _canonical_name(cfg.dataset)
    except ValueError:
        raise ConfigError(f"{_at(where, 'dataset')}: key 'dataset' is {cfg.dataset!r}; "
                          f"choose one of {', '.join(DATASETS)}") from None
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
    _check(not (cfg.nesterov and cfg.momentum == 0), where, "nesterov",
           "needs momentum > 0")
    _check(cfg.warmup_epochs <= cfg.epochs, where, "warmup_epochs",
           f"must be in [0, epochs={cfg.epochs}], got {cfg.warmup_epochs:g}")
    _check(cfg.min_lr <= cfg.lr, where, "min_lr", f"must be in [0, lr={cfg.lr:g}], "
                                                  f"got {cfg.min_lr:g}")
    if cfg.optimizer == "gsam" and cfg.gsam_rho_min is not None:
        _check(cfg.gsam_rho_min <= cfg.rho, where, "gsam_rho_min",
               f"must be in [0, rho={cfg.rho:g}], got {cfg.gsam_rho_min:g}")
        _check(cfg.min_lr < cfg.lr, where, "gsam_rho_min",
               f"needs min_lr < lr (rho follows the lr between them), got min_lr={cfg.min_lr:g}")
    if cfg.optimizer in ("msam", "asam", *VARIANT_KEYS):
        _check(cfg.micro_batches <= cfg.batch_size, where, "micro_batches",
               f"is {cfg.micro_batches}, more than batch_size={cfg.batch_size}")
    _check(cfg.start_epoch is None or cfg.start_fraction == 0, where, "start_epoch",
           "and start_fraction are both set; give one of them")
    _check(cfg.start_epoch is None or cfg.start_epoch < cfg.epochs, where, "start_epoch",
           f"must be in [0, epochs={cfg.epochs}), got {cfg.start_epoch}")
    _check(cfg.perturb == "all" or cfg.optimizer == "sgd"
           or not (cfg.model == "mlp" or cfg.model_options.get("norm") == "none"), where,
           "perturb", f"is 'norm' but model {cfg.model!r} "
           f"{'with norm: none ' if cfg.model != 'mlp' else ''}has no normalisation layers")
    _check(cfg.perturb == "all" or cfg.reuse == "none" or cfg.optimizer == "sgd", where,
           "perturb", f"is {cfg.perturb!r} with reuse {cfg.reuse!r}; reuse needs every "
           "parameter perturbed")
    _check(cfg.reuse == "none" or cfg.every >= 2, where, "reuse",
           f"is {cfg.reuse!r} but every is {cfg.every}; reuse needs every >= 2")
    _check(cfg.reuse == "none" or not (cfg.optimizer == "wsam" and cfg.wsam_decoupled), where,
           "reuse", f"is {cfg.reuse!r} with optimizer wsam (decoupled), whose sharpness step is "
           "not in the gradient that reuse rebuilds; set reuse: none or wsam_decoupled: false")
    dev = cfg.device.lower()
    _check(dev in ("auto", "cpu", "cuda") or (dev.startswith("cuda:") and dev[5:].isdigit()),
           where, "device", f"is {cfg.device!r}; use auto, cpu, cuda or cuda:N")
    s = cfg.sharpness
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
    """Parse a YAML (``.yaml``/``.yml``), TOML (``.toml``) or JSON (``.json``) mapping.

    The file must be UTF-8 text; a key given twice in one mapping is an error.
    """
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file {str(path)!r} is a directory; give the path of a .yaml, "
                          ".toml or .json file")
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} not found")
    suffix = path.suffix.lower()
    if suffix not in (".yaml", ".yml", ".toml", ".json"):
        raise ConfigError(f"{path}: unknown config format {suffix!r}; use .yaml, .toml or "
                          ".json")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (byte {err.start}: {err.reason}); save the "
                          "config as UTF-8") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot read: {err.strerror or err}") from None
    try:
        if suffix in (".yaml", ".yml"):
            data = _load_yaml(text)
        elif suffix == ".toml":
            try:
                import tomllib
            except ImportError:  # Python 3.10
                try:
                    import tomli as tomllib  # type: ignore[no-redef]
                except ImportError:
                    raise ConfigError(f"{path}: TOML configs need Python 3.11+ or the "
                                      "package tomli (pip install tomli)") from None
            data = tomllib.loads(text)  # TOML itself forbids duplicate keys
        else:
            data = json.loads(text, object_pairs_hook=_unique_pairs)
    except ConfigError:
        raise
    except _DuplicateKey as err:
        raise ConfigError(f"{path}: {err}; remove one of them") from None
    except Exception as err:  # parser errors: yaml.YAMLError, tomllib.TOMLDecodeError, ...
        raise ConfigError(f"{path}: cannot parse: {err}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got "
                          f"{type(data).__name__}")
    return data


class _DuplicateKey(Exception):
    pass


def _unique_pairs(pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
    out: dict[Any, Any] = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(f"key {k!r} appears twice")
        out[k] = v
    return out


def _load_yaml(text: str) -> Any:
    """``yaml.safe_load`` that refuses a key given twice in one mapping."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node: Any, deep: bool = False) -> Any:
            seen: dict[Any, Any] = {}
            for key_node, _value in node.value:
                key = self.construct_object(key_node, deep=deep)
                if key in seen:
                    raise _DuplicateKey(f"key {key!r} appears twice (line "
                                        f"{seen[key].start_mark.line + 1} and line "
                                        f"{key_node.start_mark.line + 1})")
                seen[key] = key_node
            return super().construct_mapping(node, deep=deep)

    return yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass


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
    cfg = _build(TrainConfig, raw, where)
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
    cases = raw.pop("cases", None) or []
    train = train_config_from_dict(raw, source, sources)
    if not isinstance(description, str):
        raise ConfigError(f"{where('description')}: key 'description' must be a string")
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{where('name')}: key 'name' must be a non-empty string")
    if not isinstance(plots, bool):
        raise ConfigError(f"{where('plots')}: key 'plots' must be true or false")
    train_keys = set(TrainConfig.model_fields)

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
            check = _value_checker(top) if "." not in str(key) else (lambda v: v)
            checked = []
            for i, v in enumerate(values):
                try:
                    checked.append(check(v))
                except ConfigError as err:
                    raise ConfigError(f"{where(full)}: key '{full}[{i}]' {err}") from None
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
    if not isinstance(cases, list) or not all(isinstance(c, Mapping) for c in cases):
        raise ConfigError(f"{where('cases')}: key 'cases' must be a list of mappings "
                          "{key: value}")
    checked_cases = []
    for i, case in enumerate(cases):
        one = check_axes({k: [v] for k, v in case.items()}, f"cases[{i}]")
        for k in one:
            if k in ("optimizer", "seed") or k in grid_axes:
                raise ConfigError(f"{where('cases')}: key 'cases[{i}].{k}' is also a grid axis "
                                  "(or optimizer / seed); put it in one place")
        checked_cases.append({k: v[0] for k, v in one.items()})
    if select is not None:
        select = _check_select(select, grid_axes, pm, checked_cases, where)
    return StudyConfig(train=train, grid=grid_axes, per_method=pm, name=name, plots=plots,
                       select=select, description=description.strip(), raw=dict(raw),
                       source=source, cases=checked_cases)


def _check_select(select: Any, grid: Mapping[str, list[Any]],
                  per_method: Mapping[str, Mapping[str, list[Any]]],
                  cases: list[dict[str, Any]], where: Callable[[str], str]) -> dict[str, Any]:
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
    axes = set(grid) | {k for m in per_method.values() for k in m} | {k for c in cases for k in c}
    for k in over:
        if k not in axes or k in ("optimizer", "seed"):
            raise ConfigError(f"{where('select.over')}: key 'select.over' names {k!r}, which "
                              "is not a grid axis or a key of cases (other than optimizer and "
                              "seed)")
    return {"by": by, "over": [str(k) for k in over]}


def load_study_config(
    path: str | Path, overrides: Iterable[str | tuple] = ()
) -> StudyConfig:
    """Load a study config file (training keys + ``grid`` / ``per_method`` / ``name``)."""
    raw = read_config_file(path)
    raw, sources = apply_overrides(raw, overrides)
    return study_from_dict(raw, str(path), sources)


def _default_of(key: str) -> Any:
    """The schema default of a dotted training key (None for keys it does not know)."""
    cls: Any = TrainConfig
    parts = key.split(".")
    for i, part in enumerate(parts):
        info = cls.model_fields.get(part) if isinstance(cls, type) else None
        if info is None:
            return None
        tp, _ = _unwrap(info.annotation)
        if i < len(parts) - 1:
            if not (isinstance(tp, type) and issubclass(tp, BaseModel)):
                return None
            cls = tp
            continue
        default = info.get_default(call_default_factory=True)
        return default.model_dump() if isinstance(default, BaseModel) else default
    return None  # pragma: no cover - empty key


def config_diff(a: Mapping[str, Any], b: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two config dicts.

    A key present in only one of them counts as the schema's default in the other, so a
    record written before a key existed (e.g. ``every``) matches a config that leaves it at
    its default.
    """
    out = []
    for k in sorted(set(a) | set(b)):
        va = a[k] if k in a else _default_of(prefix + k)
        vb = b[k] if k in b else _default_of(prefix + k)
        if isinstance(va, Mapping) and isinstance(vb, Mapping) and k != "model_options":
            out.extend(config_diff(va, vb, f"{prefix}{k}."))
        elif va != vb:
            out.append(prefix + k)
    return out


def config_reference() -> str:
    """The Markdown reference table of every key (used for ``docs/training.md``)."""
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]

    def add(cls: type[BaseModel], prefix: str) -> None:
        for name, info in cls.model_fields.items():
            tp, _ = _unwrap(info.annotation)
            if isinstance(tp, type) and issubclass(tp, BaseModel):
                add(tp, f"{prefix}{name}.")
                continue
            default = info.get_default(call_default_factory=True)
            help_text = info.description or ""
            if get_origin(tp) is Literal:
                help_text += f" ({' / '.join(get_args(tp))})"
            rule = _rule(info.annotation, list(info.metadata))
            if rule != _type_name(info.annotation) and "null" != rule:
                help_text += f"; must be {rule}"
            rows.append(f"| `{prefix}{name}` | {_type_name(info.annotation)} | "
                        f"`{json.dumps(default)}` | {help_text} |")

    add(TrainConfig, "")
    return "\n".join(rows)
