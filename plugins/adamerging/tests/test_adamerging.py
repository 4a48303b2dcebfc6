"""AdaMerging: TIES processing by hand, and on the embedded pool the entropy goes down with coefficients in [0, 1].
Preference-aware AdaMerging: the uniform preference is plain AdaMerging bit for bit, and the objective's gradient is
Σ_t T·r_t ∇H_t (a vertex: one task's entropy alone), checked against an independent computation."""

from __future__ import annotations

import pytest
import torch

from mergebench_adamerging import (
    AdaMergingPlusPlus,
    LayerWiseAdaMerging,
    Params,
    PreferenceAdaMerging,
    PreferenceParams,
    TaskWiseAdaMerging,
    TiesParams,
    entropy,
    ties_task_vectors,
)
from mergebench_core import PRETRAINED, RunContext
from mergebench_core.contract.config import build_params, parse_overrides
from mergebench_core.errors import ConfigError, MergebenchError
from mergebench_core.pools.views import TaskSubsetModelPool, TaskSubsetTaskPool


def test_ties_task_vectors_by_hand():
    taus = {"a": torch.tensor([[3.0, -1.0], [-2.0, 0.5]]), "b": torch.tensor([[0.1], [4.0]])}
    out = ties_task_vectors(taus, keep=2 / 3)  # keep 2 of 3 entries per task
    # task 0 keeps 3, -1; task 1 keeps -2, 4. Elected signs: a0: 3-2 > 0, a1: -1 < 0, b0: +4 > 0
    torch.testing.assert_close(out["a"], torch.tensor([[3.0, -1.0], [0.0, 0.0]]))
    torch.testing.assert_close(out["b"], torch.tensor([[0.0], [4.0]]))


def _objective(model, taskpool):
    total = 0.0
    with torch.no_grad():
        for t in taskpool.tasks:
            inputs, _ = next(iter(taskpool.batches(t, "test", batch_size=64)))
            total += float(entropy(taskpool.logits(model, t, inputs)))
    return total


def _merged(pool, coeff):
    base = pool.state_dict(PRETRAINED)
    model = pool.load_model(PRETRAINED)
    model.load_state_dict({k: v + coeff * sum(pool.state_dict(e)[k] - v for e in pool.expert_names)
                           for k, v in base.items()})
    return model


@pytest.mark.parametrize("method", [TaskWiseAdaMerging, LayerWiseAdaMerging])
def test_lowers_entropy_and_keeps_coefficients_in_range(method, digits_pools, tmp_path):
    pool, taskpool = digits_pools
    out = method(Params(steps=40, lr=1e-2)).run(pool, RunContext(taskpool=taskpool, cache_dir=tmp_path))
    coeffs = out.extras["coefficients"]
    values = [v for c in coeffs.values() for v in (c.values() if isinstance(c, dict) else [c])]
    assert len(coeffs) == len(pool.expert_names) and all(0.0 <= v <= 1.0 for v in values)
    assert any(abs(v - 0.3) > 1e-3 for v in values)  # they moved
    assert _objective(out.model, taskpool) < _objective(_merged(pool, 0.3), taskpool)


def test_plus_plus_runs_from_ties_vectors(digits_pools, tmp_path):
    pool, taskpool = digits_pools
    out = AdaMergingPlusPlus(TiesParams(steps=5)).run(pool, RunContext(taskpool=taskpool, cache_dir=tmp_path))
    assert set(out.extras["coefficients"]) == set(pool.expert_names)
    assert TiesParams().k == 0.2 and Params().init == 0.3 and Params().lr == 1e-3


def _take(method, taskpool, seed, n):
    stream = method._inputs(RunContext(taskpool=taskpool, seed=seed), "digits")
    return [next(stream) for _ in range(n)]


