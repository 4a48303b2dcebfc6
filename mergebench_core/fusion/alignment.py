"""Aligning independently trained models: permutation specs, weight matching and activations at named points.

Two networks trained from different random initialisations compute similar functions with their hidden units in a
different order, so averaging their weights entry by entry mixes unrelated units. Permuting the hidden units of one
network changes no output, so fusion methods first permute every model onto a reference, then combine.

An architecture's owner (the model pool) declares *which* axes move together in a `PermutationSpec`
(`contract.permutations`: block permutations for attention heads, the activation points where each permutation's
units can be observed, and the model's fusion levels); everything here works from that spec alone, so no fusion
method is written per architecture: `apply_permutation` and `apply_transport` (soft maps, for optimal transport),
`weight_matching` and `activation_matching` (Git Re-Basin), `collect_activations` and `unit_activations` (cached
like the other data statistics, in `StatsCache`). `mergebench_core.fusion.levels` builds level-by-level fusion on
the same spec.

Permutation convention, used throughout: `perms[p]` is a LongTensor such that output unit i is input unit
`perms[p][i]`, i.e. every axis carrying p is re-indexed with `index_select(axis, perms[p])`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from mergebench_core.contract.api import TaskPool
from mergebench_core.contract.permutations import Level, PermutationSpec, mlp_permutation_spec
from mergebench_core.data.statistics import StatsCache, StatsKey
from mergebench_core.errors import MergebenchError

__all__ = [
    "Level", "PermutationSpec", "Perms", "activation_matching", "apply_permutation", "apply_transport",
    "collect_activations", "mlp_permutation_spec", "unit_activations", "unit_vectors", "weight_matching",
]
"""`Level`, `PermutationSpec` and `mlp_permutation_spec` are defined in `contract.permutations` (what pools
declare); pools and plugins written before import them from here."""

Perms = dict[str, torch.Tensor]


def _check_perms(spec: PermutationSpec, sizes: Mapping[str, int], perms: Mapping[str, torch.Tensor]) -> None:
    unknown = set(perms) - set(sizes)
    if unknown:
        raise MergebenchError(f"permutations {sorted(unknown)} are not in the spec (it has {sorted(sizes)})")
    for p, perm in perms.items():
        if perm.shape != (sizes[p],) or not torch.equal(perm.sort().values.cpu(), torch.arange(sizes[p])):
            raise MergebenchError(f"perms[{p!r}] is not a permutation of {sizes[p]} units")


def _expand(perm: torch.Tensor, block: int) -> torch.Tensor:
    """A permutation of blocks as a permutation of the entries of the axis they tile."""
    if block == 1:
        return perm
    return (perm[:, None] * block + torch.arange(block)).reshape(-1)


def _permute(tensor: torch.Tensor, names: tuple[str | None, ...], perms: Mapping[str, torch.Tensor],
             skip_axis: int | None = None, blocks: Mapping[str, int] | None = None) -> torch.Tensor:
    for axis, p in enumerate(names):
        if p is not None and axis != skip_axis and p in perms:
            index = _expand(perms[p], (blocks or {}).get(p, 1))
            tensor = tensor.index_select(axis, index.to(tensor.device))
    return tensor


def apply_permutation(spec: PermutationSpec, state_dict: Mapping[str, torch.Tensor],
                      perms: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A new state dict with every axis of the spec re-indexed by its permutation (see the module's convention).

    The input is not modified. Keys outside the spec are passed through (the same tensor objects); permutations
    missing from `perms` count as the identity.
    """
    _check_perms(spec, spec.sizes(state_dict), perms)
    return {k: _permute(v, spec.axes[k], perms, blocks=spec.blocks) if k in spec.axes else v
            for k, v in state_dict.items()}


