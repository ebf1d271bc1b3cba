"""From-scratch text classifiers and their word-level tokenizer.

Batches are dicts ``{"input_ids": LongTensor(B, L), "attention_mask": LongTensor(B, L)}``
padded to one fixed ``L``, so every tensor splits cleanly along dim 0 into micro-batches.

* :class:`WordTokenizer`: lowercase, regex word / punctuation tokens, vocabulary built from the
  training texts (``min_freq``, ``max_vocab``) with ``[PAD]`` = 0 and ``[UNK]`` = 1; its state is a
  plain dict (:meth:`WordTokenizer.state_dict`) for checkpoints.
* :class:`EmbeddingBagClassifier`: mean of word embeddings over the unmasked tokens, then a
  linear layer, i.e. fastText (Joulin, Grave, Bojanowski & Mikolov, 2017, "Bag of Tricks for
  Efficient Text Classification", EACL) without n-grams.
* :class:`TextCNN`: 1-D convolutions of several widths over word embeddings, ReLU, max over
  time, dropout, linear (Kim, 2014, "Convolutional Neural Networks for Sentence
  Classification", EMNLP).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "PAD_TOKEN",
    "UNK_TOKEN",
    "EmbeddingBagClassifier",
    "TextCNN",
    "WordTokenizer",
    "unpack_text_batch",
]

PAD_TOKEN = "[PAD]"
UNK_TOKEN = "[UNK]"
DEFAULT_PATTERN = r"\w+(?:'\w+)?|[^\w\s]"


def unpack_text_batch(
    batch: Mapping[str, torch.Tensor] | torch.Tensor, pad_id: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` from a dict batch, or from a bare id tensor (mask = ids
    that are not ``pad_id``)."""
    if isinstance(batch, Mapping):
        if "input_ids" not in batch:
            raise ValueError(f"text batch needs key 'input_ids'; got keys {sorted(batch)}")
        ids = batch["input_ids"]
        mask = batch.get("attention_mask")
    elif isinstance(batch, torch.Tensor):
        ids, mask = batch, None
    else:
        raise TypeError(f"text batch must be a dict or a LongTensor, not {type(batch).__name__}")
    if ids.dim() != 2:
        raise ValueError(f"input_ids must have shape (batch, length), got {tuple(ids.shape)}")
    if mask is None:
        mask = (ids != pad_id).long()
    return ids, mask


