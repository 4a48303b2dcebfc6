"""The embedded default pool: the CLIP eight-task benchmark in miniature, built offline in seconds.

Data: scikit-learn's bundled `load_digits` (1,797 real 8×8 handwritten digits), split once into 1,200 train and
597 test images. Eight tasks see those digits through different views, as the CLIP suite sees different datasets:
the digit itself, rotated by 90° and 180°, mirrored, shifted, transposed, and two relabelings (parity, and
whether the digit is at least 5). The data, the views and the head calibration are `mergebench_digits_tasks`,
shared with the other digits pools.

Models, mirroring CLIP's recipe:
1. a shared MLP encoder is pretrained *without labels* (a denoising autoencoder on the train images of every view);
2. each task gets a frozen zero-shot head built as CLIP builds its heads, without training: its rows are the
   unit-norm class embeddings (here the normalised encoder features of one labeled example per class) times one
   logit scale shared by every task, and logits = scale · cosine(encoder features, class embedding). The scale is
   the one that calibrates the pretrained model on the train splits (minimum cross-entropy over all tasks), so the
   pretrained model is a weak but real classifier whose confidence means what it says;
3. each expert fine-tunes the whole encoder on its task, briefly, with that head frozen.
Only the encoder is merged; heads live in the task pool. Everything is seeded, and the checkpoints are cached as
safetensors under a hash of the recipe, so the pool is rebuilt only when the recipe changes.

The pool takes parameters (`DigitsPoolParams`: the experts' fine-tuning learning rate, steps, batch size and seed):
`digits-mlp_TA8(lr=3e-05)` is the same pretrained encoder, heads and data with experts fine-tuned otherwise, so the
one task pool `digits_TA8` scores every variant. A variant is cached under its own recipe hash, and its build reuses
the default build's pretrained encoder, heads and generator state (a few seconds instead of twenty), giving the
experts a full build would give, bit for bit.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
import torch.nn.functional as F
from mergebench_digits_tasks import DATA_SEED, N_TRAIN, TASKS, DigitsData, calibrated_scale, view
from torch import nn

from mergebench_core import PRETRAINED, TaskPool, hookimpl
from mergebench_core.engine.safetensors_reader import load_state_dict
from mergebench_core.engine.safetensors_writer import save_state_dict
from mergebench_core.locks import build_lock, read_json, safetensors_intact, write_text_atomic
from mergebench_core.paths import cache_dir
from mergebench_core.pools.folder import SafetensorsFolderPool
from mergebench_core.contract.checked_params import CheckedParams

__all__ = ["GENERATOR_FILE", "POOL_NAME", "TASKPOOL_NAME", "DigitsModelPool", "DigitsPoolParams", "DigitsTaskPool",
           "Encoder", "Recipe", "build", "ensure_built", "is_built", "make_pool", "zero_shot_logits",
           # mergebench_digits_tasks' names, still importable from here as before that module existed
           "TASKS", "DigitsData", "view"]

log = logging.getLogger(__name__)

POOL_NAME = "digits-mlp_TA8"
TASKPOOL_NAME = "digits_TA8"
RECIPE_VERSION = 3  # bump when the build code changes in a way the recipe fields do not show


@dataclass(frozen=True)
class Recipe:
    """Everything that determines the pool's weights; its hash names the cache folder."""

    seed: int = DATA_SEED
    n_train: int = N_TRAIN
    hidden: int = 256
    features: int = 128
    pretrain_steps: int = 1200
    pretrain_lr: float = 3e-3
    pretrain_mask: float = 0.3
    probe_shots: int = 1
    finetune_steps: int = 200
    finetune_lr: float = 3e-4
    batch_size: int = 64
    tasks: tuple[str, ...] = TASKS
    version: int = RECIPE_VERSION
    finetune_seed: int = 0
    """0: the experts' batches continue the build's generator after pretraining (the pool as it always was); another
    value draws them from a generator of their own, seeded from `seed` and this."""

    def as_dict(self) -> dict:
        """The recipe as hashed (and as recipe.json held it before `finetune_seed` existed). Fields added since appear
        only when they differ from their default, so the default recipe keeps its hash, its cached build and its
        stored results."""
        out = dataclasses.asdict(self)
        if out["finetune_seed"] == 0:
            del out["finetune_seed"]
        return out

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.as_dict(), sort_keys=True).encode()).hexdigest()[:16]

    def pretraining(self) -> Recipe:
        """This recipe with the default fine-tuning settings: the build whose pretrained encoder, heads and generator
        state a variant shares (none of them depends on the fine-tuning fields)."""
        d = Recipe()
        return dataclasses.replace(self, finetune_steps=d.finetune_steps, finetune_lr=d.finetune_lr,
                                   batch_size=d.batch_size, finetune_seed=d.finetune_seed)


