"""Preferences over tasks (`vectors`: a cell axis, like seeds, and the simplex grids of vectors) and their analysis
(`pareto`: non-dominated points, hypervolume, front tables).

The vectors' public names are re-exported here because `mergebench_core.preferences` was their module before the
core had rooms."""

from mergebench_core.preferences.vectors import (
    Preference,
    PreferenceRequest,
    from_config,
    parse_simplex,
    parse_vector,
    simplex_grid,
    validate,
)

__all__ = ["Preference", "PreferenceRequest", "from_config", "parse_simplex", "parse_vector", "simplex_grid",
           "validate"]
