"""Independent pools for fusion methods: digit classifiers trained from different random initialisations.

Git Re-Basin's and the neuron-interpolation paper's settings in miniature. Each model is a whole classifier (its head
included) trained on the 1,200 train digits of the embedded pool (the same split as `digits_TA8`, `digits` view) from
its own initialisation seed and its own data order. There is no pretrained model and there are no task vectors: the
hidden units of the models are in unrelated orders, so naive averaging fails and a fusion method must align them
first (each pool declares its `permutation_spec`, with activation points and fusion levels).

Twelve pools, `digits-<arch>_<setting>`, three architectures (`mergebench_digits_archs`: `mlp`, `cnn`, `vit`) in four
data settings:

- `seeds`: 2 models, each on the whole train split (only the initialisation and the data order differ);
- `split2`, `split4`: 2 or 4 models, each on a label-skewed part: each class's examples are divided among the models
  by a Dirichlet draw with concentrations spread evenly from 1 to 5 (smallest/largest 0.2, shuffled per class), as
  the neuron-interpolation code makes its non-IID splits;
- `shard2`: 2 models, each on a disjoint random half (the reference code's "sharded" splits divide the classes
  instead; here the halves are IID, so only the amount of data differs from `seeds`).

Every model of a pool scores on the whole test split through `digits_full`. Model i of pool seed s is initialised and
ordered from seed 1000·s + i, and the splits are drawn from s, so pool seeds never share a model. `for_seed(s)` gives
the pool of pool seed s under the same name: the runner uses it for cell seed s, so `--seed 0,1,2` fuses three
independent sets of base models, and mean ± std over seeds covers the base models' variation, as the papers report.

The checkpoints are cached as safetensors under a hash of the recipe (`$MERGEBENCH_CACHE/pools/digits-seeds/<hash>`),
with `build.json` saying how long the build took and what each model saw. `mergebench_digits` registers these pools
and their task pool `digits_full` (one entry point for the distribution); the data is `mergebench_digits_tasks`'.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mergebench_digits_archs import ARCHS, MLPClassifier, build_model
from mergebench_digits_tasks import DATA_SEED, N_TRAIN, DataSplit, DigitsData

from mergebench_core import TaskPool
from mergebench_core.engine.safetensors_writer import save_state_dict
from mergebench_core.fusion.alignment import PermutationSpec
from mergebench_core.locks import build_lock, read_json, safetensors_intact, write_text_atomic
from mergebench_core.paths import cache_dir
from mergebench_core.pools.folder import SafetensorsFolderPool
from mergebench_core.contract.checked_params import CheckedParams

__all__ = ["MLPClassifier", "SeedsRecipe", "DigitsSeedsModelPool", "DigitsFullTaskPool", "POOLS", "build",
           "ensure_built", "model_names", "train_subsets"]

log = logging.getLogger(__name__)

POOL_NAME = "digits-mlp_seeds"
TASKPOOL_NAME = "digits_full"
TASK = "digits"
SEEDS_RECIPE_VERSION = 2  # bump when the build code changes in a way the recipe fields do not show
SETTINGS = ("full", "split", "shard")

ARCH_DEFAULTS: dict[str, dict[str, Any]] = {
    # Adam at 2e-3 for 600 steps of 64 (32 epochs), constant: every MLP above 97 % in about a second.
    "mlp": dict(arch_config=(("hidden", 128),), steps=600, lr=2e-3, batch_size=64, schedule="constant"),
    # one-cycle Adam, 400 steps of 64: about 98 % in a few seconds.
    "cnn": dict(arch_config=(("channels", (16, 32, 64)),), steps=400, lr=3e-3, batch_size=64, schedule="onecycle"),
    # 4×4 patches (4 tokens and a class token): one-cycle Adam, 300 steps of 128, about 97 %.
    "vit": dict(arch_config=(("patch", 4), ("dim", 64), ("depth", 2), ("heads", 4), ("mlp_hidden", 128)),
                steps=300, lr=2e-3, batch_size=128, schedule="onecycle"),
}
SETTING_NAMES: dict[str, tuple[str, int]] = {"seeds": ("full", 2), "split2": ("split", 2), "split4": ("split", 4),
                                             "shard2": ("shard", 2)}


@dataclass(frozen=True)
class SeedsRecipe:
    """Everything that determines a pool's weights; its hash names the cache folder."""

    arch: str = "mlp"
    arch_config: tuple[tuple[str, Any], ...] = ARCH_DEFAULTS["mlp"]["arch_config"]
    """Keyword arguments of the architecture (`mergebench_digits_archs.build_model`)."""
    setting: str = "full"
    """"full": every model sees the whole train split; "split": label-skewed parts (Dirichlet over models per class);
    "shard": disjoint random parts."""
    num_models: int = 2
    seed: int = 0
    """The pool seed: model i is initialised and ordered from 1000·seed + i; the splits are drawn from it."""
    data_seed: int = DATA_SEED
    n_train: int = N_TRAIN
    """The train/test split: the TA8 pool's by default."""
    dirichlet_ratio: float = 0.2
    """"split": the smallest Dirichlet concentration over the largest (1 to 1/ratio, spread evenly over models)."""
    steps: int = 600
    lr: float = 2e-3
    batch_size: int = 64
    schedule: str = "constant"
    """"constant" or "onecycle" (torch's OneCycleLR with `lr` as its peak)."""
    version: int = SEEDS_RECIPE_VERSION

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {', '.join(ARCHS)}, got {self.arch!r}")
        if self.setting not in SETTINGS:
            raise ValueError(f"setting must be one of {', '.join(SETTINGS)}, got {self.setting!r}")
        if self.num_models < 1:
            raise ValueError("a pool needs at least one model")
        object.__setattr__(self, "arch_config", tuple((k, _tuple(v)) for k, v in self.arch_config))

    @classmethod
    def preset(cls, arch: str, setting_name: str = "seeds", **changes: Any) -> SeedsRecipe:
        """The recipe of pool `digits-<arch>_<setting_name>` (settings: seeds, split2, split4, shard2)."""
        setting, num_models = SETTING_NAMES[setting_name]
        return cls(arch=arch, setting=setting, num_models=num_models, **{**ARCH_DEFAULTS[arch], **changes})

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(dataclasses.asdict(self), sort_keys=True).encode()).hexdigest()[:16]

    def data(self) -> DigitsData:
        return DigitsData(DataSplit(seed=self.data_seed, n_train=self.n_train))

    def model(self) -> nn.Module:
        return build_model(self.arch, **dict(self.arch_config))


