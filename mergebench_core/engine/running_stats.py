"""Batch-norm running statistics after a merge, by one declared rule (`bn_stats`) for every merging method.

Running means and variances describe the activations a layer saw; they are not learned, so trimming, electing or
rescaling them like weights means nothing, and a merged network's activations are not any expert's. The engine keeps
them out of every method's tensors and settles them by the run's rule:

- ``base``: the pretrained model's statistics;
- ``mean``: the average of the experts' statistics (the default; `num_batches_tracked` is the base's);
- ``recompute``: statistics reset and measured afresh on the merged model, over a bounded, seeded slice of every
  task's training split, with only the BatchNorm layers in training mode and `momentum=None` (a cumulative average
  over the batches), gradients off.

The rule is one value, `engine.bn_stats.BnStats`, which also says who applies it: the streaming engine sets ``base``
and ``mean`` inside the merges it runs (`TensorMergeMethod`s, over the experts they merge); the runner applies the
rule to the output of every other merge method, and ``recompute`` to all of them (`settle_running_stats`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence

import torch
from torch import nn

from mergebench_core.contract.api import PRETRAINED, ModelPool, PerTaskModels, TaskPool
from mergebench_core.engine.bn_stats import BnStats
from mergebench_core.engine.pool_sources import pool_source
from mergebench_core.engine.roles import Role
from mergebench_core.errors import MergebenchError

log = logging.getLogger(__name__)

RECOMPUTE_EXAMPLES = 256
"""Training examples per task that `recompute` runs through the merged model (RegMean's default sample size)."""
RECOMPUTE_BATCH_SIZE = 64


def running_stat_keys(roles: Mapping[str, Role], keys: Iterable[str] | None = None) -> list[str]:
    """The keys (of `keys`, else of `roles`) whose role is a running statistic."""
    return [k for k in (roles if keys is None else keys) if k in roles and roles[k].is_running_stat]


def rule_value(key: str, rule: BnStats | str, base: torch.Tensor | None, experts: Sequence[torch.Tensor]
               ) -> torch.Tensor:
    """The value of running statistic `key` under `rule` ("base" or "mean"): the base's, or the experts' average in
    float32 cast back. Integer counters (`num_batches_tracked`) are always the base's (the first expert's when there
    is no base): a count of batches has no meaningful average."""
    rule = BnStats.parse(rule)
    if rule.needs_data:
        raise MergebenchError(f"bn_stats={rule} measures running statistics on the merged model, after the merge; "
                              f"a value of {key!r} can be set by rule 'base' or 'mean' only")
    if not experts:
        raise MergebenchError(f"no expert holds running statistic {key!r}")
    if not experts[0].is_floating_point() or rule.name == "base":
        if rule.name == "base" and base is None and experts[0].is_floating_point():
            raise MergebenchError(f"bn_stats=base keeps the pretrained model's running statistics, and there is no "
                                  f"pretrained model ({key!r}); use bn_stats=mean or recompute")
        return (base if base is not None else experts[0]).clone()
    return torch.stack([e.float() for e in experts]).mean(0).to(experts[0].dtype)


def _models(evaluable: object) -> list[tuple[str | None, nn.Module]]:
    """(task or None, model) for one model or per-task models; nothing for ensembles (their experts are untouched)."""
    if isinstance(evaluable, PerTaskModels):
        return list(evaluable.models.items())
    if isinstance(evaluable, nn.Module):
        return [(None, evaluable)]
    return []


def apply_rule(evaluable: object, pool: ModelPool, rule: BnStats | str, roles: Mapping[str, Role],
               experts: Sequence[str] | None = None) -> int:
    """Set the running statistics of a merged model (or each per-task model) by `rule` ("base" or "mean") from the
    pool's models; returns how many tensors were set. Reads only those tensors (lazily for file-backed pools)."""
    models = _models(evaluable)
    if not models:
        return 0
    keys = running_stat_keys(roles)
    names = list(experts if experts is not None else pool.expert_names)
    base_src = pool_source(pool, PRETRAINED) if pool.has_pretrained else None
    expert_srcs = [pool_source(pool, n) for n in names]
    done = 0
    for key in keys:
        value = rule_value(key, rule, base_src.get(key) if base_src is not None else None,
                           [s.get(key) for s in expert_srcs])
        for _, model in models:
            target = _buffer(model, key)
            if target is not None:
                target.copy_(value.to(target.device, target.dtype))
                done += 1
    return done


def _buffer(model: nn.Module, key: str) -> torch.Tensor | None:
    module_name, _, local = key.rpartition(".")
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        return None
    return module._buffers.get(local)


def batch_norms(model: nn.Module) -> dict[str, nn.modules.batchnorm._BatchNorm]:
    """Every BatchNorm layer of `model` that tracks running statistics."""
    return {n: m for n, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats}


@contextlib.contextmanager
def measuring_running_stats(model: nn.Module) -> Iterator[dict[str, nn.modules.batchnorm._BatchNorm]]:
    """Within the block, forward passes measure `model`'s BatchNorm statistics afresh: every running statistic is
    reset, and only the BatchNorm layers run in training mode (dropout and the rest in evaluation mode), with
    `momentum=None`, so each statistic becomes the plain average over the batches of the batch statistics (torch's
    cumulative moving average). Momenta and modes are restored afterwards. Yields the BatchNorm layers (empty: the
    model has none, and nothing changes)."""
    norms = batch_norms(model)
    was_training = {n: m.training for n, m in model.named_modules()}
    momenta = {n: m.momentum for n, m in norms.items()}
    model.eval()
    try:
        for m in norms.values():
            m.reset_running_stats()
            m.momentum = None
            m.train()
        yield norms
    finally:
        for n, m in norms.items():
            m.momentum = momenta[n]
        for n, m in model.named_modules():
            m.train(was_training.get(n, False))


def recompute_running_stats(model: nn.Module, taskpool: TaskPool, tasks: Sequence[str], *, seed: int = 0,
                            n_examples: int = RECOMPUTE_EXAMPLES, batch_size: int = RECOMPUTE_BATCH_SIZE,
                            device: torch.device | str = "cpu") -> int:
    """Reset every BatchNorm's running statistics in `model` and measure them again (`measuring_running_stats`) on
    the first `n_examples` training examples of each of `tasks` (in order), through `taskpool.logits`. Returns the
    number of batches."""
    norms = batch_norms(model)
    if not norms:
        return 0
    device = torch.device(device)
    first = next(iter(model.parameters()), None)
    home = first.device if first is not None else torch.device("cpu")
    batches = 0
    try:
        with measuring_running_stats(model.to(device)), torch.no_grad(), \
                torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            for task in tasks:
                for inputs, _ in taskpool.batches(task, "train", batch_size=batch_size, limit=n_examples):
                    taskpool.logits(model, task, inputs.to(device))
                    batches += 1
    finally:
        model.to(home)
    if batches == 0:
        raise MergebenchError(f"bn_stats=recompute found no training examples in tasks {list(tasks)} of task pool "
                              f"{taskpool.name!r}")
    log.info("recomputed the running statistics of %d BatchNorm layers over %d batches", len(norms), batches)
    return batches


def settle_running_stats(evaluable: object, pool: ModelPool, rule: BnStats | str, roles: Mapping[str, Role], *,
                         taskpool: TaskPool | None, tasks: Sequence[str], seed: int = 0,
                         device: torch.device | str = "cpu", set_by_engine: bool = False) -> dict[str, object]:
    """Apply `rule` to the running statistics of a merge method's output, where the rule says the runner applies it;
    returns what to store in its extras.

    `set_by_engine`: the streaming engine merged this output (a `TensorMergeMethod`), and so already set "base" or
    "mean" (`BnStats.applied_by`). Per-task models are each recomputed on their own task's data.
    """
    rule = BnStats.parse(rule)
    if not running_stat_keys(roles):
        return {}
    if rule.applied_by(streamed=set_by_engine) == "engine":
        return {"bn_stats": rule.name}
    if not rule.needs_data:
        apply_rule(evaluable, pool, rule, roles)
        return {"bn_stats": rule.name}
    if taskpool is None:
        raise MergebenchError(f"bn_stats={rule} measures running statistics on training data, and no task pool was "
                              f"given; pass the cell's task pool")
    batches = 0
    for task, model in _models(evaluable):
        batches += recompute_running_stats(model, taskpool, [task] if task is not None else list(tasks), seed=seed,
                                           device=device)
    return {"bn_stats": rule.name, "bn_recompute_batches": batches}
