"""Run configuration: one declarative pydantic schema, and its error messages.

A run is described by one :class:`TrainConfig` (a study adds grid keys:
:mod:`msam.training.studyconfig`). Files are flat mappings of the field names below
(``model_options`` and ``sharpness`` are nested mappings)::

    dataset: fashion_mnist
    train_subset: 5000
    model: small_cnn
    model_options: {width: 0.5}
    optimizer: msam
    micro_batches: 4

Every key's type, bounds and choices are declared once, on the fields of the pydantic v2
models below; checks that need several keys or a registry (model names and options, the
dataset list, sharpness metrics) are their ``model_validator``s. Every number is finite, ints
fit 64 bits, unknown keys are errors. Every problem raises :class:`ConfigError`, whose message
names the key, the value, where it came from (the file, the ``--set`` argument) and the fix.
Files and overrides: :mod:`msam.training.configfile`.
"""

from __future__ import annotations

import json
import types
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal, Union, get_args, get_origin

import annotated_types as at
from pydantic import (
    AfterValidator,
    AllowInfNan,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)
from pydantic_core import PydanticCustomError

from .configfile import (
    ConfigError,
    apply_overrides,
    check_key_names,
    parse_override,
    read_config_file,
    where_fn,
)

if TYPE_CHECKING:  # at run time: __getattr__ below (studyconfig imports this module)
    from .studyconfig import StudyConfig, load_study_config, study_from_dict  # noqa: F401

__all__ = [  # and, from studyconfig: StudyConfig, study_from_dict, load_study_config
    "METHODS", "VARIANT_KEYS", "ConfigError", "SharpnessConfig", "TrainConfig",
    "apply_overrides", "config_reference", "load_config", "parse_override", "read_config_file",
    "train_config_from_dict",
]

def variant_keys() -> dict[str, frozenset[str]]:
    """The SAM family from the rule registry (docs/variants.md; ``msam.register_rule`` adds
    to it): each rule's run-config keys. Each uses ``micro_batches`` as msam does (m = 1 is the
    paper's method) and reads only its own keys."""
    from msam.core.registry import RULES

    return {name: frozenset(cls.config_keys) for name, cls in RULES.items()
            if name not in ("sam", "asam")}


def _takes_micro_batches(method: str) -> bool:
    """False for a rule without an ascent pass (Momentum-SAM): one direction per batch."""
    from msam.core.registry import RULES

    cls = RULES.get(method)
    return cls is None or cls.ascent


def methods() -> tuple[str, ...]:
    """The methods a run config may name: sgd, sam, msam, asam and the registry's rules."""
    return ("sgd", "sam", "msam", "asam", *variant_keys())


#: As at import (the registry can grow later: :func:`methods`, :func:`variant_keys`).
METHODS = methods()
VARIANT_KEYS: dict[str, frozenset[str]] = variant_keys()
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
#: Keys that may change between a checkpoint and the run that resumes it (they do not change
#: what is computed, or, for ``epochs``, extend / shorten the run on purpose).
RESUMABLE_CHANGES = frozenset({
    "epochs", "out_dir", "progress", "threads", "tensorboard", "device", "eval_batch_size",
    "eval_every", "sharpness", "data_dir", "download",
})
#: The largest float32: a larger lr or rho overflows when torch makes it a tensor.
F32_MAX = 3.4e38


# -- field types -------------------------------------------------------------------------------

def _not_bool(value: Any) -> Any:
    # pydantic reads True as 1; a boolean where a number is expected is a mistake.
    if isinstance(value, bool):
        raise PydanticCustomError("bool_for_number", "a boolean is not a number")
    return value


def _int64(value: int) -> int:
    # A larger int overflows deep inside torch (e.g. a seed, after the data has loaded).
    if not -(2**63) <= value < 2**63:
        raise PydanticCustomError("int64", "does not fit a 64-bit integer")
    return value


