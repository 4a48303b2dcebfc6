"""Level-by-level fusion of independently trained models: level inputs and outputs, target neurons, least squares.

The neuron-interpolation methods (HF and KF linear fusion, and gradient-based fusion, ALF) build the fused model one
level at a time (a level is a submodule the pool declares, `alignment.Level`: a layer, or a transformer block):

1. run the fused model built so far, and capture the level's *input* on the fusion samples;
2. collect every base model's *output* of the same level on the same samples (cached, `alignment.collect_activations`);
3. form the fused level's *target neurons* from the base models' neurons: pairs by Hungarian matching to a reference
   model (`hungarian_targets`), or clusters by weighted K-means over all models' neurons (`kmeans_targets`), each
   target the importance-weighted mean of its members' activations; the last level keeps the class order and
   averages the models' logits;
4. fit the fused level so it reproduces the targets from its own input: in closed form by least squares for a
   Linear or Conv2d level (`fit_linear_level`), or by gradient descent (ALF, in its plugin).

Neurons are compared as activation vectors (one entry per sample and position). This module also measures the loss
barrier on the linear path between two models (`interpolation_curve`, `loss_barrier`); the pools fusion runs on
(`StateDictPool`, `CheckpointFolderPool`) and the check that a pool's models share one architecture (`load_states`)
are in `mergebench_core.pools`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mergebench_core.contract.api import ModelPool, TaskPool
from mergebench_core.errors import MergebenchError

IMPORTANCES = ("uniform", "activation")


# -- level inputs and outputs ---------------------------------------------------------------------------------------

def features_last(t: torch.Tensor, axis: int = -1) -> torch.Tensor:
    """(rows, features): `axis` becomes the last axis and every other axis becomes rows (NCHW → N·H·W rows)."""
    t = t.movedim(axis, -1)
    return t.reshape(-1, t.shape[-1])


def capture_level(model: nn.Module, module: str, taskpool: TaskPool, tasks: Sequence[str], *, n_examples: int,
                  batch_size: int = 256, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, outputs) of submodule `module` in their own shapes, batches concatenated along the first axis, on the
    first `n_examples` examples of each task's split, without gradients. The input is the module's first positional
    argument."""
    modules = dict(model.named_modules())
    if module not in modules:
        raise MergebenchError(f"level {module!r} is not a submodule of the model; use names from "
                              f"model.named_modules(), e.g. {', '.join(list(modules)[1:6])}")
    ins: list[torch.Tensor] = []
    outs: list[torch.Tensor] = []

    def record(mod: nn.Module, args: tuple[torch.Tensor, ...], output: object) -> None:
        out = output[0] if isinstance(output, tuple) else output
        assert isinstance(out, torch.Tensor)
        ins.append(args[0].detach())
        outs.append(out.detach())

    handle = modules[module].register_forward_hook(record)
    was_training = model.training
    try:
        model.eval()
        device = next(model.parameters()).device
        with torch.no_grad():
            for task in tasks:
                for inputs, _ in taskpool.batches(task, split, batch_size=batch_size, limit=n_examples):
                    taskpool.logits(model, task, inputs.to(device))
    finally:
        handle.remove()
        model.train(was_training)
    if not ins:
        raise MergebenchError(f"level {module!r} saw no input ({split} split of {list(tasks)})")
    return torch.cat(ins), torch.cat(outs)


# -- neuron importance ----------------------------------------------------------------------------------------------

def neuron_importance(activations: torch.Tensor, method: str = "uniform") -> torch.Tensor:
    """(units,) weights of a model's neurons from its (rows, units) activations, with mean 1: "uniform" (all 1), or
    "activation" (the mean absolute activation, floored at 1 % of the largest, so no neuron weighs nothing)."""
    n = activations.shape[1]
    if method == "uniform":
        return torch.ones(n, dtype=torch.float64)
    if method == "activation":
        s = activations.detach().abs().to(torch.float64).mean(0)
        s = s.clamp_min(0.01 * float(s.max()) if float(s.max()) > 0 else 1.0)
        return s * (n / s.sum())
    raise MergebenchError(f"unknown neuron importance {method!r}; choose one of {', '.join(IMPORTANCES)}")


# -- target neurons -------------------------------------------------------------------------------------------------

@dataclass
class Targets:
    """The fused level's target neurons: `values` (rows, units) and, for each base model, the target unit each of its
    neurons went to (`assignment[k][j]`, or -1 for a neuron no target uses)."""

    values: torch.Tensor
    assignment: list[torch.Tensor]
    cost: float = 0.0


