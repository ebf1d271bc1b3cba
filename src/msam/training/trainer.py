"""The training loop: ``train(config) -> RunResult``.

One run = one :class:`~msam.training.config.TrainConfig` = one directory (``out_dir``) holding

* ``config.yaml`` / ``config.json``: the resolved config; ``run_info.json``: device, sizes;
* ``last.pt``: the checkpoint written atomically at every epoch end (model, optimizer incl.
  momentum / Adam moments, scheduler, scaler, epoch, step, RNG states, config, tokenizer,
  metric history);
* ``metrics.jsonl`` / ``metrics.csv``: one row per epoch, rewritten atomically after the
  checkpoint, so they never claim an epoch the checkpoint does not hold;
* ``final.pt``: the trained model (weights, config, tokenizer) and ``sharpness.json`` if asked;
* ``done.json``: written last; its presence means the run is finished.

Methods: ``sgd`` is the base optimizer alone (one forward/backward per step); ``sam`` is
:class:`msam.MSAM` with one micro-batch; ``msam`` uses ``micro_batches``; ``asam`` is adaptive
(Kwon et al. 2021) with ``micro_batches``; ``gsam``, ``friendlysam``, ``wsam`` and ``gcsam`` are
the SAM family's rules (docs/variants.md) with ``micro_batches``. Resuming (``resume=True``)
restores everything and continues bit-identically on CPU: the batch order and augmentation are
pure functions of ``(seed, epoch, batch)`` (:func:`msam.data.iterate_batches`), and the global
RNG states are saved with the checkpoint.
"""

from __future__ import annotations

import contextlib
import csv
import io
import math
import os
import random
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import msam
from msam.data import ArrayDataset, iterate_batches, load_dataset, num_batches
from msam.data._seeding import make_generator
from msam.data.splits import stratified_split

from .checkpoint import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    capture_rng_state,
    json_text,
    load_checkpoint,
    remove_stale_temp_files,
    restore_rng_state,
    torch_bytes,
)
from .config import RESUMABLE_CHANGES, ConfigError, TrainConfig, config_diff
from .rundir import IntegrityError, RunDirError, RunFiles, RunWriteError, run_lock
from .schedule import lr_factor_fn

__all__ = ["METRIC_COLUMNS", "RunResult", "StorageError", "TrainingError", "build_optimizer",
           "evaluate", "is_finished", "train"]

METRIC_COLUMNS = (
    "epoch", "step", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "test_loss",
    "test_acc", "skipped_steps", "epoch_time_s", "elapsed_s",
)
TIME_COLUMNS = ("epoch_time_s", "elapsed_s")


class TrainingError(RuntimeError):
    """A training step failed; the run directory keeps its last good checkpoint."""


class StorageError(TrainingError):
    """A run file could not be written (disk full, read-only file system, ...); the files of
    the completed epochs are intact and the run continues with ``--resume`` once fixed."""