Int = Annotated[int, BeforeValidator(_not_bool), AfterValidator(_int64)]
#: A finite float (ints and strings such as ``"1e-3"`` are accepted, inf / NaN are not).
Float = Annotated[float, AllowInfNan(False), BeforeValidator(_not_bool)]


def _choice(*options: str) -> Any:
    """A string that must be one of ``options`` (case-insensitive)."""
    lower = BeforeValidator(lambda v: v.strip().lower() if isinstance(v, str) else v)
    return Annotated[Literal[options], lower]  # type: ignore[valid-type]


def _f(default: Any, doc: str, **bounds: Any) -> Any:
    """A field with a help text; ``bounds`` are pydantic's ``ge`` / ``gt`` / ``le`` / ``lt``."""
    if isinstance(default, (list, dict)) or isinstance(default, type):
        factory = default if isinstance(default, type) else lambda d=default: type(d)(d)
        return Field(default_factory=factory, description=doc, **bounds)
    return Field(default, description=doc, **bounds)


def _opt(tp: Any, **bounds: Any) -> Any:
    """``tp`` with bounds, or null."""
    return Annotated[tp, Field(**bounds)] | None


def _fail(key: str, what: str) -> PydanticCustomError:
    """A failed check; ``key``: the key it blames, relative to the validated model (a model
    validator's error has no location of its own; "" in a field validator)."""
    return PydanticCustomError("config", "{what}", {"key": key, "what": what})


class _Constructed(type(BaseModel)):  # type: ignore[misc]
    """``TrainConfig(**keys)`` raises :class:`ConfigError`. (A custom ``__init__`` would not
    do: pydantic also calls it for nested models while validating.)"""

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().__call__(*args, **kwargs)
        except ValidationError as err:
            raise _config_error(err, cls, lambda _key: "config", cls._key) from None


class _Schema(BaseModel, metaclass=_Constructed):  # type: ignore[misc]
    """Shared behaviour: unknown keys are errors; construction errors are ConfigErrors."""

    model_config = ConfigDict(extra="forbid", validate_default=False)
    _key: ClassVar[str] = ""  # where the model sits in a run config, e.g. "sharpness."

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump()

    def replace(self, **changes: Any) -> Any:
        return type(self)(**{**self.model_dump(), **changes})


class MeasureOptions(_Schema):
    """The keyword options of ``msam.analysis.measure`` a run may set (all optional)."""

    _key: ClassVar[str] = "sharpness.options."

    k: _opt(Int, ge=1) = _f(None, "top_eigenvalues: how many")
    method: _opt(_choice("lanczos", "power")) = _f(None, "eigenvalue method")
    max_iter: _opt(Int, ge=1) = _f(None, "Lanczos / power iteration cap")
    tol: _opt(Float, gt=0) = _f(None, "eigenvalue tolerance")
    num_probes: _opt(Int, ge=1) = _f(None, "trace: Hutchinson probes")
    ascent_steps: _opt(Int, ge=1) = _f(None, "m_sharpness: ascent steps")
    step_size: _opt(Float, gt=0) = _f(None, "m_sharpness: ascent step size")
    adaptive: bool | None = _f(None, "m_sharpness / average_sharpness: adaptive radius")
    num_samples: _opt(Int, ge=1) = _f(None, "average_sharpness: random directions")
    slq_runs: _opt(Int, ge=1) = _f(None, "spectral_density: SLQ runs")
    slq_steps: _opt(Int, ge=1) = _f(None, "spectral_density: Lanczos steps per run")
    slq_points: _opt(Int, ge=2) = _f(None, "spectral_density: grid points")
    include_samples: bool | None = _f(None, "keep raw per-probe samples in sharpness.json")

    @model_serializer(mode="wrap")
    def _set_only(self, handler: Any) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None}


