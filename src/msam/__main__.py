"""``python -m msam`` runs the command-line interface."""

from msam.cli.main import main

if __name__ == "__main__":
    raise SystemExit(main())
