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
from .rundir import IntegrityError, RunDirError, RunFiles, run_lock
from .schedule import lr_factor_fn

__all__ = ["METRIC_COLUMNS", "RunResult", "TrainingError", "build_optimizer", "evaluate",
           "is_finished", "train"]

METRIC_COLUMNS = (
    "epoch", "step", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "test_loss",
    "test_acc", "skipped_steps", "epoch_time_s", "elapsed_s",
)
TIME_COLUMNS = ("epoch_time_s", "elapsed_s")


class TrainingError(RuntimeError):
    """A training step failed; the run directory keeps its last good checkpoint."""


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
                    steps_per_epoch: int | None = None) -> torch.optim.Optimizer:
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
        return base_cls(params, **kwargs)
    perturb = None
    if cfg.perturb == "norm":  # SAM-ON: only the normalisation layers' parameters
        perturb = [p for p in msam.normalization_parameters(model) if p.requires_grad]
        if not perturb:
            raise ConfigError(f"config: key 'perturb' is 'norm' but model {cfg.model!r} has no "
                              "trainable normalisation parameters (BatchNorm, GroupNorm, ...)")
    opt = msam.MSAM(
        params, base_cls, rho=cfg.rho,
        micro_batches=1 if cfg.optimizer == "sam" else cfg.micro_batches,
        adaptive=cfg.optimizer == "asam", eta=cfg.eta, model=model,
        strategy=msam.strategies.STRATEGIES[cfg.strategy](chunk=cfg.micro_batch_chunk)
        if cfg.strategy in ("batched", "lowrank") else cfg.strategy,
        max_grad_norm=cfg.max_grad_norm, nonfinite=cfg.nonfinite, rule=variant_rule(cfg),
        every=cfg.every, start_step=start_step(cfg, steps_per_epoch),
        reuse=None if cfg.reuse == "none" else cfg.reuse, reuse_alpha=cfg.reuse_alpha,
        perturb=perturb, **kwargs,
    )
    if cfg.optimizer == "gsam" and cfg.gsam_rho_min is not None:
        # GSAM's schedule: rho_t linear in lr_t, rho_min at min_lr up to rho at the peak lr.
        for group in opt.param_groups:
            group.update(rho_max=cfg.rho, rho_min=cfg.gsam_rho_min, lr_max=cfg.lr,
                         lr_min=cfg.min_lr)
    return opt


def variant_rule(cfg: TrainConfig) -> msam.PerturbationRule | None:
    """The perturbation rule of a SAM-family method (docs/variants.md), else None."""
    from msam.core import FriendlySAMRule, GCSAMRule, GSAMRule, WSAMRule

    if cfg.optimizer == "gsam":
        return GSAMRule(alpha=cfg.gsam_alpha)
    if cfg.optimizer == "friendlysam":
        return FriendlySAMRule(sigma=cfg.friendly_sigma, lmbda=cfg.friendly_lambda)
    if cfg.optimizer == "wsam":
        return WSAMRule(gamma=cfg.wsam_gamma, decoupled=cfg.wsam_decoupled)
    if cfg.optimizer == "gcsam":
        return GCSAMRule()
    return None


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
            log("tensorboard: not installed (pip install tensorboard); skipping it")
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
        log(f"sharpness: msam.analysis is not available ({err}); skipping")
        return None
    n = min(s.examples, len(data.train))
    idx = torch.randperm(len(data.train), generator=make_generator(s.seed, "sharpness"))[:n]
    subset = data.train.subset(idx.sort().values)
    batches = [data.batch("train", x, y) for x, y in
               iterate_batches(subset, s.batch_size, shuffle=False, seed=0, epoch=0)]
    rho = s.rho if s.rho is not None else (cfg.rho if cfg.rho > 0 else 0.05)

    def loss_fn(mdl: nn.Module, batch: Any) -> torch.Tensor:
        return F.cross_entropy(mdl(batch[0]).float(), batch[1])

    t0 = time.perf_counter()
    try:
        result = measure(model, loss_fn, batches, metrics=list(s.metrics), rho=rho, m=s.m,
                         seed=s.seed, **s.options)
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
        stop_after_epochs: return after this many epochs *of this call* (for tests / time
            slicing); the run stays resumable.
        log_prefix: prepended to log lines (studies pass the run name).

    Returns:
        a :class:`RunResult`; ``completed`` is True when ``epochs`` epochs are done.

    Raises:
        ConfigError: bad config, or a run directory that cannot be used as asked:
            :class:`~msam.training.rundir.RunLockedError` (another process writes it),
            :class:`~msam.training.rundir.IntegrityError` (a corrupted file), or a finished run.
        TrainingError: a training step failed; the last checkpoint is kept.
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
        if not quiet:
            print(f"{log_prefix}{msg}", flush=True)

    with run_lock(run_dir):
        remove_stale_temp_files(run_dir)
        files = RunFiles(run_dir)
        ckpt = _open_run(cfg, run_dir, files, device, resume, rerun, log)
        if isinstance(ckpt, RunResult):
            return ckpt
        with _runtime(cfg, device), warnings.catch_warnings():
            # Harmless when the very first step is skipped (non-finite loss, GradScaler
            # overflow).
            warnings.filterwarnings("ignore",
                                    message=r"Detected call of `lr_scheduler\.step\(\)`")
            return _train(cfg, run_dir, files, device, ckpt, log, stop_after_epochs)