class SharpnessConfig(_Schema):
    """Sharpness measured on the trained model (``msam.analysis.measure``); off when empty."""

    _key: ClassVar[str] = "sharpness."

    metrics: list[str] = _f([], "metrics of msam.analysis.measure, e.g. [lambda_max, "
                                "m_sharpness]; [] = off")
    examples: Int = _f(2048, "training examples used (a fixed seeded subset)", ge=1)
    batch_size: Int = _f(256, "batch size of the measurement batches", ge=1)
    rho: _opt(Float, ge=0, le=F32_MAX) = _f(
        None, "radius for m_sharpness (null: 0.05 for every run, so runs compare)")
    m: _opt(Int, ge=1) = _f(None, "m_sharpness: micro-batches per measurement batch, a count "
                                  "as everywhere in msam (null: 1, the whole batch)")
    seed: Int = _f(0, "seed of the measurement (subset, probes)")
    options: MeasureOptions = _f(MeasureOptions, "extra options of measure (e.g. num_probes)")

    @model_validator(mode="after")
    def _check(self) -> SharpnessConfig:
        try:
            from msam.analysis import AVAILABLE_METRICS
        except ImportError:  # the analysis layer is optional here
            AVAILABLE_METRICS = tuple(self.metrics)
        bad = [m for m in self.metrics if m not in AVAILABLE_METRICS]
        if bad:
            raise _fail("metrics", f"has unknown metric(s) {bad}; available: "
                                   f"{', '.join(AVAILABLE_METRICS)}")
        if self.m is not None and self.batch_size % self.m:
            raise _fail("m", f"is {self.m}, which does not divide sharpness.batch_size="
                             f"{self.batch_size} into equal micro-batches")
        return self


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
    optimizer: str = _f("msam", "method (sgd, sam, msam, asam or a rule of the registry, e.g. "
                                "gsam, momentumsam); sgd means the base optimizer alone (no SAM)")
    base: _choice(*BASES) = _f("sgd", "base optimizer")
    rho: Float = _f(0.05, "SAM neighbourhood radius (ignored by sgd)", ge=0, le=F32_MAX)
    micro_batches: Int = _f(4, "m for msam, asam and the SAM family (sgd, sam and momentumsam "
                               "use 1)", ge=1)
    strategy: _choice(*STRATEGIES) = _f("loop", "mSAM execution strategy")
    micro_batch_chunk: _opt(Int, ge=1) = _f(
        None, "batched strategy: micro-batches per batched pass (bounds memory; null: all)")
    eta: Float = _f(0.01, "ASAM offset", gt=0, le=F32_MAX)
    rho_scaling: _choice("none", "sqrt_m") = _f(
        "none", "none: rho is each micro-batch's radius; sqrt_m: rho is SAM's (m = 1) radius "
                "and each micro-batch gets rho / sqrt(m) (msam.rho_for_m, docs/choosing_rho.md)")
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
    lr: Float = _f(0.1, "peak learning rate", gt=0, le=F32_MAX)
    momentum: Float = _f(0.9, "SGD momentum", ge=0, lt=1)
    nesterov: bool = _f(False, "SGD Nesterov momentum")
    weight_decay: Float = _f(5e-4, "weight decay (coupled for sgd, decoupled for adamw)", ge=0,
                             le=F32_MAX)
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
    seed: Int = _f(0, "seed of data subset/split/noise, batch order, init, dropout", ge=0)
    device: str = _f("auto", "auto, cpu, cuda or cuda:N")
    precision: _choice(*PRECISIONS) = _f("fp32", "autocast dtype; fp16 adds a GradScaler "
                                                 "(CUDA only)")
    deterministic: bool = _f(True, "torch.use_deterministic_algorithms(warn_only=True)")
    threads: _opt(Int, ge=1, le=4096) = _f(None, "torch.set_num_threads for the run (null: "
                                                 "unchanged)")
    out_dir: str = _f("runs/train", "run directory (study: the study directory)", min_length=1)
    progress: bool = _f(True, "tqdm progress bar (only shown on a terminal)")
    tensorboard: bool = _f(False, "also log to TensorBoard (skipped if not installed)")
    sharpness: SharpnessConfig = _f(SharpnessConfig, "sharpness after training")

    @field_validator("optimizer", mode="before")
    @classmethod
    def _optimizer(cls, name: Any) -> Any:
        if not isinstance(name, str):
            return name   # pydantic's own type error
        name = name.strip().lower()
        if name not in methods():
            raise _fail("", f"is {name!r}; choose one of {', '.join(methods())}")
        return name

    @field_validator("dataset")
    @classmethod
    def _dataset(cls, name: str) -> str:
        from msam.data.loading import DATASETS, _canonical_name

        try:
            return _canonical_name(name)
        except ValueError:
            raise _fail("", f"is {name!r}; choose one of {', '.join(DATASETS)}") from None

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        for key, ok, what in _cross_checks(self):
            if not ok:
                raise _fail(key, what)
        return self

    def resolved(self, source: str = "config") -> TrainConfig:
        """Validated copy with method rules applied (sgd: rho 0, m 1; sam: m 1)."""
        cfg = _build(TrainConfig, self.model_dump(), lambda _key: source)
        if cfg.optimizer == "sgd":
            cfg.rho, cfg.micro_batches, cfg.perturb = 0.0, 1, "all"
            for key in SCHEDULE_KEYS:  # the base optimizer alone has no perturbation steps
                setattr(cfg, key, TrainConfig.model_fields[key].default)
        elif cfg.optimizer == "sam" or not _takes_micro_batches(cfg.optimizer):
            cfg.micro_batches = 1   # SAM; a rule whose direction is shared (Momentum-SAM)
        return cfg