@dataclass(frozen=True)
class DigitsPoolParams(CheckedParams):
    """The parameters of `digits-mlp_TA8`: how its experts are fine-tuned. The pretrained encoder, the zero-shot heads
    and the data do not change, so `digits_TA8` scores every variant; the defaults are the registered pool's."""

    lr: float = Recipe.finetune_lr
    """Adam's learning rate while fine-tuning each expert."""
    steps: int = Recipe.finetune_steps
    """Fine-tuning steps per expert."""
    batch_size: int = Recipe.batch_size
    """Examples per fine-tuning step."""
    seed: int = 0
    """The fine-tuning seed (the experts' batch order): 0 gives the registered experts; pool seeds are independent of
    the cell's `--seed`."""

    # Bounds a training recipe can run within (`mergebench list` shows them): past lr 10 Adam only diverges, and a
    # million steps of this MLP is already hours, so larger values are typos, not experiments.
    above = {"lr": 0.0}
    at_least = {"steps": 1, "batch_size": 1, "seed": 0}
    at_most = {"lr": 10.0, "steps": 10**6, "batch_size": 10**5, "seed": 2**32 - 1}

    def recipe(self) -> Recipe:
        return dataclasses.replace(Recipe(), finetune_lr=self.lr, finetune_steps=self.steps,
                                   batch_size=self.batch_size, finetune_seed=self.seed)


