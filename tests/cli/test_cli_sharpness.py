"""``msam sharpness`` on a trained run: wiring, JSON output, and agreement with the library."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from _runs import tiny
from msam.analysis import top_hessian_eigenvalues
from msam.cli.main import main
from msam.training import train
from msam.training.measure import load_trained_model


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    cfg = tiny(tmp_path_factory.mktemp("sharp"), epochs=1)
    return train(cfg, quiet=True).run_dir


def test_sharpness_cli_writes_json_matching_a_direct_measurement(run_dir, tmp_path, capsys):
    out = tmp_path / "s.json"
    code = main(["sharpness", str(run_dir), "--metrics", "lambda_max,trace", "--examples", "64",
                 "--batch-size", "32", "--probes", "4", "--json", str(out), "--threads", "1"])
    assert code == 0
    result = json.loads(out.read_text())
    assert result["examples"] == 64 and result["trace_se"] >= 0
    assert "lambda_max" in capsys.readouterr().out
    # Independent path: load the model ourselves and run Lanczos on the same 64 examples.
    model, data, _ = load_trained_model(run_dir)
    from msam.data._seeding import make_generator

    idx = torch.randperm(len(data.train), generator=make_generator(0, "sharpness"))[:64]
    sub = data.train.subset(idx.sort().values)
    batches = [(sub.x[:32], sub.y[:32]), (sub.x[32:], sub.y[32:])]
    ref = top_hessian_eigenvalues(model, lambda m, b: F.cross_entropy(m(b[0]), b[1]), batches,
                                  k=1, tol=1e-6, max_iter=200)
    assert result["lambda_max"] == pytest.approx(float(ref.eigenvalues[0]), rel=1e-3)


def test_sharpness_cli_errors_name_the_problem(tmp_path, capsys):
    assert main(["sharpness", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    assert main(["sharpness", str(bad)]) == 2
    assert "bad.pt" in capsys.readouterr().err


def test_sharpness_m_is_a_count_and_rho_is_the_same_for_every_run(tmp_path, capsys):
    """Issue 25 case 12: ``--m 4`` means 4 micro-batches (of 8 in a batch of 32), as m means
    everywhere else; the default radius is 0.05 whatever the run's rho, so runs compare."""
    run_dir = train(tiny(tmp_path, epochs=1, rho=0.2, max_steps_per_epoch=1), quiet=True).run_dir
    out = tmp_path / "m.json"
    assert main(["sharpness", str(run_dir), "--metrics", "m_sharpness", "--examples", "64",
                 "--batch-size", "32", "--m", "4", "--json", str(out)]) == 0
    cfg = json.loads(out.read_text())["config"]
    assert cfg["m"] == 8 and cfg["rho"] == 0.05
    assert main(["sharpness", str(run_dir), "--metrics", "m_sharpness", "--examples", "64",
                 "--batch-size", "32", "--m", "5"]) == 2
    assert "must divide" in capsys.readouterr().err
