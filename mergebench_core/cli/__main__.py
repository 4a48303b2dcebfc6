"""`python -m mergebench_core.cli`: the console script's entry, for environments without the script on PATH."""

import sys

from mergebench_core.cli.main import entry

sys.exit(entry())
