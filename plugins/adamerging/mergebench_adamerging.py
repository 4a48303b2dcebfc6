"""AdaMerging and AdaMerging++ (Yang et al., "AdaMerging: Adaptive Model Merging for Multi-Task Learning",
ICLR 2024).

θ = θ_0 + Σ_t λ_t τ_t (task-wise: one λ per task) or θ_k = θ_0,k + Σ_t λ_t,k τ_t,k (layer-wise: one λ per parameter
tensor k per task). The λ are learned without labels: the sum over tasks of the mean prediction entropy on a batch
of each task's test inputs is minimised with Adam, and after every step the λ are projected back onto [0, 1] (the
authors clamp them inside the forward pass instead; projection keeps the stored values themselves in range).
AdaMerging++ does the same with TIES-processed task vectors: each τ_t keeps its top-k entries by magnitude over the
whole model, and only entries whose sign agrees with the elected sign (the sign of the trimmed vectors' sum, + where
that sum is exactly 0: the core task-vector pipeline's trim and sign rule, `mergebench_core.engine.pipeline`).

Defaults and where they come from: λ initialised to 0.3 (the paper's prior, FusionBench's `init_values`),
Adam with lr 1e-3 (paper and FusionBench), batch 16 per task (paper), 500 steps (the paper's task-wise runs;
FusionBench's layer-wise CLIP configuration uses 1,000), TIES k = 0.2 (the paper's AdaMerging++ setting).
Test batches are drawn in a shuffled order, as both the authors' code and FusionBench draw them (a class-sorted
test split read in order would give one-class batches): a split of at most `shuffle_buffer` examples is held whole
and reshuffled every pass; a larger one goes through a buffer of that many examples, from which each batch is drawn
at random and refilled from the split read in order. The shuffling is seeded by the run's seed. The learned λ are
stored with the result (`mergebench show` prints them), with the entropy at the first and last step.

`pa_adamerging` is the preference-aware variant: for a preference r over the cell's T tasks it minimises
Σ_t w_t·H_t with w_t = T·r_t, where H_t is task t's mean prediction entropy on its batch. That is Σ_t r_t·H_t
scaled by T, so the uniform preference (w_t = 1) is exactly the plain sum above and reproduces `adamerging_tw` /
`adamerging_lw` bit for bit (Adam is not exactly invariant to a constant scale of the loss, so Σ_t r_t·H_t itself
would not); a vertex of the simplex learns from that one task's entropy alone, and tasks of weight 0 are not run.
It is one name with a `granularity` parameter ("task" or "layer", default "layer" like the stronger
`adamerging_lw`) rather than two, because the variants differ only in the shape of the coefficients, which the
shared loop already reads from one flag; a grid sweeps both with `pa_adamerging.granularity=task,layer`. The learned
coefficients, the preference and the weights w are stored with the result; `entropy_first`/`entropy_last` hold the
weighted objective.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from mergebench_core import (
    PRETRAINED,
    MergebenchError,
    MergeOutput,
    Method,
    MethodInfo,
    ModelPool,
    RunContext,
    hookimpl,
)
from mergebench_core.engine.pipeline import agreeing_task_vectors
from mergebench_core.engine.roles import declared_roles, model_roles
from mergebench_core.engine.running_stats import running_stat_keys
from mergebench_core.data.statistics import LogitsOf
from mergebench_core.running.data_needs import require_task_pool


@dataclass
class Params:
    steps: int = 500
    """Adam steps; each sees one batch of every task."""
    lr: float = 1e-3
    batch_size: int = 16
    """Unlabeled test inputs per task per step."""
    init: float = 0.3
    """Initial value of every coefficient."""
    shuffle_buffer: int = 1024
    """Test inputs per task held for shuffling (the whole split when it is no larger)."""

    def __post_init__(self) -> None:
        if self.steps < 0 or self.batch_size < 1 or self.shuffle_buffer < self.batch_size or not 0.0 <= self.init <= 1.0:
            raise ValueError("steps must be >= 0, batch_size >= 1, shuffle_buffer >= batch_size and init in [0, 1]")


@dataclass
class TiesParams(Params):
    k: float = 0.2
    """Fraction of each task vector's entries kept (over the whole model) before the sign election."""