@dataclass
class RunResult:
    """What :func:`train` returns (also rebuilt from a finished run dir by :meth:`from_dir`)."""

    run_dir: Path
    config: TrainConfig
    history: list[dict[str, Any]]
    completed: bool
    train_time_s: float
    sharpness: dict[str, Any] | None = None
    resumed_from_epoch: int | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def final(self) -> dict[str, Any]:
        """The last epoch's metrics row (empty before the first epoch ends)."""
        return dict(self.history[-1]) if self.history else {}

    @classmethod
    def from_dir(cls, run_dir: str | os.PathLike) -> RunResult:
        """Read a finished run (``done.json`` + ``metrics.jsonl``)."""
        import json

        from .config import train_config_from_dict

        run_dir = Path(run_dir)
        files = RunFiles(run_dir)
        done = read_done(run_dir)
        files.check("metrics.jsonl", _FIX_RESULT)
        try:
            history = [json.loads(line) for line in
                       (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise IntegrityError(f"{run_dir / 'metrics.jsonl'} cannot be read ({err})"
                                 f"{_FIX_RESULT}") from None
        cfg = train_config_from_dict(done["config"], str(run_dir / "done.json"))
        return cls(run_dir=run_dir, config=cfg, history=history, completed=True,
                   train_time_s=float(done.get("train_time_s", 0.0)),
                   sharpness=done.get("sharpness"), info=done.get("info", {}))


# -- data --------------------------------------------------------------------------------------

@dataclass
class _Data:
    train: ArrayDataset
    val: ArrayDataset | None
    test: ArrayDataset
    num_classes: int
    input_shape: tuple
    modality: str
    tokens: dict[str, dict[str, torch.Tensor]] | None = None
    tokenizer_state: dict[str, Any] | None = None
    vocab_size: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def inputs(self, split: str, x: torch.Tensor) -> Any:
        """Model inputs for rows ``x`` (images) or example indices ``x`` (text)."""
        if self.tokens is None:
            return x
        return {k: v[x] for k, v in self.tokens[split].items()}

    def batch(self, split: str, x: torch.Tensor, y: torch.Tensor) -> tuple[Any, torch.Tensor]:
        return self.inputs(split, x), y


def _prepare_data(cfg: TrainConfig, device: torch.device,
                  tokenizer_state: dict[str, Any] | None) -> _Data:
    splits = load_dataset(
        cfg.dataset, data_dir=cfg.data_dir, train_subset=cfg.train_subset,
        val_fraction=cfg.val_fraction, label_noise=cfg.label_noise, seed=cfg.seed,
        download=cfg.download,
    )
    test = splits.test
    if cfg.test_subset is not None and cfg.test_subset < len(test):
        taken, _ = stratified_split(test.y, cfg.test_subset, make_generator(0, "test-subset"))
        test = test.subset(taken)
    parts = {"train": splits.train, "val": splits.val, "test": test}
    data = _Data(train=splits.train, val=splits.val, test=test, num_classes=splits.num_classes,
                 input_shape=tuple(splits.input_shape), modality=splits.modality,
                 meta={"sizes": {k: (0 if v is None else len(v)) for k, v in parts.items()},
                       "label_noise": splits.meta.get("label_noise")})
    if splits.modality == "text":
        from msam.models import make_tokenizer, tokenizer_from_state

        assert isinstance(splits.train.x, list)
        if tokenizer_state is not None:
            tok = tokenizer_from_state(tokenizer_state)
        else:
            tok = make_tokenizer(cfg.model, splits.train.x, max_length=cfg.max_length,
                                 min_freq=cfg.min_freq, max_vocab=cfg.max_vocab)
        data.tokenizer_state = tok.state_dict()
        data.vocab_size = int(tok.vocab_size)
        data.tokens = {}
        for name, ds in parts.items():
            if ds is None:
                continue
            enc = tok(list(ds.x), max_length=cfg.max_length)
            data.tokens[name] = {k: v.to(device) for k, v in enc.items()}
            # Text batches index the pre-tokenized tensors by example position.
            idx = ArrayDataset(torch.arange(len(ds)).to(device), ds.y.to(device))
            setattr(data, name, idx)
    else:
        for name, ds in parts.items():
            if ds is not None:
                assert isinstance(ds.x, torch.Tensor)
                setattr(data, name, ArrayDataset(ds.x.to(device), ds.y.to(device)))
    return data


# -- model / optimizer -------------------------------------------------------------------------

_FIX_RESULT = ("; delete the run directory and train it again (or, if last.pt is intact, "
               "delete done.json and run with --resume to rebuild the results)")


def read_done(run_dir: str | os.PathLike) -> dict[str, Any]:
    """``RUN/done.json``, verified against its checksum and parsed.

    Raises :class:`~msam.training.rundir.IntegrityError` naming the file if it is corrupted or
    truncated (a finished run's record is never silently ignored or overwritten).
    """
    done = RunFiles(run_dir).read_json("done.json", _FIX_RESULT)
    if not isinstance(done, dict) or not isinstance(done.get("config"), dict):
        raise IntegrityError(f"{Path(run_dir) / 'done.json'} is not a finished-run record "
                             f"(no 'config' mapping){_FIX_RESULT}")
    return done


def is_finished(run_dir: str | os.PathLike, cfg: TrainConfig) -> bool:
    """Whether ``run_dir`` holds a finished run of ``cfg.epochs`` epochs whose sharpness
    measurement (if any) used the metrics ``cfg`` asks for. A run finished with fewer epochs or
    other metrics is continued by ``train(cfg, resume=True)`` (which, with nothing left to
    train, only measures)."""
    if not (Path(run_dir) / "done.json").is_file():
        return False
    done = read_done(run_dir)
    return (int(done.get("epochs", -1)) == cfg.epochs
            and list(done.get("sharpness_metrics") or []) == list(cfg.sharpness.metrics))


def _build_model(cfg: TrainConfig, data: _Data) -> nn.Module:
    from msam.models import build_model

    options = dict(cfg.model_options)
    if data.modality == "text" and cfg.model != "minilm":
        options.setdefault("vocab_size", data.vocab_size)
    try:
        return build_model(cfg.model, num_classes=data.num_classes,
                           input_shape=data.input_shape, **options)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"config: key 'model_options' for model {cfg.model!r}: {err}") from err


def start_step(cfg: TrainConfig, steps_per_epoch: int | None) -> int:
    """The first perturbation step of the run's schedule: ``start_fraction`` of all
    ``epochs * steps_per_epoch`` steps, or ``start_epoch * steps_per_epoch`` (rounded)."""
    if cfg.start_fraction == 0 and not cfg.start_epoch:
        return 0
    if steps_per_epoch is None:
        raise ValueError("steps_per_epoch: needed to turn start_fraction / start_epoch into a "
                         "step")
    if cfg.start_epoch is not None:
        return int(round(cfg.start_epoch * steps_per_epoch))
    return int(round(cfg.start_fraction * cfg.epochs * steps_per_epoch))


def build_optimizer(cfg: TrainConfig, model: nn.Module,
                    steps_per_epoch: int | None = None) -> msam.MSAM:
    """The run's optimizer: the base optimizer alone (``sgd``) or :class:`msam.MSAM` around it
    (with the perturbation schedule of ``every`` / ``start_*`` / ``reuse``)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.base == "sgd":
        base_cls: type[torch.optim.Optimizer] = torch.optim.SGD
        kwargs: dict[str, Any] = dict(lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                                      weight_decay=cfg.weight_decay)
    else:
        base_cls = torch.optim.AdamW
        kwargs = dict(lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.adam_eps,
                      weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        # The base optimizer alone, through msam's one base step (clipping after unscaling, the
        # GradScaler, non-finite checks): rho = 0 and one micro-batch is one pass at w.
        return msam.MSAM(params, base_cls, rho=0.0, micro_batches=1, model=model,
                         max_grad_norm=cfg.max_grad_norm, nonfinite=cfg.nonfinite, **kwargs)
    perturb = None
    if cfg.perturb == "norm":  # SAM-ON: only the normalisation layers' parameters
        perturb = [p for p in msam.normalization_parameters(model) if p.requires_grad]
        if not perturb:
            raise ConfigError(f"config: key 'perturb' is 'norm' but model {cfg.model!r} has no "
                              "trainable normalisation parameters (BatchNorm, GroupNorm, ...)")
    try:
        opt = _msam(cfg, model, params, base_cls, kwargs, steps_per_epoch, perturb)
    except ValueError as err:  # a combination the optimizer refuses: name it as config
        raise ConfigError(f"config: optimizer {cfg.optimizer!r}: {err}") from None
    if cfg.optimizer == "gsam" and cfg.gsam_rho_min is not None:
        # GSAM's schedule: rho_t linear in lr_t, rho_min at min_lr up to rho at the peak lr.
        for group in opt.param_groups:
            group.update(rho_max=effective_rho(cfg), rho_min=cfg.gsam_rho_min, lr_max=cfg.lr,
                         lr_min=cfg.min_lr)
    return opt


def effective_rho(cfg: TrainConfig) -> float:
    """Each micro-batch's radius: ``rho``, or with ``rho_scaling: sqrt_m`` ``rho / sqrt(m)``."""
    m = 1 if cfg.optimizer in ("sam", "momentumsam") else cfg.micro_batches
    return msam.rho_for_m(cfg.rho, m) if cfg.rho_scaling == "sqrt_m" else cfg.rho


def _msam(cfg: TrainConfig, model: nn.Module, params: list, base_cls: Any,
          kwargs: dict[str, Any], steps_per_epoch: int | None, perturb: Any) -> msam.MSAM:
    return msam.MSAM(
        params, base_cls, rho=effective_rho(cfg),
        micro_batches=1 if cfg.optimizer == "sam" else cfg.micro_batches,
        adaptive=cfg.optimizer == "asam", eta=cfg.eta, model=model,
        strategy=msam.strategies.STRATEGIES[cfg.strategy](chunk=cfg.micro_batch_chunk)
        if cfg.strategy in ("batched", "lowrank") else cfg.strategy,
        max_grad_norm=cfg.max_grad_norm, nonfinite=cfg.nonfinite, rule=variant_rule(cfg),
        every=cfg.every, start_step=start_step(cfg, steps_per_epoch),
        reuse=None if cfg.reuse == "none" else cfg.reuse, reuse_alpha=cfg.reuse_alpha,
        perturb=perturb, **kwargs,
    )


def variant_rule(cfg: TrainConfig) -> msam.PerturbationRule | None:
    """The perturbation rule of a SAM-family method (docs/variants.md), from the registry with
    its run-config keys as constructor arguments; None for sgd, sam, msam and asam."""
    from msam.core.registry import RULES

    if cfg.optimizer in ("sgd", "sam", "msam", "asam"):
        return None
    cls = RULES[cfg.optimizer]
    return cls(**{arg: getattr(cfg, key) for key, arg in cls.config_keys.items()
                  if arg is not None})


def _milestone_steps(cfg: TrainConfig, steps_per_epoch: int) -> list[int]:
    epochs = cfg.milestones or [0.5 * cfg.epochs, 0.75 * cfg.epochs]
    return [int(round(e * steps_per_epoch)) for e in epochs]


def _build_scheduler(cfg: TrainConfig, opt: torch.optim.Optimizer, steps_per_epoch: int):
    factor = lr_factor_fn(
        cfg.schedule, total_steps=cfg.epochs * steps_per_epoch,
        warmup_steps=int(round(cfg.warmup_epochs * steps_per_epoch)), lr=cfg.lr,
        min_lr=cfg.min_lr, milestone_steps=_milestone_steps(cfg, steps_per_epoch),
        gamma=cfg.gamma,
    )
    return torch.optim.lr_scheduler.LambdaLR(opt, factor), factor


# -- runtime -----------------------------------------------------------------------------------

def _resolve_device(cfg: TrainConfig) -> torch.device:
    dev = cfg.device.lower()
    if dev == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"config: key 'device' is {cfg.device!r} but CUDA is not available")
    return torch.device(dev)