def test_test_batches_are_shuffled_seeded_and_cover_the_split(digits_pools):
    """As the authors' code and FusionBench: shuffled batches, every pass a permutation of the whole test split."""
    _, taskpool = digits_pools
    inputs = torch.cat([x for x, _ in taskpool.batches("digits", "test")])
    n, bs = len(inputs), 16
    method = LayerWiseAdaMerging(Params(batch_size=bs))
    passes = -(-n // bs)
    batches = _take(method, taskpool, 0, 2 * passes)
    first, second = torch.cat(batches[:passes]), torch.cat(batches[passes:])
    for one in (first, second):  # each pass holds every test input exactly once
        assert torch.equal(torch.sort(one.sum(1)).values, torch.sort(inputs.sum(1)).values)
    assert not torch.equal(first[:bs], inputs[:bs]) and not torch.equal(first, second)
    assert all(torch.equal(a, b) for a, b in zip(batches, _take(method, taskpool, 0, 2 * passes)))
    assert not torch.equal(batches[0], _take(method, taskpool, 1, 1)[0])


def test_a_split_larger_than_the_buffer_is_drawn_through_it(digits_pools):
    _, taskpool = digits_pools
    inputs = torch.cat([x for x, _ in taskpool.batches("digits", "test")])
    method = LayerWiseAdaMerging(Params(batch_size=16, shuffle_buffer=64))
    batches = _take(method, taskpool, 0, 60)  # 960 inputs drawn: more than the split, so the reading wraps
    seen = torch.cat(batches)
    assert all(b.shape == (16, inputs.shape[1]) for b in batches)
    assert (torch.cdist(seen, inputs).min(1).values == 0).all()  # every input drawn is a test input
    assert len(torch.unique(seen, dim=0)) > 64  # the buffer is refilled from the rest of the split
    with pytest.raises(ValueError):
        Params(batch_size=16, shuffle_buffer=8)


# --- preference-aware AdaMerging ---------------------------------------------------------------------------------


@pytest.mark.parametrize("granularity,plain", [("task", TaskWiseAdaMerging), ("layer", LayerWiseAdaMerging)])
def test_uniform_preference_is_plain_adamerging_bit_for_bit(granularity, plain, digits_pools):
    pool, taskpool = digits_pools
    tasks = tuple(taskpool.tasks)
    want = plain(Params(steps=6, lr=1e-2)).run(pool, RunContext(taskpool=taskpool, tasks=tasks))
    uniform = RunContext(taskpool=taskpool, tasks=tasks, preference=tuple(1 / len(tasks) for _ in tasks))
    for ctx in (uniform, RunContext(taskpool=taskpool)):  # a context without tasks is uniform too
        got = PreferenceAdaMerging(PreferenceParams(steps=6, lr=1e-2, granularity=granularity)).run(pool, ctx)
        assert got.extras["coefficients"] == want.extras["coefficients"]  # float == float: the same bits
        assert got.extras["entropy_last"] == want.extras["entropy_last"]
        assert got.extras["task_weights"] == {t: 1.0 for t in tasks} and got.extras["granularity"] == granularity
        assert got.extras["preference"] == {t: 1 / len(tasks) for t in tasks}
        merged, expected = got.model.state_dict(), want.model.state_dict()
        assert all(torch.equal(merged[k], expected[k]) for k in expected)


def _two_tasks(digits_pools, tasks=("digits", "rot90")):
    pool, taskpool = digits_pools
    return TaskSubsetModelPool(pool, list(tasks), "sub"), TaskSubsetTaskPool(taskpool, list(tasks), "sub_tasks")


def _first_gradient(monkeypatch, method, pool, ctx):
    """Run one step of `method` and return the gradient Adam received (the objective's gradient w.r.t. λ)."""
    seen = []
    step = torch.optim.Adam.step

    def recording_step(self, *args, **kwargs):
        seen.append(self.param_groups[0]["params"][0].grad.detach().clone())
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", recording_step)
    out = method.run(pool, ctx)
    assert len(seen) == 1
    return seen[0], out


def _entropy_gradient(pool, taskpool, task, inputs, coeff):
    """∂H_task/∂λ at λ = coeff everywhere, computed apart from the method: H's gradient w.r.t. every parameter of the
    merged nn.Module (no functional_call, no einsum), then the chain rule ∂H/∂λ_{e,k} = <∂H/∂θ_k, τ_{e,k}>.
    Returns (experts, tensors) per tensor and its sum over tensors (the task-wise gradient)."""
    base = pool.state_dict(PRETRAINED)
    experts = [pool.state_dict(e) for e in pool.expert_names]
    keys = [k for k, v in base.items() if v.is_floating_point()]
    model = pool.load_model(PRETRAINED)
    model.load_state_dict({k: v + coeff * sum(e[k] - v for e in experts) if k in keys else v
                           for k, v in base.items()})
    params = dict(model.named_parameters())
    assert set(keys) == set(params)  # every merged tensor is a parameter here, so each has a gradient
    logp = torch.log_softmax(taskpool.logits(model, task, inputs).double(), dim=-1)
    (-(logp.exp() * logp).sum(-1).mean()).backward()
    per_tensor = torch.tensor([[float((params[k].grad.double() * (e[k] - base[k]).double()).sum()) for k in keys]
                               for e in experts], dtype=torch.float64)
    return per_tensor, per_tensor.sum(1, keepdim=True)


def _batch(taskpool, task, position, batch_size):
    """The first batch pa_adamerging draws for `task` (seed 0, stream offset = the task's position)."""
    method = LayerWiseAdaMerging(Params(batch_size=batch_size))
    return next(method._inputs(RunContext(taskpool=taskpool, seed=0), task, offset=position))


@pytest.mark.parametrize("granularity", ["layer", "task"])
@pytest.mark.parametrize("preference", [(1.0, 0.0), (0.25, 0.75)])
def test_the_gradient_is_the_preference_weighted_entropy_gradient(monkeypatch, digits_pools, granularity,
                                                                  preference):
    # (1, 0): the gradient is 2·∇H_digits alone (rot90 is not even run); (0.25, 0.75): 0.5·∇H_digits + 1.5·∇H_rot90
    pool, taskpool = _two_tasks(digits_pools)
    ctx = RunContext(taskpool=taskpool, tasks=("digits", "rot90"), preference=preference, seed=0)
    method = PreferenceAdaMerging(PreferenceParams(steps=1, batch_size=32, granularity=granularity))
    got, out = _first_gradient(monkeypatch, method, pool, ctx)
    want = torch.zeros_like(got, dtype=torch.float64)
    for position, (task, r) in enumerate(zip(("digits", "rot90"), preference)):
        if r:
            layer, task_wise = _entropy_gradient(pool, taskpool, task, _batch(taskpool, task, position, 32), 0.3)
            want += 2 * r * (layer if granularity == "layer" else task_wise)
    assert got.shape == want.shape and want.abs().max() > 1e-4  # a real gradient, not zeros
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-7)
    assert out.extras["task_weights"] == {"digits": 2 * preference[0], "rot90": 2 * preference[1]}
    assert out.extras["preference"] == {"digits": preference[0], "rot90": preference[1]}


