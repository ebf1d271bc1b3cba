"""``msam.rho_for_m`` and the run-config key ``rho_scaling: sqrt_m`` (issue 27): opt-in, the
radius each micro-batch is perturbed with is ``rho / sqrt(m)``; the default is untouched."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import msam
from msam.training import ConfigError, TrainConfig
from msam.training.config import train_config_from_dict
from msam.training.trainer import build_optimizer


def test_rho_for_m_values_and_errors():
    assert msam.rho_for_m(0.4, 1) == 0.4
    assert msam.rho_for_m(0.4, 4) == pytest.approx(0.2)
    assert msam.rho_for_m(0.4, 16) == pytest.approx(0.1)
    for bad_m in (0, -2, 1.5, True, "4"):
        with pytest.raises(ValueError, match="m: "):
            msam.rho_for_m(0.4, bad_m)
    for bad_rho in (-0.1, math.nan, math.inf, None):
        with pytest.raises(ValueError, match="rho: "):
            msam.rho_for_m(bad_rho, 4)


def _step_once(cfg: TrainConfig, seed: int = 0) -> list[torch.Tensor]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 6), torch.nn.Tanh(),
                                torch.nn.Linear(6, 3))
    opt = build_optimizer(cfg, model)
    g = torch.Generator().manual_seed(1)
    batch = torch.randn(16, 12, generator=g), torch.randint(0, 3, (16,), generator=g)
    opt.step(lambda b: F.cross_entropy(model(b[0]), b[1]), batch)
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("optimizer,m", [("msam", 4), ("msam", 16), ("gsam", 4)])
def test_sqrt_m_scaling_trains_as_the_explicit_radius(optimizer, m):
    """A run with rho 0.4 and sqrt_m takes the same step as a run given rho 0.4 / sqrt(m)
    directly; without the key, rho is used as it is (and the steps differ)."""
    base = dict(model="mlp", optimizer=optimizer, micro_batches=m, lr=0.1, momentum=0.0,
                weight_decay=0.0)
    scaled = _step_once(TrainConfig(**base, rho=0.4, rho_scaling="sqrt_m").resolved())
    direct = _step_once(TrainConfig(**base, rho=0.4 / math.sqrt(m)).resolved())
    plain = _step_once(TrainConfig(**base, rho=0.4).resolved())
    for a, b in zip(scaled, direct):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)
    assert any((a - b).abs().max() > 1e-5 for a, b in zip(scaled, plain))


def test_sam_is_unchanged_by_sqrt_m_and_bad_values_name_the_key():
    base = dict(model="mlp", optimizer="sam", lr=0.1, momentum=0.0, weight_decay=0.0, rho=0.3)
    for a, b in zip(_step_once(TrainConfig(**base, rho_scaling="sqrt_m").resolved()),
                    _step_once(TrainConfig(**base).resolved())):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(ConfigError, match="rho_scaling"):
        train_config_from_dict({"rho_scaling": "linear"}, "test.yaml")
