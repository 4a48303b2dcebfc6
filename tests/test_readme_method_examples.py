"""The README's smallest plugin of each kind runs as written and gives a number known in advance.

Each example is loaded the way an installed plugin is: its `pyproject.toml` block must declare the module as a
`mergebench` entry point, and the module's code (from the README) is registered under that name next to every
installed plugin. The data-free example is pip-installed by `test_third_party_plugin.py`.
"""

from __future__ import annotations

import re
import sys
import tomllib
import types
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mergebench_core import PRETRAINED, RunContext
from mergebench_core.cli import main
from mergebench_core.contract import registry as registry_module
from mergebench_core.contract.permutations import PermutationSpec, mlp_permutation_spec
from mergebench_core.fusion.alignment import apply_permutation
from mergebench_core.pools.states import StateDictPool
from mergebench_core.results.store import ResultStore
from mergebench_core.training.loop import TrainConfig, TrainState

README = Path(__file__).resolve().parent.parent / "README.md"
EXAMPLES = {"input_energy": "mergebench-input-energy", "mtl": "mergebench-mtl", "l2sp": "mergebench-l2sp",
            "norm_sort": "mergebench-norm-sort"}


def readme_block(title: str) -> str:
    """The code block that follows the README line `<!-- plugin-example: TITLE -->`."""
    match = re.search(rf"<!-- plugin-example: {re.escape(title)} -->\s*```\w*\n(.*?)```", README.read_text(), re.S)
    assert match, f"README lacks the plugin example block {title!r}"
    return match.group(1)


def load_example(dist: str, monkeypatch: pytest.MonkeyPatch) -> tuple[str, types.ModuleType]:
    """(entry-point name, module) of the README's plugin `dist`, checked against its pyproject block; the module is
    importable by its name while the test runs (dataclasses look their module up)."""
    project = tomllib.loads(readme_block(f"{dist}/pyproject.toml"))
    assert project["project"]["name"] == dist
    ((entry, module_name),) = project["project"]["entry-points"]["mergebench"].items()
    assert project["tool"]["setuptools"]["py-modules"] == [module_name]
    module = types.ModuleType(module_name)
    monkeypatch.setitem(sys.modules, module_name, module)
    code = compile(readme_block(f"{dist}/{module_name}.py"), f"README.md:{module_name}.py", "exec")
    exec(code, module.__dict__)  # noqa: S102 - the README's own example, the point of the test
    return entry, module


@pytest.fixture()
def examples(monkeypatch, cli_env):
    """The four examples, registered as plugins next to every installed one, in a CLI environment."""
    loaded = {}
    for entry, dist in EXAMPLES.items():
        name, module = load_example(dist, monkeypatch)
        assert name == entry
        loaded[entry] = module
    registry = registry_module.build_registry(extra_modules=list(loaded.values()))
    monkeypatch.setattr(registry_module, "_REGISTRY", registry)
    return loaded


def test_each_example_is_short():
    for dist in EXAMPLES.values():
        module = dist.replace("-", "_")
        lines = [line for line in readme_block(f"{dist}/{module}.py").splitlines() if line.strip()]
        assert 15 <= len(lines) <= 40, (dist, len(lines))


def test_input_energy_weighs_each_column_by_its_input_energy(examples):
    method = examples["input_energy"].InputEnergy(examples["input_energy"].Params(floor=0.0))
    states = [{"fc.weight": torch.tensor([[1.0, 2.0]]), "fc.bias": torch.tensor([0.0])},
              {"fc.weight": torch.tensor([[3.0, 4.0]]), "fc.bias": torch.tensor([2.0])}]
    energies = [{"fc": torch.tensor([1.0, 3.0])}, {"fc": torch.tensor([3.0, 1.0])}]
    merged, covered = method.merge_states(states, energies)
    # column 0: (1·1 + 3·3) / 4 = 2.5; column 1: (2·3 + 4·1) / 4 = 2.5; the bias is no weight: the mean, 1
    assert torch.equal(merged["fc.weight"], torch.tensor([[2.5, 2.5]])) and covered == ["fc.weight"]
    assert torch.equal(merged["fc.bias"], torch.tensor([1.0]))


def test_input_energy_runs_on_the_embedded_pool(examples, cli_env):
    assert main(["run", "-m", "input_energy", "-p", "digits-mlp_TA8", "input_energy.n_examples=64"]) == 0
    rows = {r.method: r for r in ResultStore(cli_env / "results.sqlite").all()}
    assert rows["input_energy"].status == "ok"
    assert rows["input_energy"].mean > rows["pretrained"].mean + 0.05  # it kept some of what the experts learned


