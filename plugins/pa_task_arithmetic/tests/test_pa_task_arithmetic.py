"""pa_task_arithmetic: the uniform preference is task arithmetic bit for bit; other preferences weight τ_t by T·r_t."""

import torch

from mergebench_core import PRETRAINED, RunContext
from mergebench_core.pools.views import TaskSubsetModelPool, TaskSubsetTaskPool
from mergebench_pa_task_arithmetic import Params, PreferenceTaskArithmetic
from mergebench_task_arithmetic import Params as TaParams
from mergebench_task_arithmetic import TaskArithmetic


def state(output):
    return output.model.state_dict()


def test_uniform_preference_is_task_arithmetic_bit_for_bit(digits_pools):
    pool, taskpool = digits_pools
    tasks = tuple(taskpool.tasks)
    ta = state(TaskArithmetic(TaParams()).run(pool, RunContext(taskpool=taskpool, tasks=tasks)))
    uniform = RunContext(taskpool=taskpool, tasks=tasks, preference=tuple(1 / len(tasks) for _ in tasks))
    pa = state(PreferenceTaskArithmetic(Params()).run(pool, uniform))
    none = state(PreferenceTaskArithmetic(Params()).run(pool, RunContext(taskpool=taskpool, tasks=tasks)))
    for key in ta:
        assert torch.equal(ta[key], pa[key]) and torch.equal(ta[key], none[key])


def test_weights_are_the_number_of_tasks_times_the_preference(digits_pools):
    pool, taskpool = digits_pools
    tasks = ["digits", "rot90"]
    sub_pool = TaskSubsetModelPool(pool, tasks, "sub")
    sub_tasks = TaskSubsetTaskPool(taskpool, tasks, "sub_tasks")
    ctx = RunContext(taskpool=sub_tasks, tasks=tuple(tasks), preference=(0.75, 0.25))
    out = PreferenceTaskArithmetic(Params(scaling_factor=0.4)).run(sub_pool, ctx)
    assert out.extras["task_weights"] == {"digits": 1.5, "rot90": 0.5}
    base, a, b = (pool.state_dict(n) for n in (PRETRAINED, "digits", "rot90"))
    merged = out.model.state_dict()
    for key in base:  # θ_0 + λ (1.5 τ_digits + 0.5 τ_rot90), computed independently
        expected = base[key] + 0.4 * (1.5 * (a[key] - base[key]) + 0.5 * (b[key] - base[key]))
        assert torch.allclose(merged[key], expected, atol=1e-6)