def _cross_checks(c: TrainConfig) -> Iterable[tuple[str, bool, str]]:
    """``(key, holds, what is wrong)`` for every check that needs several keys or a registry;
    lazily, so a check only runs once those before it hold."""
    from msam.models import MODELS, is_text_model, model_options

    yield "model", c.model in MODELS, f"is {c.model!r}; choose one of {', '.join(MODELS)}"
    valid = model_options(c.model)
    for k, v in c.model_options.items():
        yield (f"model_options.{k}", k in valid, f"is an unknown option for model {c.model!r}; "
               f"valid options: {', '.join(valid) or '(none)'}")
        problem = _option_problem(v, valid[k])
        yield (f"model_options.{k}", problem is None,
               f"for model {c.model!r} must be {problem}, got {v!r}")
    text = c.dataset == "rotten_tomatoes"
    yield ("model", text == is_text_model(c.model), f"is {c.model!r}, a "
           f"{'image' if text else 'text'} model, but dataset {c.dataset!r} is "
           f"{'text' if text else 'images'}")
    yield "augment", not (text and c.augment), "must be false for text data"
    yield "nesterov", not (c.nesterov and c.momentum == 0), "needs momentum > 0"
    yield ("warmup_epochs", c.warmup_epochs <= c.epochs,
           f"must be in [0, epochs={c.epochs}], got {c.warmup_epochs:g}")
    yield "min_lr", c.min_lr <= c.lr, f"must be in [0, lr={c.lr:g}], got {c.min_lr:g}"
    if c.optimizer == "gsam" and c.gsam_rho_min is not None:
        yield ("gsam_rho_min", c.gsam_rho_min <= c.rho,
               f"must be in [0, rho={c.rho:g}], got {c.gsam_rho_min:g}")
        yield ("gsam_rho_min", c.min_lr < c.lr,
               f"needs min_lr < lr (rho follows the lr between them), got min_lr={c.min_lr:g}")
    yield ("micro_batches", c.optimizer not in ("msam", "asam", *variant_keys())
           or c.micro_batches <= c.batch_size,
           f"is {c.micro_batches}, more than batch_size={c.batch_size}")
    yield ("start_epoch", c.start_epoch is None or c.start_fraction == 0,
           "and start_fraction are both set; give one of them")
    yield ("start_epoch", c.start_epoch is None or c.start_epoch < c.epochs,
           f"must be in [0, epochs={c.epochs}), got {c.start_epoch}")
    yield ("perturb", c.perturb == "all" or c.optimizer == "sgd"
           or not (c.model == "mlp" or c.model_options.get("norm") == "none"),
           f"is 'norm' but model {c.model!r} "
           f"{'with norm: none ' if c.model != 'mlp' else ''}has no normalisation layers")
    yield ("perturb", c.perturb == "all" or c.reuse == "none" or c.optimizer == "sgd",
           f"is {c.perturb!r} with reuse {c.reuse!r}; reuse needs every parameter perturbed")
    yield ("reuse", c.reuse == "none" or c.every >= 2,
           f"is {c.reuse!r} but every is {c.every}; reuse needs every >= 2")
    yield ("reuse", c.reuse == "none" or not (c.optimizer == "wsam" and c.wsam_decoupled),
           f"is {c.reuse!r} with optimizer wsam (decoupled), whose sharpness step is not in the "
           "gradient that reuse rebuilds; set reuse: none or wsam_decoupled: false")
    dev = c.device.lower()
    yield ("device", dev in ("auto", "cpu", "cuda") or (dev.startswith("cuda:")
                                                         and dev[5:].isdigit()),
           f"is {c.device!r}; use auto, cpu, cuda or cuda:N")


