"""The ``msam`` command line (``msam.cli.main:main``)."""
