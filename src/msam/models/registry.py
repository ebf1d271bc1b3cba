"""Model registry: ``build_model(name, num_classes=..., input_shape=..., **options)``."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .basic import MLP, SmallCNN
from .resnet import CifarResNet, ResNet18, WideResNet
from .text import EmbeddingBagClassifier, TextCNN, WordTokenizer
from .vit import ViT

__all__ = [
    "IMAGE_MODELS",
    "MODELS",
    "TEXT_MODELS",
    "build_model",
    "count_parameters",
    "is_text_model",
    "make_tokenizer",
    "model_options",
    "tokenizer_from_state",
]


def _minilm(num_classes: int, **options: Any) -> nn.Module:
    from .minilm import MiniLMClassifier  # transformers is imported only when needed

    return MiniLMClassifier(num_classes, **options)


_MINILM_OPTIONS = {"dropout": None, "freeze_encoder": False, "path": None,
                   "train_layers": None, "cache_frozen": False}


@dataclass(frozen=True)
class _Spec:
    builder: Callable[..., nn.Module]
    kind: str  # "image" (gets input_shape) or "text"
    fixed: Mapping[str, Any] = field(default_factory=dict)
    summary: str = ""

    def options(self) -> dict[str, Any]:
        """Valid options and their defaults."""
        if self.builder is _minilm:
            return dict(_MINILM_OPTIONS)
        params = inspect.signature(self.builder).parameters
        return {
            k: p.default
            for k, p in params.items()
            if k not in ("self", "input_shape", "num_classes") and k not in self.fixed
        }


_SPECS: dict[str, _Spec] = {
    "mlp": _Spec(MLP, "image", summary="fully connected ReLU net"),
    "small_cnn": _Spec(SmallCNN, "image", summary="3 conv-norm-ReLU blocks, fast on CPU"),
    "resnet20": _Spec(CifarResNet, "image", {"depth": 20}, "CIFAR ResNet-20 (He et al. 2016)"),
    "resnet32": _Spec(CifarResNet, "image", {"depth": 32}, "CIFAR ResNet-32"),
    "resnet56": _Spec(CifarResNet, "image", {"depth": 56}, "CIFAR ResNet-56"),
    "resnet18": _Spec(ResNet18, "image", summary="CIFAR PreAct ResNet-18"),
    "wrn": _Spec(WideResNet, "image", summary="WRN-depth-widen (Zagoruyko & Komodakis 2016)"),
    "wrn16_4": _Spec(WideResNet, "image", {"depth": 16, "widen": 4}, "WRN-16-4"),
    "wrn16_8": _Spec(WideResNet, "image", {"depth": 16, "widen": 8}, "WRN-16-8"),
    "wrn28_10": _Spec(WideResNet, "image", {"depth": 28, "widen": 10}, "WRN-28-10"),
    "vit_small": _Spec(ViT, "image", summary="small ViT (Dosovitskiy et al. 2021)"),
    "embedding_bag": _Spec(EmbeddingBagClassifier, "text", summary="fastText-style bag of words"),
    "text_cnn": _Spec(TextCNN, "text", summary="Kim (2014) CNN over word embeddings"),
    "minilm": _Spec(_minilm, "text", summary="pretrained all-MiniLM-L6-v2 + mean pool + linear"),
}

MODELS: tuple[str, ...] = tuple(_SPECS)
IMAGE_MODELS: tuple[str, ...] = tuple(n for n, s in _SPECS.items() if s.kind == "image")
TEXT_MODELS: tuple[str, ...] = tuple(n for n, s in _SPECS.items() if s.kind == "text")


def _spec(name: str) -> _Spec:
    if not isinstance(name, str) or name not in _SPECS:
        raise ValueError(f"unknown model {name!r}; valid models: {', '.join(MODELS)}")
    return _SPECS[name]


def is_text_model(name: str) -> bool:
    """Whether ``name`` takes ``{"input_ids", "attention_mask"}`` batches (else images)."""
    return _spec(name).kind == "text"


def model_options(name: str) -> dict[str, Any]:
    """The options ``build_model(name, ...)`` accepts, with their defaults."""
    return _spec(name).options()


def _check_input_shape(input_shape: Sequence[int]) -> tuple[int, int, int]:
    try:
        shape = tuple(int(s) for s in input_shape)
    except (TypeError, ValueError):
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(
            f"input_shape={input_shape!r} must be (channels, height, width), e.g. (1, 28, 28)"
        )
    return shape  # type: ignore[return-value]


def build_model(
    name: str,
    *,
    num_classes: int,
    input_shape: Sequence[int] = (1, 28, 28),
    **options: Any,
) -> nn.Module:
    """Build the registered model ``name`` (see :data:`MODELS`).

    Image models take ``(B, *input_shape)`` float tensors; text models (:data:`TEXT_MODELS`)
    take ``{"input_ids", "attention_mask"}`` dicts of ``(B, L)`` int64 tensors and ignore
    ``input_shape``. All return ``(B, num_classes)`` logits. Unknown names or options raise
    ``ValueError`` listing the valid ones (:func:`model_options`). Initialisation only uses
    torch's global RNG, so ``torch.manual_seed`` fixes it.
    """
    spec = _spec(name)
    valid = spec.options()
    bad = sorted(set(options) - set(valid))
    if bad:
        raise ValueError(
            f"model {name!r} got unknown option(s) {', '.join(bad)}; "
            f"valid options: {', '.join(valid) or '(none)'}"
        )
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes={num_classes!r} must be a positive int")
    kwargs = {**spec.fixed, **options}
    if spec.kind == "image":
        return spec.builder(
            input_shape=_check_input_shape(input_shape), num_classes=num_classes, **kwargs
        )
    return spec.builder(num_classes=num_classes, **kwargs)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of scalar parameters (shared parameters counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def make_tokenizer(
    model_name: str,
    texts: Iterable[str] | None = None,
    *,
    max_length: int = 128,
    min_freq: int = 1,
    max_vocab: int | None = 30000,
    path: str | None = None,
) -> Callable[..., dict]:
    """Tokenizer for text model ``model_name``: ``tok(list_of_str, max_length) -> dict``.

    * ``"minilm"``: the shipped WordPiece tokenizer (:class:`~msam.models.minilm.TextTokenizer`;
      ``path`` overrides the model folder).
    * ``"embedding_bag"`` / ``"text_cnn"``: a :class:`~msam.models.text.WordTokenizer` whose
      vocabulary is built from ``texts`` (the training texts) with ``min_freq`` / ``max_vocab``;
      pass ``vocab_size=tok.vocab_size`` to :func:`build_model`.

    The result pads / truncates to a fixed ``max_length`` (default given here), so a whole
    dataset can be tokenized once and split along dim 0.
    """
    if _spec(model_name).kind != "text":
        raise ValueError(f"model {model_name!r} is not a text model; text models: {TEXT_MODELS}")
    if model_name == "minilm":
        from .minilm import TextTokenizer

        return TextTokenizer(path=path, max_length=max_length)
    if texts is None:
        raise ValueError(f"make_tokenizer({model_name!r}) needs the training texts (vocabulary)")
    return WordTokenizer.fit(texts, min_freq=min_freq, max_vocab=max_vocab, max_length=max_length)


def tokenizer_from_state(state: Mapping[str, Any]) -> Callable[..., dict]:
    """Rebuild a tokenizer from its ``state_dict()`` (e.g. read back from a checkpoint)."""
    kind = state.get("kind")
    if kind == "word":
        return WordTokenizer.from_state_dict(state)
    if kind == "minilm":
        from .minilm import TextTokenizer

        return TextTokenizer(max_length=state.get("max_length", 128))
    raise ValueError(f"unknown tokenizer state kind {kind!r}; expected 'word' or 'minilm'")
