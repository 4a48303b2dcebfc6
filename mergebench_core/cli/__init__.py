"""The `mergebench` command line (`main`), and its console script (`entry`); `python -m mergebench_core.cli` runs it
too. One module per core command; plugins add theirs through the `register_commands` hook."""

from mergebench_core.cli.main import entry, main

__all__ = ["entry", "main"]