def _open_run(cfg: TrainConfig, run_dir: Path, files: RunFiles, device: torch.device,
              resume: bool, rerun: bool, log: Callable[[str], None]) -> dict | RunResult | None:
    """What to start from: a checkpoint dict, None (from scratch), or a finished result."""
    ckpt_path, done_path = run_dir / "last.pt", run_dir / "done.json"
    checkpoints = [p for p in (ckpt_path, run_dir / "prev.pt") if p.exists()]
    finished = done_path.exists()
    if rerun:
        if checkpoints or finished:
            log(f"{run_dir}: --rerun: discarding the run it holds")
        files.forget(*RUN_FILES)
        return None
    if (checkpoints or finished) and not resume:
        what = "a finished run (done.json)" if finished else "an unfinished run (last.pt)"
        raise RunDirError(f"out_dir {str(run_dir)!r} already holds a run: {what}; pass --resume "
                          "(resume=True) to continue it, --rerun (rerun=True) to train it again "
                          "from scratch, or choose another out_dir")
    if not resume:
        return None
    ckpt = _load_verified_checkpoint(run_dir, files, device, log)
    if ckpt is None:
        if finished:
            raise RunDirError(
                f"{run_dir} holds a finished run (done.json) but no checkpoint (last.pt was "
                "deleted), so it cannot be resumed or extended; its results are kept as they "
                "are. Pass --rerun (rerun=True) to train it again from scratch")
        log(f"{run_dir}: no checkpoint, starting from scratch")
        return None
    changed = [k for k in config_diff(ckpt["config"], cfg.to_dict())
               if k.split(".")[0] not in RESUMABLE_CHANGES]
    if changed:
        raise ConfigError(
            f"cannot resume {str(ckpt_path)!r}: the config differs in "
            f"{', '.join(changed)} (only {', '.join(sorted(RESUMABLE_CHANGES))} may change); "
            "start a new out_dir instead"
        )
    if int(ckpt["epoch"]) > cfg.epochs:
        raise ConfigError(f"config: key 'epochs' is {cfg.epochs} but the checkpoint in "
                          f"{str(run_dir)!r} already has {ckpt['epoch']} epochs")
    if finished and int(ckpt["epoch"]) == cfg.epochs and is_finished(run_dir, cfg):
        log(f"{run_dir}: already finished ({cfg.epochs} epochs)")
        return RunResult.from_dir(run_dir)
    if finished:
        read_done(run_dir)  # a corrupted record is reported, not silently replaced
        files.forget("done.json")  # extended or re-measured: not finished until rewritten
    return ckpt


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
                log(f"the corrupted checkpoint was moved to {bad}")
        return ckpt
    if problems:
        raise IntegrityError(
            f"cannot resume {run_dir}: {'; '.join(problems)}. The checkpoint is corrupted and "
            "no intact one is left; nothing was changed. Restore the file from a backup, or "
            "pass --rerun (rerun=True) to train the run again from scratch")
    return None


