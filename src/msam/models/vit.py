"""A small Vision Transformer for 28x28 / 32x32 images.

Dosovitskiy et al. (2021, "An Image is Worth 16x16 Words: Transformers for Image Recognition at
Scale", ICLR): the image is cut into non-overlapping ``patch_size`` x ``patch_size`` patches,
each linearly embedded; a learned class token and learned position embeddings are added and the
sequence goes through pre-norm Transformer encoder blocks (Vaswani et al., 2017, "Attention Is
All You Need", NeurIPS; pre-norm as in Xiong et al., 2020, "On Layer Normalization in the
Transformer Architecture", ICML). The class token (or the mean token, ``pool="mean"``) feeds a
LayerNorm + linear head. Chen, Hsieh & Gong (2022, "When Vision Transformers Outperform ResNets
without Pretraining or Strong Data Augmentations", ICLR) show SAM helps ViTs most.

Defaults (dim 192, depth 6, 3 heads, MLP ratio 2, patch 4) give about 1.8M parameters and 49
(28x28) or 64 (32x32) patches.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .layers import check_choice

__all__ = ["Attention", "TransformerBlock", "ViT"]


class Attention(nn.Module):
    """Multi-head self-attention with a fused QKV projection."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim={dim} must be divisible by heads={heads}")
        self.heads = heads
        self.dropout = dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        p = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class TransformerBlock(nn.Module):
    """Pre-norm block: ``x + attn(ln(x))`` then ``x + mlp(ln(x))`` (GELU MLP)."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, mlp_dim),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(mlp_dim, dim),
            nn.Dropout(dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """Vision Transformer; ``input_shape`` height and width must be multiples of ``patch_size``."""

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        patch_size: int = 4,
        dim: int = 192,
        depth: int = 6,
        heads: int = 3,
        mlp_ratio: float = 2.0,
        dropout: float = 0.0,
        pool: str = "cls",
    ) -> None:
        super().__init__()
        check_choice("pool", pool, ("cls", "mean"))
        c, h, w = input_shape
        if patch_size < 1 or h % patch_size or w % patch_size:
            raise ValueError(
                f"patch_size={patch_size} must divide the image size {h}x{w} "
                f"(e.g. 4 or 7 for 28x28, 4 or 8 for 32x32)"
            )
        if depth < 1 or dim < 1 or heads < 1 or mlp_ratio <= 0:
            raise ValueError("dim, depth, heads and mlp_ratio must be positive")
        n_patches = (h // patch_size) * (w // patch_size)
        self.pool = pool
        self.patch_embed = nn.Conv2d(c, dim, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, n_patches + 1, dim))
        self.drop = nn.Dropout(dropout)
        mlp_dim = max(1, int(round(dim * mlp_ratio)))
        self.blocks = nn.Sequential(
            *(TransformerBlock(dim, heads, mlp_dim, dropout) for _ in range(depth))
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.patch_embed.weight
        nn.init.trunc_normal_(w, std=(1.0 / w[0].numel()) ** 0.5)
        nn.init.zeros_(self.patch_embed.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, N, dim)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = self.drop(torch.cat([cls, x], dim=1) + self.pos_embed)
        x = self.norm(self.blocks(x))
        feat = x[:, 0] if self.pool == "cls" else x[:, 1:].mean(dim=1)
        return self.head(feat)