class WordTokenizer:
    """Word-level tokenizer with a vocabulary built from training texts.

    >>> tok = WordTokenizer.fit(["a good movie", "a bad movie"], max_length=6)
    >>> tok(["good film"])["input_ids"].tolist()   # 'film' is unknown -> 1, then padding 0
    [[5, 1, 0, 0, 0, 0]]
    """

    pad_id = 0
    unk_id = 1

    def __init__(
        self,
        itos: Sequence[str],
        max_length: int = 128,
        lowercase: bool = True,
        pattern: str = DEFAULT_PATTERN,
    ) -> None:
        itos = list(itos)
        if itos[:2] != [PAD_TOKEN, UNK_TOKEN]:
            raise ValueError(f"vocabulary must start with {PAD_TOKEN!r}, {UNK_TOKEN!r}")
        if len(set(itos)) != len(itos):
            raise ValueError("vocabulary has duplicate tokens")
        if max_length < 1:
            raise ValueError(f"max_length={max_length} must be >= 1")
        self.itos = itos
        self.stoi = {t: i for i, t in enumerate(itos)}
        self.max_length = int(max_length)
        self.lowercase = bool(lowercase)
        self.pattern = pattern
        self._regex = re.compile(pattern)

    @classmethod
    def fit(
        cls,
        texts: Iterable[str],
        min_freq: int = 1,
        max_vocab: int | None = 30000,
        max_length: int = 128,
        lowercase: bool = True,
        pattern: str = DEFAULT_PATTERN,
    ) -> WordTokenizer:
        """Build the vocabulary: tokens seen at least ``min_freq`` times, most frequent first
        (ties broken alphabetically, so the result does not depend on text order), keeping at
        most ``max_vocab`` entries in total, the two special tokens included."""
        if min_freq < 1:
            raise ValueError(f"min_freq={min_freq} must be >= 1")
        if max_vocab is not None and max_vocab < 2:
            raise ValueError(f"max_vocab={max_vocab} must be >= 2 (PAD and UNK)")
        regex = re.compile(pattern)
        counts: Counter[str] = Counter()
        for text in texts:
            counts.update(regex.findall(text.lower() if lowercase else text))
        for special in (PAD_TOKEN, UNK_TOKEN):
            counts.pop(special, None)
        words = [w for w, c in counts.items() if c >= min_freq]
        words.sort(key=lambda w: (-counts[w], w))
        if max_vocab is not None:
            words = words[: max_vocab - 2]
        return cls([PAD_TOKEN, UNK_TOKEN, *words], max_length, lowercase, pattern)

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    def __len__(self) -> int:
        return len(self.itos)

    def tokenize(self, text: str) -> list[str]:
        return self._regex.findall(text.lower() if self.lowercase else text)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, unknown tokens mapped to ``unk_id``, no truncation."""
        return [self.stoi.get(t, self.unk_id) for t in self.tokenize(text)]

    def decode(self, ids: Iterable[int]) -> list[str]:
        """Tokens of ``ids`` with padding dropped."""
        return [self.itos[int(i)] for i in ids if int(i) != self.pad_id]

    def __call__(self, texts: str | Sequence[str], max_length: int | None = None) -> dict:
        """Encode a list of texts to ``{"input_ids", "attention_mask"}``, both ``(B, L)`` int64,
        truncated / right-padded to ``L = max_length`` (default: the tokenizer's)."""
        if isinstance(texts, str):
            texts = [texts]
        length = self.max_length if max_length is None else int(max_length)
        if length < 1:
            raise ValueError(f"max_length={length} must be >= 1")
        ids = torch.full((len(texts), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(texts), length), dtype=torch.long)
        for row, text in enumerate(texts):
            tok = self.encode(text)[:length]
            if tok:
                ids[row, : len(tok)] = torch.tensor(tok, dtype=torch.long)
                mask[row, : len(tok)] = 1
        return {"input_ids": ids, "attention_mask": mask}

    def state_dict(self) -> dict[str, Any]:
        """Plain-Python state (JSON / ``torch.save`` friendly)."""
        return {
            "kind": "word",
            "itos": list(self.itos),
            "max_length": self.max_length,
            "lowercase": self.lowercase,
            "pattern": self.pattern,
        }

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> WordTokenizer:
        return cls(state["itos"], state["max_length"], state["lowercase"], state["pattern"])

    def __repr__(self) -> str:
        return f"WordTokenizer(vocab_size={self.vocab_size}, max_length={self.max_length})"


def _check_vocab(vocab_size: int | None, padding_idx: int) -> int:
    if vocab_size is None:
        raise ValueError("text models need option vocab_size (e.g. tokenizer.vocab_size)")
    if vocab_size < 2 or not 0 <= padding_idx < vocab_size:
        raise ValueError(f"vocab_size={vocab_size} / padding_idx={padding_idx} are inconsistent")
    return int(vocab_size)


class EmbeddingBagClassifier(nn.Module):
    """Masked mean of word embeddings + linear head (fastText-style, Joulin et al., 2017).

    Uses ``nn.EmbeddingBag(mode="sum")`` with per-token weights ``mask / n_tokens`` (dense
    gradients, as SAM's perturbation needs). Texts with no tokens give a zero feature vector.
    """

    def __init__(
        self,
        num_classes: int,
        vocab_size: int | None = None,
        embed_dim: int = 64,
        padding_idx: int = 0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        vocab_size = _check_vocab(vocab_size, padding_idx)
        self.padding_idx = padding_idx
        self.embedding = nn.EmbeddingBag(vocab_size, embed_dim, mode="sum")
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = nn.Linear(embed_dim, num_classes)
        nn.init.normal_(self.embedding.weight, std=embed_dim**-0.5)

    def forward(self, batch: Mapping[str, torch.Tensor] | torch.Tensor) -> torch.Tensor:
        ids, mask = unpack_text_batch(batch, self.padding_idx)
        w = mask.to(self.embedding.weight.dtype)
        w = w / w.sum(dim=1, keepdim=True).clamp_min(1.0)
        feat = self.embedding(ids, per_sample_weights=w)
        return self.fc(self.drop(feat))


class TextCNN(nn.Module):
    """Kim (2014) CNN: ``filters`` maps per kernel width, max over the valid time steps.

    Padding tokens are zeroed before the convolution, the sequence is zero-padded on the right
    so each real token starts a full window, and windows that start on padding are ignored by
    the max (ReLU outputs are >= 0, so masking them to 0 is exact). Texts without tokens give a
    zero feature vector.
    """

    def __init__(
        self,
        num_classes: int,
        vocab_size: int | None = None,
        embed_dim: int = 128,
        kernel_sizes: Sequence[int] = (3, 4, 5),
        filters: int = 100,
        dropout: float = 0.5,
        padding_idx: int = 0,
    ) -> None:
        super().__init__()
        vocab_size = _check_vocab(vocab_size, padding_idx)
        kernel_sizes = tuple(int(k) for k in kernel_sizes)
        if not kernel_sizes or min(kernel_sizes) < 1 or filters < 1:
            raise ValueError("kernel_sizes must be positive ints and filters >= 1")
        self.padding_idx = padding_idx
        self.kernel_sizes = kernel_sizes
        self.embedding = nn.Embedding(vocab_size, embed_dim)
        self.convs = nn.ModuleList(nn.Conv1d(embed_dim, filters, k) for k in kernel_sizes)
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = nn.Linear(filters * len(kernel_sizes), num_classes)
        nn.init.normal_(self.embedding.weight, std=embed_dim**-0.5)

    def forward(self, batch: Mapping[str, torch.Tensor] | torch.Tensor) -> torch.Tensor:
        ids, mask = unpack_text_batch(batch, self.padding_idx)
        length = ids.shape[1]
        m = mask.to(self.embedding.weight.dtype)
        x = (self.embedding(ids) * m.unsqueeze(-1)).transpose(1, 2)  # (B, E, L)
        # Zero-pad on the right so every token starts a full window: the result does not
        # depend on how much padding the batch carries.
        x = F.pad(x, (0, max(self.kernel_sizes) - 1))
        valid = m.unsqueeze(1)  # (B, 1, L): windows starting on a real token
        feats = [(F.relu(conv(x))[..., :length] * valid).amax(dim=-1) for conv in self.convs]
        return self.fc(self.drop(torch.cat(feats, dim=1)))
