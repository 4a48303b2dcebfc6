"""Preferences over tasks (`vectors`: a cell axis, like seeds) and their analysis (`pareto`: non-dominated points,
hypervolume, simplex grids).

The vectors' public names are re-exported here because `mergebench_core.preferences` was their module before the
core had rooms."""

from mergebench_core.preferences.vectors import (
    Preference,
    PreferenceRequest,
    from_config,
    parse_simplex,
    parse_vector,
    validate,
)

__all__ = ["Preference", "PreferenceRequest", "from_config", "parse_simplex", "parse_vector", "validate"]