@contextlib.contextmanager
def _runtime(cfg: TrainConfig, device: torch.device) -> Iterator[None]:
    """Threads and determinism for the run; the process-wide settings are restored after."""
    old_threads = torch.get_num_threads()
    old_det = torch.are_deterministic_algorithms_enabled()
    old_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    old_cudnn = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    try:
        if cfg.threads is not None:
            torch.set_num_threads(cfg.threads)
        if cfg.deterministic:
            if device.type == "cuda":
                os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.deterministic = True
            torch.backends.cudnn.benchmark = False
        elif device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        yield
    finally:
        torch.set_num_threads(old_threads)
        torch.use_deterministic_algorithms(old_det, warn_only=old_warn)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = old_cudnn


def _autocast(cfg: TrainConfig, device: torch.device) -> Callable[[], Any]:
    if cfg.precision == "fp32":
        return contextlib.nullcontext
    dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float16
    return lambda: torch.autocast(device.type, dtype=dtype)


class _AccuracyTracker:
    """Training accuracy from the unperturbed forward pass of each (micro-)batch.

    The mSAM loop strategy calls ``loss_fn`` twice with the same micro-batch object (at ``w``,
    then at ``w + e_j``); only the first call per object and step is counted. Calls inside
    ``torch.func`` transforms (the ``vmap`` strategy) cannot be read and are not counted.
    """

    def __init__(self, device: torch.device) -> None:
        self.correct = torch.zeros((), dtype=torch.int64, device=device)
        self.count = 0
        self._seen: set[int] = set()

    def new_step(self) -> None:
        self._seen.clear()

    def observe(self, mb: Any, logits: torch.Tensor, y: torch.Tensor) -> None:
        if torch._C._are_functorch_transforms_active():
            return
        key = id(mb)
        if key in self._seen:
            return
        self._seen.add(key)
        self.correct += (logits.detach().argmax(-1) == y).sum()
        self.count += int(y.shape[0])

    def value(self) -> float | None:
        return float(self.correct.item()) / self.count if self.count else None