def _train(cfg: TrainConfig, run_dir: Path, files: RunFiles, device: torch.device,
           ckpt: dict | None, log: Callable[[str], None],
           stop_after_epochs: int | None) -> RunResult:
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
    autocast = _autocast(cfg, device)

    history: list[dict[str, Any]] = []
    start_epoch, global_step, elapsed = 0, 0, 0.0
    resumed_from = None
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        # The schedule is rebuilt from the config (epochs may have changed): set the lr of
        # the next step from it (identical to the saved value when nothing changed).
        for group, base_lr in zip(opt.param_groups, scheduler.base_lrs):
            group["lr"] = base_lr * factor(scheduler.last_epoch)
        scheduler._last_lr = [g["lr"] for g in opt.param_groups]
        if scaler is not None and ckpt.get("scaler") is not None:
            scaler.load_state_dict(ckpt["scaler"])
        restore_rng_state(ckpt["rng"])
        history = [dict(r) for r in ckpt["history"]]
        start_epoch = int(ckpt["epoch"])
        global_step = int(ckpt["global_step"])
        elapsed = float(ckpt.get("train_time_s", 0.0))
        resumed_from = start_epoch
        log(f"resuming {run_dir} from epoch {start_epoch} (step {global_step})")

    info = {
        "device": str(device), "torch": str(torch.__version__), "msam": msam.__version__,
        "parameters": sum(p.numel() for p in model.parameters()),
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "steps_per_epoch": steps_per_epoch, "sizes": data.meta["sizes"],
        "label_noise": data.meta.get("label_noise"), "threads": torch.get_num_threads(),
    }
    start_files = {**_config_files(cfg), "run_info.json": _json_bytes(info)}
    if ckpt is not None:  # drop rows of an epoch the checkpoint does not hold
        start_files.update(_metrics_files(history))
    files.write(start_files)
    if ckpt is None:
        sched = getattr(opt, "schedule", None)
        sched_text = "" if sched is None or sched.trivial else f" {sched!r}"
        log(f"{cfg.optimizer} ({cfg.base}) rho={cfg.rho} m={cfg.micro_batches}{sched_text} on "
            f"{cfg.dataset} ({info['sizes']['train']} train) with {cfg.model} "
            f"({info['parameters']:,} params), {cfg.epochs} epochs x {steps_per_epoch} steps, "
            f"{device}")

    is_msam = isinstance(opt, msam.MSAM)
    # SAM-ON with GroupNorm: one-channel images batched as (N, 1, H, W) with strides
    # (H*W, 1, W, 1) count as channels_last, so the convolutions run channels_last; torch's CPU
    # GroupNorm backward in that layout, asked only for weight and bias gradients (the
    # perturbation of the normalisation parameters), writes to a null input gradient and
    # segfaults (torch 2.13). Standard NCHW strides avoid that kernel path. Only these runs.
    restride = (cfg.perturb == "norm" and cfg.optimizer != "sgd" and data.modality == "image"
                and any(isinstance(mod, nn.GroupNorm) for mod in model.modules()))
    tb = _TensorBoard(cfg, run_dir, log)
    epochs_this_call = 0
    try:
        for epoch in range(start_epoch, cfg.epochs):
            t0 = time.perf_counter()
            model.train()
            tracker = _AccuracyTracker(device)
            loss_sum = torch.zeros((), dtype=torch.float64, device=device)
            loss_n = 0
            skipped = 0
            lr_used = opt.param_groups[0]["lr"]

            def loss_fn(mb: Any, _tracker: _AccuracyTracker = tracker) -> torch.Tensor:
                inputs, y = mb
                if restride:
                    inputs = inputs.clone(memory_format=torch.contiguous_format)
                with autocast():
                    logits = model(inputs)
                loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
                _tracker.observe(mb, logits, y)
                return loss

            bar = _progress(cfg, steps_per_epoch, f"epoch {epoch + 1}/{cfg.epochs}")
            batches = iterate_batches(data.train, cfg.batch_size, shuffle=True, seed=cfg.seed,
                                      epoch=epoch, augment=cfg.augment, drop_last=cfg.drop_last)
            for b, (x, y) in enumerate(batches):
                if b >= steps_per_epoch:
                    break
                batch = data.batch("train", x, y)
                n = int(y.shape[0])
                tracker.new_step()
                lr_used = opt.param_groups[0]["lr"]
                try:
                    if is_msam:
                        loss = opt.step(loss_fn, batch, scaler=scaler)
                        step_skipped = bool(opt.last_result is not None
                                            and opt.last_result.skipped)
                        if scaler is not None:
                            scaler.update()
                    else:
                        loss, step_skipped = _base_step(cfg, opt, loss_fn, batch, scaler)
                except Exception as err:
                    raise _step_failed(files, epoch, global_step, err) from err
                if step_skipped:
                    skipped += 1
                else:
                    loss_sum += loss.detach().double() * n
                    loss_n += n
                scheduler.step()
                global_step += 1
                if bar is not None:
                    bar.update(1)
                    if b % 10 == 0 or b == steps_per_epoch - 1:
                        acc = tracker.value()
                        bar.set_postfix(loss=f"{float(loss_sum) / max(loss_n, 1):.4f}",
                                        acc="-" if acc is None else f"{100 * acc:.1f}%")
            if bar is not None:
                bar.close()

            evaluate_now = (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs
            val_loss = val_acc = test_loss = test_acc = None
            if evaluate_now:
                if data.val is not None:
                    val_loss, val_acc = evaluate(model, data, "val", cfg.eval_batch_size,
                                                 autocast)
                test_loss, test_acc = evaluate(model, data, "test", cfg.eval_batch_size,
                                               autocast)
            epoch_time = time.perf_counter() - t0
            elapsed += epoch_time
            row = {
                "epoch": epoch + 1, "step": global_step, "lr": lr_used,
                "train_loss": float(loss_sum.item()) / loss_n if loss_n else None,
                "train_acc": tracker.value(), "val_loss": val_loss, "val_acc": val_acc,
                "test_loss": test_loss, "test_acc": test_acc, "skipped_steps": skipped,
                "epoch_time_s": round(epoch_time, 4), "elapsed_s": round(elapsed, 4),
            }
            row = {k: _clean(v) for k, v in row.items()}
            history.append(row)
            # One checksummed write: last.pt (the previous one kept as prev.pt), then the
            # metrics, so they never list an epoch the checkpoint does not hold.
            files.write({"last.pt": _checkpoint_bytes(cfg, model, opt, scheduler, scaler,
                                                      epoch + 1, global_step, history,
                                                      elapsed, data),
                         **_metrics_files(history)}, rotate=("last.pt", "prev.pt"))
            tb.log(row)
            log(f"epoch {epoch + 1}/{cfg.epochs}  loss {_fmt(row['train_loss'])}  "
                f"acc {_fmt(row['train_acc'], True)}  val {_fmt(val_acc, True)}  "
                f"test {_fmt(test_acc, True)}  lr {lr_used:.4g}  {epoch_time:.1f}s"
                + (f"  skipped {skipped}" if skipped else ""))
            epochs_this_call += 1
            if stop_after_epochs is not None and epochs_this_call >= stop_after_epochs \
                    and epoch + 1 < cfg.epochs:
                return RunResult(run_dir, cfg, history, False, elapsed, None, resumed_from, info)
    finally:
        tb.close()

    files.write({"final.pt": torch_bytes({
        "format": "msam-model", "version": 1, "model": model.state_dict(),
        "config": cfg.to_dict(), "tokenizer": data.tokenizer_state,
        "num_classes": data.num_classes, "input_shape": list(data.input_shape),
        "metrics": history[-1] if history else {},
    })})
    sharp = _measure_sharpness(cfg, model, data, run_dir, log)
    files.write({"done.json": _json_bytes({
        "status": "done", "epochs": cfg.epochs, "final": history[-1] if history else {},
        "train_time_s": elapsed, "sharpness": sharp,
        "sharpness_metrics": list(cfg.sharpness.metrics), "info": info, "config": cfg.to_dict(),
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    })})
    return RunResult(run_dir, cfg, history, True, elapsed, sharp, resumed_from, info)


def _base_step(cfg: TrainConfig, opt: torch.optim.Optimizer, loss_fn: Callable,
               batch: Any, scaler: Any) -> tuple[torch.Tensor, bool]:
    """One plain step (``optimizer: sgd``): a single forward/backward on the whole batch."""
    opt.zero_grad(set_to_none=True)
    loss = loss_fn(batch)
    if not bool(torch.isfinite(loss.detach())):
        if cfg.nonfinite == "skip" or scaler is not None:
            return loss.detach(), True
        raise FloatingPointError("non-finite training loss; set nonfinite: skip to skip such "
                                 "steps")
    params = [p for g in opt.param_groups for p in g["params"]]
    if scaler is not None:
        scaler.scale(loss).backward()
        if cfg.max_grad_norm is not None:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        before = scaler.get_scale()
        scaler.step(opt)
        scaler.update()
        return loss.detach(), scaler.get_scale() < before
    loss.backward()
    if cfg.max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
    opt.step()
    return loss.detach(), False


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