def test_a_vertex_learns_from_its_task_alone(digits_pools):
    # with r = (1, 0) the other task's data plays no part: swapping its test inputs changes nothing learned
    pool, taskpool = _two_tasks(digits_pools)
    _, other_taskpool = _two_tasks(digits_pools, ("digits", "mirror"))
    params = PreferenceParams(steps=4, lr=1e-2)
    a = PreferenceAdaMerging(params).run(pool, RunContext(taskpool=taskpool, tasks=("digits", "rot90"),
                                                          preference=(1.0, 0.0)))
    # the same two experts, but the second task's batches now come from `mirror`'s test split
    b = PreferenceAdaMerging(params).run(pool, RunContext(taskpool=_Renamed(other_taskpool, {"rot90": "mirror"}),
                                                          tasks=("digits", "rot90"), preference=(1.0, 0.0)))
    assert a.extras["coefficients"] == b.extras["coefficients"]
    c = PreferenceAdaMerging(params).run(pool, RunContext(taskpool=taskpool, tasks=("digits", "rot90"),
                                                          preference=(0.5, 0.5)))
    assert c.extras["coefficients"] != a.extras["coefficients"]


class _Renamed:
    """A task pool that answers for task `name` with the data and head of another task."""

    def __init__(self, inner, renamed):
        self.inner, self.renamed = inner, renamed
        self.tasks = [t if t not in renamed.values() else next(k for k, v in renamed.items() if v == t)
                      for t in inner.tasks]

    def batches(self, task, split="test", **kwargs):
        return self.inner.batches(self.renamed.get(task, task), split, **kwargs)

    def logits(self, model, task, inputs):
        return self.inner.logits(model, self.renamed.get(task, task), inputs)


