"""Apply realistic single mutations to the core, one at a time, and check the suite kills each.

    python scripts/mutants.py            # every mutant; prints a table (killed / SURVIVED)
    python scripts/mutants.py eps_outside  # one mutant

A mutant whose search text is not found exactly once in its file (the source changed) makes the
script exit with status 2 and name it, before any test runs.

Each mutant is a text replacement in one source file; the named tests run against the mutated
tree (the file is restored afterwards, whatever happens). A mutant is killed when at least one
of its tests fails.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "msam"
STRICT = "tests/optim/test_reference_equations.py"
MATRIX = "tests/optim/test_optimizer_matrix.py"
CONFORMANCE = "tests/optim/test_torch_optim_conformance.py"
DIST = "tests/distributed/test_ddp.py"

# name: (file, old, new, tests)
MUTANTS = {
    "eps_outside": ("core/perturbation.py", "(rho / (norm + EPS))", "(rho / norm + EPS)",
                    [STRICT]),
    "eps_bigger": ("core/perturbation.py", "EPS = 1e-12", "EPS = 1e-8", [STRICT]),
    "weights_1_over_m": ("optim/step.py", "[(mb, n_j / n) for mb, n_j in",
                         "[(mb, 1.0 / self.num_micro_batches(n)) for mb, n_j in",
                         [MATRIX, STRICT]),
    "perturb_ignored": ("optim/msam.py",
                        "perturb.append(self._perturb_ids is None or id(p) in self._perturb_ids)",
                        "perturb.append(True)", [STRICT]),
    "no_ascent_unscale": ("strategies/base.py",
                          "        if self.loss_scale is None:\n            return grads\n",
                          "        if True:\n            return grads\n", [STRICT]),
    "no_ascent_norm_check": ("optim/step.py",
                             'flags.check(norm, "ascent", j, "gradient")', "pass", [STRICT]),
    "no_final_grad_check": ("optim/step.py",
                            "flags.check_grads([None if p.grad is None else local(p.grad) "
                            "for p in ctx.params])", "pass", [STRICT]),
    "vmap_ignores_grad_weight": ("strategies/vmap.py",
                                 "ctx.micro_batches[j][1] * ctx.grad_weight",
                                 "ctx.micro_batches[j][1]", [STRICT]),
    "loop_ignores_grad_weight": ("strategies/loop.py", "loss * (weight * ctx.grad_weight)",
                                 "loss * weight", [STRICT]),
    "accumulate_no_rollback": ("optim/step.py", "                self._restore(saved)",
                               "                pass", [STRICT]),
    "bn_stats_from_perturbed": ("strategies/loop.py",
                                "ctx.bn.pass_(record=ctx.perturbed_stats):\n            del e_j",
                                "ctx.bn.pass_(record=True):\n            del e_j", [STRICT]),
    "bn_stats_from_perturbed_vmap": ("strategies/vmap.py", "record=offsets is None",
                                     "record=True", [STRICT]),
    "ddp_sync_sums": ("distributed/optimizer.py",
                      "            flat.div_(self.world_size)\n            offset = 0\n"
                      "            for i in idx:\n                n = full[i].numel()\n"
                      "                out[i]",
                      "            offset = 0\n            for i in idx:\n"
                      "                n = full[i].numel()\n                out[i]",
                      ["tests/distributed/test_ddp.py"]),
    "restore_skipped": ("strategies/loop.py",
                        "            torch._foreach_copy_(self.ctx.pert_params, self.ctx.backup)",
                        "            pass", [MATRIX]),
    "autocast_cache_kept": ("strategies/base.py", "    torch.clear_autocast_cache()",
                            "    pass", ["tests/optim/test_optimizer_api.py"]),
    "no_unscale_before_clip": ("optim/msam.py",
                               "                scaler.unscale_(self.base_optimizer)\n", "",
                               [CONFORMANCE
                                + "::test_mutant_clipping_acts_on_the_unscaled_gradient"]),
    "gsam_rho_not_clipped": ("core/gsam.py", "    frac = min(1.0, max(0.0, frac))\n", "",
                             [CONFORMANCE + "::test_mutant_gsam_rho_schedule_is_clipped"]),
    # Core v3
    "split_outside_agreement": ("optim/step.py",
                                "            with cfg.strategy.session(None):  # type: ignore"
                                "[arg-type]\n                raise",
                                "            raise", [DIST + "::test_failure_before_any_collective"
                                                     "_stops_every_rank"]),
    "no_settings_check": ("distributed/optimizer.py", "        distribution.check_settings(self)\n",
                          "", [DIST + "::test_ranks_with_different_settings_are_refused_on_"
                               "every_rank"]),
    "bn_commit_skipped": ("optim/step.py",
                          "schedule's new direction. Once.\"\"\"\n        for bn in self.bn:",
                          "schedule's new direction. Once.\"\"\"\n        for bn in []:",
                          ["tests/core/test_batchnorm_policy.py"]),
    "usam_normalised": ("core/usam.py", 'g * float(group["rho"])',
                        'g * float(group["rho"]) / (norm + 1e-12)', ["tests/core/test_usam.py"]),
    "rollback_keeps_grads": ("optim/step.py",
                             "nothing else was written.\"\"\"\n        if self.before is not None:",
                             "nothing else was written.\"\"\"\n        if False:",
                             ["tests/optim/test_schedules.py::test_reuse_off_step_whose_base_step_"
                              "fails_leaves_the_plain_gradient"]),
    # lowrank's fused clean gradient (issue 26): a weight per micro-batch dropped / the fp16 D
    "lowrank_clean_unweighted": ("strategies/lowrank.py",
                                 "dd = layer.d * c.to(layer.d.dtype).view(-1, 1, 1)",
                                 "dd = layer.d", ["tests/optim/test_schedules.py"]),
    "lowrank_fp16_d": ("strategies/lowrank.py",
                       "        if d.dtype == torch.float16:  # unscaled, small entries would "
                       "underflow in fp16\n            d = d.float()\n", "",
                       ["tests/strategies/test_lowrank.py"]),
}


class StaleMutant(Exception):
    """A mutant's search text is not (exactly once) in its file: the source changed."""