def _as64(ts: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [t.detach().to("cpu", torch.float64) for t in ts]


def pair_costs(a0: torch.Tensor, a1: torch.Tensor, s0: torch.Tensor, s1: torch.Tensor,
               p0: torch.Tensor | None = None, p1: torch.Tensor | None = None) -> torch.Tensor:
    """(n0, n1) HF matching costs: for neurons i of model 0 and j of model 1, the merged neuron is the importance-
    weighted mean ŷ_ij = (s0_i p0_i + s1_j p1_j) / (s0_i + s1_j) of their reproducible parts p (their projections on
    what the fused level's input can express; the activations themselves when `p` is None), and the cost is
    s0_i ‖ŷ_ij − a0_i‖ + s1_j ‖ŷ_ij − a1_j‖: how far the merged neuron lands from each original. Computed from Gram
    matrices in O(n² · rows) without forming ŷ_ij."""
    a0, a1, s0, s1 = _as64([a0, a1, s0, s1])
    p0 = a0 if p0 is None else _as64([p0])[0]
    p1 = a1 if p1 is None else _as64([p1])[0]
    alpha = s0[:, None] / (s0[:, None] + s1[None, :])
    beta = 1.0 - alpha
    pp0, pp1 = (p0 * p0).sum(0), (p1 * p1).sum(0)
    g01 = p0.T @ p1
    shared = alpha**2 * pp0[:, None] + beta**2 * pp1[None, :] + 2 * alpha * beta * g01
    e = shared + (a0 * a0).sum(0)[:, None] - 2 * alpha * (p0 * a0).sum(0)[:, None] - 2 * beta * (a0.T @ p1)
    f = shared + (a1 * a1).sum(0)[None, :] - 2 * alpha * (p0.T @ a1) - 2 * beta * (p1 * a1).sum(0)[None, :]
    return s0[:, None] * e.clamp_min(0).sqrt() + s1[None, :] * f.clamp_min(0).sqrt()


def hungarian_targets(acts: Sequence[torch.Tensor], importance: Sequence[torch.Tensor],
                      projections: Sequence[torch.Tensor] | None = None, *, identity: bool = False) -> Targets:
    """HF targets: every model's neurons matched one-to-one to the first (reference) model's by the linear
    assignment minimising `pair_costs`; target i is the importance-weighted mean of reference neuron i and the neurons
    matched to it. With more than two models each is matched to the reference on its own (star-shaped). `identity`
    keeps unit i with unit i (the output level, whose units are classes)."""
    from scipy.optimize import linear_sum_assignment

    acts, importance = _as64(acts), _as64(importance)
    n = acts[0].shape[1]
    if any(a.shape[1] != n for a in acts):
        raise MergebenchError(f"Hungarian fusion needs equal widths, got {[a.shape[1] for a in acts]}")
    total = acts[0] * importance[0]
    weight = importance[0].clone()
    assignment = [torch.arange(n)]
    cost = 0.0
    for k in range(1, len(acts)):
        if identity:
            cols = torch.arange(n)
        else:
            p0 = projections[0] if projections is not None else None
            pk = projections[k] if projections is not None else None
            c = pair_costs(acts[0], acts[k], importance[0], importance[k], p0, pk)
            _, found = linear_sum_assignment(c.numpy())
            cols = torch.as_tensor(found, dtype=torch.long)
            cost += float(c[torch.arange(n), cols].sum())
        total = total + acts[k][:, cols] * importance[k][cols]
        weight = weight + importance[k][cols]
        assign = torch.empty(n, dtype=torch.long)
        assign[cols] = torch.arange(n)
        assignment.append(assign)
    return Targets(total / weight, assignment, cost)


def _sq_dists(points: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """(points, centroids) squared Euclidean distances between rows."""
    d = (points * points).sum(1)[:, None] + (centroids * centroids).sum(1)[None, :] - 2 * points @ centroids.T
    return d.clamp_min(0)


def _centroids(points: torch.Tensor, weights: torch.Tensor, assign: torch.Tensor, k: int) -> torch.Tensor:
    sums = torch.zeros(k, points.shape[1], dtype=points.dtype).index_add_(0, assign, points * weights[:, None])
    mass = torch.zeros(k, dtype=points.dtype).index_add_(0, assign, weights)
    return sums / mass.clamp_min(1e-300)[:, None]


def _lloyd(points: torch.Tensor, weights: torch.Tensor, centroids: torch.Tensor, max_iter: int
           ) -> tuple[torch.Tensor, float]:
    k = centroids.shape[0]
    rows = torch.arange(len(points))
    dist = _sq_dists(points, centroids)
    assign = dist.argmin(1)
    for _ in range(max_iter):
        counts = torch.bincount(assign, minlength=k)
        if bool((counts == 0).any()):  # refill: the farthest (weighted) neurons of clusters that have several
            own = dist[rows, assign] * weights
            for empty in torch.nonzero(counts == 0)[:, 0].tolist():
                moved = int(torch.where(counts[assign] > 1, own, torch.full_like(own, -1.0)).argmax())
                counts[assign[moved]] -= 1
                assign[moved], counts[empty], own[moved] = empty, 1, -1.0
        centroids = _centroids(points, weights, assign, k)
        dist = _sq_dists(points, centroids)
        new = dist.argmin(1)
        if torch.equal(new, assign):
            break
        assign = new
    centroids = _centroids(points, weights, assign, k)
    cost = float((_sq_dists(points, centroids)[rows, assign] * weights).sum())
    return assign, cost


def _kmeans_pp(points: torch.Tensor, weights: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """k-means++ seeding (each next centroid drawn with probability ∝ weight · squared distance to the nearest)."""
    first = int(torch.multinomial(weights.float(), 1, generator=gen))
    chosen = [first]
    d = _sq_dists(points, points[first:first + 1])[:, 0]
    for _ in range(1, k):
        p = (d * weights).float()
        nxt = int(torch.multinomial(p, 1, generator=gen)) if float(p.sum()) > 0 else int(torch.randint(
            len(points), (1,), generator=gen))
        chosen.append(nxt)
        d = torch.minimum(d, _sq_dists(points, points[nxt:nxt + 1])[:, 0])
    return points[chosen].clone()


def kmeans_targets(acts: Sequence[torch.Tensor], importance: Sequence[torch.Tensor], k: int, *,
                   restarts: int = 3, max_iter: int = 100, generator: torch.Generator | None = None,
                   identity: bool = False) -> Targets:
    """KF targets: weighted K-means (Lloyd, squared Euclidean) over every model's neurons as activation vectors, k
    clusters, each neuron weighing its importance; a target is its cluster's weighted mean activation.

    The first run starts from the reference's (first model's) neurons, the other `restarts` − 1 from k-means++ draws
    of `generator`; the lowest cost wins. Clusters are then ordered like the reference's neurons (a linear assignment
    of centroids to reference neurons by distance), so a fused level can start from the reference's weights. An empty
    cluster takes the farthest neuron of a cluster that has more than one. `identity`: unit i of every model forms
    cluster i (the output level)."""
    from scipy.optimize import linear_sum_assignment

    acts, importance = _as64(acts), _as64(importance)
    points = torch.cat([a.T for a in acts])  # (all neurons, rows)
    weights = torch.cat(importance)
    sizes = [a.shape[1] for a in acts]
    if identity:
        if any(s != k for s in sizes):
            raise MergebenchError(f"the output level keeps its {k} units in place, but the models have {sizes}")
        assign = torch.arange(k).repeat(len(acts))
        cost = 0.0
    else:
        if k > len(points):
            raise MergebenchError(f"K-means into {k} target neurons needs at least {k} neurons, the models have "
                                  f"{len(points)}")
        generator = generator if generator is not None else torch.Generator().manual_seed(0)
        best: tuple[torch.Tensor, float] | None = None
        for run in range(max(1, restarts)):
            start = points[:sizes[0]][:k].clone() if run == 0 and sizes[0] >= k else \
                _kmeans_pp(points, weights, k, generator)
            assign, cost = _lloyd(points, weights, start, max_iter)
            if best is None or cost < best[1] - 1e-12 * abs(best[1]):
                best = (assign, cost)
        assert best is not None
        assign, cost = best
        centroids = _centroids(points, weights, assign, k)
        ref = points[:sizes[0]]
        _, order = linear_sum_assignment(_sq_dists(centroids, ref).T.numpy())  # reference neuron i → cluster order[i]
        if sizes[0] == k:
            rank = torch.empty(k, dtype=torch.long)
            rank[torch.as_tensor(order, dtype=torch.long)] = torch.arange(k)
            assign = rank[assign]
    values = _centroids(points, weights, assign, k).T.contiguous()
    assignment = list(assign.split(sizes))
    return Targets(values, assignment, cost)


def match_to_inputs(targets: Targets, inputs: torch.Tensor) -> Targets:
    """For a residual level (output = input + f(input)): reorder the target units so that unit i best matches input
    feature i (a linear assignment by distance between the (rows, units) inputs and targets), because the skip
    connection carries input feature i into output unit i."""
    from scipy.optimize import linear_sum_assignment

    x, t = _as64([inputs])[0], targets.values
    if x.shape != t.shape:
        raise MergebenchError(f"a residual level's targets {tuple(t.shape)} must have its inputs' shape "
                              f"{tuple(x.shape)}")
    _, cols = linear_sum_assignment(_sq_dists(x.T, t.T).numpy())  # input feature i ← target cols[i]
    cols_t = torch.as_tensor(cols, dtype=torch.long)
    rank = torch.empty_like(cols_t)
    rank[cols_t] = torch.arange(len(cols_t))
    assignment = [torch.where(a >= 0, rank[a.clamp_min(0)], a) for a in targets.assignment]
    return Targets(t[:, cols_t], assignment, targets.cost)


# -- closed-form levels ---------------------------------------------------------------------------------------------

LINEAR_LEVELS = (nn.Linear, nn.Conv2d)


def design_matrix(module: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """(rows, unknowns per unit): the level's inputs as a least-squares design matrix, a column of ones appended
    when the module has a bias. Linear: one row per sample (and token); Conv2d: one row per sample and output
    position (the unfolded receptive fields, channel-major, as the weight is laid out)."""
    if isinstance(module, nn.Linear):
        x = inputs.reshape(-1, module.in_features)
    elif isinstance(module, nn.Conv2d):
        if module.groups != 1 or module.padding_mode != "zeros" or isinstance(module.padding, str):
            raise MergebenchError("least-squares fusion supports Conv2d with groups=1 and numeric zero padding")
        cols = F.unfold(inputs, module.kernel_size, dilation=module.dilation, padding=module.padding,
                        stride=module.stride)
        x = cols.transpose(1, 2).reshape(-1, cols.shape[1])
    else:
        raise MergebenchError(f"least squares fits nn.Linear or nn.Conv2d levels, not {type(module).__name__}")
    x = x.to(torch.float64)
    if module.bias is not None:
        x = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
    return x


def least_squares(x: torch.Tensor, targets: torch.Tensor, *, level: str = "", n_examples: int | None = None
                  ) -> torch.Tensor:
    """The minimum-norm least-squares solution W of x W ≈ targets (float64; SVD-based, so dead inputs cost nothing).

    Fewer rows than unknowns leaves the fit underdetermined, so that is refused with a `MergebenchError` that says
    how many fusion samples the level needs."""
    rows, unknowns = x.shape
    if rows < unknowns:
        per_example = rows / n_examples if n_examples else None
        need = math.ceil(unknowns / per_example) if per_example else None
        raise MergebenchError(
            f"least squares for level {level!r} has {rows} rows of inputs for {unknowns} unknowns per neuron "
            f"({unknowns} inputs, bias included): fewer samples than unknowns leave the fit underdetermined; "
            + (f"raise num_fusion_samples from {n_examples} to at least {need}" if need else
               "use more fusion samples"))
    x, t = x.to(torch.float64), targets.to(torch.float64)
    if x.device.type == "cpu":
        return torch.linalg.lstsq(x, t, driver="gelsd").solution
    return torch.linalg.pinv(x) @ t


def linear_projection(module: nn.Module, inputs: torch.Tensor, outputs: torch.Tensor, *, level: str = "",
                      n_examples: int | None = None) -> torch.Tensor:
    """The part of each output column the level can express from these inputs: X (X⁺ outputs), (rows, units)."""
    x = design_matrix(module, inputs)
    return x @ least_squares(x, outputs, level=level, n_examples=n_examples)


def level_weights(module: nn.Module) -> torch.Tensor:
    """(unknowns, out units): a Linear or Conv2d level's weight and bias laid out like `design_matrix`'s columns."""
    w = module.weight.detach().to(torch.float64).reshape(module.weight.shape[0], -1).T
    if module.bias is not None:
        w = torch.cat([w, module.bias.detach().to(torch.float64)[None]])
    return w


def fit_linear_level(module: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, *, level: str = "",
                     n_examples: int | None = None) -> float:
    """Set `module`'s weight and bias (in place) to the least-squares fit of `targets` (rows, out units; rows in the
    design matrix's order) from `inputs`; returns the fit's relative residual ‖XW − T‖ / ‖T‖.

    Among the least-squares solutions it takes the one closest to the module's current weights,
    W = W₀ + X⁺(T − X W₀): directions the inputs never excite (a ReLU unit that is zero on every fusion sample)
    keep their starting weights instead of being zeroed, so a level that already reproduces its targets is left
    exactly as it was."""
    x = design_matrix(module, inputs)
    out = module.weight.shape[0]
    if targets.shape[1] != out:
        raise MergebenchError(f"level {level!r} has {out} output units, but {targets.shape[1]} targets were given")
    t = targets.to(torch.float64)
    w0 = level_weights(module)
    w = w0 + least_squares(x, t - x @ w0, level=level, n_examples=n_examples)
    residual = float((x @ w - t).norm() / t.norm().clamp_min(1e-300))
    with torch.no_grad():
        if module.bias is not None:
            module.bias.copy_(w[-1].to(module.bias.dtype))
            w = w[:-1]
        module.weight.copy_(w.T.reshape(module.weight.shape).to(module.weight.dtype))
    return residual


# -- the linear path between two models -----------------------------------------------------------------------------

def interpolate(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], t: float) -> dict[str, torch.Tensor]:
    """(1 − t)·a + t·b for floating tensors; other tensors (integer buffers) from a."""
    return {k: ((1 - t) * v.double() + t * b[k].double()).to(v.dtype) if v.is_floating_point() else v
            for k, v in a.items()}


def interpolation_curve(model: nn.Module, a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor],
                        taskpool: TaskPool, *, points: int = 11, split: str = "test", limit: int | None = None,
                        tasks: Sequence[str] | None = None) -> list[dict[str, float]]:
    """[{"t", "loss", "accuracy"}]: the models (1 − t)·a + t·b for `points` evenly spaced t in [0, 1], each loaded
    into `model` (an instance of the architecture) and scored on `split`, loss and accuracy averaged over tasks."""
    from mergebench_core.data.evaluation import evaluate

    if points < 2:
        raise ValueError("a curve needs at least its two ends")
    curve = []
    for i in range(points):
        t = i / (points - 1)
        model.load_state_dict(interpolate(a, b, t))
        scores = evaluate(taskpool, model, tasks=tasks, limit=limit, split=split)
        curve.append({"t": t, "loss": sum(s["loss"] for s in scores.values()) / len(scores),
                      "accuracy": sum(s["accuracy"] for s in scores.values()) / len(scores)})
    return curve


def loss_barrier(curve: Sequence[Mapping[str, float]], key: str = "loss") -> float:
    """The largest rise of the curve above the straight line between its ends: max_t L(t) − ((1 − t) L(0) + t L(1))
    (Frankle et al., 2020; Git Re-Basin's barrier). For accuracy, pass key="accuracy" and read the result as the
    largest *drop* (it is computed as a rise of −accuracy)."""
    sign = -1.0 if key == "accuracy" else 1.0
    first, last = sign * curve[0][key], sign * curve[-1][key]
    return max(sign * p[key] - ((1 - p["t"]) * first + p["t"] * last) for p in curve)


# -- what a fusion method needs from a pool -------------------------------------------------------------------------

def cannot_fuse(pool: ModelPool, *, levels: bool = False) -> str | None:
    """Why no fusion method can run on `pool` (no permutation spec, fewer than two models, or, with `levels`, no
    fusion levels), phrased as what to change; None when it can."""
    spec = pool.permutation_spec()
    if spec is None:
        return (f"pool {pool.name!r} declares no permutation spec, so its hidden units cannot be aligned; the "
                f"pool's permutation_spec() must return a mergebench_core.contract.permutations.PermutationSpec (for a "
                f"chain of Linear layers, mlp_permutation_spec([...layer names...]))")
    if len(pool.expert_names) < 2:
        return f"pool {pool.name!r} has fewer than two models to fuse"
    if levels and not spec.levels:
        return (f"pool {pool.name!r} declares no fusion levels; its permutation spec must list them "
                f"(PermutationSpec(levels=[Level('fc1'), ...]): the submodules to fuse one after another, in forward "
                f"order)")
    return None


def missing_points(spec: object) -> list[str]:
    """The permutations of `spec` with no activation point (activation-based alignment needs one for each)."""
    return [p for p in getattr(spec, "perms", {}) if p not in getattr(spec, "points", {})]