def _option_problem(value: Any, default: Any) -> str | None:
    """What a model option must be, judged by its default's type (None: fine)."""
    if default is None:
        return None
    if isinstance(default, bool):
        return None if isinstance(value, bool) else "true or false"
    if isinstance(default, (int, float)):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if isinstance(default, int) and ok and not float(value).is_integer():
            ok = False
        return None if ok else ("an integer" if isinstance(default, int) else "a number")
    if isinstance(default, str):
        return None if isinstance(value, str) else "a string"
    if isinstance(default, (list, tuple)):
        example = f"a list like {list(default)}"
        if not isinstance(value, (list, tuple)):
            return example
        return next((example for x in value if default and _option_problem(x, default[0])),
                    None)
    return None


# -- pydantic errors -> messages ---------------------------------------------------------------

def _unwrap(tp: Any) -> tuple[Any, list[Any]]:
    """``Annotated[T, m1]`` -> ``(T, [m1])``; ``T | None`` -> ``T`` (nested ones flattened)."""
    meta: list[Any] = []
    while True:
        if get_origin(tp) is Annotated:
            tp, meta = get_args(tp)[0], [*get_args(tp)[1:], *meta]
        elif get_origin(tp) in (Union, types.UnionType) and type(None) in get_args(tp):
            tp = next(a for a in get_args(tp) if a is not type(None))
        else:
            return tp, meta


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Annotated:
        return _type_name(get_args(tp)[0])
    if get_origin(tp) in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if tp is type(None):
        return "null"
    if get_origin(tp) is list:
        return f"list of {_type_name(get_args(tp)[0])}"
    if get_origin(tp) is dict or (isinstance(tp, type) and issubclass(tp, BaseModel)):
        return "mapping"
    return "str" if get_origin(tp) is Literal else getattr(tp, "__name__", str(tp))


