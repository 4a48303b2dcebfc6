"""Fusion of independently trained models: permutation specs and alignment (`alignment`), level-by-level fusion
(`levels`).

The level tools, and the pools fusion runs on, are re-exported here because `mergebench_core.fusion` was their
module before the core had rooms; the pools now live in `mergebench_core.pools` (`folder`: `CheckpointFolderPool`,
`folder_pool_from_env`; `states`: `StateDictPool`, `load_states`)."""

from mergebench_core.fusion.levels import (
    IMPORTANCES,
    LINEAR_LEVELS,
    Targets,
    cannot_fuse,
    capture_level,
    design_matrix,
    features_last,
    fit_linear_level,
    hungarian_targets,
    interpolate,
    interpolation_curve,
    kmeans_targets,
    least_squares,
    level_weights,
    linear_projection,
    loss_barrier,
    match_to_inputs,
    missing_points,
    neuron_importance,
    pair_costs,
)
from mergebench_core.pools.folder import FOLDER_ENV, CheckpointFolderPool, folder_pool_from_env
from mergebench_core.pools.states import StateDictPool, load_states

__all__ = [
    "CheckpointFolderPool",
    "FOLDER_ENV",
    "IMPORTANCES",
    "LINEAR_LEVELS",
    "StateDictPool",
    "Targets",
    "cannot_fuse",
    "capture_level",
    "design_matrix",
    "features_last",
    "fit_linear_level",
    "folder_pool_from_env",
    "hungarian_targets",
    "interpolate",
    "interpolation_curve",
    "kmeans_targets",
    "least_squares",
    "level_weights",
    "linear_projection",
    "load_states",
    "loss_barrier",
    "match_to_inputs",
    "missing_points",
    "neuron_importance",
    "pair_costs",
]
