"""Tests for the image models and the registry of msam.models."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from msam.models import (
    IMAGE_MODELS,
    MODELS,
    TEXT_MODELS,
    build_model,
    count_parameters,
    group_count,
    is_text_model,
    model_options,
)

SHAPES = [(1, 28, 28), (3, 32, 32)]
# To keep the suite fast, deeper / wider variants of a tested class (resnet32/56, wrn16_8,
# wrn28_10) only get parameter counts, and resnet18 runs at a quarter of its width here.
FORWARD_MODELS = [
    m for m in IMAGE_MODELS if m not in ("resnet32", "resnet56", "wrn16_8", "wrn28_10")
]
FORWARD_OPTIONS = {"resnet18": {"width": 0.25}}


def test_registry_partition():
    assert set(IMAGE_MODELS) | set(TEXT_MODELS) == set(MODELS)
    assert not set(IMAGE_MODELS) & set(TEXT_MODELS)
    for name in ("mlp", "small_cnn", "resnet20", "resnet18", "wrn16_4", "wrn28_10", "vit_small"):
        assert name in IMAGE_MODELS and not is_text_model(name)
    for name in ("minilm", "text_cnn", "embedding_bag"):
        assert name in TEXT_MODELS and is_text_model(name)


@pytest.mark.parametrize("name", FORWARD_MODELS)
@pytest.mark.parametrize("shape", SHAPES, ids=["1x28x28", "3x32x32"])
def test_output_shape_and_gradients_reach_every_parameter(name, shape):
    torch.manual_seed(0)
    model = build_model(name, num_classes=7, input_shape=shape, **FORWARD_OPTIONS.get(name, {}))
    model.train()
    x = torch.randn(3, *shape)
    logits = model(x)
    assert logits.shape == (3, 7)
    assert torch.isfinite(logits).all()
    F.cross_entropy(logits, torch.tensor([0, 3, 6])).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{name}: no gradient for {pname}"
        assert torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, f"{name}: zero gradient for {pname}"


@pytest.mark.parametrize("name", ["mlp", "small_cnn", "resnet20", "resnet18", "wrn", "vit_small"])
def test_tiny_8x8_images(name):
    # sklearn's digits are 1x8x8; stride-2 stages and GAP must still work there.
    model = build_model(
        name, num_classes=10, input_shape=(1, 8, 8), **FORWARD_OPTIONS.get(name, {})
    )
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)


def test_mlp_parameter_count_by_hand():
    model = build_model("mlp", num_classes=10)  # default hidden (512, 256) on 1x28x28
    assert count_parameters(model) == (784 + 1) * 512 + (512 + 1) * 256 + (256 + 1) * 10
    model = build_model("mlp", num_classes=5, input_shape=(3, 32, 32), hidden=(100, 50, 20))
    expected = (3072 + 1) * 100 + (100 + 1) * 50 + (50 + 1) * 20 + (20 + 1) * 5
    assert count_parameters(model) == expected
    assert count_parameters(build_model("mlp", num_classes=3, hidden=())) == 785 * 3


def _resnet20_params(c_in: int, width: int, classes: int, shortcut: str = "A") -> int:
    """He et al. (2016) CIFAR ResNet-20 by hand: bias-free 3x3 convs, a norm (2 params per
    channel) after each conv, 3 stages x 3 blocks x 2 convs, linear head."""
    c1, c2, c3 = 16 * width, 32 * width, 64 * width
    conv = lambda a, b, k=3: a * b * k * k
    norm = lambda c: 2 * c
    total = conv(c_in, c1) + norm(c1)  # stem
    for c_prev, c in ((c1, c1), (c1, c2), (c2, c3)):
        total += conv(c_prev, c) + norm(c) + conv(c, c) + norm(c)  # first block of the stage
        total += 2 * (2 * conv(c, c) + 2 * norm(c))  # two more blocks
        if shortcut == "B" and c_prev != c:
            total += conv(c_prev, c, 1) + norm(c)
    return total + c3 * classes + classes


def test_resnet20_parameter_count_by_hand():
    cifar = build_model("resnet20", num_classes=10, input_shape=(3, 32, 32))
    assert count_parameters(cifar) == _resnet20_params(3, 1, 10) == 269_722  # the paper's 0.27M
    fmnist = build_model("resnet20", num_classes=10, input_shape=(1, 28, 28))
    assert count_parameters(fmnist) == _resnet20_params(1, 1, 10) == 269_722 - 2 * 16 * 9
    wide = build_model("resnet20", num_classes=100, input_shape=(3, 32, 32), width=2)
    assert count_parameters(wide) == _resnet20_params(3, 2, 100)
    proj = build_model("resnet20", num_classes=10, input_shape=(3, 32, 32), shortcut="B")
    assert count_parameters(proj) == _resnet20_params(3, 1, 10, "B")
    # GroupNorm has the same 2 parameters per channel as BatchNorm.
    gn = build_model("resnet20", num_classes=10, input_shape=(3, 32, 32), norm="group")
    assert count_parameters(gn) == 269_722


def test_known_parameter_counts_from_the_papers():
    cifar = dict(num_classes=10, input_shape=(3, 32, 32))
    # He et al. (2016), Table 6: ResNet-32 0.46M, ResNet-56 0.85M.
    assert count_parameters(build_model("resnet32", **cifar)) == 464_154
    assert count_parameters(build_model("resnet56", **cifar)) == 853_018
    # Zagoruyko & Komodakis (2016), Table: WRN-16-4 2.7M, WRN-28-10 36.5M.
    assert count_parameters(build_model("wrn16_4", **cifar)) == 2_748_890
    assert count_parameters(build_model("wrn28_10", **cifar)) == 36_479_194
    assert count_parameters(build_model("wrn", depth=16, widen=4, **cifar)) == 2_748_890
    assert 10.9e6 < count_parameters(build_model("wrn16_8", **cifar)) < 11.0e6
    # ResNet-18 on CIFAR: about 11.2M parameters.
    assert 11.1e6 < count_parameters(build_model("resnet18", **cifar)) < 11.2e6
    assert 11.1e6 < count_parameters(build_model("resnet18", preact=False, **cifar)) < 11.2e6
    assert 1.7e6 < count_parameters(build_model("vit_small", **cifar)) < 1.9e6


def _types(model: nn.Module) -> set[type]:
    return {type(m) for m in model.modules()}


@pytest.mark.parametrize("name", ["small_cnn", "resnet20", "resnet18", "wrn16_4"])
def test_norm_option_swaps_layer_type(name):
    kw = dict(num_classes=10, input_shape=(3, 32, 32))
    bn, gn = build_model(name, **kw), build_model(name, norm="group", **kw)
    assert nn.BatchNorm2d in _types(bn) and nn.GroupNorm not in _types(bn)
    assert nn.GroupNorm in _types(gn) and nn.BatchNorm2d not in _types(gn)
    if name == "small_cnn":
        plain = build_model(name, norm="none", **kw)
        assert not {nn.BatchNorm2d, nn.GroupNorm} & _types(plain)
    else:
        with pytest.raises(ValueError, match="norm"):
            build_model(name, norm="none", **kw)


def test_group_norm_makes_examples_independent_of_the_micro_batch():
    # What Andriushchenko & Flammarion (2022) rely on: with GroupNorm, splitting a batch into
    # micro-batches leaves each example's forward pass unchanged (BatchNorm does not).
    torch.manual_seed(0)
    x = torch.randn(4, 1, 28, 28)
    gn = build_model("resnet20", num_classes=10, norm="group").train()
    torch.testing.assert_close(gn(x)[:2], gn(x[:2]), rtol=1e-4, atol=1e-5)
    bn = build_model("resnet20", num_classes=10).train()
    assert not torch.allclose(bn(x)[:2], bn(x[:2]), atol=1e-4)


def test_group_count():
    assert [group_count(c) for c in (16, 32, 64, 128, 640, 24, 3)] == [4, 8, 16, 32, 32, 6, 1]
    assert group_count(16, 2) == 2
    with pytest.raises(ValueError, match="norm_groups"):
        group_count(16, 3)
    model = build_model("small_cnn", num_classes=2, norm="group", norm_groups=2)
    assert {m.num_groups for m in model.modules() if isinstance(m, nn.GroupNorm)} == {2}


def test_width_option_scales_channels():
    narrow = build_model("small_cnn", num_classes=10, width=0.5)
    wide = build_model("small_cnn", num_classes=10, width=2)
    assert [m.out_channels for m in narrow.modules() if isinstance(m, nn.Conv2d)] == [16, 32, 64]
    assert [m.out_channels for m in wide.modules() if isinstance(m, nn.Conv2d)] == [64, 128, 256]
    r18 = build_model("resnet18", num_classes=10, width=0.25)
    assert r18.fc.in_features == 128


def test_unknown_model_and_options_raise_listing_valid_ones():
    with pytest.raises(ValueError, match=r"unknown model 'resnet19'.*small_cnn.*resnet20"):
        build_model("resnet19", num_classes=10)
    with pytest.raises(ValueError, match=r"unknown option\(s\) colour.*valid options: .*width"):
        build_model("small_cnn", num_classes=10, colour="red")
    # Aliases fix their architecture: depth is not an option of resnet20 / wrn28_10.
    with pytest.raises(ValueError, match="depth"):
        build_model("resnet20", num_classes=10, depth=32)
    with pytest.raises(ValueError, match="widen"):
        build_model("wrn28_10", num_classes=10, widen=2)
    assert "depth" in model_options("wrn") and "depth" not in model_options("wrn16_4")
    assert model_options("small_cnn")["norm"] == "batch"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(name="small_cnn", norm="layer"), "norm"),
        (dict(name="resnet20", width=0), "width"),
        (dict(name="wrn", depth=17), "depth"),
        (dict(name="vit_small", patch_size=5), "patch_size"),
        (dict(name="vit_small", pool="max"), "pool"),
        (dict(name="mlp", input_shape=(28, 28)), "input_shape"),
        (dict(name="mlp", num_classes=0), "num_classes"),
    ],
)
def test_invalid_option_values_raise(kwargs, match):
    kwargs = {"num_classes": 10, **kwargs}
    name = kwargs.pop("name")
    with pytest.raises(ValueError, match=match):
        build_model(name, **kwargs)


def test_vit_patch_size_option():
    for shape, patch, tokens in (((1, 28, 28), 7, 16), ((3, 32, 32), 8, 16), ((1, 28, 28), 4, 49)):
        model = build_model("vit_small", num_classes=4, input_shape=shape, patch_size=patch)
        assert model.pos_embed.shape[1] == tokens + 1
        assert model(torch.randn(2, *shape)).shape == (2, 4)
    small = build_model("vit_small", num_classes=4, dim=64, depth=2, heads=4, pool="mean")
    assert small(torch.randn(2, 1, 28, 28)).shape == (2, 4)


@pytest.mark.parametrize("name", ["mlp", "small_cnn", "resnet20", "wrn16_4", "vit_small"])
def test_init_is_deterministic_given_the_seed(name):
    torch.manual_seed(123)
    a = build_model(name, num_classes=10).state_dict()
    torch.manual_seed(123)
    b = build_model(name, num_classes=10).state_dict()
    torch.manual_seed(124)
    c = build_model(name, num_classes=10).state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_small_cnn_overfits_a_tiny_random_set():
    torch.manual_seed(0)
    model = build_model("small_cnn", num_classes=10, width=0.5)
    x, y = torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(40):
        opt.zero_grad()
        F.cross_entropy(model.train()(x), y).backward()
        opt.step()
    with torch.no_grad():
        acc = (model.eval()(x).argmax(1) == y).float().mean().item()
    assert acc >= 0.95
