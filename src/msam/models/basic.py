"""Small image classifiers: a multi-layer perceptron and a fast convolutional network."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from .layers import check_choice, init_conv_bn, make_norm, scaled_channels

__all__ = ["MLP", "SmallCNN"]


class MLP(nn.Module):
    """Fully connected ReLU network on the flattened image (Rumelhart, Hinton & Williams, 1986,
    "Learning representations by back-propagating errors", Nature).

    ``hidden`` lists the hidden-layer sizes; each hidden layer is ``Linear -> ReLU`` (then
    ``Dropout`` when ``dropout > 0``). The parameter count is
    ``sum((d_i + 1) * d_{i+1})`` over consecutive sizes ``prod(input_shape), *hidden, num_classes``.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        hidden: Sequence[int] = (512, 256),
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        hidden = tuple(int(h) for h in hidden)
        if any(h < 1 for h in hidden):
            raise ValueError(f"hidden={hidden} must hold positive sizes")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout={dropout!r} must be in [0, 1)")
        layers: list[nn.Module] = [nn.Flatten()]
        d = math.prod(input_shape)
        for h in hidden:
            layers += [nn.Linear(d, h), nn.ReLU(inplace=True)]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            d = h
        layers.append(nn.Linear(d, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class SmallCNN(nn.Module):
    """A fast convolutional network for 28x28 / 32x32 images, built for CPU experiments.

    Three ``Conv3x3 -> Norm -> ReLU`` blocks with ``32w``, ``64w`` and ``128w`` channels; the
    first two are followed by 2x2 max pooling, the last by global average pooling, then a linear
    classifier (the VGG-style conv / pool pattern of Simonyan & Zisserman, 2015, "Very Deep
    Convolutional Networks for Large-Scale Image Recognition", ICLR, cut down to three layers).
    Convolutions carry a bias only when ``norm="none"``.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        width: float = 1.0,
        norm: str = "batch",
        norm_groups: int | None = None,
    ) -> None:
        super().__init__()
        check_choice("norm", norm, ("batch", "group", "none"))
        c_in = input_shape[0]
        chans = [scaled_channels(b, width) for b in (32, 64, 128)]
        layers: list[nn.Module] = []
        for i, c in enumerate(chans):
            layers += [
                nn.Conv2d(c_in, c, 3, padding=1, bias=norm == "none"),
                make_norm(norm, c, norm_groups),
                nn.ReLU(inplace=True),
            ]
            if i < len(chans) - 1:
                layers.append(nn.MaxPool2d(2))
            c_in = c
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, num_classes)
        init_conv_bn(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))