@torch.no_grad()
def evaluate(model: nn.Module, data: _Data, split: str, batch_size: int,
             autocast: Callable[[], Any] = contextlib.nullcontext) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` on a split (eval mode)."""
    ds = getattr(data, split)
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=ds.y.device)
    correct = torch.zeros((), dtype=torch.int64, device=ds.y.device)
    try:
        for x, y in iterate_batches(ds, batch_size, shuffle=False, seed=0, epoch=0):
            with autocast():
                logits = model(data.inputs(split, x))
            total += F.cross_entropy(logits.float(), y, reduction="sum").double()
            correct += (logits.argmax(-1) == y).sum()
    finally:
        model.train(was_training)
    n = len(ds)
    return float(total.item()) / n, float(correct.item()) / n


# -- files -------------------------------------------------------------------------------------

def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _json_bytes(obj: Any) -> bytes:
    return json_text(obj).encode("utf-8")


def _metrics_files(history: list[dict[str, Any]]) -> dict[str, bytes]:
    """``metrics.jsonl`` and ``metrics.csv`` for ``history``."""
    import json

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(METRIC_COLUMNS), extrasaction="ignore",
                            lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in METRIC_COLUMNS})
    return {"metrics.jsonl": "".join(json.dumps(row) + "\n" for row in history).encode(),
            "metrics.csv": buf.getvalue().encode()}


def _config_files(cfg: TrainConfig) -> dict[str, bytes]:
    d = cfg.to_dict()
    out = {"config.json": _json_bytes(d)}
    try:
        import yaml
    except ImportError:  # pragma: no cover - pyyaml is an optional dependency
        return out
    out["config.yaml"] = yaml.safe_dump(d, sort_keys=False).encode("utf-8")
    return out


#: What a run writes (besides the lock and checksums.json); ``rerun`` deletes these.
RUN_FILES = ("last.pt", "prev.pt", "final.pt", "done.json", "metrics.jsonl", "metrics.csv",
             "sharpness.json", "config.json", "config.yaml", "run_info.json", "error.txt")


class _TensorBoard:
    def __init__(self, cfg: TrainConfig, run_dir: Path, log: Callable[[str], None]) -> None:
        self.writer = None
        if not cfg.tensorboard:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            log("WARNING: tensorboard: not installed (pip install tensorboard); skipping it")
            return
        self.writer = SummaryWriter(str(run_dir / "tensorboard"))

    def log(self, row: dict[str, Any]) -> None:
        if self.writer is None:
            return
        for k, v in row.items():
            if k not in ("epoch", "step") and isinstance(v, (int, float)) and v is not None:
                self.writer.add_scalar(k, v, row["epoch"])
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _progress(cfg: TrainConfig, total: int, desc: str):
    enabled = cfg.progress and sys.stderr.isatty()
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is an optional dependency
        return None
    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, file=sys.stderr)


# -- sharpness ---------------------------------------------------------------------------------

def _headline(result: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in result.items()
            if k not in ("details", "timings_s", "config") and isinstance(v, (int, float))
            and not isinstance(v, bool)}


def _measure_sharpness(cfg: TrainConfig, model: nn.Module, data: _Data, run_dir: Path,
                       log: Callable[[str], None]) -> dict[str, Any] | None:
    s = cfg.sharpness
    if not s.metrics:
        return None
    try:
        from msam.analysis import measure
    except ImportError as err:
        log(f"WARNING: sharpness: msam.analysis is not available ({err}); skipping")
        return None
    n = min(s.examples, len(data.train))
    idx = torch.randperm(len(data.train), generator=make_generator(s.seed, "sharpness"))[:n]
    subset = data.train.subset(idx.sort().values)
    batches = [data.batch("train", x, y) for x, y in
               iterate_batches(subset, s.batch_size, shuffle=False, seed=0, epoch=0)]
    rho = s.rho if s.rho is not None else 0.05  # one radius for every run of a study

    def loss_fn(batch: Any) -> torch.Tensor:
        return F.cross_entropy(model(batch[0]).float(), batch[1])

    t0 = time.perf_counter()
    try:
        result = measure(model, loss_fn, batches, metrics=list(s.metrics), rho=rho,
                         micro_batches=s.m, seed=s.seed, **s.options.model_dump())
    except TypeError as err:
        raise ConfigError(f"config: key 'sharpness.options': {err}") from err
    result = dict(result)
    result["examples"] = n
    RunFiles(run_dir).write({"sharpness.json": _json_bytes(result)})
    head = _headline(result)
    log("sharpness: " + ", ".join(f"{k}={v:.4g}" for k, v in head.items() if k != "examples")
        + f" ({time.perf_counter() - t0:.1f}s)")
    return head


# -- the loop ----------------------------------------------------------------------------------

def _fmt(v: Any, pct: bool = False) -> str:
    if v is None:
        return "-"
    return f"{100 * v:.2f}%" if pct else f"{v:.4f}"


def train(
    config: TrainConfig,
    *,
    resume: bool = False,
    rerun: bool = False,
    quiet: bool = False,
    stop_after_epochs: int | None = None,
    log_prefix: str = "",
    accept_unverified: bool = False,
) -> RunResult:
    """Train one run described by ``config`` into ``config.out_dir``.

    Args:
        config: the run's configuration (validated and resolved here).
        resume: continue from ``out_dir/last.pt`` (verified against its checksum; a corrupted
            one falls back to ``prev.pt``) if it exists, otherwise start fresh. Without it, an
            ``out_dir`` that already holds a run is an error. A finished run is returned as it
            is (or extended, if ``epochs`` grew); one whose checkpoint is gone is refused.
        rerun: discard whatever run ``out_dir`` holds, finished or not, and train from scratch.
        quiet: no per-epoch log lines (the progress bar follows ``config.progress``).
            Warnings (e.g. a corrupted checkpoint replaced by the previous one) are printed
            to stderr all the same.
        stop_after_epochs: return after this many epochs *of this call* (for tests / time
            slicing); the run stays resumable.
        log_prefix: prepended to log lines (studies pass the run name).
        accept_unverified: resume although ``checksums.json`` was deleted (the checkpoints
            are then loaded unverified); without it such a run is refused.

    Returns:
        a :class:`RunResult`; ``completed`` is True when ``epochs`` epochs are done.

    Raises:
        ConfigError: bad config, or a run directory that cannot be used as asked:
            :class:`~msam.training.rundir.RunLockedError` (another process writes it),
            :class:`~msam.training.rundir.IntegrityError` (a corrupted file), or a finished run.
        TrainingError: a training step failed; the last checkpoint is kept.
            :class:`StorageError`: a run file could not be written (disk full, read-only).
    """
    cfg = config.resolved()
    run_dir = Path(cfg.out_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"config: key 'out_dir' is {cfg.out_dir!r}, which is a file, not a "
                          "directory; choose another out_dir")
    device = _resolve_device(cfg)
    if cfg.precision == "fp16" and device.type != "cuda":
        raise ConfigError("config: key 'precision' fp16 needs a CUDA device; use bf16 or fp32")

    def log(msg: str) -> None:
        if msg.startswith("WARNING: "):  # a warning is never quiet
            print(f"{log_prefix}{msg}", file=sys.stderr, flush=True)
        elif not quiet:
            print(f"{log_prefix}{msg}", flush=True)

    with run_lock(run_dir):
        remove_stale_temp_files(run_dir)
        files = RunFiles(run_dir)
        if resume and not rerun and not accept_unverified:
            files.require_manifest(("last.pt", "prev.pt", "done.json"), _FIX_MANIFEST)
        ckpt = _open_run(cfg, run_dir, files, device, resume, rerun, log)
        if isinstance(ckpt, RunResult):
            return ckpt
        with _runtime(cfg, device), warnings.catch_warnings():
            # Harmless when the very first step is skipped (non-finite loss, GradScaler
            # overflow).
            warnings.filterwarnings("ignore",
                                    message=r"Detected call of `lr_scheduler\.step\(\)`")
            try:
                return _train(cfg, run_dir, files, device, ckpt, log, stop_after_epochs)
            except RunWriteError as err:
                raise _storage_failed(run_dir, files, err) from err


_FIX_MANIFEST = (", pass --accept-unverified (accept_unverified=True) to resume from the files "
                 "as they are, or pass --rerun (rerun=True) to train the run again from scratch")


def _storage_failed(run_dir: Path, files: RunFiles, err: RunWriteError) -> StorageError:
    """What a failed write (disk full, read-only directory) means for the run, and the fix."""
    try:
        epoch = int(load_checkpoint(run_dir / "last.pt")["epoch"]) \
            if files.verify("last.pt") is not False else None
    except (OSError, ValueError):
        epoch = None
    safe = ("No epoch was completed yet" if epoch is None else
            f"The completed epochs are safe: {run_dir / 'last.pt'} holds epoch {epoch} and "
            "matches its checksum (every write is atomic)")
    return StorageError(
        f"{err.strerror}. {safe}. Free space on that disk (or make the run directory writable "
        "again), then run the same command with --resume to continue from there")


def _open_run(cfg: TrainConfig, run_dir: Path, files: RunFiles, device: torch.device,
              resume: bool, rerun: bool, log: Callable[[str], None]) -> dict | RunResult | None:
    """What to start from: a checkpoint dict, None (from scratch), or a finished result."""
    ckpt_path, done_path = run_dir / "last.pt", run_dir / "done.json"
    checkpoints = [p for p in (ckpt_path, run_dir / "prev.pt") if p.exists()]
    finished = done_path.exists()
    if rerun:
        if checkpoints or finished:
            log(f"{run_dir}: --rerun: discarding the run it holds")
        files.discard(*RUN_FILES, "last.pt.corrupt")
        return None
    if (checkpoints or finished) and not resume:
        what = "a finished run (done.json)" if finished else "an unfinished run (last.pt)"
        raise RunDirError(f"out_dir {str(run_dir)!r} already holds a run: {what}; pass --resume "
                          "(resume=True) to continue it, --rerun (rerun=True) to train it again "
                          "from scratch, or choose another out_dir")
    if not resume:
        return None
    done = read_done(run_dir) if finished else None  # a corrupted record is named, not replaced
    if done is not None:
        _refuse_changes(done["config"], cfg, run_dir / "done.json")
        if is_finished(run_dir, cfg):  # never retrained, even if its checkpoints are gone
            log(f"{run_dir}: already finished ({cfg.epochs} epochs)")
            return RunResult.from_dir(run_dir)
    ckpt = _load_verified_checkpoint(run_dir, files, device, log)
    if ckpt is not None and done is not None and int(ckpt["epoch"]) != int(done["epochs"]):
        raise RunDirError(
            f"{run_dir} holds a finished run of {done['epochs']} epochs, but its intact "
            f"checkpoint is of epoch {ckpt['epoch']}: extending it would retrain finished "
            "epochs. Its results are kept as they are; pass --rerun (rerun=True) to train it "
            "again from scratch")
    if ckpt is None:
        if finished:
            raise RunDirError(
                f"{run_dir} holds a finished run (done.json) but no checkpoint (last.pt was "
                "deleted), so it cannot be resumed or extended; its results are kept as they "
                "are. Pass --rerun (rerun=True) to train it again from scratch")
        log(f"{run_dir}: no checkpoint, starting from scratch")
        return None
    _refuse_changes(ckpt["config"], cfg, ckpt_path)
    if int(ckpt["epoch"]) > cfg.epochs:
        raise ConfigError(f"config: key 'epochs' is {cfg.epochs} but the checkpoint in "
                          f"{str(run_dir)!r} already has {ckpt['epoch']} epochs")
    if finished:
        files.forget("done.json")  # extended or re-measured: not finished until rewritten
    return ckpt


def _refuse_changes(recorded: dict[str, Any], cfg: TrainConfig, where: Path) -> None:
    """A resumed run must compute what the recorded one did (e.g. the same m)."""
    changed = [k for k in config_diff(recorded, cfg.to_dict())
               if k.split(".")[0] not in RESUMABLE_CHANGES]
    if changed:
        raise ConfigError(
            f"cannot resume {str(where)!r}: the config differs in {', '.join(changed)} (only "
            f"{', '.join(sorted(RESUMABLE_CHANGES))} may change); start a new out_dir, or pass "
            "--rerun to train it again with the new config")


def _load_verified_checkpoint(run_dir: Path, files: RunFiles, device: torch.device,
                              log: Callable[[str], None]) -> dict | None:
    """``last.pt`` if it matches its checksum, else ``prev.pt``; None if there is neither.

    Raises :class:`IntegrityError` when checkpoints exist but none is intact.
    """
    problems = []
    for name in ("last.pt", "prev.pt"):
        path = run_dir / name
        if not path.exists():
            continue
        if files.verify(name) is False:
            problems.append(f"{path} does not match its SHA-256 in {files.manifest_path}")
            continue
        try:
            ckpt = load_checkpoint(path, map_location=device)
        except ValueError as err:
            problems.append(str(err))
            continue
        if problems:
            log(f"WARNING: {'; '.join(problems)}; resuming from {name} (epoch {ckpt['epoch']}) "
                "instead")
            if name != "last.pt" and (run_dir / "last.pt").exists():
                bad = run_dir / "last.pt.corrupt"
                os.replace(run_dir / "last.pt", bad)  # kept for inspection, never loaded
                files.forget("last.pt")
                log(f"WARNING: the corrupted checkpoint was moved to {bad}")
        return ckpt
    if problems:
        raise IntegrityError(
            f"cannot resume {run_dir}: {'; '.join(problems)}. The checkpoint is corrupted and "
            "no intact one is left; nothing was changed. Restore the file from a backup, or "
            "pass --rerun (rerun=True) to train the run again from scratch")
    return None


@dataclass
class _Run:
    """The state of one run while it trains (what the steps of :func:`_train` share)."""

    cfg: TrainConfig
    run_dir: Path
    files: RunFiles
    device: torch.device
    log: Callable[[str], None]
    data: _Data
    steps_per_epoch: int
    model: nn.Module
    opt: msam.MSAM
    scheduler: Any
    factor: Callable[[int], float]
    scaler: Any
    autocast: Callable[[], Any]
    history: list[dict[str, Any]] = field(default_factory=list)
    start_epoch: int = 0
    global_step: int = 0
    elapsed: float = 0.0
    resumed_from: int | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def result(self, completed: bool, sharpness: dict[str, Any] | None = None) -> RunResult:
        return RunResult(self.run_dir, self.cfg, self.history, completed, self.elapsed,
                         sharpness, self.resumed_from, self.info)


def _train(cfg: TrainConfig, run_dir: Path, files: RunFiles, device: torch.device,
           ckpt: dict | None, log: Callable[[str], None],
           stop_after_epochs: int | None) -> RunResult:
    """Set up (or restore) the run, train its remaining epochs, then finish it."""
    run = _set_up(cfg, run_dir, files, device, ckpt, log)
    if ckpt is not None:
        _restore(run, ckpt)
    _write_start_files(run, resumed=ckpt is not None)
    tb = _TensorBoard(cfg, run_dir, log)
    try:
        for n, epoch in enumerate(range(run.start_epoch, cfg.epochs), 1):
            row = _train_epoch(run, epoch)
            tb.log(row)
            if stop_after_epochs is not None and n >= stop_after_epochs \
                    and epoch + 1 < cfg.epochs:
                return run.result(False)
    finally:
        tb.close()
    return _finish(run)


def _set_up(cfg: TrainConfig, run_dir: Path, files: RunFiles, device: torch.device,
            ckpt: dict | None, log: Callable[[str], None]) -> _Run:
    """Data, model, optimizer, schedule and scaler of a run (seeded as a fresh run)."""
    try:
        data = _prepare_data(cfg, device, None if ckpt is None else ckpt.get("tokenizer"))
    except ValueError as err:  # bad data files, or a subset / split the data cannot give
        raise ConfigError(f"config: dataset {cfg.dataset!r}: {err}") from None
    steps_per_epoch = num_batches(data.train, cfg.batch_size, cfg.drop_last)
    if cfg.max_steps_per_epoch is not None:
        steps_per_epoch = min(steps_per_epoch, cfg.max_steps_per_epoch)
    if steps_per_epoch < 1:
        raise ConfigError(f"config: key 'batch_size' ({cfg.batch_size}) is larger than the "
                          f"{len(data.train)} training examples (with drop_last)")
    last = len(data.train) % cfg.batch_size
    if not cfg.drop_last and 0 < last < cfg.micro_batches \
            and (cfg.max_steps_per_epoch is None
                 or cfg.max_steps_per_epoch >= num_batches(data.train, cfg.batch_size)):
        raise ConfigError(f"config: key 'drop_last' is false and the last batch has {last} "
                          f"examples, fewer than micro_batches={cfg.micro_batches}")
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed % (2**32))
    model = _build_model(cfg, data).to(device)
    opt = build_optimizer(cfg, model, steps_per_epoch)
    scheduler, factor = _build_scheduler(cfg, opt, steps_per_epoch)
    scaler = torch.amp.GradScaler(device.type) if cfg.precision == "fp16" else None
    run = _Run(cfg, run_dir, files, device, log, data, steps_per_epoch, model, opt, scheduler,
               factor, scaler, _autocast(cfg, device))
    run.info = {
        "device": str(device), "torch": str(torch.__version__), "msam": msam.__version__,
        "parameters": sum(p.numel() for p in model.parameters()),
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "steps_per_epoch": steps_per_epoch, "sizes": data.meta["sizes"],
        "label_noise": data.meta.get("label_noise"), "threads": torch.get_num_threads(),
    }
    return run


def _restore(run: _Run, ckpt: dict) -> None:
    """Everything a checkpoint holds, so that the run continues bit-identically."""
    run.model.load_state_dict(ckpt["model"])
    if run.cfg.optimizer == "sgd" and "msam" not in ckpt["optimizer"]:
        run.opt.base_optimizer.load_state_dict(ckpt["optimizer"])  # a run saved before v3
    else:
        run.opt.load_state_dict(ckpt["optimizer"])
    run.scheduler.load_state_dict(ckpt["scheduler"])
    # The schedule is rebuilt from the config (epochs may have changed): set the lr of the next
    # step from it (identical to the saved value when nothing changed).
    for group, base_lr in zip(run.opt.param_groups, run.scheduler.base_lrs):
        group["lr"] = base_lr * run.factor(run.scheduler.last_epoch)
    run.scheduler._last_lr = [g["lr"] for g in run.opt.param_groups]
    if run.scaler is not None and ckpt.get("scaler") is not None:
        run.scaler.load_state_dict(ckpt["scaler"])
    restore_rng_state(ckpt["rng"])
    run.history = [dict(r) for r in ckpt["history"]]
    run.start_epoch = run.resumed_from = int(ckpt["epoch"])
    run.global_step = int(ckpt["global_step"])
    run.elapsed = float(ckpt.get("train_time_s", 0.0))
    run.log(f"resuming {run.run_dir} from epoch {run.start_epoch} (step {run.global_step})")


def _write_start_files(run: _Run, resumed: bool) -> None:
    """The resolved config and run info (and, on resume, metrics cut to the checkpoint)."""
    cfg, info = run.cfg, run.info
    start_files = {**_config_files(cfg), "run_info.json": _json_bytes(info)}
    if resumed:  # drop rows of an epoch the checkpoint does not hold
        start_files.update(_metrics_files(run.history))
    run.files.write(start_files)
    if not resumed:
        sched = getattr(run.opt, "schedule", None)
        sched_text = "" if sched is None or sched.trivial else f" {sched!r}"
        scaled = "" if cfg.rho_scaling == "none" else \
            f" (per micro-batch {effective_rho(cfg):.4g})"
        run.log(f"{cfg.optimizer} ({cfg.base}) rho={cfg.rho}{scaled} m={cfg.micro_batches}"
                f"{sched_text} "
                f"on {cfg.dataset} ({info['sizes']['train']} train) with {cfg.model} "
                f"({info['parameters']:,} params), {cfg.epochs} epochs x "
                f"{run.steps_per_epoch} steps, {run.device}")


def _train_epoch(run: _Run, epoch: int) -> dict[str, Any]:
    """One epoch: its steps, the evaluation, then last.pt and the metrics in one write."""
    cfg, opt = run.cfg, run.opt
    t0 = time.perf_counter()
    run.model.train()
    tracker = _AccuracyTracker(run.device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=run.device)
    loss_n = skipped = 0
    lr_used = opt.param_groups[0]["lr"]
    loss_fn = _loss_fn(run, tracker)
    bar = _progress(cfg, run.steps_per_epoch, f"epoch {epoch + 1}/{cfg.epochs}")
    batches = iterate_batches(run.data.train, cfg.batch_size, shuffle=True, seed=cfg.seed,
                              epoch=epoch, augment=cfg.augment, drop_last=cfg.drop_last)
    for b, (x, y) in zip(range(run.steps_per_epoch), batches):
        tracker.new_step()
        lr_used = opt.param_groups[0]["lr"]
        loss, step_skipped = _step(run, loss_fn, run.data.batch("train", x, y), epoch)
        if step_skipped:
            skipped += 1
        else:
            loss_sum += loss.detach().double() * int(y.shape[0])
            loss_n += int(y.shape[0])
        run.scheduler.step()
        run.global_step += 1
        if bar is not None:
            bar.update(1)
            if b % 10 == 0 or b == run.steps_per_epoch - 1:
                acc = tracker.value()
                bar.set_postfix(loss=f"{float(loss_sum) / max(loss_n, 1):.4f}",
                                acc="-" if acc is None else f"{100 * acc:.1f}%")
    if bar is not None:
        bar.close()
    train_stats = {"lr": lr_used, "train_loss": float(loss_sum.item()) / loss_n if loss_n
                   else None, "train_acc": tracker.value(), "skipped_steps": skipped}
    return _end_epoch(run, epoch, train_stats, t0)


def _loss_fn(run: _Run, tracker: _AccuracyTracker) -> Callable[[Any], torch.Tensor]:
    # SAM-ON with GroupNorm: one-channel images batched as (N, 1, H, W) with strides
    # (H*W, 1, W, 1) count as channels_last, so the convolutions run channels_last; torch's CPU
    # GroupNorm backward in that layout, asked only for weight and bias gradients (the
    # perturbation of the normalisation parameters), writes to a null input gradient and
    # segfaults (torch 2.13). Standard NCHW strides avoid that kernel path. Only these runs.
    cfg = run.cfg
    restride = (cfg.perturb == "norm" and cfg.optimizer != "sgd"
                and run.data.modality == "image"
                and any(isinstance(mod, nn.GroupNorm) for mod in run.model.modules()))

    def loss_fn(mb: Any) -> torch.Tensor:
        inputs, y = mb
        if restride:
            inputs = inputs.clone(memory_format=torch.contiguous_format)
        with run.autocast():
            logits = run.model(inputs)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=run.cfg.label_smoothing)
        tracker.observe(mb, logits, y)
        return loss

    return loss_fn


def _step(run: _Run, loss_fn: Callable[[Any], torch.Tensor], batch: Any,
          epoch: int) -> tuple[torch.Tensor, bool]:
    """One optimizer step: ``(loss, skipped)``; a failure becomes a TrainingError."""
    opt, scaler = run.opt, run.scaler
    try:
        loss = opt.step(loss_fn, batch, scaler=scaler)
        if scaler is not None:
            scaler.update()
        return loss, bool(opt.last_result is not None and opt.last_result.skipped)
    except Exception as err:
        raise _step_failed(run.files, epoch, run.global_step, err) from err


def _end_epoch(run: _Run, epoch: int, train_stats: dict[str, Any], t0: float) -> dict[str, Any]:
    """Evaluate (every ``eval_every`` epochs and at the end), record and log the epoch."""
    cfg, data = run.cfg, run.data
    val_loss = val_acc = test_loss = test_acc = None
    if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
        if data.val is not None:
            val_loss, val_acc = evaluate(run.model, data, "val", cfg.eval_batch_size,
                                         run.autocast)
        test_loss, test_acc = evaluate(run.model, data, "test", cfg.eval_batch_size,
                                       run.autocast)
    epoch_time = time.perf_counter() - t0  # the evaluation included
    run.elapsed += epoch_time
    row = {"epoch": epoch + 1, "step": run.global_step, **train_stats, "val_loss": val_loss,
           "val_acc": val_acc, "test_loss": test_loss, "test_acc": test_acc,
           "epoch_time_s": round(epoch_time, 4), "elapsed_s": round(run.elapsed, 4)}
    row = {k: _clean(row[k]) for k in METRIC_COLUMNS}
    run.history.append(row)
    # One checksummed write: last.pt (the previous one kept as prev.pt), then the metrics, so
    # they never list an epoch the checkpoint does not hold.
    run.files.write({"last.pt": _checkpoint_bytes(cfg, run.model, run.opt, run.scheduler,
                                                  run.scaler, epoch + 1, run.global_step,
                                                  run.history, run.elapsed, data),
                     **_metrics_files(run.history)}, rotate=("last.pt", "prev.pt"))
    skipped = row["skipped_steps"]
    run.log(f"epoch {epoch + 1}/{cfg.epochs}  loss {_fmt(row['train_loss'])}  "
            f"acc {_fmt(row['train_acc'], True)}  val {_fmt(val_acc, True)}  "
            f"test {_fmt(test_acc, True)}  lr {row['lr']:.4g}  {epoch_time:.1f}s"
            + (f"  skipped {skipped}" if skipped else ""))
    return row


def _finish(run: _Run) -> RunResult:
    """final.pt, the sharpness measurement, then done.json (written last: the run is done)."""
    cfg, data, history = run.cfg, run.data, run.history
    run.files.write({"final.pt": torch_bytes({
        "format": "msam-model", "version": 1, "model": run.model.state_dict(),
        "config": cfg.to_dict(), "tokenizer": data.tokenizer_state,
        "num_classes": data.num_classes, "input_shape": list(data.input_shape),
        "metrics": history[-1] if history else {},
    })})
    sharp = _measure_sharpness(cfg, run.model, data, run.run_dir, run.log)
    run.files.write({"done.json": _json_bytes({
        "status": "done", "epochs": cfg.epochs, "final": history[-1] if history else {},
        "train_time_s": run.elapsed, "sharpness": sharp,
        "sharpness_metrics": list(cfg.sharpness.metrics), "info": run.info,
        "config": cfg.to_dict(),
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    })})
    return run.result(True, sharp)


def _step_failed(files: RunFiles, epoch: int, global_step: int, err: Exception) -> TrainingError:
    """A TrainingError for a failed step; the traceback goes to ``error.txt``.

    Nothing of the failed epoch is written: ``last.pt`` and the metrics stay at the last
    completed epoch, so ``--resume`` continues from there once the cause is fixed.
    """
    import traceback

    text = "".join(traceback.format_exception(type(err), err, err.__traceback__))
    files.write_text("error.txt", text)
    kept = (f"The checkpoint of epoch {epoch} (last.pt) is kept" if epoch
            else "No checkpoint was written yet")
    return TrainingError(
        f"training step {global_step + 1} (epoch {epoch + 1}) failed: {type(err).__name__}: "
        f"{err}. {kept}; fix the cause and run again with --resume (traceback in "
        f"{files.dir / 'error.txt'})")


def _checkpoint_bytes(cfg: TrainConfig, model: nn.Module, opt: torch.optim.Optimizer,
                      scheduler: Any, scaler: Any, epoch: int, global_step: int,
                      history: list[dict[str, Any]], elapsed: float, data: _Data) -> bytes:
    return torch_bytes({
        "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
        "epoch": epoch, "global_step": global_step,
        "model": model.state_dict(), "optimizer": opt.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": None if scaler is None else scaler.state_dict(),
        "rng": capture_rng_state(), "config": cfg.to_dict(),
        "tokenizer": data.tokenizer_state, "history": [dict(r) for r in history],
        "train_time_s": elapsed, "torch_version": str(torch.__version__),
        "msam_version": msam.__version__,
    })

