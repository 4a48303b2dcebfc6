"""The mergeability plugin: a training method that re-fine-tunes every expert with the mergeability regularisers
(a derived pool; `training`), and the `mergebench mergeability` experiment on such pools, added to the command line
through the `register_commands` hook: recipes and partner draws (`experiment`), group features (`features`, cached
through `cache`), paired intervals and regressions (`statistics`), the run itself (`running`), tables and the
figure (`report`), and the command's options (`command`).

The names the single module of earlier versions offered are importable from here as before.
"""

from __future__ import annotations

from typing import Any

from mergebench_core import hookimpl
from mergebench_mergeability.command import add_arguments, command
from mergebench_mergeability.training import THETA0, Mergeability, Params, grad_magnitude, moderate_update

__all__ = ["THETA0", "Mergeability", "Params", "grad_magnitude", "moderate_update"]


@hookimpl
def register_methods(register: Any) -> None:
    register(Mergeability)


@hookimpl
def register_commands(register: Any) -> None:
    register("mergeability", command, arguments=add_arguments,
             help="do experts fine-tuned with mergeability regularisers merge better? recipes, merges with held-out "
                  "partners, and the stability analysis")
