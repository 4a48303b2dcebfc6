"""The base of every upscaling method: build the upscaled model, train its routers at test time if it has any, and
hand it to the harness to be scored per sample.

A plugin writes `upscale(base, experts, ctx)`, which returns the pretrained model with routed blocks swapped in.
If the result has trainable parameters (routers) and the method declares unlabeled data, they are trained by the
core's one training loop (`training.loop.train`) on the tasks' unlabeled test batches, minimising the sum over tasks of
the mean prediction entropy (`entropy_loss`): the test-time adaptation of AdaMerging and WEMoE. During training the
routing coefficients are averaged over each batch (`batch_reduce`, FusionBench's configuration); the returned model
routes every sample on its own.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from mergebench_core.contract.api import PRETRAINED, Batch, MergeOutput, Method, MethodInfo, ModelPool, RunContext
from mergebench_core.engine.roles import declared_roles, model_roles
from mergebench_core.engine.running_stats import running_stat_keys
from mergebench_core.running.data_needs import require_task_pool
from mergebench_core.training.loop import TrainState, train
from mergebench_core.training.params import TrainingParams
from mergebench_core.upscaling.blocks import set_batch_reduce
from mergebench_core.upscaling.model import mlp_blocks, size_report


def entropy_loss(logits: Tensor, eps: float = 1e-8) -> Tensor:
    """Mean Shannon entropy of the softmax predictions, log(p + eps) as FusionBench's WEMoE computes it."""
    probs = torch.softmax(logits.float(), dim=-1)
    return -(probs * torch.log(probs + eps)).sum(-1).mean()


def summed_entropy(model: nn.Module, batches: Mapping[str, Batch], state: TrainState) -> Tensor:
    """Σ_t mean entropy of task t's predictions on its batch (labels unread): the test-time objective."""
    return sum(entropy_loss(state.taskpool.logits(model, t, x)) for t, (x, _labels) in batches.items())  # type: ignore


@dataclass
class TestTimeParams(TrainingParams):
    """FusionBench 0.2.33's WEMoE configuration (`method/wemoe/weight_ensembling_moe.yaml`): Adam, lr 1e-4, 1,000
    steps, batch 16 per task."""

    steps: int = 1000
    lr: float = 1e-4
    batch_size: int = 16


class UpscaleMethod(Method):
    """Returns an upscaled model; `info.data` "unlabeled" trains its routers on test inputs (labels never read)."""

    info = MethodInfo(kind="upscale", data="none", task_vectors=True)
    upscales: ClassVar[str] = "MLP blocks (or Linear layers)"
    """What the method replaces, for its refusal on a model that has none."""

    @classmethod
    def targets(cls, model: nn.Module) -> list[str]:
        """The modules the method replaces: each transformer layer's `mlp`, else every Linear (see `mlp_blocks`)."""
        return mlp_blocks(model)

    @classmethod
    def refusal(cls, pool: ModelPool, params: Any) -> str | None:
        earlier = super().refusal(pool, params)  # task vectors, files: the bases' reasons first
        if earlier:
            return earlier
        build = getattr(pool, "build_model", None)  # an untrained instance: cheap, and enough to see the modules
        if callable(build) and not getattr(pool, "files_only", False):
            model = build()
            if not cls.targets(model):
                return (f"it upscales {cls.upscales}, and the model of pool {pool.name!r} "
                        f"({type(model).__name__}) has none; choose a pool whose model has them (CLIP, ViT, an MLP "
                        f"such as digits-mlp_TA8)")
        return None

    @abstractmethod
    def upscale(self, base: nn.Module, experts: list[nn.Module], ctx: RunContext, skip: set[str]) -> nn.Module:
        """The pretrained model `base` (a fresh copy, free to change) with routed blocks swapped in; `skip` names
        the running statistics, which are not weights and stay the base's."""

    def run(self, pool: ModelPool, ctx: RunContext) -> MergeOutput:
        self.require_fit(pool)
        base = pool.load_model(PRETRAINED).eval()
        skip = set(running_stat_keys(model_roles(base, declared_roles(pool)), base.state_dict()))
        experts = [pool.load_model(e).eval() for e in pool.expert_names]
        ctx.log.info("%s: upscaling the pretrained model with %d experts", self.name, len(experts))
        model = self.upscale(pool.load_model(PRETRAINED).eval(), experts, ctx, skip)
        del experts
        extras: dict[str, object] = dict(size_report(model, base))
        trainable = [p for p in model.parameters() if p.requires_grad]
        if trainable and self.info.data != "none":
            extras.update(self.adapt(model, trainable, ctx))
        model.requires_grad_(False)
        set_batch_reduce(model, False)
        return MergeOutput(model.eval().cpu(), extras=extras)

    def adapt(self, model: nn.Module, trainable: list[nn.Parameter], ctx: RunContext) -> dict[str, object]:
        """Test-time training of the routers: entropy on unlabeled test batches, through the core loop."""
        params = self.params
        if not isinstance(params, TrainingParams):
            raise TypeError(f"{self.name}: a method that trains its routers needs TrainingParams, got {params!r}")
        config = params.train_config()
        if config.steps == 0:  # the routers as initialised (task arithmetic): nothing to read
            return {"trained_parameters": 0, "steps": 0}
        taskpool = require_task_pool(self, ctx.taskpool)
        set_batch_reduce(model, True)
        result = train(model, taskpool, ctx.tasks or tuple(taskpool.tasks), summed_entropy, config,
                       seed=ctx.seed, device=ctx.device, parameters=trainable, log_metrics=ctx.log_metrics,
                       progress=ctx.progress, split="test")
        return {"trained_parameters": sum(p.numel() for p in trainable), "steps": result.steps,
                "entropy_last": result.final_loss, "train_seconds": result.seconds}