def weight_matching(spec: PermutationSpec, reference: Mapping[str, torch.Tensor],
                    other: Mapping[str, torch.Tensor], *, max_iter: int = 100,
                    generator: torch.Generator | None = None) -> Perms:
    """Permutations that move `other`'s units onto `reference`'s (Git Re-Basin weight matching, Ainsworth et al.,
    ICLR 2023): maximise Σ ⟨W_ref, π(W_other)⟩ over the tensors of the spec by coordinate ascent.

    From the identity, each sweep visits the permutations in an order drawn from `generator` (seed 0 when None). For
    permutation p, A = Σ over its (key, axis) of W_ref · W_otherᵀ, both moved to that axis first and flattened, with
    every other axis of W_other already permuted; the linear assignment maximising trace(A[:, π]) replaces p when it
    improves the objective by more than 1e-12 relative. A sweep that improves nothing ends the search. Float64
    throughout, so the stopping test compares numbers that mean something.
    """
    from scipy.optimize import linear_sum_assignment  # scipy only for alignment: the core does not import it

    sizes = spec.sizes(reference)
    spec.validate(other)
    for key in spec.axes:
        if reference[key].shape != other[key].shape:
            raise MergebenchError(f"tensor {key!r} has shape {tuple(reference[key].shape)} in the reference and "
                                  f"{tuple(other[key].shape)} in the model to align; they are not one architecture")
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    ref = {k: reference[k].detach().to("cpu", torch.float64) for k in spec.axes}
    oth = {k: other[k].detach().to("cpu", torch.float64) for k in spec.axes}
    perms: Perms = {p: torch.arange(n) for p, n in sizes.items()}
    names, where = list(sizes), spec.perms
    for _ in range(max_iter):
        improved = False
        for i in torch.randperm(len(names), generator=generator).tolist():
            p, n = names[i], sizes[names[i]]
            a = torch.zeros(n, n, dtype=torch.float64)
            for key, axis in where[p]:
                w_ref = ref[key].movedim(axis, 0).reshape(n, -1)
                w_oth = _permute(oth[key], spec.axes[key], perms, axis, spec.blocks).movedim(axis, 0).reshape(n, -1)
                a += w_ref @ w_oth.T
            _, cols = linear_sum_assignment(a.numpy(), maximize=True)
            new = torch.as_tensor(cols, dtype=torch.long)
            rows = torch.arange(n)
            old_value, new_value = float(a[rows, perms[p]].sum()), float(a[rows, new].sum())
            if new_value > old_value + 1e-12 * abs(old_value):
                perms[p], improved = new, True
        if not improved:
            break
    return perms