def ties_task_vectors(taus: dict[str, torch.Tensor], keep: float) -> dict[str, torch.Tensor]:
    """Per-task TIES processing of stacked task vectors {key: (T, ...)}: global top-k trim, then keep the entries that
    agree with the elected sign (the core pipeline's trim and its one sign rule: a zero sum elects +). The per-task
    vectors stay separate (AdaMerging++ learns their weights)."""
    keys = list(taus)
    flat = torch.cat([taus[key].flatten(1) for key in keys], dim=1)  # (T, P)
    out = agreeing_task_vectors(flat, keep)
    result, offset = {}, 0
    for key in keys:
        n = taus[key][0].numel()
        result[key] = out[:, offset:offset + n].view_as(taus[key])
        offset += n
    return result


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean Shannon entropy of the softmax predictions."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1).mean()


class _AdaMerging(Method):
    layer_wise: ClassVar[bool]
    ties: ClassVar[bool] = False
    info = MethodInfo(kind="merge", data="unlabeled", task_vectors=True)

    def _task_vectors(self, base: dict[str, torch.Tensor], experts: list[dict[str, torch.Tensor]],
                      keys: list[str]) -> dict[str, torch.Tensor]:
        taus = {key: torch.stack([e[key].float() - base[key].float() for e in experts]) for key in keys}
        return ties_task_vectors(taus, self.params.k) if self.ties else taus

    def run(self, pool: ModelPool, ctx: RunContext) -> MergeOutput:
        self.require_fit(pool)
        p, taskpool, device = self.params, require_task_pool(self, ctx.taskpool), ctx.device
        experts = pool.expert_names
        base = pool.state_dict(PRETRAINED)
        model = pool.load_model(PRETRAINED).to(device).eval().requires_grad_(False)
        # running statistics are not weights: they stay the base's while the coefficients are learned (batch norm in
        # eval mode reads them as constants) and the run's bn_stats rule sets them afterwards
        held_out = set(running_stat_keys(model_roles(model, declared_roles(pool)), base))
        keys = [k for k, v in base.items() if v.is_floating_point() and k not in held_out]
        taus = {k: v.to(device) for k, v in self._task_vectors(base, [pool.state_dict(e) for e in experts],
                                                                keys).items()}
        base_dev = {k: v.float().to(device) for k, v in base.items() if k in taus}
        shape = (len(experts), len(keys)) if self.layer_wise else (len(experts), 1)
        coeffs = nn.Parameter(torch.full(shape, float(p.init), device=device))
        weights = self._objective_weights(ctx, list(taskpool.tasks))
        # a task of weight 0 is not even run (its stream, seeded by the task's position, is simply not drawn from)
        active = [t for t in taskpool.tasks if weights is None or weights[t] != 0.0]
        wrappers = {t: LogitsOf(model, taskpool, t) for t in active}
        streams = {t: self._inputs(ctx, t, offset=i) for i, t in enumerate(taskpool.tasks) if t in wrappers}
        optimizer = torch.optim.Adam([coeffs], lr=p.lr)

        def merged_params() -> dict[str, torch.Tensor]:
            return {f"model.{k}": base_dev[k] + torch.einsum("t,t...->...", coeffs[:, i if self.layer_wise else 0],
                                                            taus[k]) for i, k in enumerate(keys)}

        history: list[float] = []
        for _ in ctx.track(range(p.steps), desc=f"{self.name} steps", total=p.steps):
            params = merged_params()
            entropies = (entropy(torch.func.functional_call(wrappers[t], params, (next(streams[t]),)))
                         for t in active)
            if weights is None:  # AdaMerging: the plain sum over tasks
                loss = sum(entropies)
            else:
                loss = sum(weights[t] * h for t, h in zip(active, entropies))
            optimizer.zero_grad()
            loss.backward()  # type: ignore[union-attr]
            optimizer.step()
            with torch.no_grad():
                coeffs.clamp_(0.0, 1.0)
            history.append(float(loss.detach()))  # type: ignore[union-attr]
        with torch.no_grad():
            final = {k.removeprefix("model."): v.detach().cpu().to(base[k.removeprefix("model.")].dtype)
                     for k, v in merged_params().items()}
        model.load_state_dict({**base, **final})
        values = coeffs.detach().cpu()
        if self.layer_wise:
            learned = {e: dict(zip(keys, values[i].tolist())) for i, e in enumerate(experts)}
        else:
            learned = {e: float(values[i, 0]) for i, e in enumerate(experts)}
        extras = {"coefficients": learned, "entropy_first": history[:1], "entropy_last": history[-1:],
                  "steps": p.steps}
        return MergeOutput(model.cpu(), extras={**extras, **self._extras(ctx, weights)})

    def _objective_weights(self, ctx: RunContext, tasks: list[str]) -> dict[str, float] | None:
        """Per-task weights of the entropy objective; None for AdaMerging's plain sum."""
        return None

    def _extras(self, ctx: RunContext, weights: dict[str, float] | None) -> dict[str, Any]:
        """What the variant stores with the result besides the coefficients and the objective's values."""
        return {}

    def _inputs(self, ctx: RunContext, task: str, offset: int = 0) -> Iterator[torch.Tensor]:
        """Unlabeled test inputs of `task` in shuffled batches, without end (labels are dropped on purpose)."""
        p, gen = self.params, ctx.generator(offset=offset)
        rows = self._rows(ctx, task)
        held = list(itertools.islice(rows, p.shuffle_buffer))
        if not held:
            raise MergebenchError(f"task {task!r} has no test inputs for {self.name}")
        pool = torch.stack(held)
        more = next(rows, None)
        if more is None:  # the whole split is held: reshuffle it every pass, as a shuffling data loader does
            while True:
                order = torch.randperm(len(pool), generator=gen)
                for i in range(0, len(pool), p.batch_size):
                    yield pool[order[i:i + p.batch_size]].to(ctx.device)

        def refill() -> Iterator[torch.Tensor]:  # the rest of the split, then the split over and over, in order
            yield more
            yield from rows
            while True:
                yield from self._rows(ctx, task)

        ordered = refill()
        while True:  # a larger split: draw each batch from the buffer and refill those slots in split order
            slots = torch.randperm(len(pool), generator=gen)[:p.batch_size]
            yield pool[slots].to(ctx.device)
            for slot in slots.tolist():
                pool[slot] = next(ordered)

    def _rows(self, ctx: RunContext, task: str) -> Iterator[torch.Tensor]:
        """One pass over the split's inputs, one example at a time, in order."""
        for inputs, _labels in require_task_pool(self, ctx.taskpool).batches(task, "test", batch_size=256):
            yield from inputs