class Encoder(nn.Module):
    """The mergeable model: 64 pixels → features (three linear layers and a LayerNorm)."""

    def __init__(self, hidden: int = 256, features: int = 128):
        super().__init__()
        self.fc1 = nn.Linear(64, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, features)
        self.norm = nn.LayerNorm(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        x = F.gelu(self.fc1(x))
        x = F.gelu(self.fc2(x))
        return self.norm(self.fc3(x))


def _pretrain(recipe: Recipe, data: DigitsData, gen: torch.Generator) -> Encoder:
    encoder = Encoder(recipe.hidden, recipe.features)
    decoder = nn.Linear(recipe.features, 64)
    views = sorted({t for t in recipe.tasks if t not in ("parity", "magnitude")})
    inputs = torch.cat([data.split(t, "train")[0] for t in views])  # no labels are used here
    opt = torch.optim.Adam([*encoder.parameters(), *decoder.parameters()], lr=recipe.pretrain_lr)
    for _ in range(recipe.pretrain_steps):
        batch = inputs[torch.randint(0, len(inputs), (256,), generator=gen)]
        noisy = batch * (torch.rand(batch.shape, generator=gen) > recipe.pretrain_mask)
        loss = F.mse_loss(decoder(encoder(noisy)), batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    log.info("pretrained the encoder (reconstruction loss %.4f)", loss.item())
    return encoder.eval()


def _prototypes(recipe: Recipe, encoder: Encoder, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(classes, features): the unit-norm mean of the unit-norm features of each class's first probe shots."""
    classes = int(y.max()) + 1
    with torch.no_grad():
        feats = F.normalize(encoder(x), dim=-1)
        rows = [feats[torch.nonzero(y == c)[: recipe.probe_shots, 0]].mean(0) for c in range(classes)]
    return F.normalize(torch.stack(rows), dim=-1)


def _zero_shot_heads(recipe: Recipe, encoder: Encoder, data: DigitsData) -> dict[str, nn.Linear]:
    """CLIP-style zero-shot heads: the rows are unit-norm class prototypes times one shared logit scale, no bias;
    `DigitsTaskPool.logits` applies them to unit-norm features, so logits = scale · cosine(feature, prototype)."""
    splits = {t: data.split(t, "train") for t in recipe.tasks}
    prototypes = {t: _prototypes(recipe, encoder, x, y) for t, (x, y) in splits.items()}
    with torch.no_grad():
        cosines = {t: F.normalize(encoder(x), dim=-1) @ prototypes[t].T for t, (x, _) in splits.items()}
    scale = calibrated_scale(cosines, {t: y for t, (_, y) in splits.items()})
    log.info("zero-shot heads: logit scale %.2f", scale)
    heads = {}
    for t, rows in prototypes.items():
        head = nn.Linear(recipe.features, len(rows))
        with torch.no_grad():
            head.weight.copy_(scale * rows)
            head.bias.zero_()
        heads[t] = head.requires_grad_(False).eval()
    return heads


def zero_shot_logits(head: nn.Linear, features: torch.Tensor) -> torch.Tensor:
    """A task's logits from encoder features: its head applied to the unit-norm features (CLIP's zero-shot form)."""
    return head(F.normalize(features, dim=-1))


def _finetune(recipe: Recipe, encoder: Encoder, head: nn.Linear, x: torch.Tensor, y: torch.Tensor,
              gen: torch.Generator) -> Encoder:
    expert = copy.deepcopy(encoder).train()
    opt = torch.optim.Adam(expert.parameters(), lr=recipe.finetune_lr)
    for _ in range(recipe.finetune_steps):
        idx = torch.randint(0, len(x), (recipe.batch_size,), generator=gen)
        loss = F.cross_entropy(zero_shot_logits(head, expert(x[idx])), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return expert.eval()


GENERATOR_FILE = "generator.safetensors"
"""The build generator's state after pretraining, kept so that a variant's experts continue it without pretraining."""


def build(recipe: Recipe, folder: Path, pretrained_from: Path | None = None) -> None:
    """Train the pretrained encoder, the heads and the experts, and write them to `folder` as safetensors. With
    `pretrained_from` (a build of `recipe.pretraining()` that kept its generator state), take the pretrained encoder,
    heads and generator from there and fine-tune only the experts: the same bytes as a full build, without the 15 s
    of pretraining."""
    log.info("building the embedded pool %s (recipe %s) in %s%s", POOL_NAME, recipe.digest(), folder,
             f", pretrained model from {pretrained_from}" if pretrained_from else "")
    threads = torch.get_num_threads()
    # One thread: these matrices are too small to gain from more, a second thread makes the build 4x slower when
    # another process shares the cores, and a fixed thread count makes the float sums (so the weights) the same on
    # every machine.
    torch.set_num_threads(1)
    try:
        _build(recipe, folder, pretrained_from)
    finally:
        torch.set_num_threads(threads)


def _finetune_generator(recipe: Recipe, after_pretraining: torch.Generator) -> torch.Generator:
    if recipe.finetune_seed == 0:
        return after_pretraining
    return torch.Generator().manual_seed(1_000_000 * recipe.seed + recipe.finetune_seed)


def _build(recipe: Recipe, folder: Path, pretrained_from: Path | None = None) -> None:
    data = DigitsData(recipe)
    gen = torch.Generator().manual_seed(recipe.seed)
    with torch.random.fork_rng():  # module initialisation draws from the global generator: pin it, then restore
        torch.manual_seed(recipe.seed)
        if pretrained_from is None:
            encoder = _pretrain(recipe, data, gen)
            state = gen.get_state()
            heads = _zero_shot_heads(recipe, encoder, data)
        else:
            encoder = Encoder(recipe.hidden, recipe.features)
            encoder.load_state_dict(load_state_dict(pretrained_from / f"{PRETRAINED}.safetensors"))
            encoder.eval()
            state = load_state_dict(pretrained_from / GENERATOR_FILE)["state"]
            gen.set_state(state)
            heads = _read_heads(pretrained_from / "heads.safetensors", recipe.tasks)
        ft_gen = _finetune_generator(recipe, gen)
        experts = {t: _finetune(recipe, encoder, heads[t], *data.split(t, "train"), ft_gen) for t in recipe.tasks}
    folder.mkdir(parents=True, exist_ok=True)
    if pretrained_from is None:
        save_state_dict(encoder.state_dict(), folder / f"{PRETRAINED}.safetensors")
        head_tensors = {f"{t}.{k}": v for t, h in heads.items() for k, v in h.state_dict().items()}
        save_state_dict(head_tensors, folder / "heads.safetensors")
    else:
        for name in (f"{PRETRAINED}.safetensors", "heads.safetensors"):
            shutil.copyfile(pretrained_from / name, folder / name)
    save_state_dict({"state": state}, folder / GENERATOR_FILE)
    for t, expert in experts.items():
        save_state_dict(expert.state_dict(), folder / f"{t}.safetensors")
    write_text_atomic(folder / "recipe.json", json.dumps(dataclasses.asdict(recipe), indent=2))  # last: done


def _read_heads(path: Path, tasks: tuple[str, ...]) -> dict[str, nn.Linear]:
    """The frozen heads written by a build, as `nn.Linear`s."""
    tensors = load_state_dict(path)
    heads = {}
    for t in tasks:
        w = tensors[f"{t}.weight"]
        head = nn.Linear(w.shape[1], w.shape[0])
        head.load_state_dict({"weight": w, "bias": tensors[f"{t}.bias"]})
        heads[t] = head.requires_grad_(False).eval()
    return heads


def is_built(recipe: Recipe, folder: Path) -> bool:
    """The folder holds this recipe's whole build: its recipe.json (written last) matches and every checkpoint is
    intact. A torn recipe.json or a truncated checkpoint means: build again."""
    files = [folder / f"{n}.safetensors" for n in (PRETRAINED, *recipe.tasks, "heads")]
    written = read_json(folder / "recipe.json")  # every field, or (builds of older versions) `as_dict()`
    return written in (json.loads(json.dumps(dataclasses.asdict(recipe))), json.loads(json.dumps(recipe.as_dict()))) \
        and safetensors_intact(files)


def ensure_built(recipe: Recipe, root: Path | None = None) -> Path:
    """The folder of `recipe`'s build, built first if needed (once, by one of several processes). A fine-tuning
    variant whose `pretraining()` recipe is already built (the default pool, for `digits-mlp_TA8(lr=...)`) starts
    from that build instead of pretraining again."""
    root = root or cache_dir() / "pools" / "digits"
    folder = root / recipe.digest()
    if not is_built(recipe, folder):
        base = recipe.pretraining()
        source = root / base.digest()
        kept = source / GENERATOR_FILE  # absent from builds made before generator states were kept
        if base == recipe or not (is_built(base, source) and kept.is_file() and safetensors_intact([kept])):
            source = None
        with build_lock(folder, f"the {POOL_NAME} pool"):  # two processes build it once, one after the other
            if not is_built(recipe, folder):
                (folder / "recipe.json").unlink(missing_ok=True)  # not done until the rebuild writes it again
                if source is None:
                    build(recipe, folder)
                else:
                    build(recipe, folder, pretrained_from=source)
    return folder


class DigitsModelPool(SafetensorsFolderPool):
    """The pretrained encoder and one expert per task, read from the recipe's build folder (built on first use)."""

    default_taskpool = TASKPOOL_NAME

    def __init__(self, recipe: Recipe | None = None, root: Path | None = None):
        self.name = POOL_NAME
        self.recipe = recipe or Recipe()
        self.root = root

    @cached_property
    def folder(self) -> Path:
        return ensure_built(self.recipe, self.root)

    @property
    def expert_names(self) -> list[str]:
        return list(self.recipe.tasks)

    def build_model(self) -> nn.Module:
        return Encoder(self.recipe.hidden, self.recipe.features)

    def identity(self, name: str) -> str:
        if name == PRETRAINED:  # every fine-tuning variant shares the pretrained encoder, so its cached statistics
            return f"{POOL_NAME}/{self.recipe.pretraining().digest()}/{name}"
        return f"{self.name}/{self.recipe.digest()}/{name}"

    def version_info(self) -> dict[str, str]:
        return {"digits_recipe": self.recipe.digest()}


class DigitsTaskPool(TaskPool):
    """Accuracy of an encoder, through each task's frozen head, on the 597 held-out test digits."""

    def __init__(self, recipe: Recipe | None = None, root: Path | None = None):
        self.name = TASKPOOL_NAME
        self.recipe = recipe or Recipe()
        self.root = root

    @cached_property
    def data(self) -> DigitsData:
        return DigitsData(self.recipe)

    @cached_property
    def heads(self) -> dict[str, nn.Linear]:
        return self._load_heads()

    def _load_heads(self) -> dict[str, nn.Linear]:
        # built outside inference mode even when first asked for by an evaluation: data-dependent methods
        # (Fisher, AdaMerging) backpropagate through the heads later, which inference tensors forbid
        with torch.inference_mode(False):
            return _read_heads(ensure_built(self.recipe, self.root) / "heads.safetensors", self.recipe.tasks)

    @property
    def tasks(self) -> list[str]:
        return list(self.recipe.tasks)

    def batches(self, task: str, split: str = "test", *, batch_size: int = 256,
                limit: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if task not in self.recipe.tasks:
            raise KeyError(f"task pool {self.name!r} has no task {task!r}; tasks: {', '.join(self.recipe.tasks)}")
        x, y = self.data.split(task, split)
        if limit is not None:
            x, y = x[:limit], y[:limit]
        for i in range(0, len(x), batch_size):
            yield x[i:i + batch_size], y[i:i + batch_size]

    def num_examples(self, task: str, split: str = "test") -> int:
        return len(self.data.split(task, split)[1])

    def logits(self, model: nn.Module, task: str, inputs: torch.Tensor) -> torch.Tensor:
        head = self.heads[task]
        features = model(inputs)
        if head.weight.device != features.device:  # Module.to rebinds parameters, which torch.func transforms forbid
            head = head.to(features.device)
        return zero_shot_logits(head, features)

    def version_info(self) -> dict[str, str]:
        return {"digits_recipe": self.recipe.digest()}


def make_pool(params: DigitsPoolParams | None = None) -> DigitsModelPool:
    """The registered factory: the pool whose experts are fine-tuned as `params` say (the defaults: the default
    pool)."""
    return DigitsModelPool((params or DigitsPoolParams()).recipe())


@hookimpl
def register_modelpools(register):
    register(POOL_NAME, make_pool, "8 digit tasks, MLP encoder pretrained without labels (embedded, offline)",
             default=True, params=DigitsPoolParams)
    import mergebench_digits_seeds  # imported here: it builds on this module's data helpers

    mergebench_digits_seeds.register_modelpools(register)


@hookimpl
def register_taskpools(register):
    register(TASKPOOL_NAME, DigitsTaskPool, "8 views of scikit-learn's bundled digits, 597 test images each")
    import mergebench_digits_seeds

    mergebench_digits_seeds.register_taskpools(register)
