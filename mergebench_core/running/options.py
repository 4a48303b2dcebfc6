"""What a run is asked to do (`RunOptions`), and the checks of those options that need no pool: the device and the
way cells are executed. Kept apart from the runner so that executors and tools can take options without it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mergebench_core.errors import ConfigError
from mergebench_core.paths import cache_dir
from mergebench_core.preferences.vectors import PreferenceRequest
from mergebench_core.running.executors import can_fork


@dataclass
class RunOptions:
    methods: Sequence[str] | None = None
    """Method names; None runs every installed method."""
    modelpools: Sequence[str] | None = None
    """Model pool names; None runs the pools their plugins mark as default."""
    taskpool: str | None = None
    """Score with this task pool instead of each model pool's default."""
    overrides: Sequence[str] = ()
    config_file: str | Path | None = None
    seeds: Sequence[int] = (0,)
    task_orders: Sequence[int] = (0,)
    """Order seeds for continual methods (`--task-orders N`, `--task-order K`; `running.task_order`): each such
    method runs once per order; 0 is the pool's own order."""
    limit: int | None = None
    device: str = "auto"
    rerun: bool = False
    batch_size: int = 256
    cache_dir: Path = field(default_factory=cache_dir)
    dtype: str | None = None
    """Load models in this dtype (pools that support it: float32, bfloat16, float16)."""
    trust_pickle: bool = False
    """Allow pools to unpickle checkpoints (arbitrary code); off by default."""
    tasks: Sequence[str] | None = None
    """Restrict every pool to the experts and tasks of these tasks (`--tasks digits,rot90`)."""
    preferences: PreferenceRequest = field(default_factory=PreferenceRequest)
    """Preference vectors for preference-aware methods; the config file's `preferences:` are added to these."""
    eval_only: bool = False
    """Never train: training methods load their cached model or the run is refused before any work."""
    loggers: Sequence[str] = ()
    """Registered loggers to switch on besides the JSON lines beside the store (`--logger wandb`)."""
    jobs: int = 1
    """Cells run at once, each in its own worker process (`--jobs`)."""
    cell_timeout: float | None = None
    """Seconds after which a cell's worker is stopped and the cell stored as failed (`--cell-timeout`)."""
    isolation: str = "process"
    """"process": each cell in a fresh worker process (a cell cannot change what later cells see, and a crash or
    sys.exit fails only its cell); "none": in the driver's process (for a debugger; no timeouts, one job)."""
    executor: str = "local"
    """"local" (worker processes on this machine) or "ray" (Ray tasks, `--executor ray`)."""
    ray_address: str | None = None
    """An existing Ray cluster to send cells to (`ray.init(address=...)`); None starts or joins a local Ray."""
    bn_stats: str | None = None
    """How merges settle batch-norm running statistics (`--bn-stats`: base, mean, recompute); None: the config
    file's `bn_stats:`, else mean. See `mergebench_core.engine.bn_stats`."""


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError:
        raise ConfigError(f"--device {device!r} is not a device; use cpu, cuda or cuda:N") from None


def check_device(device: torch.device) -> None:
    """A device this machine has, before any work (not three failed cells later)."""
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {device}: this machine has no CUDA GPU that torch can use (torch "
                              f"{torch.__version__}, built for CUDA {torch.version.cuda or 'none'}); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {device}: this machine has {torch.cuda.device_count()} GPU(s), numbered from "
                              f"0")
    elif device.type not in ("cpu", "mps"):
        raise ConfigError(f"--device {device}: use cpu, cuda or cuda:N")


def runs_in_process(opts: RunOptions) -> bool:
    """Whether cells run in the driver's process (`--isolation none`, or a platform that cannot fork)."""
    return opts.executor == "local" and (opts.isolation == "none" or not can_fork())


def check_execution(opts: RunOptions) -> None:
    """The executor, isolation, jobs and timeout settings fit together and can be met on this machine."""
    if opts.executor not in ("local", "ray"):
        raise ConfigError(f"--executor {opts.executor!r}: use local or ray")
    if opts.isolation not in ("process", "none"):
        raise ConfigError(f"--isolation {opts.isolation!r}: use process or none")
    if opts.jobs < 1:
        raise ConfigError(f"--jobs {opts.jobs}: run at least one cell at a time")
    if opts.cell_timeout is not None and opts.cell_timeout <= 0:
        raise ConfigError(f"--cell-timeout {opts.cell_timeout:g}: give a positive number of seconds")
    if runs_in_process(opts) and (opts.jobs > 1 or opts.cell_timeout is not None):
        why = "--isolation none" if opts.isolation == "none" else "this platform cannot fork worker processes"
        raise ConfigError(f"--jobs and --cell-timeout need worker processes, and {why}")
    if opts.executor == "ray":
        try:
            import ray  # noqa: F401
        except ImportError:
            raise ConfigError("--executor ray needs Ray: pip install 'mergebench[ray]'") from None
