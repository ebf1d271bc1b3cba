"""Names kept from the engine of msam 0.1 (the step now lives in :mod:`msam.optim.step`), and
:func:`normalization_parameters` (SAM-ON's subset of parameters)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from msam.optim.step import (
    GradientConfig,
    GradientResult,
    validate_count,
    validate_eta,
    validate_rho,
)

__all__ = ["GradientEngine", "GradientResult", "normalization_parameters", "validate_count",
           "validate_eta", "validate_rho"]

#: The gradient configuration (``MSAM.engine``); named ``GradientEngine`` before v3.
GradientEngine = GradientConfig


def normalization_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters of normalization layers (BatchNorm, GroupNorm, LayerNorm, InstanceNorm).

    Pass them as ``perturb=`` to perturb only these, as in SAM-ON (Mueller et al., NeurIPS 2023);
    the remaining parameters are not perturbed but still receive the averaged gradient.
    """
    kinds = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)
    out: list[nn.Parameter] = []
    seen: set[int] = set()
    for mod in model.modules():
        if isinstance(mod, kinds) or type(mod).__name__.endswith(("LayerNorm", "RMSNorm")):
            for p in mod.parameters(recurse=False):
                if id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
    return out


def trainable(params: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    return [p for p in params if p.requires_grad]
