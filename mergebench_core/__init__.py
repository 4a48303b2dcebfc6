"""mergebench core: the plugin contract, the runner, the results store and the shared tensor tools."""

from importlib import metadata as _metadata

from .api import (
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
from .errors import CheckpointError, ConfigError, MergebenchError, UnknownNameError
from .hookspecs import hookimpl
from .merging import MergeStream, TaskVectorMethod, TensorMergeMethod

try:
    __version__ = _metadata.version("mergebench")
except _metadata.PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0+unknown"

__all__ = [
    "ACCURACY", "MetricSpec", "PRETRAINED", "CheckpointError", "ConfigError", "Ensemble", "MergeOutput", "MergeStream", "MergebenchError",
    "Method", "MethodInfo", "ModelPool", "PerTaskModels", "RunContext", "TaskPool", "TaskVectorMethod", "TensorMergeMethod",
    "UnknownNameError", "hookimpl", "__version__",
]
