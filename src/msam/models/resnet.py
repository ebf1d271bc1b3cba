"""Residual networks for 28x28 / 32x32 images (CIFAR-style: 3x3 stem, no max-pool).

* :class:`CifarResNet`: the CIFAR ResNet-(6n+2) of He, Zhang, Ren & Sun (2016, "Deep Residual
  Learning for Image Recognition", CVPR, Sec. 4.2): three stages of ``n`` basic blocks with
  ``16, 32, 64`` channels (times ``width``) and, by default, parameter-free "option A" shortcuts
  (stride-2 subsampling plus zero channel padding). ResNet-20 (n = 3) has 0.27M parameters.
* :class:`ResNet18`: the 4-stage ResNet-18 adapted to CIFAR (64-128-256-512 channels times
  ``width``), pre-activation blocks by default (He, Zhang, Ren & Sun, 2016, "Identity Mappings in
  Deep Residual Networks", ECCV), as used for the SAM / m-sharpness experiments of Foret et al.
  (2021, "Sharpness-Aware Minimization for Efficiently Improving Generalization", ICLR) and
  Andriushchenko & Flammarion (2022, "Towards Understanding Sharpness-Aware Minimization", ICML).
* :class:`WideResNet`: WRN-d-k of Zagoruyko & Komodakis (2016, "Wide Residual Networks", BMVC):
  pre-activation blocks, ``(d - 4) / 6`` per stage, ``16k, 32k, 64k`` channels, optional dropout
  between the two convolutions.

The ``norm`` option swaps every BatchNorm for GroupNorm (Wu & He, 2018), see
:mod:`msam.models.layers`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .layers import check_choice, init_conv_bn, make_norm, scaled_channels

__all__ = ["BasicBlock", "CifarResNet", "PreActBlock", "ResNet18", "WideResNet"]

_NORMS = ("batch", "group")


def _conv3x3(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)


class _PadShortcut(nn.Module):
    """He et al. (2016) option A: subsample by ``stride`` and zero-pad the new channels."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.lo = (c_out - c_in) // 2
        self.hi = c_out - c_in - self.lo

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.lo, self.hi))


