"""Errors a user can act on: each says what is wrong, where, and how to fix it."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class MergebenchError(Exception):
    """Base class for every error mergebench reports to a user (the CLI prints these without a traceback)."""


class UnknownNameError(MergebenchError, KeyError):
    """A method, model pool or task pool name that no installed plugin provides."""

    def __init__(self, kind: str, name: str, known: Iterable[str]):
        self.kind, self.name, self.known = kind, name, sorted(known)
        close = difflib.get_close_matches(name, self.known, n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        listing = ", ".join(self.known) if self.known else "none installed"
        super().__init__(f"unknown {kind} {name!r}.{hint} Known {kind}s: {listing}. "
                         f"Run `mergebench list` to see what is installed.")

    def __str__(self) -> str:  # KeyError would quote the message
        return self.args[0]


class ConfigError(MergebenchError):
    """A parameter value or override that does not fit the method's parameter dataclass."""


class CheckpointError(MergebenchError):
    """A checkpoint that cannot be read or does not match its siblings."""


class PluginError(MergebenchError):
    """A plugin that registers something invalid (for example a name that is already taken)."""


def normalize_name(name: str) -> str:
    """Method names accept hyphens for underscores (`dare-ties` is `dare_ties`), as users of MergeKit type them."""
    return name.strip().lower().replace("-", "_")
