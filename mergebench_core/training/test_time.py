"""Test-time merges: a merged model θ(φ) computed from learnable φ (merging coefficients, masks over task-vector
entries or singular components), trained on the entropy of unlabeled test batches through the one training loop.

AdaMerging's idea, shared by Concrete subspace learning, CART's AdaMerging variant and AdaRank: the merged weights
are a differentiable function of a few learnable tensors, the pretrained architecture runs them functionally
(`torch.func.functional_call`, so the frozen model is never rewritten while training), and the objective is the sum
over tasks of the mean prediction entropy (`upscaling.entropy_loss`). A plugin subclasses `FunctionalMerge`, writes
`merged(state)` (θ(φ) for the keys it changes; `state` is None for the final model) and hands it to
`adapt_by_entropy`; it writes a merge rule, not a loop.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call

from mergebench_core.contract.api import PRETRAINED, Batch, ModelPool, RunContext, TaskPool
from mergebench_core.data.statistics import LogitsOf
from mergebench_core.engine.roles import Role, declared_roles, model_roles
from mergebench_core.engine.running_stats import running_stat_keys
from mergebench_core.running.data_needs import require_task_pool
from mergebench_core.training.loop import LossFn, TrainConfig, TrainResult, TrainState, train
from mergebench_core.upscaling.method import entropy_loss


class FunctionalMerge(nn.Module, ABC):
    """A frozen model whose weights `keys` are θ(φ), with φ the module's own parameters."""

    def __init__(self, model: nn.Module, keys: Sequence[str]) -> None:
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.keys = list(keys)

    def train(self, mode: bool = True) -> FunctionalMerge:
        """Only φ trains: the frozen model stays in evaluation mode (no dropout; batch norm reads its statistics)."""
        super().train(mode)
        self.model.eval()
        return self

    def stash(self, prefix: str, tensors: Sequence[Tensor]) -> None:
        """Keep constant tensors (task vectors, singular factors) as buffers `prefix0`, `prefix1`, ... so they move
        with the module to the training device."""
        for i, t in enumerate(tensors):
            self.register_buffer(f"{prefix}{i}", t)

    def stashed(self, prefix: str) -> list[Tensor]:
        return [getattr(self, f"{prefix}{i}") for i in range(len(self.keys))]

    @abstractmethod
    def merged(self, state: TrainState | None) -> dict[str, Tensor]:
        """θ(φ) for every key of `keys`; `state` is None when the final model is built (no sampling then)."""

    def logits(self, params: Mapping[str, Tensor], taskpool: TaskPool, task: str, inputs: Tensor) -> Tensor:
        """Task `task`'s logits of the model with weights `params` (the others the frozen model's own)."""
        return functional_call(LogitsOf(self.model, taskpool, task), {f"model.{k}": v for k, v in params.items()},
                               (inputs,))

    def entropy(self, params: Mapping[str, Tensor], batches: Mapping[str, Batch], taskpool: TaskPool) -> Tensor:
        """Σ_t mean prediction entropy of task t on its batch (labels unread)."""
        total = None
        for task, (inputs, _labels) in batches.items():
            term = entropy_loss(self.logits(params, taskpool, task, inputs))
            total = term if total is None else total + term
        assert total is not None
        return total

    @torch.no_grad()
    def materialize(self) -> nn.Module:
        """The frozen model with θ(φ) written into it (on the CPU): the method's result."""
        final = self.merged(None)
        self.model.cpu()
        state = self.model.state_dict()
        for key, value in final.items():
            state[key] = value.detach().cpu().to(state[key].dtype)
        self.model.load_state_dict(state)
        return self.model


def summed_entropy(merge: nn.Module, batches: Mapping[str, Batch], state: TrainState) -> Tensor:
    """The test-time objective of every `FunctionalMerge`: θ(φ) once per step, then Σ_t entropy."""
    assert isinstance(merge, FunctionalMerge)
    return merge.entropy(merge.merged(state), batches, state.taskpool)


def adapt_by_entropy(merge: FunctionalMerge, ctx: RunContext, config: TrainConfig, parameters: Sequence[nn.Parameter],
                     method: object, loss: LossFn = summed_entropy) -> TrainResult:
    """Train `parameters` of `merge` on the cell's tasks' unlabeled test batches (the core loop, split "test")."""
    taskpool = require_task_pool(method, ctx.taskpool)
    return train(merge, taskpool, ctx.tasks or tuple(taskpool.tasks), loss, config, seed=ctx.seed,
                 device=ctx.device, parameters=parameters, log_metrics=ctx.log_metrics, progress=ctx.progress,
                 split="test")


def mergeable_state(pool: ModelPool) -> tuple[nn.Module, dict[str, Tensor], list[str], dict[str, Role]]:
    """The pretrained model, its state, the keys a test-time merge may change (floating tensors that are not batch
    norm's running statistics, which stay the base's), and every key's role (which tensors are matrices)."""
    model = pool.load_model(PRETRAINED).eval()
    state = {k: v.detach() for k, v in model.state_dict().items()}
    roles = model_roles(model, declared_roles(pool))
    held_out = set(running_stat_keys(roles, state))
    keys = [k for k, v in state.items() if v.is_floating_point() and k not in held_out
            and k in dict(model.named_parameters())]
    return model, state, keys, roles