def test_preference_parameters_and_flags():
    params = build_params("pa_adamerging", PreferenceParams, {},
                          parse_overrides(["pa_adamerging.granularity=task,layer"]))
    assert [p.granularity for p in params] == ["task", "layer"] and PreferenceParams().granularity == "layer"
    with pytest.raises(ConfigError, match="granularity must be 'task' or 'layer'"):
        build_params("pa_adamerging", PreferenceParams, {}, parse_overrides(["pa_adamerging.granularity=tensor"]))
    info = PreferenceAdaMerging.info
    assert (info.kind, info.data, info.preference_aware, info.task_vectors) == ("merge", "unlabeled", True, True)
    assert not TaskWiseAdaMerging.info.preference_aware
    assert PreferenceAdaMerging(PreferenceParams(granularity="task")).layer_wise is False
    assert PreferenceAdaMerging().layer_wise is True


def test_a_preference_over_other_tasks_is_refused(digits_pools):
    pool, taskpool = _two_tasks(digits_pools)
    ctx = RunContext(taskpool=taskpool, tasks=("digits", "mirror"), preference=(0.5, 0.5))
    with pytest.raises(MergebenchError, match="select the same tasks"):
        PreferenceAdaMerging(PreferenceParams(steps=1)).run(pool, ctx)


class _BnNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 3, 1)
        self.bn = torch.nn.BatchNorm2d(3)
        self.fc = torch.nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


def test_batch_norm_statistics_are_held_out_of_the_learned_combination():
    # batch norm's running statistics cannot carry gradients (torch refuses), and they are not weights: they stay the
    # base's while the coefficients are learned, so with no steps every weight is θ_0 + init·Σ τ and every statistic θ_0's
    from mergebench_core import ModelPool, TaskPool

    torch.manual_seed(0)
    states = {}
    for name in (PRETRAINED, "a", "b"):
        net = _BnNet()
        net.bn.running_mean.uniform_(-1, 1)
        net.bn.running_var.uniform_(0.5, 2)
        states[name] = net.state_dict()

    class Pool(ModelPool):
        name = "bn"
        expert_names = ["a", "b"]

        def load_model(self, name):
            net = _BnNet()
            net.load_state_dict(states[name])
            return net.eval()

    class Tasks(TaskPool):
        name = "bn-tasks"
        tasks = ["a", "b"]

        def batches(self, task, split="test", *, batch_size=256, limit=None):
            g = torch.Generator().manual_seed(len(task) + (split == "test"))
            yield torch.randn(8, 2, 4, 4, generator=g), torch.randint(0, 2, (8,), generator=g)

        def logits(self, model, task, inputs):
            return model(inputs)

    for steps in (0, 3):
        out = LayerWiseAdaMerging(Params(steps=steps, lr=1e-2)).run(Pool(), RunContext(taskpool=Tasks()))
        merged = out.model.state_dict()
        for key in ("bn.running_mean", "bn.running_var", "bn.num_batches_tracked"):
            assert torch.equal(merged[key], states[PRETRAINED][key])
        if steps == 0:
            want = states[PRETRAINED]["conv.weight"] + 0.3 * sum(states[e]["conv.weight"] - states[PRETRAINED]["conv.weight"]
                                                                 for e in ("a", "b"))
            torch.testing.assert_close(merged["conv.weight"], want)
            assert set(out.extras["coefficients"]["a"]) == {"conv.weight", "conv.bias", "bn.weight", "bn.bias",
                                                            "fc.weight", "fc.bias"}