def _state(taskpool, tasks, preference=None):
    return TrainState(1, tasks, torch.device("cpu"), torch.Generator(), taskpool, TrainConfig(), preference=preference)


def _batches(taskpool, tasks):
    return {t: next(iter(taskpool.batches(t, "train", batch_size=16))) for t in tasks}


def test_mtl_minimises_the_preference_weighted_sum(examples, digits_pools):
    pool, taskpool = digits_pools
    model, tasks = pool.load_model(PRETRAINED), ("digits", "rot90")
    batches = _batches(taskpool, tasks)
    ce = {t: F.cross_entropy(taskpool.logits(model, t, x), y) for t, (x, y) in batches.items()}
    method = examples["mtl"].MultiTask()
    loss = method.loss(model, batches, _state(taskpool, tasks, preference=(0.25, 0.75)))
    torch.testing.assert_close(loss, 0.25 * ce["digits"] + 0.75 * ce["rot90"])
    torch.testing.assert_close(method.loss(model, batches, _state(taskpool, tasks)), (ce["digits"] + ce["rot90"]) / 2)
    assert method.train_config().steps == 100


def test_l2sp_adds_the_pull_towards_the_starting_weights(examples, digits_pools):
    pool, taskpool = digits_pools
    model, tasks = pool.load_model(PRETRAINED), ("digits",)
    batches = _batches(taskpool, tasks)
    method, state = examples["l2sp"].L2SP(examples["l2sp"].Params(alpha=0.2)), _state(taskpool, tasks)
    ce = F.cross_entropy(taskpool.logits(model, "digits", batches["digits"][0]), batches["digits"][1])
    torch.testing.assert_close(method.loss(model, batches, state), ce)  # at θ0 the pull is zero
    weight = next(model.parameters())
    with torch.no_grad():
        weight += 0.5
    ce = F.cross_entropy(taskpool.logits(model, "digits", batches["digits"][0]), batches["digits"][1])
    torch.testing.assert_close(method.loss(model, batches, state), ce + 0.2 / 2 * 0.25 * weight.numel())


def test_l2sp_derives_a_pool_that_merge_methods_run_on(examples, cli_env):
    assert main(["run", "-m", "simple_average", "-p", "digits-mlp_TA8+l2sp(steps=2)"]) == 0
    rows = [r for r in ResultStore(cli_env / "results.sqlite").all() if r.method == "simple_average"]
    assert [(r.modelpool, r.status) for r in rows] == [("digits-mlp_TA8+l2sp(steps=2)", "ok")]


def _mlp():
    return nn.Sequential(OrderedDict(fc1=nn.Linear(4, 6), act=nn.ReLU(), fc2=nn.Linear(6, 3)))


def test_norm_sort_fuses_a_model_with_a_permuted_copy_of_itself_into_that_model(examples):
    torch.manual_seed(0)
    spec = mlp_permutation_spec(["fc1", "fc2"])
    reference = _mlp().state_dict()
    shuffled = apply_permutation(spec, reference, {"P_fc1": torch.tensor([3, 0, 5, 1, 4, 2])})
    pool = StateDictPool(_mlp, {"a": reference, "b": shuffled}, spec)
    out = examples["norm_sort"].NormSort().run(pool, RunContext())
    fused = out.model.state_dict()
    assert all(torch.equal(fused[k], reference[k]) for k in reference)  # the average of a model with itself
    assert out.extras["alignment"] == {"b": {"P_fc1": 5}}  # unit 4 stays put


def test_norm_sort_refuses_pools_it_cannot_serve(examples):
    norm_sort = examples["norm_sort"]
    blocks = PermutationSpec({"fc1.weight": ("H", None), "fc2.weight": (None, "H")}, blocks={"H": 2})
    pool = StateDictPool(_mlp, {"a": _mlp().state_dict(), "b": _mlp().state_dict()}, blocks)
    assert "permutes blocks of them; use git_rebasin" in norm_sort.NormSort.refusal(pool, norm_sort.Params())
    bare = StateDictPool(_mlp, {"a": _mlp().state_dict(), "b": _mlp().state_dict()}, None)
    assert "declares no permutation spec" in norm_sort.NormSort.refusal(bare, norm_sort.Params())
