"""An independent pool for fusion methods: digit classifiers trained from different random initialisations.

Git Re-Basin's MLP setting in miniature (Ainsworth et al., ICLR 2023, whose MNIST MLP has this shape with wider
layers): each model is a whole classifier, 64 pixels → 128 → 128 → 10 classes with ReLU, trained on the 1,200
train digits of the embedded pool (the same split as `digits_TA8`, `digits` view) from its own initialisation seed
and its own data order. There is no pretrained model and there are no task vectors: the hidden units of the models
are in unrelated orders, so naive averaging fails and a fusion method must align them first (the pool declares its
`permutation_spec`). The checkpoints are cached as safetensors under a hash of the recipe, like the TA8 pool.

`mergebench_digits` registers this pool and its task pool `digits_full` (one entry point for the distribution).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mergebench_core import ModelPool, TaskPool
from mergebench_core.alignment import PermutationSpec, mlp_permutation_spec
from mergebench_core.paths import cache_dir
from mergebench_core.tensors import SafetensorsSource, load_state_dict, save_state_dict
from mergebench_digits import DigitsData, Recipe

log = logging.getLogger(__name__)

POOL_NAME = "digits-mlp_seeds"
TASKPOOL_NAME = "digits_full"
TASK = "digits"
SEEDS_RECIPE_VERSION = 1  # bump when the build code changes in a way the recipe fields do not show


@dataclass(frozen=True)
class SeedsRecipe:
    """Everything that determines the pool's weights; its hash names the cache folder."""

    num_models: int = 2
    seed: int = 0
    """Model i is initialised from seed + i and sees the data in an order drawn from seed + i."""
    data_seed: int = Recipe.seed
    n_train: int = Recipe.n_train
    """The train/test split: the TA8 pool's by default."""
    hidden: int = 128
    steps: int = 600
    lr: float = 2e-3
    """Adam at 2e-3 for 600 steps of 64 (32 epochs): every model above 97 % test accuracy in about a second."""
    batch_size: int = 64
    version: int = SEEDS_RECIPE_VERSION

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(dataclasses.asdict(self), sort_keys=True).encode()).hexdigest()[:16]

    def data(self) -> DigitsData:
        return DigitsData(Recipe(seed=self.data_seed, n_train=self.n_train))


class MLPClassifier(nn.Module):
    """The whole classifier is the model (the head included): 64 → hidden → hidden → 10 with ReLU."""

    def __init__(self, hidden: int = 128, classes: int = 10):
        super().__init__()
        self.fc1 = nn.Linear(64, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


def model_names(recipe: SeedsRecipe) -> list[str]:
    return [f"seed{i}" for i in range(recipe.num_models)]


def _train(recipe: SeedsRecipe, seed: int, x: torch.Tensor, y: torch.Tensor) -> MLPClassifier:
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():  # the default initialisation draws from the global generator: leave it as it was
        model = MLPClassifier(recipe.hidden, int(y.max()) + 1)
    with torch.no_grad():  # He (Kaiming-normal) weights and zero biases, the usual start for ReLU networks
        for layer in (model.fc1, model.fc2, model.fc3):
            layer.weight.normal_(0.0, (2.0 / layer.in_features) ** 0.5, generator=gen)
            layer.bias.zero_()
    opt = torch.optim.Adam(model.parameters(), lr=recipe.lr)
    order = torch.empty(0, dtype=torch.long)
    for _ in range(recipe.steps):
        if len(order) < recipe.batch_size:  # epochs in a seeded order; a short remainder joins the next epoch
            order = torch.cat([order, torch.randperm(len(x), generator=gen)])
        idx, order = order[: recipe.batch_size], order[recipe.batch_size:]
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    log.info("trained the seed-%d classifier (last batch loss %.4f)", seed, loss.item())
    return model.eval()


def build(recipe: SeedsRecipe, folder: Path) -> None:
    """Train every model and write it to `folder` as safetensors (one thread, as the TA8 pool builds: the matrices
    are too small to gain from more, and a fixed thread count makes the weights the same on every machine)."""
    log.info("building %s (recipe %s) in %s", POOL_NAME, recipe.digest(), folder)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        x, y = recipe.data().split(TASK, "train")
        models = {name: _train(recipe, recipe.seed + i, x, y) for i, name in enumerate(model_names(recipe))}
    finally:
        torch.set_num_threads(threads)
    folder.mkdir(parents=True, exist_ok=True)
    for name, model in models.items():
        save_state_dict(model.state_dict(), folder / f"{name}.safetensors")
    (folder / "recipe.json").write_text(json.dumps(dataclasses.asdict(recipe), indent=2))  # written last: done


def ensure_built(recipe: SeedsRecipe, root: Path | None = None) -> Path:
    folder = (root or cache_dir() / "pools" / "digits-seeds") / recipe.digest()
    marker = folder / "recipe.json"
    if not (marker.is_file() and json.loads(marker.read_text()) == json.loads(json.dumps(dataclasses.asdict(recipe)))):
        build(recipe, folder)
    return folder


class DigitsSeedsModelPool(ModelPool):
    """Independently initialised digit classifiers `seed0`, `seed1`, ... (no pretrained model)."""

    name = POOL_NAME
    default_taskpool = TASKPOOL_NAME
    has_pretrained = False
    relation = "independent"

    def __init__(self, recipe: SeedsRecipe | None = None, root: Path | None = None):
        self.recipe = recipe or SeedsRecipe()
        self.root = root

    @cached_property
    def folder(self) -> Path:
        return ensure_built(self.recipe, self.root)

    @property
    def expert_names(self) -> list[str]:
        return model_names(self.recipe)

    def _file(self, name: str) -> Path:
        if name not in self.expert_names:
            raise KeyError(f"pool {self.name!r} has no model {name!r} (it has no pretrained model); models: "
                           f"{', '.join(self.expert_names)}")
        return self.folder / f"{name}.safetensors"

    def load_model(self, name: str) -> nn.Module:
        model = MLPClassifier(self.recipe.hidden)
        model.load_state_dict(load_state_dict(self._file(name)))
        return model.eval()

    def state_dict(self, name: str) -> dict[str, torch.Tensor]:
        return load_state_dict(self._file(name))

    def tensor_source(self, name: str) -> SafetensorsSource:
        return SafetensorsSource(self._file(name), name=f"{self.name}/{name}")

    def task_of(self, expert: str) -> str:
        return TASK

    def identity(self, name: str) -> str:
        return f"{self.name}/{self.recipe.digest()}/{name}"

    def version_info(self) -> dict[str, str]:
        return {"digits_seeds_recipe": self.recipe.digest()}

    def permutation_spec(self) -> PermutationSpec:
        """The two hidden layers' units: `P_fc1` (fc1's outputs, fc2's inputs) and `P_fc2` (fc2's outputs, fc3's
        inputs); the 10 class logits stay in place."""
        return mlp_permutation_spec(["fc1", "fc2", "fc3"])


class DigitsFullTaskPool(TaskPool):
    """The ten-class digits task of the TA8 pool, scored by the model's own head (logits = model(x)).

    Its splits are `DigitsData`'s: "val" is the shared 10 % of train (`mergebench_core.splits`), "train" stays whole.
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


def register_modelpools(register) -> None:  # called by mergebench_digits' hook (the distribution's entry point)
    register(POOL_NAME, DigitsSeedsModelPool,
             "2 digit classifiers (MLP 64-128-128-10) from different random inits, for fusion (embedded, offline)")


def register_taskpools(register) -> None:
    register(TASKPOOL_NAME, DigitsFullTaskPool, "scikit-learn's bundled digits, 10 classes, the model's own head")
