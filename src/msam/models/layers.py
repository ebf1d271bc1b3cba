"""Small building blocks shared by the vision models (normalisation choice, initialisation).

The ``norm`` option of the convolutional models picks between

* ``"batch"``: BatchNorm (Ioffe & Szegedy, 2015, "Batch Normalization: Accelerating Deep Network
  Training by Reducing Internal Covariate Shift", ICML).
* ``"group"``: GroupNorm (Wu & He, 2018, "Group Normalization", ECCV). Andriushchenko & Flammarion
  (2022, "Towards Understanding Sharpness-Aware Minimization", ICML) use it to study m-sharpness
  without the batch-statistics side effect of BatchNorm: with GroupNorm every example is
  normalised on its own, so splitting a batch into micro-batches does not change the forward pass.
* ``"none"``: no normalisation (``nn.Identity``), only where the architecture tolerates it.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

__all__ = [
    "NORMS",
    "check_choice",
    "group_count",
    "init_conv_bn",
    "make_norm",
    "scaled_channels",
]

NORMS = ("batch", "group", "none")


def group_count(channels: int, groups: int | None = None) -> int:
    """Number of GroupNorm groups for ``channels`` channels.

    With ``groups`` given it must divide ``channels``. Otherwise the rule is: at most 32 groups
    (the default of Wu & He, 2018) and at least 4 channels per group, then the largest divisor of
    ``channels`` not above that. This gives 4 groups for 16 channels, 8 for 32, 16 for 64 and 32
    for 128 or more, so thin CIFAR networks do not degenerate into InstanceNorm.
    """
    if groups is not None:
        if groups < 1 or channels % groups:
            raise ValueError(f"norm_groups={groups} must be >= 1 and divide {channels} channels")
        return groups
    g = max(1, min(32, channels // 4))
    while channels % g:
        g -= 1
    return g


def make_norm(kind: str, channels: int, groups: int | None = None, dims: int = 2) -> nn.Module:
    """A normalisation layer over ``channels`` channels of a ``dims``-d feature map."""
    if kind == "batch":
        return nn.BatchNorm2d(channels) if dims == 2 else nn.BatchNorm1d(channels)
    if kind == "group":
        return nn.GroupNorm(group_count(channels, groups), channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"norm={kind!r} is not one of {NORMS}")


def check_choice(option: str, value: str, choices: Iterable[str]) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{option}={value!r} is not one of {choices}")


def scaled_channels(base: int, width: float) -> int:
    """``round(base * width)``, at least 1; ``width`` must be positive."""
    if not width > 0:
        raise ValueError(f"width={width!r} must be > 0")
    return max(1, int(round(base * width)))


def init_conv_bn(module: nn.Module) -> None:
    """He (Kaiming) normal init for convolutions (He et al., 2015, "Delving Deep into
    Rectifiers", ICCV), unit scale / zero shift for normalisation layers, zero bias elsewhere.

    Only torch's global RNG is used, so the result is fixed by ``torch.manual_seed``.
    """
    for m in module.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d)):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm)):
            if m.weight is not None:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
