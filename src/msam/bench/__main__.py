"""``python -m msam.bench``: the same as ``msam bench``."""

import sys

from msam.bench.cli import main

sys.exit(main())
