"""mergebench core: the plugin contract, the runner, the results store and the shared tensor tools.

The core is a few rooms, each one idea (`contract`, `data`, `engine`, `pools`, `running`, `results`, `training`,
`fusion`, `preferences`); what a plugin needs most is re-exported here. Modules of the flat layout that came before
are still importable under their old names (`moved_modules`).
"""

import os as _os
from importlib import metadata as _metadata

# Before torch is first imported (its OpenMP runtime reads this once, at load): threads that wait for work sleep
# instead of spinning. On a shared or oversubscribed machine (other jobs, several cells at once) spinning threads
# took the cores from the thread with work: 200 training steps of the digits MLP took 16-63 s instead of 0.7-1.8 s
# (bench/training_under_load.py). A user's own setting wins.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from mergebench_core import moved_modules as _moved_modules
from mergebench_core.contract.api import (
    ACCURACY,
    PRETRAINED,
    Ensemble,
    MergeOutput,
    Method,
    MethodInfo,
    MetricSpec,
    ModelPool,
    PerTaskModels,
    RunContext,
    TaskPool,
)
from mergebench_core.contract.continual import ContinualMethod
from mergebench_core.contract.hookspecs import hookimpl
from mergebench_core.engine.data_free import TaskVectorMethod, TensorMergeMethod
from mergebench_core.engine.stream import MergeStream
from mergebench_core.errors import CheckpointError, ConfigError, MergebenchError, UnknownNameError

_moved_modules.install()

try:
    __version__ = _metadata.version("mergebench")
except _metadata.PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0+unknown"

__all__ = [
    "ACCURACY", "ContinualMethod", "MetricSpec", "PRETRAINED", "CheckpointError", "ConfigError", "Ensemble", "MergeOutput",
    "MergeStream", "MergebenchError", "Method", "MethodInfo", "ModelPool", "PerTaskModels", "RunContext", "TaskPool",
    "TaskVectorMethod", "TensorMergeMethod", "UnknownNameError", "hookimpl", "__version__",
]