def _rule(tp: Any, meta: Iterable[Any] = ()) -> str:
    """What a value of this field must be, e.g. ``a finite number in [0, 1) or null``."""
    inner, more = _unwrap(tp)
    lo = hi = None
    for m in [*meta, *more]:
        for b in (getattr(m, "metadata", None) or [m]):  # a FieldInfo holds its bounds
            if isinstance(b, (at.Ge, at.Gt)):
                lo = ("[", b.ge) if isinstance(b, at.Ge) else ("(", b.gt)
            elif isinstance(b, (at.Le, at.Lt)):
                hi = ("]", b.le) if isinstance(b, at.Le) else (")", b.lt)
    bounds = (f"in {lo[0]}{lo[1]:g}, {hi[1]:g}{hi[0]}" if lo and hi else
              f"{'>=' if lo[0] == '[' else '>'} {lo[1]:g}" if lo else
              f"{'<=' if hi[0] == ']' else '<'} {hi[1]:g}" if hi else "")
    text = ("a finite number" + (f" {bounds}" if bounds else "") if inner is float
            else bounds or _type_name(inner))
    return text + (" or null" if "null" in _type_name(tp) else "")


def _locate(cls: type[BaseModel], loc: tuple) -> tuple[str, Any, list[Any], type]:
    """Dotted key, annotation and metadata of the value at ``loc``, and the model holding the
    last named field (for unknown-key errors)."""
    key, tp, meta, owner = "", cls, [], cls
    for part in loc:
        inner = _unwrap(tp)[0]
        if isinstance(part, int):
            key += f"[{part}]"
            tp, meta = (get_args(inner)[0], []) if get_origin(inner) is list else (tp, meta)
            continue
        key = f"{key}.{part}" if key else str(part)
        info = inner.model_fields.get(str(part)) if isinstance(inner, type) and issubclass(
            inner, BaseModel) else None
        owner = inner if info is not None or isinstance(inner, type) and issubclass(
            inner, BaseModel) else owner
        tp, meta = (info.annotation, list(info.metadata)) if info else (Any, [])
    return key, tp, meta, owner


def _problem(err: Mapping[str, Any], cls: type[BaseModel]) -> tuple[str, str]:
    """``(dotted key, what is wrong)`` for one pydantic error."""
    loc, kind, value = tuple(err["loc"]), err["type"], err.get("input")
    if kind == "config":  # a check across keys: the key is in ctx (or in loc)
        key = ".".join(k for k in (_locate(cls, loc)[0], err["ctx"]["key"]) if k)
        return key, err["ctx"]["what"]
    key, tp, meta, owner = _locate(cls, loc[:loc.index("[key]") - 1] if "[key]" in loc else loc)
    if kind == "extra_forbidden":
        names = list(owner.model_fields)
        return key, (f"is an unknown key{_suggest(str(loc[-1]), names)}; valid keys: "
                     f"{', '.join(names)}")
    if "[key]" in loc:
        return key, f"has a non-string key {value!r}"
    if kind == "literal_error":
        return key, f"is {value!r}; choose one of {', '.join(get_args(_unwrap(tp)[0]))}"
    if kind in ("too_short", "too_long"):
        n = next(m.min_length for m in meta if getattr(m, "min_length", None))
        return key, f"must have {n} items, got {value!r}"
    if kind == "int64":
        return key, f"must be an integer below 2**63 (a 64-bit integer), got {value!r}"
    if kind == "string_too_short":
        return key, f"must be a non-empty string, got {value!r}"
    if kind == "finite_number" or kind.startswith(("greater_than", "less_than")):
        return key, f"must be {_rule(tp, meta)}, got {value!r}"
    return key, f"must be {_type_name(tp)}, got {value!r}"  # type and parsing errors


def _config_error(err: ValidationError, cls: type[BaseModel], where: Callable[[str], str],
                  prefix: str = "") -> ConfigError:
    """The first problem of ``err`` as a ConfigError naming the key, value and source."""
    key, what = _problem(err.errors()[0], cls)
    key = prefix + key
    text = (f"{where(key)}: unknown key '{key}'{what[len('is an unknown key'):]}"
            if what.startswith("is an unknown key") else f"{where(key)}: key '{key}' {what}")
    more = len(err.errors()) - 1
    return ConfigError(text + (f" (and {more} more problem(s))" if more else ""))


