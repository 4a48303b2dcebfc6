"""What every fusion method checks before it starts, and the parameter every one of them has.

Fusion methods (align-to-first: Git Re-Basin, OTFusion; level by level: HF/KF linear fusion, ALF) run on pools of
independently trained models of one architecture. They share the same refusals, said the same way: a pool with no
permutation spec, fewer than two models, or (for level fusion) no levels cannot be fused at all; a pool whose
models differ in tensors or shapes is not one architecture; a method that reads activations needs the task pool's
train inputs. `open_fusion` says all of it before any work.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mergebench_core.contract.api import Method, ModelPool, RunContext, TaskPool
from mergebench_core.contract.checked_params import CheckedParams
from mergebench_core.errors import MergebenchError
from mergebench_core.fusion.alignment import PermutationSpec
from mergebench_core.pools.states import load_states
from mergebench_core.running.data_needs import require_task_pool


@dataclass
class FusionParams(CheckedParams):
    """The parameter every fusion method has: how many train inputs per task its activations are taken on."""

    num_fusion_samples: int = 512
    """Train inputs per task on which activations are compared, matched or fitted."""
    at_least = {"num_fusion_samples": 1}


@dataclass
class FusionStart:
    """A fusion run past its checks: the pool's spec, its models in order (the first is the reference) with their
    state dicts, and, when the method reads activations, the task pool and the tasks whose train inputs it uses."""

    spec: PermutationSpec
    names: list[str]
    states: dict[str, dict[str, torch.Tensor]]
    taskpool: TaskPool | None
    tasks: Sequence[str]


def open_fusion(method: Method, pool: ModelPool, ctx: RunContext, *, needs_data: bool) -> FusionStart:
    """The checks above, as `MergebenchError`s that say what to change; then what the fusion starts from."""
    reason = method.refusal(pool, method.params)
    if reason is not None:
        raise MergebenchError(f"{method.name} cannot fuse this pool: {reason}")
    spec = pool.permutation_spec()
    assert spec is not None  # the refusal covers pools without one
    taskpool = require_task_pool(method, ctx.taskpool) if needs_data else ctx.taskpool  # the runner's guarantee
    names = pool.expert_names
    states = load_states(pool, names)  # one architecture, or a clear error
    tasks = list(ctx.tasks or taskpool.tasks) if taskpool is not None else []
    return FusionStart(spec, names, states, taskpool, tasks)
