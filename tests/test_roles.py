"""Tensor roles: which tensors are matrices (and how a convolution kernel becomes one), which are running statistics,
and the rule that settles running statistics after a merge (`bn_stats`: base, mean, recompute), from the roles
themselves through the streaming engine to a run's cells and their identity."""

from __future__ import annotations

import logging
import types
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from torch import nn

from mergebench_core import PRETRAINED, MergeOutput, Method, MethodInfo, ModelPool, RunContext, TaskPool, hookimpl
from mergebench_core.errors import ConfigError, MergebenchError
from mergebench_core.engine.merging import MatrixTaskVectorMethod, TensorMergeMethod, merge_sources
from mergebench_core.engine.roles import LINEAR, MatrixView, Role, role_from_name, roles_of
from mergebench_core.engine.running_stats import recompute_running_stats, settle_running_stats
from mergebench_core.engine.tensors import StateDictSource

C_IN, SIDE, N_TRAIN = 3, 6, 24


class ConvNet(nn.Module):
    """1×1 conv → BN → ReLU → 3×3 conv → BN → ReLU → global average → Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(C_IN, 4, 1)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 5, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(5)
        self.fc = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


def conv_net(seed: int, stats_seed: int | None = None) -> ConvNet:
    """A ConvNet with weights from `seed` and distinct running statistics (from `stats_seed`, default `seed`)."""
    torch.manual_seed(seed)
    model = ConvNet()
    g = torch.Generator().manual_seed(1000 + (seed if stats_seed is None else stats_seed))
    for bn in (model.bn1, model.bn2):
        bn.running_mean.copy_(torch.randn(bn.num_features, generator=g))
        bn.running_var.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
        bn.num_batches_tracked.fill_(int(torch.randint(1, 100, (1,), generator=g)))
    return model.eval()


class ConvPool(ModelPool):
    """A pretrained ConvNet and two experts near it (small perturbations of every weight and statistic)."""

    name = "convnet"
    default_taskpool = "images"

    def __init__(self) -> None:
        base = conv_net(0)
        self.states = {PRETRAINED: base.state_dict()}
        for i, task in enumerate(self.expert_names, start=1):
            g = torch.Generator().manual_seed(i)
            state = {}
            for k, v in base.state_dict().items():
                state[k] = v + 0.1 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v + i
            state = {k: v.abs() + 0.1 if k.endswith("running_var") else v for k, v in state.items()}
            self.states[task] = state

    @property
    def expert_names(self) -> list[str]:
        return ["a", "b"]

    def load_model(self, name: str) -> nn.Module:
        model = ConvNet()
        model.load_state_dict(self.states[name])
        return model.eval()


class ImageTasks(TaskPool):
    """Two tasks of random C_IN × SIDE × SIDE images with shifted means; logits are the network's outputs."""

    name = "images"

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(7)
        self.x = {t: torch.randn(N_TRAIN, C_IN, SIDE, SIDE, generator=g) + i for i, t in enumerate(self.tasks)}
        self.y = {t: torch.randint(0, 3, (N_TRAIN,), generator=g) for t in self.tasks}

    @property
    def tasks(self) -> list[str]:
        return ["a", "b"]

    def batches(self, task: str, split: str = "test", *, batch_size: int = 256,
                limit: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        x, y = self.x[task][:limit], self.y[task][:limit]
        for i in range(0, len(x), batch_size):
            yield x[i:i + batch_size], y[i:i + batch_size]

    def logits(self, model: nn.Module, task: str, inputs: torch.Tensor) -> torch.Tensor:
        return model(inputs)


@dataclass
class NoParams:
    pass


# -- roles ----------------------------------------------------------------------------------------------------------

def test_roles_of_a_conv_net_come_from_its_modules():
    model = ConvNet()
    roles = roles_of(model)
    assert set(roles) == set(model.state_dict())
    assert roles["conv1.weight"] == roles["conv2.weight"] == Role("weight", MatrixView("conv"))
    assert roles["fc.weight"] == LINEAR
    assert {roles[k].kind for k in ("conv1.bias", "conv2.bias", "fc.bias")} == {"bias"}
    assert {roles[f"bn{i}.{p}"].kind for i in (1, 2) for p in ("weight", "bias")} == {"norm"}
    assert {roles[f"bn{i}.{p}"].kind for i in (1, 2)
            for p in ("running_mean", "running_var", "num_batches_tracked")} == {"running_stat"}
    grouped = roles_of(nn.Conv2d(4, 6, 3, groups=2))["weight"]
    assert grouped.view == MatrixView("conv", 2) and not grouped.view.usable
    assert roles_of(nn.Embedding(10, 3))["weight"] == Role("embedding", MatrixView("embedding"))
    shared = nn.Linear(2, 2)
    assert set(roles_of(nn.Sequential(shared, shared))) == {"0.weight", "0.bias", "1.weight", "1.bias"}


@pytest.mark.parametrize("name, shape, dtype, kind, view", [
    ("features.3.running_var", (8,), torch.float32, "running_stat", None),
    ("features.3.num_batches_tracked", (), torch.int64, "running_stat", None),
    ("features.0.weight", (8, 3, 3, 3), torch.float32, "weight", MatrixView("conv")),
    ("block.conv.weight", (8, 3, 1, 3, 3), torch.float16, "weight", MatrixView("conv")),
    ("fc.weight", (4, 8), torch.float32, "weight", MatrixView("linear")),
    ("w", (4, 8), torch.float32, "weight", MatrixView("linear")),
    ("wte.embed.weight", (100, 8), torch.float32, "embedding", MatrixView("embedding")),
    ("fc.bias", (4,), torch.float32, "bias", None),
    ("ln.weight", (4,), torch.float32, "norm", None),
    ("position_ids", (1, 7), torch.int64, "buffer", None),
    ("mix", (2, 3, 4), torch.float32, "other", None),
])
def test_roles_from_names_for_files(name, shape, dtype, kind, view):
    role = role_from_name(name, shape, dtype)
    assert (role.kind, role.view) == (kind, view)


def test_matrix_view_reshapes_a_kernel_and_back():
    kernel = torch.randn(2, 5, 4, 3, 3)  # two experts' kernels
    view = MatrixView("conv")
    matrix = view.to_matrix(kernel, batch_dims=1)
    assert matrix.shape == (2, 5, 36) and torch.equal(matrix[1], kernel[1].reshape(5, 36))
    assert torch.equal(view.from_matrix(matrix, (5, 4, 3, 3)), kernel)
    assert view.matrix_shape((5, 4, 3, 3)) == (5, 36)


# -- matrix methods on the view -------------------------------------------------------------------------------------

class RankOne(MatrixTaskVectorMethod):
    """The best rank-one approximation of the summed task vectors: not element-wise, so a reshape matters."""

    name = "rank_one"
    Params = NoParams
    info = MethodInfo()

    def __init__(self, params=None):
        super().__init__(params)
        self.seen: dict[str, tuple[int, ...]] = {}

    def merge_matrix(self, key, taus):
        self.seen[key] = tuple(taus.shape)
        return rank_one(taus)


def rank_one(taus: torch.Tensor) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(taus.sum(0), full_matrices=False)
    return s[0] * torch.outer(u[:, 0], vh[0])


def _states(pool: ConvPool) -> tuple[dict, list[dict]]:
    return pool.states[PRETRAINED], [pool.states[e] for e in pool.expert_names]


def test_a_conv_kernel_is_merged_on_its_matrix_view_and_running_stats_never_reach_the_method():
    pool = ConvPool()
    base, experts = _states(pool)
    method = RankOne()
    out: dict[str, torch.Tensor] = {}
    merge_sources(method, StateDictSource(base), [StateDictSource(e) for e in experts], sink=out,
                  roles=roles_of(ConvNet()))
    for key, shape in (("conv1.weight", (4, 3, 1, 1)), ("conv2.weight", (5, 4, 3, 3)), ("fc.weight", (3, 5))):
        taus = torch.stack([e[key] - base[key] for e in experts]).reshape(2, shape[0], -1)
        torch.testing.assert_close(out[key], base[key] + rank_one(taus).reshape(shape))
    assert method.seen == {"conv1.weight": (2, 4, 3), "conv2.weight": (2, 5, 36), "fc.weight": (2, 3, 5)}
    torch.testing.assert_close(out["conv2.bias"], base["conv2.bias"] + sum(e["conv2.bias"] - base["conv2.bias"]
                                                                            for e in experts) / 2)
    assert "fallback_tensors" not in method.extras


def test_tensors_without_a_usable_view_fall_back_loudly(caplog):
    g = torch.Generator().manual_seed(0)
    model = nn.ModuleDict({"dw": nn.Conv2d(4, 4, 3, groups=4, bias=False), "dw2": nn.Conv2d(4, 4, 3, groups=2, bias=False)})
    base = {k: torch.randn(v.shape, generator=g) for k, v in model.state_dict().items()}
    base["mix"] = torch.randn(2, 3, 4, generator=g)
    experts = [{k: v + torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(3)]
    method = RankOne()
    out: dict[str, torch.Tensor] = {}
    with caplog.at_level(logging.WARNING, logger="mergebench_core.engine.roles"):
        merge_sources(method, StateDictSource(base), [StateDictSource(e) for e in experts], sink=out,
                      roles=roles_of(model))
    for key in base:  # every one of them is the mean, as before, but now counted and warned about
        torch.testing.assert_close(out[key], torch.stack([e[key] for e in experts]).mean(0))
    assert method.extras["fallback_tensors"] == {"mean": 3}
    assert not method.seen
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2  # once per reason: grouped convolution, tensor with no view
    assert any("grouped convolution" in w for w in warnings) and any("no matrix view" in w for w in warnings)


# -- running statistics in the engine -------------------------------------------------------------------------------

class Recorder(TensorMergeMethod):
    """The mean of the experts, recording which tensors it was given."""

    name = "recorder"
    Params = NoParams
    requires_base = False

    def __init__(self, params=None):
        super().__init__(params)
        self.keys: list[str] = []

    def merge_tensor(self, key, base, experts):
        self.keys.append(key)
        return torch.stack([e.float() for e in experts]).mean(0)


@pytest.mark.parametrize("with_module", [True, False])
@pytest.mark.parametrize("rule", ["base", "mean"])
def test_running_stats_follow_the_rule_not_the_method(rule, with_module):
    pool = ConvPool()
    base, experts = _states(pool)
    method = Recorder()
    out: dict[str, torch.Tensor] = {}
    merge_sources(method, StateDictSource(base), [StateDictSource(e) for e in experts], sink=out, bn_stats=rule,
                  roles=roles_of(ConvNet()) if with_module else None)  # without: the names tell (a file merge)
    stats = [k for k in base if k.rpartition(".")[2] in ("running_mean", "running_var", "num_batches_tracked")]
    assert len(stats) == 6 and not set(stats) & set(method.keys)
    for key in stats:
        if rule == "base" or key.endswith("num_batches_tracked"):  # counters are the base's (the experts differ)
            assert torch.equal(out[key], base[key])
        else:
            torch.testing.assert_close(out[key], (experts[0][key] + experts[1][key]) / 2)
    assert not torch.equal(experts[0]["bn1.num_batches_tracked"], experts[1]["bn1.num_batches_tracked"])


def test_base_rule_needs_a_base():
    pool = ConvPool()
    _, experts = _states(pool)
    with pytest.raises(MergebenchError, match="no pretrained model"):
        merge_sources(Recorder(), None, [StateDictSource(e) for e in experts], sink={}, bn_stats="base")
    with pytest.raises(MergebenchError, match="recompute"):
        merge_sources(Recorder(), None, [StateDictSource(e) for e in experts], sink={}, bn_stats="recompute")


# -- recompute --------------------------------------------------------------------------------------------------------

def _batch_stats(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per channel: batch mean, unbiased variance (what BN accumulates), biased variance (what it normalises by)."""
    return h.mean((0, 2, 3)), h.var((0, 2, 3), unbiased=True), h.var((0, 2, 3), unbiased=False)


def test_recompute_measures_the_statistics_of_the_merged_model_on_the_training_data():
    model, tp = conv_net(0), ImageTasks()
    batches = recompute_running_stats(model, tp, ["a", "b"], n_examples=16, batch_size=8, seed=0)
    assert batches == 4
    hand = {k: [] for k in ("m1", "v1", "m2", "v2")}
    ref = conv_net(0)  # the same weights; BN in training mode normalises by batch statistics
    with torch.no_grad():
        for task in ("a", "b"):
            for i in (0, 8):
                x = tp.x[task][i:i + 8]
                h1 = ref.conv1(x)
                m1, v1, b1 = _batch_stats(h1)
                a1 = torch.relu((h1 - m1.view(1, -1, 1, 1)) / torch.sqrt(b1.view(1, -1, 1, 1) + ref.bn1.eps)
                                * ref.bn1.weight.view(1, -1, 1, 1) + ref.bn1.bias.view(1, -1, 1, 1))
                m2, v2, _ = _batch_stats(ref.conv2(a1))
                for k, v in zip(("m1", "v1", "m2", "v2"), (m1, v1, m2, v2)):
                    hand[k].append(v)
    mean = {k: torch.stack(v).mean(0) for k, v in hand.items()}  # momentum=None: the average over batches
    torch.testing.assert_close(model.bn1.running_mean, mean["m1"])
    torch.testing.assert_close(model.bn1.running_var, mean["v1"])
    torch.testing.assert_close(model.bn2.running_mean, mean["m2"])
    torch.testing.assert_close(model.bn2.running_var, mean["v2"])
    assert int(model.bn1.num_batches_tracked) == 4
    assert not model.training and not model.bn1.training and model.bn1.momentum == 0.1  # modes and momenta restored
    # with equal batches the running mean of the first layer is the plain mean of its input over the data
    x_all = torch.cat([tp.x[t][:16] for t in ("a", "b")])
    torch.testing.assert_close(model.bn1.running_mean, ref.conv1(x_all).mean((0, 2, 3)).detach())


class Messy(Method):
    """A merge method outside the streaming engine that leaves nonsense in the running statistics."""

    name = "messy"
    Params = NoParams
    info = MethodInfo(kind="merge")

    def run(self, pool, ctx):
        model = pool.load_model(PRETRAINED)
        for bn in (model.bn1, model.bn2):
            bn.running_mean.fill_(123.0)
            bn.running_var.fill_(456.0)
        return MergeOutput(model)


@pytest.mark.parametrize("rule", ["base", "mean"])
def test_outputs_of_other_merge_methods_get_the_rule_too(rule):
    pool = ConvPool()
    output = Messy().run(pool, RunContext())
    extras = settle_running_stats(output.model, pool, rule, roles_of(ConvNet()), taskpool=None, tasks=())
    assert extras == {"bn_stats": rule}
    base, experts = _states(pool)
    want = base["bn2.running_var"] if rule == "base" else (experts[0]["bn2.running_var"] + experts[1]["bn2.running_var"]) / 2
    torch.testing.assert_close(output.model.bn2.running_var, want)


# -- runs: the rule is a run-level setting, in the identity only of pools that have running statistics --------------

class MlpPool(ConvPool):
    name = "mlp"

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.states = {n: nn.Linear(4, 3).state_dict() for n in (PRETRAINED, *self.expert_names)}

    def load_model(self, name):
        model = nn.Linear(4, 3)
        model.load_state_dict(self.states[name])
        return model.eval()


class SeeingTasks(ImageTasks):
    """ImageTasks that remember the running statistics of the last model they scored."""

    seen: ClassVar[dict[str, torch.Tensor]] = {}

    def logits(self, model, task, inputs):
        if isinstance(model, ConvNet) and not model.training:
            SeeingTasks.seen = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
        return model(inputs)


class MeanMerge(Recorder):
    name = "mean_merge"


def _registry():
    from mergebench_core.contract.registry import build_registry

    plugin = types.ModuleType("conv_plugin")

    @hookimpl
    def register_methods(register):
        register(MeanMerge)
        register(Messy)

    @hookimpl
    def register_modelpools(register):
        register("convnet", ConvPool)
        register("mlp", MlpPool)

    @hookimpl
    def register_taskpools(register):
        register("images", SeeingTasks)

    plugin.register_methods, plugin.register_modelpools = register_methods, register_modelpools
    plugin.register_taskpools = register_taskpools
    return build_registry(entry_points=[], extra_modules=[plugin])


def _runner(tmp_path, **options):
    from mergebench_core.running.runner import Runner, RunOptions
    from mergebench_core.results.store import ResultStore

    opts = RunOptions(isolation="none", cache_dir=tmp_path, taskpool="images", **options)
    return Runner(_registry(), ResultStore(":memory:"), opts)


@pytest.mark.parametrize("rule", ["base", "mean", "recompute"])
@pytest.mark.parametrize("method", ["mean_merge", "messy"])
def test_a_run_applies_its_rule_to_every_merge_method(tmp_path, rule, method):
    runner = _runner(tmp_path, methods=[method], modelpools=["convnet"], bn_stats=rule)
    report = runner.run(runner.plan())
    row = next(r for r in report.results if r.kind == "method")
    assert row.status == "ok", row.traceback
    assert row.extras["bn_stats"] == rule and row.config["bn_stats"] == rule and row.identity["bn_stats"] == rule
    pool = ConvPool()
    base, experts = _states(pool)
    seen = SeeingTasks.seen
    if rule == "base":
        torch.testing.assert_close(seen["bn1.running_mean"], base["bn1.running_mean"])
    elif rule == "mean":
        torch.testing.assert_close(seen["bn1.running_mean"],
                                   (experts[0]["bn1.running_mean"] + experts[1]["bn1.running_mean"]) / 2)
    else:
        model = runner.modelpool("convnet").load_model(PRETRAINED)
        if method == "mean_merge":
            model.load_state_dict({k: (experts[0][k].float() + experts[1][k].float()) / 2
                                   if v.is_floating_point() else v for k, v in base.items()})
        recompute_running_stats(model, SeeingTasks(), ["a", "b"])
        torch.testing.assert_close(seen["bn1.running_mean"], model.bn1.running_mean)
        torch.testing.assert_close(seen["bn2.running_var"], model.bn2.running_var)


def test_the_rule_enters_the_identity_only_of_pools_with_running_stats(tmp_path):
    runner = _runner(tmp_path, methods=["mean_merge"], modelpools=["convnet", "mlp"])
    cells = runner.plan()
    reg = cells[0].registration
    assert runner.bn_stats.name == "mean"
    assert runner.identity("convnet", "images", reg)["bn_stats"] == "mean"
    assert "bn_stats" not in runner.identity("mlp", "images", reg)
    assert "bn_stats" not in runner.identity("convnet", "images")  # reference rows do not merge
    mlp_cell = next(c for c in cells if c.modelpool == "mlp")
    assert "bn_stats" not in runner._blank(mlp_cell).config
    other = _runner(tmp_path, methods=["mean_merge"], modelpools=["convnet", "mlp"], bn_stats="base")
    conv_cell = next(c for c in cells if c.modelpool == "convnet")
    assert other.key(conv_cell) != runner.key(conv_cell) and other.key(mlp_cell) == runner.key(mlp_cell)


def test_bn_stats_from_the_config_file_and_bad_values(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("bn_stats: recompute\n")
    runner = _runner(tmp_path, methods=["mean_merge"], modelpools=["convnet"], config_file=config)
    runner.plan()
    assert runner.bn_stats.name == "recompute"
    assert _runner(tmp_path, methods=["mean_merge"], modelpools=["convnet"], config_file=config,
                   bn_stats="base").bn_stats.name == "base"
    with pytest.raises(ConfigError, match="bn_stats 'median'"):
        _runner(tmp_path, bn_stats="median")
    config.write_text("bn_stats: median\n")
    with pytest.raises(ConfigError, match="bn_stats 'median'"):
        _runner(tmp_path, methods=["mean_merge"], modelpools=["convnet"], config_file=config).plan()


@pytest.mark.parametrize("rule", ["base", "mean"])
def test_mergebench_merge_on_files_finds_running_stats_and_conv_kernels_by_name(tmp_path, capsys, rule):
    from mergebench_core.cli import main
    from mergebench_core.engine.tensors import load_state_dict, save_state_dict

    pool = ConvPool()
    base, experts = _states(pool)
    paths = []
    for name, state in (("base", base), ("a", experts[0]), ("b", experts[1])):
        paths.append(tmp_path / f"{name}.safetensors")
        save_state_dict({k: v.contiguous() for k, v in state.items()}, paths[-1])
    out = tmp_path / "merged.safetensors"
    assert main(["merge", "-m", "tsv_m", "--base", str(paths[0]), "--models", *map(str, paths[1:]),
                 "--out", str(out), "--bn-stats", rule]) == 0, capsys.readouterr().err
    got = load_state_dict(out)
    want_var = base["bn1.running_var"] if rule == "base" else (experts[0]["bn1.running_var"] +
                                                              experts[1]["bn1.running_var"]) / 2
    torch.testing.assert_close(got["bn1.running_var"], want_var)
    assert torch.equal(got["bn2.num_batches_tracked"], base["bn2.num_batches_tracked"])
    from mergebench_tsv_m import tsv_merge_matrix  # the 3×3 kernel went through its matrix view

    taus = torch.stack([e["conv2.weight"] - base["conv2.weight"] for e in experts])
    torch.testing.assert_close(got["conv2.weight"], base["conv2.weight"] + tsv_merge_matrix(
        taus.reshape(2, 5, 36)).reshape(5, 4, 3, 3), atol=1e-5, rtol=1e-5)