def _build(cls: type[BaseModel], raw: Mapping[str, Any], where: Callable[[str], str]) -> Any:
    try:
        return cls.model_validate(dict(raw))
    except ValidationError as err:
        raise _config_error(err, cls, where) from None


#: Names other tools use for our keys (too far apart for a spelling match).
_ALIASES = {"learning_rate": "lr", "m": "micro_batches", "num_micro_batches": "micro_batches",
            "num_epochs": "epochs", "wd": "weight_decay", "output_dir": "out_dir",
            "out": "out_dir", "scheduler": "schedule", "lr_schedule": "schedule",
            "method": "optimizer", "arch": "model", "data": "dataset", "radius": "rho"}


def _suggest(key: str, names: Iterable[str]) -> str:
    import difflib

    names = list(names)
    alias = _ALIASES.get(key.lower())
    close = [alias] if alias in names else difflib.get_close_matches(key, names, n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _value_checker(key: str) -> Callable[[Any], Any]:
    """Validate one value of the training key ``key`` (grid values)."""
    info = TrainConfig.model_fields[key]
    adapter = TypeAdapter(Annotated[(info.annotation, *info.metadata)] if info.metadata
                          else info.annotation)

    def check(value: Any) -> Any:
        try:
            return adapter.validate_python(value)
        except ValidationError as err:
            e = dict(err.errors()[0])
            e["loc"] = (key, *e["loc"])
            raise ConfigError(_problem(e, TrainConfig)[1]) from None

    return check


# -- building ----------------------------------------------------------------------------------

def train_config_from_dict(
    raw: Mapping[str, Any], source: str = "config", sources: Mapping[str, str] | None = None
) -> TrainConfig:
    """Build and validate a :class:`TrainConfig` from a raw mapping."""
    where = where_fn(source, sources or {})
    check_key_names(raw, source)
    study_keys = [k for k in STUDY_KEYS if k in raw]
    if study_keys:
        raise ConfigError(f"{where(study_keys[0])}: key '{study_keys[0]}' belongs to a study "
                          "config; run it with `msam study` (or remove the key)")
    return _build(TrainConfig, raw, where)


def load_config(path: str | Path, overrides: Iterable[str | tuple] = ()) -> TrainConfig:
    """Load a run config file and apply ``key=value`` overrides (validated)."""
    raw, sources = apply_overrides(read_config_file(path), overrides)
    return train_config_from_dict(raw, str(path), sources)


def __getattr__(name: str) -> Any:  # the study keys live in studyconfig (imports this module)
    if name in ("StudyConfig", "study_from_dict", "load_study_config"):
        from . import studyconfig

        return getattr(studyconfig, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# -- comparing and documenting configs ---------------------------------------------------------

def _default_of(key: str) -> Any:
    """The schema default of a dotted training key (None for keys it does not know)."""
    cls: Any = TrainConfig
    *parents, last = key.split(".")
    for part in parents:
        info = cls.model_fields.get(part) if isinstance(cls, type) else None
        cls = _unwrap(info.annotation)[0] if info is not None else None
        if not (isinstance(cls, type) and issubclass(cls, BaseModel)):
            return None
    info = cls.model_fields.get(last)
    default = None if info is None else info.get_default(call_default_factory=True)
    return default.model_dump() if isinstance(default, BaseModel) else default


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
            tp = _unwrap(info.annotation)[0]
            if isinstance(tp, type) and issubclass(tp, BaseModel):
                add(tp, f"{prefix}{name}.")
                continue
            text = info.description or ""
            if get_origin(tp) is Literal:
                text += f" ({' / '.join(get_args(tp))})"
            rule = _rule(info.annotation, info.metadata)
            if rule not in (_type_name(info.annotation), "null"):
                text += f"; must be {rule}"
            rows.append(f"| `{prefix}{name}` | {_type_name(info.annotation)} | "
                        f"`{json.dumps(info.get_default(call_default_factory=True))}` | {text} |")

    add(TrainConfig, "")
    return "\n".join(rows)