def check(name: str) -> None:
    """Raise :class:`StaleMutant` unless ``name`` exists and its text occurs once."""
    if name not in MUTANTS:
        raise StaleMutant(f"{name}: no such mutant (known: {', '.join(MUTANTS)})")
    file, old, _, _ = MUTANTS[name]
    count = (SRC / file).read_text().count(old)
    if count != 1:
        raise StaleMutant(f"{name}: its search text occurs {count} times in src/msam/{file} "
                          f"(needs exactly 1; the source changed, update the mutant): {old!r}")


def run(name: str) -> bool:
    file, old, new, tests = MUTANTS[name]
    path = SRC / file
    original = path.read_text()
    try:
        path.write_text(original.replace(old, new))
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p",
                               "no:cacheprovider", *tests], cwd=ROOT, capture_output=True,
                              text=True)
    finally:
        path.write_text(original)
    killed = proc.returncode != 0
    failed = [ln.split(" ")[1] for ln in proc.stdout.splitlines() if ln.startswith("FAILED")]
    print(f"| {name} | {file} | {'killed' if killed else 'SURVIVED'} | "
          f"{failed[0] if failed else ''} |", flush=True)
    return killed


def main() -> int:
    names = sys.argv[1:] or list(MUTANTS)
    stale = []
    for n in names:   # every named mutant is checked before any test runs
        try:
            check(n)
        except StaleMutant as err:
            stale.append(str(err))
    if stale:
        print("STALE MUTANTS (nothing was run):\n" + "\n".join(stale), file=sys.stderr)
        return 2
    print("| mutant | file | result | first failing test |\n|---|---|---|---|")
    results = [run(n) for n in names]
    return 0 if all(results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