def apply_transport(spec: PermutationSpec, state_dict: Mapping[str, torch.Tensor],
                    maps: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A new state dict with every axis that carries permutation p replaced by `maps[p] @` that axis.

    `maps[p]` is an (m, n) matrix over units (blocks): row i says how much of each of the n source units goes into
    target unit i (OTFusion's transport map diag(1/ν) Tᵀ; a permutation's one-hot matrix gives `apply_permutation`'s
    result). Tensors are combined in float64 and returned in their own dtype; keys outside the spec pass through.
    """
    sizes = spec.sizes(state_dict)
    unknown = set(maps) - set(sizes)
    if unknown:
        raise MergebenchError(f"transport maps {sorted(unknown)} are not in the spec (it has {sorted(sizes)})")
    for p, m in maps.items():
        if m.dim() != 2 or m.shape[1] != sizes[p]:
            raise MergebenchError(f"maps[{p!r}] has shape {tuple(m.shape)}; it must be (target units, {sizes[p]})")
    out = dict(state_dict)
    for key, names in spec.axes.items():
        t = state_dict[key].detach().to(torch.float64)
        for axis, p in enumerate(names):
            if p is None or p not in maps:
                continue
            m = maps[p].to(t.device, torch.float64)
            moved = t.movedim(axis, 0)
            rest = moved.shape[1:]
            mixed = m @ moved.reshape(m.shape[1], -1)  # a block's entries travel together: rows of (units, block·rest)
            t = mixed.reshape(m.shape[0] * spec.block(p), *rest).movedim(0, axis)
        out[key] = t.to(state_dict[key].dtype)
    return out


def unit_vectors(activations: torch.Tensor, block: int = 1) -> torch.Tensor:
    """(rows, units · block) activations → (units, rows · block): one vector per unit (a head's block of features
    together), the objects that activation-based matching compares."""
    rows, features = activations.shape
    if features % block:
        raise MergebenchError(f"{features} features do not split into blocks of {block}")
    return activations.reshape(rows, features // block, block).permute(1, 0, 2).reshape(features // block, -1)


def _standardize(z: torch.Tensor) -> torch.Tensor:
    z = z.to(torch.float64)
    z = z - z.mean(0, keepdim=True)
    return z / z.std(0, keepdim=True).clamp_min(1e-12)


def activation_matching(spec: PermutationSpec, reference: Mapping[str, torch.Tensor],
                        other: Mapping[str, torch.Tensor]) -> Perms:
    """Permutations that move `other`'s units onto `reference`'s by their activations (Git Re-Basin's activation
    matching, Ainsworth et al., ICLR 2023): for each permutation p, the linear assignment maximising the summed
    correlation Σ_i corr(Z_ref[:, i], Z_other[:, π(i)]) of the two models' activations at p's points, each feature
    standardised over the rows (a head's features summed over its block). `reference[p]` and `other[p]` are
    (rows, units · block) matrices from `unit_activations` on the same inputs. Each permutation is solved on its own:
    activations do not depend on how other layers are permuted."""
    from scipy.optimize import linear_sum_assignment

    perms: Perms = {}
    for p in spec.perms:
        if p not in reference or p not in other:
            raise MergebenchError(f"no activations for permutation {p!r}; the pool's spec must name a point for it "
                                  f"(PermutationSpec.points)")
        if reference[p].shape != other[p].shape:
            raise MergebenchError(f"activations for {p!r} have shapes {tuple(reference[p].shape)} and "
                                  f"{tuple(other[p].shape)}; both models must see the same inputs")
        block = spec.block(p)
        corr = unit_vectors(_standardize(reference[p]), block) @ unit_vectors(_standardize(other[p]), block).T
        _, cols = linear_sum_assignment(corr.numpy(), maximize=True)
        perms[p] = torch.as_tensor(cols, dtype=torch.long)
    return perms


def unit_activations(spec: PermutationSpec, model: nn.Module, taskpool: TaskPool, tasks: Sequence[str], *,
                     n_examples: int = 256, batch_size: int = 64, cache: StatsCache | None = None,
                     model_identity: str | None = None, split: str = "train") -> dict[str, torch.Tensor]:
    """{permutation: (rows, units · block)}: the outputs of every point of each permutation (`spec.points`), features
    last, rows of several points stacked, on the first `n_examples` of each task's split (cached like
    `collect_activations`)."""
    missing = [p for p in spec.perms if p not in spec.points]
    if missing:
        raise MergebenchError(f"the permutation spec names no activation point for {missing}; activation-based "
                              f"alignment needs PermutationSpec.points (the module whose output carries each one)")
    points = list(dict.fromkeys(m for p in spec.perms for m in spec.points[p]))
    acts = collect_activations(model, taskpool, tasks, points, split=split, n_examples=n_examples,
                               batch_size=batch_size, cache=cache, model_identity=model_identity,
                               feature_axes=spec.feature_axes)
    return {p: torch.cat([acts[m] for m in spec.points[p]]) for p in spec.perms}


def collect_activations(model: nn.Module, taskpool: TaskPool, tasks: Sequence[str], points: Sequence[str], *,
                        split: str = "train", n_examples: int = 256, batch_size: int = 64,
                        cache: StatsCache | None = None, model_identity: str | None = None,
                        seed: int = 0, feature_axes: Mapping[str, int] | None = None) -> dict[str, torch.Tensor]:
    """{point: (rows, features)}: the outputs of the submodules named `points` (as in `model.named_modules()`) on the
    first `n_examples` examples of each task's `split`, concatenated over `tasks` in order, under `torch.no_grad`.

    Shape convention: an output's last axis holds the features, every other axis becomes rows, so a (batch, tokens,
    features) output gives batch·tokens rows; `feature_axes` names another axis for some points (1 for NCHW
    convolutions: rows are then batch·height·width, in that order). A module returning a tuple contributes its first
    element.

    With a `cache` (and the `model_identity` the pool gives, `ModelPool.identity`), each (task, point) is stored like
    any other statistic, so a second method aligning the same models runs no forward pass. The examples are the
    first n of each split, so `seed` changes nothing but the key (for callers that sample).
    """
    modules = dict(model.named_modules())
    missing = [p for p in points if p not in modules]
    if missing:
        raise MergebenchError(f"activation points {missing} are not submodules of the model; use names from "
                              f"model.named_modules(), e.g. {', '.join(list(modules)[1:6])}")
    if cache is not None and model_identity is None:
        raise ValueError("caching activations needs the model's identity (ModelPool.identity(name))")

    axes = {p: (feature_axes or {}).get(p, -1) for p in points}

    def key(task: str, point: str) -> StatsKey:
        axis = f"-axis{axes[point]}" if axes[point] != -1 else ""
        return StatsKey(str(model_identity), f"{taskpool.name}/{task}", f"activations-{split}-{point}{axis}",
                        n_examples, seed)

    def run(task: str, todo: Sequence[str]) -> dict[str, torch.Tensor]:
        return _run_points(model, taskpool, task, todo, split, n_examples, batch_size, axes)

    per_task: list[dict[str, torch.Tensor]] = []
    for task in tasks:
        if cache is None:
            per_task.append(run(task, points))
            continue
        keys = {p: key(task, p) for p in points}
        found = _load_activations(cache, keys)
        todo = [p for p in points if p not in found]
        if todo:  # built under the entries' locks, as every cache entry is: once across processes
            with cache.locked([cache.path(keys[p]) for p in todo], f"activations of {model_identity} on {task}"):
                found |= _load_activations(cache, {p: keys[p] for p in todo})  # another process may have built them
                todo = [p for p in points if p not in found]
                if todo:
                    for p, t in run(task, todo).items():
                        found[p] = t
                        cache.save(keys[p], {"activations": t})
        cache.hits += len(points) - len(todo)
        cache.misses += len(todo)
        per_task.append(found)
    return {p: torch.cat([t[p] for t in per_task]) for p in points}


def _load_activations(cache: StatsCache, keys: Mapping[str, StatsKey]) -> dict[str, torch.Tensor]:
    """{point: activations} for the points whose entry is in `cache` and can be trusted."""
    found = {}
    for p, k in keys.items():
        stored = cache.load(k)
        if stored is not None:
            found[p] = stored["activations"]
    return found


def _run_points(model: nn.Module, taskpool: TaskPool, task: str, points: Sequence[str], split: str,
                n_examples: int, batch_size: int, axes: Mapping[str, int]) -> dict[str, torch.Tensor]:
    modules = dict(model.named_modules())
    chunks: dict[str, list[torch.Tensor]] = {p: [] for p in points}

    def hook(point: str) -> Callable[..., None]:
        def record(module: nn.Module, args: tuple[torch.Tensor, ...], output: object) -> None:
            out = output[0] if isinstance(output, tuple) else output
            assert isinstance(out, torch.Tensor)
            out = out.detach().movedim(axes.get(point, -1), -1)
            chunks[point].append(out.reshape(-1, out.shape[-1]).float().cpu())
        return record

    device = next(model.parameters()).device
    was_training = model.training
    handles = [modules[p].register_forward_hook(hook(p)) for p in points]
    try:
        model.eval()  # dropout off: activations are a property of the weights, not of a random mask
        with torch.no_grad():
            for inputs, _ in taskpool.batches(task, split, batch_size=batch_size, limit=n_examples):
                taskpool.logits(model, task, inputs.to(device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    empty = [p for p in points if not chunks[p]]
    if empty:
        raise MergebenchError(f"points {empty} produced no output on task {task!r} ({split} split)")
    return {p: torch.cat(c) for p, c in chunks.items()}
