"""Continual merging: experts arrive one at a time, in a stated order, and the merged model is updated at each arrival
without going back to earlier experts (OPCM, DOP).

A `ContinualMethod` owns the loop and keeps one state between arrivals, the merged task vector τ̂ (θ = θ_0 + τ̂). The
first expert's task vector is taken as it is (both OPCM and DOP start from the first model); for every later expert
the plugin says how τ̂ absorbs its task vector τ_t (`absorb`), and may rescale the whole model afterwards (`settle`).
The order comes from the cell (`RunContext.task_order`, drawn by `running.task_order`); after each arrival the model
is handed to `RunContext.on_step`, with which the runner scores the tasks seen so far (the cell's curve).

Which tensors are weight matrices is read from the model's modules (`engine.roles`), as the reference code reads
`nn.Linear` modules: Linear weights reach `absorb` with `is_matrix` true; other floating-point parameters (biases,
norms, embeddings, conv kernels) with `is_matrix` false. Integer buffers and batch-norm running statistics are the
pretrained model's during the steps; the final model's running statistics follow the run's `--bn-stats` rule.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from mergebench_core.contract.api import PRETRAINED, MergeOutput, Method, MethodInfo, ModelPool, RunContext
from mergebench_core.engine.roles import Role, declared_roles, model_roles, role_from_name
from mergebench_core.engine.tensor_math import is_mergeable
from mergebench_core.errors import ConfigError

TaskVector = dict[str, torch.Tensor]


def is_continual(method: type[Any]) -> bool:
    """True for methods that merge experts one at a time and so run once per task order."""
    return isinstance(method, type) and issubclass(method, ContinualMethod)


class ContinualMethod(Method):
    """Base of continual merging methods: implement `absorb` (and `settle` when the method rescales the model)."""

    info = MethodInfo(kind="merge", data="none", task_vectors=True)

    def begin(self, keys: Sequence[str]) -> None:
        """Reset whatever the method keeps between arrivals; `keys` are the tensors it merges."""

    def first(self, tau: TaskVector) -> TaskVector:
        """The merged task vector after the first arrival: its own task vector, as OPCM and DOP start."""
        return {k: v.clone() for k, v in tau.items()}

    @abstractmethod
    def absorb(self, step: int, key: str, merged: torch.Tensor, tau: torch.Tensor, is_matrix: bool) -> torch.Tensor:
        """Tensor `key` of the merged task vector after arrival `step` (1 for the second expert), from the merged task
        vector so far and the new expert's task vector (both float32)."""

    def settle(self, step: int, merged: TaskVector, tau: TaskVector) -> TaskVector:
        """A whole-model correction after each arrival (`step` ≥ 1) once every tensor has absorbed τ_t (OPCM rescales
        to the average task-vector norm); by default none."""
        return merged

    def steps(self, base: dict[str, torch.Tensor], experts: Sequence[dict[str, torch.Tensor]],
              roles: dict[str, Role] | None = None) -> list[TaskVector]:
        """The merged task vector after each arrival, on plain state dicts (what `run` does, without a pool)."""
        return [merged for _, merged in self.iterate(base, iter(experts), roles or {})]

    def iterate(self, base: dict[str, torch.Tensor], experts: Iterable[dict[str, torch.Tensor]],
                roles: dict[str, Role]) -> Iterator[tuple[int, TaskVector]]:
        """(step, merged task vector) after each expert of `experts` (state dicts, read one at a time)."""
        keys = [k for k, v in base.items()
                if is_mergeable(v.dtype) and _role(roles, k, v).kind not in ("running_stat", "buffer")]
        matrix = {k: _is_linear_weight(_role(roles, k, base[k])) for k in keys}
        self.begin(keys)
        merged: TaskVector = {}
        for step, expert in enumerate(experts):
            tau = {k: expert[k].to(torch.float32) - base[k].to(torch.float32) for k in keys}
            if step == 0:
                merged = self.first(tau)
            else:
                merged = {k: self.absorb(step, k, merged[k], tau[k], matrix[k]) for k in keys}
                merged = self.settle(step, merged, tau)
            yield step, merged

    def run(self, pool: ModelPool, ctx: RunContext) -> MergeOutput:
        order = list(ctx.task_order) or list(pool.expert_names)
        unknown = [n for n in order if n not in pool.expert_names]
        if unknown:
            raise ConfigError(f"{self.name}: task order names {unknown}, which pool {pool.name!r} does not hold "
                              f"(its experts: {', '.join(pool.expert_names)})")
        base = pool.state_dict(PRETRAINED)
        model = pool.load_model(PRETRAINED)
        roles = model_roles(model, declared_roles(pool))
        experts = (pool.state_dict(name) for name in order)
        for step, merged in self.iterate(base, experts, roles):
            _load(model, base, merged)
            if ctx.on_step is not None:
                ctx.on_step(step, order[:step + 1], model)
        return MergeOutput(model, extras={"task_order": order, **self.extras()})

    def extras(self) -> dict[str, Any]:
        """What the method wants stored with the result (per-step coefficients, ranks)."""
        return {}


def _role(roles: dict[str, Role], key: str, tensor: torch.Tensor) -> Role:
    return roles.get(key) or role_from_name(key, tuple(tensor.shape), tensor.dtype)


def _is_linear_weight(role: Role) -> bool:
    return role.kind == "weight" and role.view is not None and role.view.kind == "linear"


def _load(model: nn.Module, base: dict[str, torch.Tensor], merged: TaskVector) -> None:
    state = {k: (base[k].to(torch.float32) + merged[k]).to(base[k].dtype) if k in merged else base[k]
             for k in base}
    model.load_state_dict(state)