def _tuple(value: Any) -> Any:
    return tuple(_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


def model_names(recipe: SeedsRecipe) -> list[str]:
    return [f"seed{i}" for i in range(recipe.num_models)]


def train_subsets(recipe: SeedsRecipe, labels: torch.Tensor) -> list[torch.Tensor]:
    """Indices into the train split that each model trains on."""
    n, k = len(labels), recipe.num_models
    if recipe.setting == "full":
        return [torch.arange(n) for _ in range(k)]
    gen = torch.Generator().manual_seed(10_000 + recipe.seed)
    if recipe.setting == "shard":
        return [part.sort().values for part in torch.randperm(n, generator=gen).chunk(k)]
    import numpy as np  # the Dirichlet draw: numpy's generator is seedable and stable across versions

    rng = np.random.default_rng(10_000 + recipe.seed)
    alphas = np.linspace(1.0, 1.0 / recipe.dirichlet_ratio, k)
    parts: list[list[int]] = [[] for _ in range(k)]
    for c in range(int(labels.max()) + 1):
        idx = torch.nonzero(labels == c)[:, 0]
        idx = idx[torch.randperm(len(idx), generator=gen)].tolist()
        shares = rng.dirichlet(rng.permutation(alphas))
        counts = (shares * len(idx)).astype(int)
        counts[-1] += len(idx) - counts.sum()
        start = 0
        for i, count in enumerate(counts.tolist()):
            parts[i].extend(idx[start:start + count])
            start += count
    return [torch.tensor(sorted(p), dtype=torch.long) for p in parts]


def _init(recipe: SeedsRecipe, seed: int, gen: torch.Generator) -> nn.Module:
    with torch.random.fork_rng():  # default initialisations draw from the global generator: leave it as it was
        torch.manual_seed(seed)
        model = recipe.model()
    if recipe.arch == "mlp":
        with torch.no_grad():  # He (Kaiming-normal) weights and zero biases, the usual start for ReLU networks
            for layer in (model.fc1, model.fc2, model.fc3):
                layer.weight.normal_(0.0, (2.0 / layer.in_features) ** 0.5, generator=gen)
                layer.bias.zero_()
    elif recipe.arch == "vit":
        with torch.no_grad():
            model.embed.cls.normal_(0.0, 0.02, generator=gen)
            model.embed.pos.normal_(0.0, 0.02, generator=gen)
    return model


def _train(recipe: SeedsRecipe, seed: int, x: torch.Tensor, y: torch.Tensor) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    model = _init(recipe, seed, gen)
    opt = torch.optim.Adam(model.parameters(), lr=recipe.lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe.lr, total_steps=recipe.steps) \
        if recipe.schedule == "onecycle" else None
    order = torch.empty(0, dtype=torch.long)
    model.train()
    for _ in range(recipe.steps):
        while len(order) < recipe.batch_size:  # epochs in a seeded order; a short remainder joins the next epoch
            order = torch.cat([order, torch.randperm(len(x), generator=gen)])
        idx, order = order[: recipe.batch_size], order[recipe.batch_size:]
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
    log.info("trained the seed-%d %s classifier (last batch loss %.4f)", seed, recipe.arch, loss.item())
    return model.eval()


def build(recipe: SeedsRecipe, folder: Path) -> None:
    """Train every model and write it to `folder` as safetensors (one thread, as the TA8 pool builds: the matrices
    are too small to gain from more, and a fixed thread count makes the weights the same on every machine)."""
    log.info("building the %s/%s pool (recipe %s) in %s", recipe.arch, recipe.setting, recipe.digest(), folder)
    start = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        x, y = recipe.data().split(TASK, "train")
        parts = train_subsets(recipe, y)
        models = {name: _train(recipe, 1000 * recipe.seed + i, x[parts[i]], y[parts[i]])
                  for i, name in enumerate(model_names(recipe))}
    finally:
        torch.set_num_threads(threads)
    folder.mkdir(parents=True, exist_ok=True)
    for name, model in models.items():
        save_state_dict(model.state_dict(), folder / f"{name}.safetensors")
    classes = int(y.max()) + 1
    info = {"seconds": round(time.perf_counter() - start, 2),
            "models": {name: {"examples": len(parts[i]),
                              "class_counts": torch.bincount(y[parts[i]], minlength=classes).tolist()}
                       for i, name in enumerate(model_names(recipe))}}
    write_text_atomic(folder / "build.json", json.dumps(info, indent=2))
    write_text_atomic(folder / "recipe.json", json.dumps(dataclasses.asdict(recipe), indent=2))  # last: done


def ensure_built(recipe: SeedsRecipe, root: Path | None = None) -> Path:
    folder = (root or cache_dir() / "pools" / "digits-seeds") / recipe.digest()
    want = json.loads(json.dumps(dataclasses.asdict(recipe)))
    files = [folder / f"{n}.safetensors" for n in model_names(recipe)]

    def done() -> bool:  # a torn recipe.json or a truncated checkpoint is rebuilt
        return read_json(folder / "recipe.json") == want and safetensors_intact(files)

    if not done():
        with build_lock(folder, f"the {recipe.arch}/{recipe.setting} pool"):  # built once by concurrent processes
            if not done():
                (folder / "recipe.json").unlink(missing_ok=True)
                build(recipe, folder)
    return folder


class DigitsSeedsModelPool(SafetensorsFolderPool):
    """Independently initialised digit classifiers `seed0`, `seed1`, ... (no pretrained model)."""

    name = POOL_NAME
    default_taskpool = TASKPOOL_NAME
    has_pretrained = False
    relation = "independent"

    def __init__(self, recipe: SeedsRecipe | None = None, root: Path | None = None):
        self.recipe = recipe or SeedsRecipe()
        self.root = root
        self._seeded: dict[int, DigitsSeedsModelPool] = {self.recipe.seed: self}

    @cached_property
    def folder(self) -> Path:
        return ensure_built(self.recipe, self.root)

    @property
    def expert_names(self) -> list[str]:
        return model_names(self.recipe)

    def build_model(self) -> nn.Module:
        """An untrained instance of the architecture (no build needed): what methods inspect before any work."""
        return self.recipe.model()

    def task_of(self, expert: str) -> str:
        return TASK

    def identity(self, name: str) -> str:
        return f"{self.name}/{self.recipe.digest()}/{name}"

    def version_info(self) -> dict[str, str]:
        return {"digits_seeds_recipe": self.recipe.digest(), "digits_seeds_pool_seed": str(self.recipe.seed)}

    def permutation_spec(self) -> PermutationSpec:
        """The architecture's spec (`mergebench_digits_archs`): hidden units, channels, or residual stream, heads and
        MLP units; with activation points and fusion levels."""
        return self.recipe.model().permutation_spec()

    def for_seed(self, seed: int) -> DigitsSeedsModelPool:
        """The same pool built from pool seed `seed` (other initialisations, orders and splits), under the same name:
        the runner asks for it in every cell, so cell seed s fuses the base models of pool seed s."""
        if seed not in self._seeded:
            pool = type(self)(dataclasses.replace(self.recipe, seed=seed), self.root)
            pool.name = self.name
            pool._seeded = self._seeded
            self._seeded[seed] = pool
        return self._seeded[seed]

    def build_info(self) -> dict[str, Any]:
        """What `build.json` recorded: build seconds, and each model's number of examples and class counts."""
        path = self.folder / "build.json"
        return json.loads(path.read_text()) if path.is_file() else {}


class DigitsFullTaskPool(TaskPool):
    """The ten-class digits task of the TA8 pool, scored by the model's own head (logits = model(x)).

    Its splits are `DigitsData`'s: "val" is the shared 10 % of train (`mergebench_core.data.splits`), "train" stays whole.
    """

    name = TASKPOOL_NAME

    def __init__(self, recipe: SeedsRecipe | None = None):
        self.recipe = recipe or SeedsRecipe()

    @cached_property
    def data(self) -> DigitsData:
        return self.recipe.data()

    @property
    def tasks(self) -> list[str]:
        return [TASK]

    def _split(self, task: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        if task != TASK:
            raise KeyError(f"task pool {self.name!r} has no task {task!r}; tasks: {TASK}")
        return self.data.split(task, split)

    def batches(self, task: str, split: str = "test", *, batch_size: int = 256,
                limit: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        x, y = self._split(task, split)
        if limit is not None:
            x, y = x[:limit], y[:limit]
        for i in range(0, len(x), batch_size):
            yield x[i:i + batch_size], y[i:i + batch_size]

    def num_examples(self, task: str, split: str = "test") -> int:
        return len(self._split(task, split)[1])

    def logits(self, model: nn.Module, task: str, inputs: torch.Tensor) -> torch.Tensor:
        return model(inputs)

    def version_info(self) -> dict[str, str]:
        return {"digits_seeds_split": f"{self.recipe.data_seed}/{self.recipe.n_train}"}


def _params_class(arch: str) -> type:
    """The parameters of the `digits-<arch>_*` pools: how each model is trained, with the architecture's defaults
    (`ARCH_DEFAULTS`), so the defaults give the registered pools. The pool seed is not one of them: it is the cell's
    `--seed` (`for_seed`)."""
    defaults = ARCH_DEFAULTS[arch]
    # Bounds a recipe can run within (`mergebench list` shows them): past lr 10 Adam only diverges, and a million
    # steps is already hours, so larger values are typos, not experiments.
    bounds = {"above": {"lr": 0.0}, "at_least": {"steps": 1, "batch_size": 1},
              "at_most": {"lr": 10.0, "steps": 10**6, "batch_size": 10**5}}
    cls = dataclasses.make_dataclass(
        f"{arch.capitalize()}SeedsPoolParams",
        [("lr", float, dataclasses.field(default=defaults["lr"])),
         ("steps", int, dataclasses.field(default=defaults["steps"])),
         ("batch_size", int, dataclasses.field(default=defaults["batch_size"]))],
        bases=(CheckedParams,), frozen=True, namespace=bounds)
    cls.__module__ = __name__
    cls.__doc__ = f"Training of each model of the digits-{arch}_* pools: Adam's (peak) learning rate, steps, batch size."
    return cls


POOL_PARAMS: dict[str, type] = {arch: _params_class(arch) for arch in ARCHS}
"""{arch: the parameters dataclass of its pools}."""

ARCH_LABELS = {"mlp": "MLP 64-128-128-10", "cnn": "VGG-style CNN 16-32-64", "vit": "ViT, 4x4 patches, 2 blocks"}
SETTING_LABELS = {"seeds": "the full train split", "split2": "label-skewed (Dirichlet) halves",
                  "split4": "label-skewed (Dirichlet) quarters", "shard2": "disjoint random halves"}


def _factory(arch: str, setting_name: str):
    name = f"digits-{arch}_{setting_name}"

    def make(params: Any = None) -> DigitsSeedsModelPool:
        changes = dataclasses.asdict(params) if params is not None else {}
        pool = DigitsSeedsModelPool(SeedsRecipe.preset(arch, setting_name, **changes))
        pool.name = name
        return pool

    make.__name__ = make.__qualname__ = f"pool_{arch}_{setting_name}"
    return name, make


POOLS = dict(_factory(arch, setting) for arch in ARCHS for setting in SETTING_NAMES)
"""{pool name: factory}: `digits-<arch>_<setting>` for arch in mlp, cnn, vit and setting in seeds, split2, split4,
shard2."""


def register_modelpools(register) -> None:  # called by mergebench_digits' hook (the distribution's entry point)
    for name, factory in POOLS.items():
        arch, setting = name.removeprefix("digits-").split("_")
        models = SETTING_NAMES[setting][1]
        register(name, factory, f"{models} digit classifiers ({ARCH_LABELS[arch]}) from different random inits, "
                                f"each trained on {SETTING_LABELS[setting]}, for fusion (embedded, offline)",
                 params=POOL_PARAMS[arch])
    from mergebench_core.pools.folder import folder_pool_from_env

    register("fusion-folder", folder_pool_from_env, "your own models for fusion: model.py and one .safetensors per "
                                                    "model in the folder $MERGEBENCH_FUSION_DIR")


def register_taskpools(register) -> None:
    register(TASKPOOL_NAME, DigitsFullTaskPool, "scikit-learn's bundled digits, 10 classes, the model's own head")
