"""mergebench core: the plugin contract, the runner, the results store and the shared tensor tools.

The core is a few rooms, each one idea (`contract`, `data`, `engine`, `pools`, `running`, `results`, `training`,
`fusion`, `preferences`); what a plugin needs most is re-exported here. Modules of the flat layout that came before
are still importable under their old names (`moved_modules`).
"""

from importlib import metadata as _metadata

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
from mergebench_core.contract.hookspecs import hookimpl
from mergebench_core.engine.merging import MergeStream, TaskVectorMethod, TensorMergeMethod
from mergebench_core.errors import CheckpointError, ConfigError, MergebenchError, UnknownNameError

_moved_modules.install()

try:
    __version__ = _metadata.version("mergebench")
except _metadata.PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0+unknown"

__all__ = [
    "ACCURACY", "MetricSpec", "PRETRAINED", "CheckpointError", "ConfigError", "Ensemble", "MergeOutput", "MergeStream", "MergebenchError",
    "Method", "MethodInfo", "ModelPool", "PerTaskModels", "RunContext", "TaskPool", "TaskVectorMethod", "TensorMergeMethod",
    "UnknownNameError", "hookimpl", "__version__",
]
