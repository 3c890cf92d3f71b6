"""``python -m ubsmoe.plots RUN_DIR...`` (the CLI itself is :mod:`ubsmoe.plots.cli`)."""

import sys

from ubsmoe.plots.cli import main

sys.exit(main())
