"""What is benchmarked: a model, one fixed synthetic batch and its loss, and the methods.

Every method of one model shares the same model object and the same batch (so all of them pay
the same cache and memory-layout costs); each has its own optimizer (its own momentum buffers).
The data are synthetic (``torch.randn`` images, random token ids): a step's cost does not
depend on the values, and no data set has to be present.

Input shapes: ``mlp`` and ``small_cnn`` get Fashion-MNIST shaped ``1x28x28`` images (what the
demo trains), the ResNets / WRNs CIFAR shaped ``3x32x32``; ``minilm`` gets ``text_length``
random WordPiece ids with a full attention mask and 2 classes (the Rotten Tomatoes task).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import msam
from msam.core.batch import split_batch

__all__ = [
    "BENCH_ONLY_MODELS",
    "DEFAULT_INPUT_SHAPES",
    "Method",
    "Stepper",
    "Workload",
    "build_workload",
    "make_methods",
    "make_stepper",
    "parse_schedules",
]

#: Window of a late-phase schedule method: 8 steps, the last ``(1 - f) * 8`` perturbing.
LATE_WINDOW = 8

DEFAULT_INPUT_SHAPES: dict[str, tuple[int, int, int]] = {
    "mlp": (1, 28, 28),
    "small_cnn": (1, 28, 28),
}
CIFAR_SHAPE = (3, 32, 32)
TEXT_VOCAB = (1000, 30000)  # token ids drawn from [1000, 30000): ordinary WordPiece ids


class TinyTransformer(nn.Module):
    """A small pre-norm transformer classifier over token ids: token and position embeddings
    (``nn.Embedding``), ``depth`` blocks of :class:`msam.models.vit.TransformerBlock`
    (LayerNorm, fused-QKV attention, GELU MLP), a final LayerNorm, mean pooling and a linear
    head. Every parameter lives in an ``Embedding``, ``Linear`` or ``LayerNorm``."""

    def __init__(self, vocab: int, seq: int, num_classes: int, dim: int = 128, depth: int = 4,
                 heads: int = 4, mlp_ratio: float = 2.0) -> None:
        super().__init__()
        from msam.models.vit import TransformerBlock

        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(seq, dim)
        self.blocks = nn.Sequential(*(TransformerBlock(dim, heads, int(dim * mlp_ratio))
                                      for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(ids.shape[1], device=ids.device).expand(ids.shape[0], -1)
        x = self.tok(ids) + self.pos(pos)
        return self.head(self.norm(self.blocks(x)).mean(dim=1))


TRANSFORMER_VOCAB, TRANSFORMER_SEQ = 1000, 64


#: Bench-only workloads. ``transformer``: :class:`TinyTransformer` with 4 layers of width 128
#: (4 heads, MLP 256) over sequences of 64 random token ids (vocabulary 1000), 10 classes.
BENCH_ONLY_MODELS = ("transformer",)


@dataclass
class Workload:
    """One model with its batch and loss function."""

    name: str
    model: nn.Module
    batch: Any                       # (inputs, labels); inputs a tensor or a dict of tensors
    loss_fn: Callable[[Any], torch.Tensor]
    batch_size: int
    input_desc: str
    n_params: int
    param_bytes: int
    has_batchnorm: bool


def build_workload(
    name: str,
    batch_size: int = 128,
    *,
    device: torch.device | str = "cpu",
    seed: int = 0,
    text_length: int = 32,
    input_shape: Sequence[int] | None = None,
) -> Workload:
    """Build model ``name`` (from :func:`msam.models.build_model`) with a synthetic batch."""
    from msam.models import build_model, is_text_model

    device = torch.device(device)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    if name in BENCH_ONLY_MODELS:
        num_classes = 10
        model = TinyTransformer(TRANSFORMER_VOCAB, TRANSFORMER_SEQ, num_classes)
        inputs: Any = torch.randint(0, TRANSFORMER_VOCAB, (batch_size, TRANSFORMER_SEQ),
                                    generator=gen)
        desc = f"{TRANSFORMER_SEQ} tokens, width 128, 4 layers"
    elif is_text_model(name):
        num_classes = 2
        model = build_model(name, num_classes=num_classes)
        if name != "minilm":  # from-scratch text models need a vocabulary size
            raise ValueError(f"bench: text model {name!r} is not supported (only minilm)")
        ids = torch.randint(*TEXT_VOCAB, (batch_size, text_length), generator=gen)
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        desc = f"{text_length} tokens"
    else:
        num_classes = 10
        shape = tuple(input_shape or DEFAULT_INPUT_SHAPES.get(name, CIFAR_SHAPE))
        model = build_model(name, num_classes=num_classes, input_shape=shape)
        inputs = torch.randn((batch_size, *shape), generator=gen)
        desc = "x".join(str(s) for s in shape)
    labels = torch.randint(0, num_classes, (batch_size,), generator=gen)
    model = model.to(device).train()
    inputs = inputs.to(device) if isinstance(inputs, torch.Tensor) else {
        k: v.to(device) for k, v in inputs.items()}
    batch = (inputs, labels.to(device))

    def loss_fn(b: Any) -> torch.Tensor:
        x, y = b
        return F.cross_entropy(model(x), y)

    params = [p for p in model.parameters() if p.requires_grad]
    return Workload(
        name=name, model=model, batch=batch, loss_fn=loss_fn, batch_size=batch_size,
        input_desc=desc, n_params=sum(p.numel() for p in params),
        param_bytes=sum(p.numel() * p.element_size() for p in params),
        has_batchnorm=any(isinstance(mod, nn.modules.batchnorm._BatchNorm)
                          for mod in model.modules()),
    )


@dataclass(frozen=True)
class Method:
    """One benchmarked configuration.

    ``kind``: ``"sgd"`` (plain base optimizer, one forward + backward), ``"sam"`` (``msam.SAM``,
    the loop strategy with ``m = 1``), ``"msam"`` (``msam.MSAM`` with ``strategy`` and ``m``) or
    ``"accum"`` (plain SGD with the batch cut into ``m`` micro-batches and their gradients
    accumulated: the compute floor of smaller micro-batches, with no SAM work at all),
    ``"sched"`` (``msam.MSAM`` loop with a schedule, docs/schedules.md: ``every``,
    ``late`` = the start fraction, ``reuse``) or ``"variant"``: a rule of the SAM family
    (``rule``: ``"gsam"``, ``"friendlysam"``, ``"wsam"``, ``"gcsam"``; docs/variants.md) with
    its default hyperparameters, ``strategy`` and ``m`` (``m = 1``: the paper's method). A
    ``sched`` call runs one window of :attr:`window` optimizer steps (the schedule's period:
    ``every`` steps, or ``LATE_WINDOW`` steps of which the last ``(1 - late)`` perturb), so its
    time per step is the mean over a window in which off-steps and perturbation steps mix as in
    an epoch.
    """

    kind: str
    m: int = 1
    strategy: str | None = None
    every: int = 1
    late: float = 0.0
    reuse: str | None = None
    rule: str | None = None

    @property
    def window(self) -> int:
        return LATE_WINDOW if self.late else self.every

    @property
    def key(self) -> str:
        if self.kind in ("sgd", "sam"):
            return self.kind
        if self.kind == "accum":
            return f"accum-m{self.m}"
        if self.kind == "sched":
            what = f"late{self.late:g}" if self.late else f"every{self.every}"
            where = "" if self.strategy in (None, "loop") else f"-{self.strategy}"
            return f"msam-m{self.m}-{what}" + (f"-{self.reuse}" if self.reuse else "") + where
        if self.kind == "variant":
            return f"{self.rule}-{self.strategy}-m{self.m}"
        return f"msam-{self.strategy}-m{self.m}"

    @property
    def label(self) -> str:
        if self.kind == "sgd":
            return "SGD"
        if self.kind == "sam":
            return "SAM"
        if self.kind == "accum":
            return f"SGD, {self.m} micro-batches accumulated"
        if self.kind == "sched":
            who = f"mSAM m={self.m}" + ("" if self.strategy in (None, "loop")
                                        else f" {self.strategy}")
            if self.late:
                return f"{who}, last {100 * (1 - self.late):g}% of steps"
            if self.reuse:
                return f"{who}, {self.reuse} reuse, every {self.every}"
            return f"{who}, every {self.every} steps"
        if self.kind == "variant":
            name = variant_names().get(str(self.rule), str(self.rule))
            return f"{name} {self.strategy} m={self.m}"
        return f"mSAM {self.strategy} m={self.m}"


def variant_names() -> dict[str, str]:
    """Display names of the SAM family's rules, from the registry (``msam.core.RULES``; SAM and
    ASAM are methods of their own here)."""
    from msam.core.registry import RULES

    return {name: cls.title or name for name, cls in RULES.items() if name not in ("sam", "asam")}


#: Display names of the SAM family's rules (at import; see :func:`variant_names`).
VARIANT_NAMES = variant_names()


def make_methods(
    m_values: Sequence[int],
    strategies: Sequence[str] = ("loop", "vmap"),
    *,
    accum: bool = True,
    variants: Sequence[str] = (),
) -> list[Method]:
    """SGD, SAM, then mSAM for every strategy and ``m`` (``loop`` at ``m = 1`` *is* SAM, so it
    is not repeated), then each of ``variants`` (SAM-family rules) for every strategy and
    ``m`` (a rule without an ascent pass, Momentum-SAM, once: ``m = 1``, loop), then the
    accumulation floors for every ``m > 1``."""
    from msam.core.registry import RULES

    out = [Method("sgd"), Method("sam", 1, "loop")]
    for s in strategies:
        for m in m_values:
            if m == 1 and s in ("loop", "batched", "lowrank"):  # both are SAM at m = 1
                continue
            out.append(Method("msam", m, s))
    for v in variants:
        if not getattr(RULES.get(v), "ascent", True):
            # One pass at w + e, e from the optimizer's state (Momentum-SAM): one direction for
            # the whole batch, so m = 1, and no per-micro-batch work for a strategy to share.
            out.append(Method("variant", 1, "loop", rule=v))
            continue
        out.extend(Method("variant", m, s, rule=v) for s in strategies for m in m_values)
    if accum:
        out.extend(Method("accum", m) for m in m_values if m > 1)
    return out


def parse_schedules(text: str, m: int, strategy: str = "loop") -> list[Method]:
    """``"every2,every5,late0.75,looksam5"`` -> schedule methods (mSAM with ``m`` and
    ``strategy`` on the perturbation steps)."""
    out = []
    for item in (t.strip() for t in text.split(",") if t.strip()):
        try:
            if item.startswith("every"):
                meth = Method("sched", m, strategy, every=int(item[5:]))
            elif item.startswith("late"):
                frac = float(item[4:])
                if not 0 < frac < 1 or (frac * LATE_WINDOW) % 1:
                    raise ValueError
                meth = Method("sched", m, strategy, late=frac)
            elif item.startswith("looksam"):
                meth = Method("sched", m, strategy, every=int(item[7:]), reuse="looksam")
            else:
                raise ValueError
        except ValueError:
            raise ValueError(
                f"--schedules: {item!r} is not everyK (K >= 1), lateF (0 < F < 1, F x "
                f"{LATE_WINDOW} whole) or looksamK (K >= 2)") from None
        if meth.every < 1 or (meth.reuse and meth.every < 2):
            raise ValueError(f"--schedules: {item!r}: K must be >= 1 (looksam: >= 2)")
        out.append(meth)
    return out


@dataclass
class Stepper:
    """A method bound to a workload: ``step()`` runs one full optimizer step (``window``
    steps for a schedule method; the runner divides its time by ``window``)."""

    method: Method
    optimizer: torch.optim.Optimizer
    step: Callable[[], Any]
    window: int = 1

    def state_tensors(self) -> list[torch.Tensor]:
        """Tensors this method keeps between steps (optimizer state, e.g. momentum)."""
        opt = getattr(self.optimizer, "base_optimizer", self.optimizer)
        out = [v for st in opt.state.values() for v in st.values()
               if isinstance(v, torch.Tensor)]
        # Buffers a strategy keeps between steps (batched: its per-micro-batch gradients).
        strategy = getattr(getattr(self.optimizer, "engine", None), "strategy", None)
        for s in [strategy, *getattr(strategy, "candidates", {}).values()]:
            out.extend(getattr(s, "workspace_tensors", lambda: [])())
        return out


def make_stepper(
    wl: Workload,
    method: Method,
    *,
    rho: float = 0.05,
    lr: float = 0.01,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
) -> Stepper:
    """Bind ``method`` to ``wl`` with SGD (momentum 0.9, weight decay 5e-4) as base optimizer."""
    params = [p for p in wl.model.parameters() if p.requires_grad]
    sgd_kwargs = {"lr": lr, "momentum": momentum, "weight_decay": weight_decay}
    batch, loss_fn = wl.batch, wl.loss_fn
    if method.kind == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(params, **sgd_kwargs)

        def step() -> Any:
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(batch)
            loss.backward()
            opt.step()
            return loss.detach()

        return Stepper(method, opt, step)
    if method.kind == "accum":
        opt = torch.optim.SGD(params, **sgd_kwargs)
        n = wl.batch_size

        def step() -> Any:
            opt.zero_grad(set_to_none=True)
            total = 0.0
            for mb, n_j in split_batch(batch, method.m):
                loss = loss_fn(mb)
                (loss * (n_j / n)).backward()
                total = total + loss.detach() * (n_j / n)
            opt.step()
            return total

        return Stepper(method, opt, step)
    if method.kind == "sam":
        sam = msam.SAM(params, torch.optim.SGD, rho=rho, strategy="loop", model=wl.model,
                       **sgd_kwargs)
        return Stepper(method, sam, lambda: sam.step(loss_fn, batch))
    if method.kind == "msam":
        if method.m > wl.batch_size:
            raise ValueError(f"m={method.m} > batch size {wl.batch_size}")
        opt_m = msam.MSAM(params, torch.optim.SGD, rho=rho, micro_batches=method.m,
                          strategy=method.strategy or "loop", model=wl.model, **sgd_kwargs)
        return Stepper(method, opt_m, lambda: opt_m.step(loss_fn, batch))
    if method.kind == "sched":
        start = round(method.late * LATE_WINDOW)
        opt_s = msam.MSAM(params, torch.optim.SGD, rho=rho, micro_batches=method.m,
                          strategy=method.strategy or "loop", model=wl.model, every=method.every,
                          start_step=start, reuse=method.reuse, **sgd_kwargs)

        def window() -> Any:
            # Each call is one window, replayed from step 0 of the schedule (an "epoch").
            opt_s.steps = 0
            for _ in range(method.window):
                loss = opt_s.step(loss_fn, batch)
            return loss

        return Stepper(method, opt_s, window, window=method.window)
    if method.kind == "variant":
        if method.m > wl.batch_size:
            raise ValueError(f"m={method.m} > batch size {wl.batch_size}")
        opt_v = msam.MSAM(params, torch.optim.SGD, rho=rho, micro_batches=method.m,
                          rule=str(method.rule), strategy=method.strategy or "loop",
                          model=wl.model, **sgd_kwargs)
        return Stepper(method, opt_v, lambda: opt_v.step(loss_fn, batch))
    raise ValueError(f"unknown method kind {method.kind!r}")
