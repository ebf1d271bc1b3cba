"""``msam bench`` smoke tests: it runs on a tiny setup in seconds and writes JSON, markdown and
PNG. No timing is asserted (the machine is shared); memory numbers are deterministic."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from msam.bench import cli
from msam.bench.memory import measure_step_memory, tensor_bytes
from msam.bench.runner import quantiles
from msam.bench.workloads import build_workload, make_methods, make_stepper


@pytest.fixture(scope="module")
def bench_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    code = cli.main(["--models", "mlp", "--m", "1,2", "--steps", "3", "--warmup", "1",
                     "--batch-size", "8", "--threads", "1", "--out", str(out), "--quiet"])
    return code, out


def test_bench_writes_json_markdown_png(bench_out):
    code, out = bench_out
    assert code == 0
    data = json.loads((out / "bench.json").read_text())
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "bench.md").read_text()
    assert "| method | m |" in md and "## mlp" in md and "Command: `msam bench" in md
    assert data["meta"]["threads"] == 1 and data["meta"]["batch_size"] == 8
    (model,) = data["models"]
    keys = [r["key"] for r in model["results"]]
    assert keys == ["sgd", "sam", "msam-loop-m2", "msam-vmap-m1", "msam-vmap-m2", "accum-m2"]
    for r in model["results"]:
        assert "error" not in r, r
        assert r["time_s"]["n"] == 3 and len(r["times_s"]) == 3
        assert r["time_s"]["p25"] <= r["time_s"]["median"] <= r["time_s"]["p75"]
        assert r["memory"]["peak_bytes"] >= r["memory"]["state_bytes"] > 0
    res = {r["key"]: r for r in model["results"]}
    assert res["sgd"]["ratio_sgd"] == 1.0 and res["sam"]["ratio_sam"] == 1.0
    assert res["msam-loop-m2"]["memory_within_bound"] is True
    assert {t["target"] for t in data["targets"]} >= {"SAM / SGD step time"}


def test_bad_arguments_exit_2(tmp_path, capsys):
    assert cli.main(["--models", "nope", "--out", str(tmp_path)]) == 2
    assert "unknown model" in capsys.readouterr().err
    assert cli.main(["--models", "mlp", "--m", "64", "--batch-size", "8",
                     "--out", str(tmp_path)]) == 2
    assert cli.main(["--models", "mlp", "--strategies", "fast", "--out", str(tmp_path)]) == 2
    assert not list(tmp_path.iterdir())


def test_msam_command_plugin_and_module_entry_point():
    from msam.cli.main import main

    assert main(["bench", "--help"]) == 0
    proc = subprocess.run([sys.executable, "-m", "msam.bench", "--help"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and "--strategies" in proc.stdout


def test_methods_grid():
    keys = [m.key for m in make_methods([1, 4], ["loop", "vmap"])]
    assert keys == ["sgd", "sam", "msam-loop-m4", "msam-vmap-m1", "msam-vmap-m4", "accum-m4"]
    assert [m.key for m in make_methods([2], ["loop"], accum=False)] == ["sgd", "sam",
                                                                         "msam-loop-m2"]


def test_a_rule_without_an_ascent_pass_is_timed_once_at_m1():
    """Momentum-SAM perturbs the whole batch along one direction: m > 1 is refused by the rule,
    so the bench times it once (m = 1, loop) instead of reporting 'not run' per m / strategy."""
    keys = [m.key for m in make_methods([1, 4], ["loop", "lowrank"], accum=False,
                                        variants=["gsam", "momentumsam"])]
    assert keys == ["sgd", "sam", "msam-loop-m4",
                    "msam-lowrank-m4", "gsam-loop-m1", "gsam-loop-m4", "gsam-lowrank-m1",
                    "gsam-lowrank-m4", "momentumsam-loop-m1"]
    wl = build_workload("mlp", 8)
    st = make_stepper(wl, make_methods([1], ["loop"], accum=False, variants=["momentumsam"])[-1])
    for _ in range(2):
        st.step()
    assert st.optimizer.base_optimizer.state  # momentum exists: the second step perturbed


def test_quantiles():
    q = quantiles([4.0, 1.0, 3.0, 2.0])
    assert q["median"] == 2.5 and q["min"] == 1.0 and q["max"] == 4.0 and q["n"] == 4
    assert q["p25"] == 1.75 and q["p75"] == 3.25
    assert quantiles([]) == {"n": 0}


def test_memory_probe_sees_a_temporary_and_counts_storages_once():
    big = 1 << 20
    model = torch.nn.Linear(2, 2)

    def step():
        t = torch.empty(big, dtype=torch.uint8)
        t.fill_(1)
        del t
        return torch.empty(16, dtype=torch.uint8)

    mem = measure_step_memory(step, model, list, None, torch.device("cpu"))
    assert big <= mem["step_peak_bytes"] < big + 4096
    assert mem["state_bytes"] == tensor_bytes(model.parameters()) == 6 * 4
    x = torch.zeros(10)
    assert tensor_bytes([x, x[2:], x.view(2, 5), None]) == 40


def test_loop_memory_within_sam_plus_parameters_on_a_conv_net():
    torch.set_num_threads(1)
    wl = build_workload("small_cnn", 16, input_shape=(1, 12, 12))
    peaks = {}
    for meth in make_methods([1, 4], ["loop"], accum=False):
        st = make_stepper(wl, meth)
        peaks[meth.key] = measure_step_memory(st.step, wl.model, st.state_tensors, wl.batch,
                                              torch.device("cpu"))["peak_bytes"]
    assert peaks["msam-loop-m4"] <= peaks["sam"] + wl.param_bytes
    assert peaks["sam"] > peaks["sgd"]


def test_render_rewrites_reports_from_json(bench_out, tmp_path):
    _, out = bench_out
    assert cli.main(["--render", str(out / "bench.json"), "--out", str(tmp_path), "-q"]) == 0
    assert (tmp_path / "bench.md").read_text() == (out / "bench.md").read_text()
    assert (tmp_path / "bench.png").stat().st_size > 0
    bad = tmp_path / "x.json"
    bad.write_text("[]")
    assert cli.main(["--render", str(bad), "-q"]) == 2


def test_memory_probe_prints_no_profiler_lines(capfd):
    """Issue 25 case 13: torch's profiler writes two ``USDT:`` lines per profiled step to fd 2;
    the bench drops them (and passes any other output on)."""
    model = torch.nn.Linear(4, 4)
    x = torch.randn(8, 4)

    def step():
        os.write(2, b"a real warning\n")
        return model(x).sum()

    measure_step_memory(step, model, list, None, torch.device("cpu"))
    err = capfd.readouterr().err
    assert "USDT" not in err
    assert err.count("a real warning") == 2  # the warm-up step and the measured one


def test_targets_table_says_why_a_target_is_missed():
    from msam.bench.report import markdown_report

    def row(key, method, m, strategy, ratio_sgd, ratio_sam, mem=None):
        return {"key": key, "label": key, "method": method, "m": m, "strategy": strategy,
                "micro_batch_size": 8 // m, "ratio_sgd": ratio_sgd, "ratio_sam": ratio_sam,
                "memory_ratio_sam": mem, "time_s": {}, "memory": {}}

    meta = {"device": "cpu", "torch": "x", "threads": 1, "batch_size": 8, "rho": 0.05,
            "date": "today", "command": "msam bench", "memory_method": "profiler"}
    data = {"meta": meta, "models": [{
        "model": "resnet20", "params": 1, "input": "x", "batch_size": 8, "batchnorm": True,
        "rounds": 3, "warmup_rounds": 1, "param_bytes": 4,
        "results": [row("sgd", "sgd", 1, "", 1.0, 0.5), row("sam", "sam", 1, "", 2.5, 1.0),
                    row("msam-loop-m4", "msam", 4, "loop", 3.0, 1.2, mem=1.0)]}]}
    md = markdown_report(data)
    targets = md.split("## Targets")[1].split("\n## ")[0]
    misses = [line for line in targets.splitlines() if "**no**" in line]
    assert len(misses) == 2
    for line in misses:
        why = line.rstrip(" |").rsplit("|", 1)[1].strip()
        assert len(why) > 20, line


def test_schedules_are_timed_with_each_schedule_strategy_and_momentumsam_once(tmp_path):
    """Issue 26's table comes from one bench run per model: the schedules with the loop and
    the best strategy side by side, and Momentum-SAM (one pass, m = 1) next to them."""
    code = cli.main(["--models", "mlp", "--m", "2", "--strategies", "loop", "--steps", "2",
                     "--warmup", "1", "--batch-size", "8", "--threads", "1", "--no-memory",
                     "--no-plot", "--no-accum", "--variants", "momentumsam",
                     "--schedules", "looksam2", "--schedule-m", "2",
                     "--schedule-strategy", "loop,lowrank", "--out", str(tmp_path), "-q"])
    assert code == 0
    (model,) = json.loads((tmp_path / "bench.json").read_text())["models"]
    results = {r["key"]: r for r in model["results"]}
    assert list(results) == ["sgd", "sam", "msam-loop-m2", "momentumsam-loop-m1",
                             "msam-m2-every2-looksam", "msam-m2-every2-looksam-lowrank"]
    assert all("error" not in r for r in results.values())
    assert cli.main(["--models", "mlp", "--schedules", "every2", "--schedule-strategy", "fast",
                     "--out", str(tmp_path), "-q"]) == 2