class TaskWiseAdaMerging(_AdaMerging):
    """One learned coefficient per task vector."""

    name = "adamerging_tw"
    Params = Params
    layer_wise = False


class LayerWiseAdaMerging(_AdaMerging):
    """One learned coefficient per parameter tensor of every task vector."""

    name = "adamerging_lw"
    Params = Params
    layer_wise = True


@dataclass
class PreferenceParams(Params):
    granularity: str = "layer"
    """"task" (one coefficient per task vector, as `adamerging_tw`) or "layer" (one per parameter tensor of every
    task vector, as `adamerging_lw`)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.granularity not in ("task", "layer"):
            raise ValueError(f"granularity must be 'task' or 'layer', got {self.granularity!r}")


class PreferenceAdaMerging(_AdaMerging):
    """AdaMerging minimising the preference-weighted entropy Σ_t T·r_t·H_t (task-wise or layer-wise)."""

    name = "pa_adamerging"
    Params = PreferenceParams
    info = MethodInfo(kind="merge", data="unlabeled", task_vectors=True, preference_aware=True)

    @property
    def layer_wise(self) -> bool:  # type: ignore[override]
        return self.params.granularity == "layer"

    def _objective_weights(self, ctx: RunContext, tasks: list[str]) -> dict[str, float]:
        prefs = ctx.task_weights() or {t: 1.0 / len(tasks) for t in tasks}
        missing = [t for t in tasks if t not in prefs]
        if missing:
            raise MergebenchError(f"{self.name}: the preference is over tasks {', '.join(prefs)}, but the task pool "
                                  f"scores {', '.join(missing)} too; select the same tasks for both (--tasks)")
        # T·r_t rounded to float32 as the entropies are: exactly 1.0 for the uniform preference whatever T
        weights = {t: float(torch.tensor(len(prefs) * prefs[t], dtype=torch.float32)) for t in tasks}
        if not any(weights.values()):
            raise MergebenchError(f"{self.name}: the preference gives every task of the task pool weight 0")
        return weights

    def _extras(self, ctx: RunContext, weights: dict[str, float] | None) -> dict[str, Any]:
        assert weights is not None
        prefs = ctx.task_weights() or {t: 1.0 / len(weights) for t in weights}
        return {"preference": {t: prefs[t] for t in weights}, "task_weights": weights,
                "granularity": self.params.granularity}


class AdaMergingPlusPlus(_AdaMerging):
    """Layer-wise AdaMerging over TIES-trimmed, sign-agreeing task vectors."""

    name = "adamerging_pp"
    Params = TiesParams
    layer_wise = True
    ties = True


@hookimpl
def register_methods(register):
    register(TaskWiseAdaMerging)
    register(LayerWiseAdaMerging)
    register(AdaMergingPlusPlus)
    register(PreferenceAdaMerging)