class BasicBlock(nn.Module):
    """Post-activation basic block: ``relu(norm(conv(relu(norm(conv(x))))) + shortcut(x))``.

    ``shortcut`` is ``"A"`` (zero padding, no parameters) or ``"B"`` (1x1 convolution + norm)
    when the shape changes, identity otherwise.
    """

    def __init__(
        self,
        c_in: int,
        c_out: int,
        stride: int,
        norm: str,
        norm_groups: int | None,
        shortcut: str = "B",
    ) -> None:
        super().__init__()
        self.conv1 = _conv3x3(c_in, c_out, stride)
        self.bn1 = make_norm(norm, c_out, norm_groups)
        self.conv2 = _conv3x3(c_out, c_out)
        self.bn2 = make_norm(norm, c_out, norm_groups)
        self.shortcut: nn.Module
        if stride == 1 and c_in == c_out:
            self.shortcut = nn.Identity()
        elif shortcut == "A":
            self.shortcut = _PadShortcut(c_in, c_out, stride)
        else:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False),
                make_norm(norm, c_out, norm_groups),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class PreActBlock(nn.Module):
    """Pre-activation basic block (He et al., 2016b; also the WRN block with ``dropout``).

    ``out = conv(drop(relu(norm(conv(relu(norm(x))))))) + shortcut``, where the shortcut is the
    identity or, when the shape changes, a 1x1 convolution of the pre-activated input.
    """

    def __init__(
        self,
        c_in: int,
        c_out: int,
        stride: int,
        norm: str,
        norm_groups: int | None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.bn1 = make_norm(norm, c_in, norm_groups)
        self.conv1 = _conv3x3(c_in, c_out, stride)
        self.bn2 = make_norm(norm, c_out, norm_groups)
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = _conv3x3(c_out, c_out)
        self.shortcut: nn.Module | None = None
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = F.relu(self.bn1(x))
        skip = x if self.shortcut is None else self.shortcut(pre)
        out = self.conv1(pre)
        out = self.conv2(self.drop(F.relu(self.bn2(out))))
        return out + skip


class CifarResNet(nn.Module):
    """CIFAR ResNet-(6n+2) (He et al., 2016): ``depth`` in {20, 32, 44, 56, 110, ...}."""

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        depth: int = 20,
        width: float = 1.0,
        norm: str = "batch",
        norm_groups: int | None = None,
        shortcut: str = "A",
    ) -> None:
        super().__init__()
        check_choice("norm", norm, _NORMS)
        check_choice("shortcut", shortcut, ("A", "B"))
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"depth={depth} must be 6n+2 with n >= 1 (20, 32, 44, 56, 110)")
        n = (depth - 2) // 6
        chans = [scaled_channels(b, width) for b in (16, 32, 64)]
        self.conv1 = _conv3x3(input_shape[0], chans[0])
        self.bn1 = make_norm(norm, chans[0], norm_groups)
        blocks: list[nn.Module] = []
        c_in = chans[0]
        for stage, c in enumerate(chans):
            for i in range(n):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(BasicBlock(c_in, c, stride, norm, norm_groups, shortcut))
                c_in = c
        self.layers = nn.Sequential(*blocks)
        self.fc = nn.Linear(c_in, num_classes)
        init_conv_bn(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(F.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


class ResNet18(nn.Module):
    """ResNet-18 for small images: 3x3 stem, 4 stages of 2 blocks, 1x1 projection shortcuts.

    ``preact=True`` (default) uses pre-activation blocks and a final norm + ReLU (He et al.,
    2016b); ``preact=False`` the original post-activation blocks (He et al., 2016).
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        width: float = 1.0,
        norm: str = "batch",
        norm_groups: int | None = None,
        preact: bool = True,
    ) -> None:
        super().__init__()
        check_choice("norm", norm, _NORMS)
        chans = [scaled_channels(b, width) for b in (64, 128, 256, 512)]
        self.preact = bool(preact)
        self.conv1 = _conv3x3(input_shape[0], chans[0])
        # Post-activation nets normalise the stem; pre-activation nets normalise before the head.
        self.bn1 = make_norm(norm, chans[0], norm_groups) if not preact else nn.Identity()
        blocks: list[nn.Module] = []
        c_in = chans[0]
        for stage, c in enumerate(chans):
            for i in range(2):
                stride = 2 if stage > 0 and i == 0 else 1
                if preact:
                    blocks.append(PreActBlock(c_in, c, stride, norm, norm_groups))
                else:
                    blocks.append(BasicBlock(c_in, c, stride, norm, norm_groups, "B"))
                c_in = c
        self.layers = nn.Sequential(*blocks)
        self.bn_final = make_norm(norm, c_in, norm_groups) if preact else nn.Identity()
        self.fc = nn.Linear(c_in, num_classes)
        init_conv_bn(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(x)
        if not self.preact:
            out = F.relu(self.bn1(out))
        out = self.layers(out)
        if self.preact:
            out = F.relu(self.bn_final(out))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


class WideResNet(nn.Module):
    """WRN-``depth``-``widen`` (Zagoruyko & Komodakis, 2016); ``depth`` = 6n+4."""

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        depth: int = 16,
        widen: int = 4,
        dropout: float = 0.0,
        norm: str = "batch",
        norm_groups: int | None = None,
    ) -> None:
        super().__init__()
        check_choice("norm", norm, _NORMS)
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"depth={depth} must be 6n+4 with n >= 1 (10, 16, 22, 28, 40)")
        if not widen > 0:
            raise ValueError(f"widen={widen!r} must be > 0")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout={dropout!r} must be in [0, 1)")
        n = (depth - 4) // 6
        chans = [scaled_channels(b, widen) for b in (16, 32, 64)]
        self.conv1 = _conv3x3(input_shape[0], 16)
        blocks: list[nn.Module] = []
        c_in = 16
        for stage, c in enumerate(chans):
            for i in range(n):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(PreActBlock(c_in, c, stride, norm, norm_groups, dropout))
                c_in = c
        self.layers = nn.Sequential(*blocks)
        self.bn_final = make_norm(norm, c_in, norm_groups)
        self.fc = nn.Linear(c_in, num_classes)
        init_conv_bn(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn_final(self.layers(self.conv1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))
