"""The rule registry (msam.core.registry): user rules by name, one compatibility check, and no
import circle back to the rule files."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

import msam
from msam.core import RULES, check_support, make_rule, register_rule

pytestmark = pytest.mark.usefixtures("float64")

SRC = Path(msam.__file__).parent


class SignSAM(msam.PerturbationRule):
    """A user rule written against the documented interface: e = rho sign(g) / ||sign(g)||."""

    name = "signsam_test"

    def direction(self, g, w, group):
        return torch.sign(g)

    def norm_terms(self, g, w, group):
        return torch.sign(g)


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def _reference_grad(model, x, y, rho):
    """float64, from the equation: h = grad L(w + rho s / ||s||), s = sign(grad L(w))."""
    ps = list(model.parameters())
    loss = torch.nn.functional.cross_entropy(model(x), y)
    g = torch.autograd.grad(loss, ps)
    s = [torch.sign(t) for t in g]
    norm = torch.sqrt(sum((t ** 2).sum() for t in s))
    with torch.no_grad():
        for p, t in zip(ps, s):
            p.add_(rho * t / (norm + 1e-12))
    h = torch.autograd.grad(torch.nn.functional.cross_entropy(model(x), y), ps)
    with torch.no_grad():
        for p, t in zip(ps, s):
            p.sub_(rho * t / (norm + 1e-12))
    return h


@pytest.mark.parametrize("strategy", ["loop", "vmap", "batched"])
def test_a_registered_user_rule_is_used_by_name(strategy):
    register_rule("signsam_test", SignSAM, replace=True)
    try:
        model, ref = _model(), _model()
        opt = msam.MSAM(model.parameters(), torch.optim.SGD, rho=0.1, rule="signsam_test",
                        strategy=strategy, model=model, lr=0.1)
        g = torch.Generator().manual_seed(1)
        x, y = torch.randn(16, 5, generator=g), torch.randint(0, 3, (16,), generator=g)
        opt.step(lambda b: torch.nn.functional.cross_entropy(model(b[0]), b[1]), (x, y))
        h = _reference_grad(ref, x, y, 0.1)
        with torch.no_grad():
            for p, hp in zip(ref.parameters(), h):
                p.sub_(0.1 * hp)
        for p, q in zip(model.parameters(), ref.parameters()):
            torch.testing.assert_close(p, q, rtol=0, atol=1e-12)
        assert opt.rule.name == "signsam_test"
    finally:
        RULES.pop("signsam_test", None)


def test_register_rule_validates_and_refuses_silent_replacement():
    with pytest.raises(ValueError, match="lower-case identifier"):
        register_rule("Bad Name", SignSAM)
    with pytest.raises(ValueError, match="PerturbationRule subclass"):
        register_rule("notarule", torch.optim.SGD)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="'sam' is already registered"):
        register_rule("sam", SignSAM)
    assert RULES["sam"] is msam.SAMRule
    with pytest.raises(ValueError, match="rule must be one of"):
        make_rule("nosuchrule")


@pytest.mark.parametrize("rule,where,mode,names", [
    ("gsam", "fsdp", "", ["'gsam'", "ShardedMSAM", "DistributedMSAM"]),
    ("friendlysam", "fsdp", "", ["'friendlysam'", "ShardedMSAM", "DistributedMSAM"]),
    ("wsam", "ddp", "synchronized", ["'wsam'", "synchronized", "mode='local'"]),
    ("gsam", "two_step", "", ["'gsam'", "first_step", "opt.step(loss_fn, batch)"]),
    ("wsam", "gradient", "", ["'wsam'", "msam_gradient", "decoupled=False"]),
    ("wsam", "reuse", "", ["'wsam'", "reuse", "coupled form"]),
])
def test_one_check_names_the_rule_the_place_and_the_alternative(rule, where, mode, names):
    with pytest.raises(ValueError) as err:
        check_support(make_rule(rule), where=where, mode=mode)
    for name in names:
        assert name in str(err.value), (name, str(err.value))


@pytest.mark.parametrize("rule,where", [("sam", "fsdp"), ("asam", "fsdp"), ("gcsam", "fsdp"),
                                        ("usam", "fsdp"), ("gsam", "ddp"), ("sam", "two_step"),
                                        ("friendlysam", "gradient"), ("gsam", "reuse")])
def test_supported_combinations_pass(rule, where):
    check_support(make_rule(rule), where=where, mode="local")


def test_the_base_rule_module_imports_no_variant():
    """core/perturbation.py (the base class) imports none of the rule files: the registry
    imports them, so there is no circle."""
    tree = ast.parse((SRC / "core" / "perturbation.py").read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not imported & {"msam.core.gsam", "msam.core.wsam", "msam.core.friendlysam",
                           "msam.core.gcsam", "msam.core.usam", "msam.core.registry"}


def test_a_registered_rule_is_a_run_config_method():
    """register_rule makes the name a method of run configs (optimizer: <name>), built by the
    trainer from the registry; an unknown name is refused naming the key."""
    from msam.training import TrainConfig
    from msam.training.configfile import ConfigError
    from msam.training.trainer import build_optimizer

    with pytest.raises(ConfigError, match="optimizer"):
        TrainConfig(optimizer="signsam_test").resolved()
    register_rule("signsam_test", SignSAM, replace=True)
    try:
        cfg = TrainConfig(optimizer="signsam_test", model="mlp", micro_batches=2).resolved()
        opt = build_optimizer(cfg, _model())
        assert opt.rule.name == "signsam_test" and opt.micro_batches == 2
    finally:
        RULES.pop("signsam_test", None)
