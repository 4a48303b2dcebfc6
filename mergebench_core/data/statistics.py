"""Data statistics that merging methods share, computed once and cached on disk as safetensors.

Fisher merging, uncertainty-based gradient matching, RegMean and their variants all start from the same few
statistics of a model on a task's training data:

- the diagonal Fisher (or Gauss-Newton Hessian) estimate: the mean over examples of each parameter's squared
  *per-example* gradient of the negative log-likelihood, with the true labels ("empirical") or with labels drawn from
  the model's own predictive distribution ("sampled", an unbiased Monte-Carlo estimate of the true Fisher);
- the mean absolute per-example gradient (`mean_abs_gradient`, the first moment where the Fisher takes the second),
  which Task Arithmetic in Trust Region reads as each parameter's importance to a task;
- the Gram matrix XᵀX / n of the inputs of every `nn.Linear` (RegMean), and of every transformers `Conv1D`
  (GPT-2's linear layers, which store their weight transposed, (in, out): `weight_is_transposed`); on request of
  every Conv1d/Conv2d with groups = 1 too, over its unfolded input patches (`conv_patches`), which is the Gram of
  the kernel's matrix view out × (in · prod(k)).

They are expensive (a backward pass per example for Fisher) and identical across methods and across a grid of
hyper-parameters, so `StatsCache` stores each one under a key of (model identity, task, statistic, number of
examples, seed, code version) in the content-addressed cache (`mergebench_core.cache`): an entry stored under
another key (a hash collision, a hand-copied file, an older `STATS_VERSION`) or whose bytes no longer match its
digest is recomputed, never used.

Which modules are linear layers and convolutions, and how wide their inputs are, is decided once, in
`mergebench_core.engine.roles` (`linear_layers`, `weight_is_transposed` and `in_features` are re-exported here, where
plugins have always imported them).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from mergebench_core.cache import ContentCache, Entry, Key, key_digest
from mergebench_core.contract.api import ModelPool, RunContext, TaskPool
from mergebench_core.engine.roles import in_features, is_convolution, linear_layers, weight_is_transposed, weight_view

log = logging.getLogger(__name__)

STATS_VERSION = 1
"""Bump whenever a change to this module changes the numbers it computes; every cached file is then recomputed."""

FisherLabels = Literal["empirical", "sampled"]
Progress = Callable[..., Iterator[Any]]


# -- the cache ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class StatsKey:
    """What identifies one cached data statistic. Everything that changes its numbers must be in here."""

    model: str
    """`ModelPool.identity(name)`: changes whenever the weights change."""
    task: str
    """`<task pool name>/<task>`: the task pool owns the data and the heads, so both are part of the key."""
    statistic: str
    n_examples: int
    seed: int
    version: int = STATS_VERSION

    def metadata(self) -> dict[str, str]:
        """The key as flat strings (how entries of cache format 1 stored it)."""
        return {f"mergebench.{k}": str(v) for k, v in asdict(self).items()}

    def filename(self) -> str:
        return f"{self.statistic}-{key_digest(asdict(self))}.safetensors"

    def describe(self) -> str:
        return f"{self.statistic} of {self.model} on {self.task}"


class StatsCache(ContentCache):
    """Data statistics in the content-addressed cache (`mergebench_core.cache`): one entry per `StatsKey`, named
    `<statistic>-<hash of the key>.safetensors`, float32 tensors. Counts its hits and misses (`get_or_compute`) so
    benchmarks can report them."""

    @classmethod
    def for_context(cls, ctx: RunContext) -> StatsCache:
        """The cache every method of a run shares: `<cache dir>/stats`."""
        return cls(Path(ctx.cache_dir) / "stats")

    def entry_name(self, key: Key, digest: str) -> str:
        return f"{key['statistic']}-{digest}"

    def path(self, key: StatsKey) -> Path:
        return self.entry_path(asdict(key))

    def load(self, key: StatsKey) -> dict[str, torch.Tensor] | None:
        """The cached tensors for `key`, or None when absent, damaged, or stored under a different key."""
        entry = self.get(asdict(key), key.describe())
        return entry.tensors if entry is not None else None

    def save(self, key: StatsKey, tensors: Mapping[str, torch.Tensor]) -> Path:
        return self.put(asdict(key), Entry(_float32(tensors)), key.describe())

    def get_or_compute(self, key: StatsKey, compute: Callable[[], Mapping[str, torch.Tensor]]
                       ) -> dict[str, torch.Tensor]:
        """The statistic of `key`: from the cache, or `compute()`d once (across processes) and stored."""
        return self.get_or_build(asdict(key), lambda: Entry(_float32(compute())), key.describe()).tensors


def _float32(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()}


# -- data ---------------------------------------------------------------------------------------------------------

def _train_batches(taskpool: TaskPool, task: str, n_examples: int, batch_size: int,
                   progress: Progress | None, desc: str) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    """The first `n_examples` training examples of `task` in batches, wrapped in a progress bar when asked."""
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]] = taskpool.batches(
        task, "train", batch_size=batch_size, limit=n_examples)
    if progress is not None:
        batches = progress(batches, desc=desc, total=math.ceil(n_examples / batch_size))
    return batches


# -- Fisher / Hessian diagonals -----------------------------------------------------------------------------------

class LogitsOf(nn.Module):
    """`taskpool.logits(model, task, ·)` as a module, so `torch.func.functional_call` can swap the model's weights.

    The task pool's head is not a submodule: only the mergeable model's parameters are differentiated.
    """

    def __init__(self, model: nn.Module, taskpool: TaskPool, task: str):
        super().__init__()
        self.model = model
        self._taskpool, self._task = taskpool, task

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self._taskpool.logits(self.model, self._task, inputs)


def _labels_for(wrapper: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, mode: FisherLabels,
                generator: torch.Generator) -> torch.Tensor:
    if mode == "empirical":
        return labels
    with torch.no_grad():
        probs = torch.softmax(wrapper(inputs).float(), dim=-1).cpu()
    return torch.multinomial(probs, 1, generator=generator).squeeze(1).to(labels.device)


def _moment(g: torch.Tensor, power: int) -> torch.Tensor:
    """|g|^power entry-wise: squares for Fisher diagonals, magnitudes for mean absolute gradients."""
    return g.float().pow(2) if power == 2 else g.float().abs().pow(power)


def _squared_grads_vmap(wrapper: nn.Module, params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor],
                        inputs: torch.Tensor, labels: torch.Tensor, chunk: int, power: int = 2
                        ) -> dict[str, torch.Tensor]:
    """Σ over the batch of |each example's gradient|^power (squared by default), with vmap(grad), `chunk` examples at
    a time."""
    from torch.func import functional_call, grad, vmap

    def loss(p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = functional_call(wrapper, (p, buffers), (x.unsqueeze(0),))
        return F.cross_entropy(logits.float(), y.unsqueeze(0))

    out = {k: torch.zeros_like(v, dtype=torch.float32) for k, v in params.items()}
    for i in range(0, len(inputs), chunk):
        per_example = vmap(grad(loss), in_dims=(None, 0, 0))(params, inputs[i:i + chunk], labels[i:i + chunk])
        for k, g in per_example.items():
            out[k] += _moment(g, power).sum(0)
    return out


def _squared_grads_loop(wrapper: nn.Module, params: dict[str, torch.Tensor], inputs: torch.Tensor,
                        labels: torch.Tensor, power: int = 2) -> dict[str, torch.Tensor]:
    """The same sum with one backward pass per example: slow, but works on any module."""
    names = list(params)
    tensors = [dict(wrapper.named_parameters())[n] for n in names]
    out = {n: torch.zeros_like(t) for n, t in zip(names, tensors)}
    for i in range(len(inputs)):
        loss = F.cross_entropy(wrapper(inputs[i:i + 1]).float(), labels[i:i + 1])
        grads = torch.autograd.grad(loss, tensors, allow_unused=True)
        for n, g in zip(names, grads):
            if g is not None:
                out[n] += _moment(g, power).to(out[n].dtype)
    return out


def fisher_diagonal(model: nn.Module, taskpool: TaskPool, task: str, n_examples: int = 256, *, seed: int = 0,
                    labels: FisherLabels = "empirical", batch_size: int = 32, device: torch.device | str = "cpu",
                    per_example: Literal["auto", "vmap", "loop"] = "auto", max_grad_memory_mb: float = 1024,
                    progress: Progress | None = None, power: int = 2) -> dict[str, torch.Tensor]:
    """Diagonal Fisher of `model` on `task`: mean over the first `n_examples` training examples of g ⊙ g, where g is
    one example's gradient of the cross-entropy of `taskpool.logits(model, task, x)` with respect to every
    parameter of `model`.

    `labels="sampled"` draws each label from the model's softmax (seeded by `seed`), as uncertainty-based gradient
    matching does; `"empirical"` uses the true labels. `per_example="auto"` batches with `torch.func.vmap` and falls
    back to a per-example loop for modules vmap cannot handle. vmap holds one gradient per example, so it takes as
    many examples at a time as fit in `max_grad_memory_mb` (the whole batch for small models, a few for CLIP).

    `taskpool.logits` runs inside `torch.func` transforms here: it must not rebind module parameters (`Module.to`)
    or fill lazy caches; one plain forward is run first so lazily built heads exist before the transforms start.

    `power` = 1 gives the mean over examples of |g| instead (see `mean_abs_gradient`).
    """
    if power not in (1, 2):
        raise ValueError(f"power must be 1 (mean |g|) or 2 (mean g ⊙ g), got {power}")
    if labels not in ("empirical", "sampled"):
        raise ValueError(f"labels must be 'empirical' or 'sampled', got {labels!r}")
    device = torch.device(device)
    model = model.to(device).eval()
    wrapper = LogitsOf(model, taskpool, task)
    params = {f"model.{k}": v.detach() for k, v in model.named_parameters()}
    buffers = {f"model.{k}": v.detach() for k, v in model.named_buffers()}
    sums = {k: torch.zeros_like(v, dtype=torch.float32) for k, v in params.items()}
    bytes_per_example = 4 * sum(v.numel() for v in params.values())
    chunk = max(1, int(max_grad_memory_mb * 2**20 // max(bytes_per_example, 1)))
    generator = torch.Generator().manual_seed(seed)
    mode = per_example
    seen = 0
    for inputs, y in _train_batches(taskpool, task, n_examples, batch_size, progress,
                                    f"{'fisher' if power == 2 else 'mean |grad|'} ({labels}) on {task}"):
        inputs, y = inputs.to(device), y.to(device)
        if seen == 0:  # one plain forward first: task pools build heads lazily, which must not happen under vmap
            with torch.no_grad():  # (nor under inference mode: the heads are backpropagated through)
                wrapper(inputs[:1])
        y = _labels_for(wrapper, inputs, y, labels, generator)
        if mode in ("auto", "vmap"):
            try:
                batch = _squared_grads_vmap(wrapper, params, buffers, inputs, y, chunk, power)
                mode = "vmap"
            except Exception as exc:
                if mode == "vmap":
                    raise
                log.info("vmap cannot batch per-example gradients of this model (%s); looping per example", exc)
                mode = "loop"
        if mode == "loop":
            batch = _squared_grads_loop(wrapper, params, inputs, y, power)
        for k in sums:
            sums[k] += batch[k].float()
        seen += len(inputs)
    if seen == 0:
        raise ValueError(f"task {task!r} of task pool {taskpool.name!r} has no training examples")
    if seen < n_examples:
        log.warning("task %s has only %d training examples (%d asked for)", task, seen, n_examples)
    return {k.removeprefix("model."): (v / seen).cpu() for k, v in sums.items()}


def mean_abs_gradient(model: nn.Module, taskpool: TaskPool, task: str, n_examples: int = 128, *,
                      batch_size: int = 32, device: torch.device | str = "cpu",
                      progress: Progress | None = None) -> dict[str, torch.Tensor]:
    """Mean over the first `n_examples` training examples of |g|, g one example's gradient of the cross-entropy
    (true labels): the first moment where `fisher_diagonal` takes the second. Task Arithmetic in Trust Region
    measures with it how strongly each parameter matters to a task."""
    return fisher_diagonal(model, taskpool, task, n_examples, labels="empirical", batch_size=batch_size,
                           device=device, progress=progress, power=1)


# -- Gram matrices of linear-layer inputs -------------------------------------------------------------------------

class _StopForward(Exception):
    """Raised by a hook once every requested layer has seen its input, so the rest of the forward is skipped."""


def gram_convolutions(model: nn.Module) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """The convolutions of `model` whose input Grams can be collected ({name: module}: nn.Conv1d and nn.Conv2d with
    groups = 1, as linear maps of their unfolded input patches), and why each other one cannot ({name: reason}:
    grouped, 3-D and transposed convolutions)."""
    ok: dict[str, nn.Module] = {}
    refused: dict[str, str] = {}
    for name, m in model.named_modules():
        if not is_convolution(m):
            continue
        view = weight_view(m)
        if view is None:
            refused[name] = "a transposed convolution"
        elif not isinstance(m, (nn.Conv1d, nn.Conv2d)):
            refused[name] = f"a {type(m).__name__} (patches of 3-D inputs are not unfolded)"
        elif not view.usable:
            refused[name] = f"a grouped convolution (groups={m.groups})"
        else:
            ok[name] = m
    return ok, refused


def gram_layers(model: nn.Module, convolutions: bool = False) -> dict[str, nn.Module]:
    """The layers whose input Grams RegMean uses: `linear_layers`, and with `convolutions` the convolutions of
    `gram_convolutions`."""
    layers = linear_layers(model)
    if convolutions:
        layers.update(gram_convolutions(model)[0])
    return {name: m for name, m in model.named_modules() if name in layers}  # forward-definition order


def conv_patches(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The unfolded input patches of a Conv1d or Conv2d (groups = 1) as rows (positions, in_channels · prod(k)), in
    the order of the kernel's matrix view `weight.flatten(1)`: y = patches @ weight.flatten(1)ᵀ + bias at every
    output position. A 1×1 convolution's patches are the channel vectors at every position."""
    conv1d = isinstance(module, nn.Conv1d)
    if x.dim() == (2 if conv1d else 3):  # an unbatched input
        x = x.unsqueeze(0)
    padding: Any = module.padding
    if isinstance(padding, str) or module.padding_mode != "zeros":  # pad as the layer does, then unfold unpadded
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        x = F.pad(x, module._reversed_padding_repeated_twice, mode=mode)
        padding = (0,) * len(module.kernel_size)
    kernel, stride, dilation = module.kernel_size, module.stride, module.dilation
    if conv1d:
        x = x.unsqueeze(-2)
        kernel, stride, dilation, padding = ((1, *t) for t in (kernel, stride, dilation, padding))
    patches = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)  # (N, C·k, L)
    return patches.transpose(1, 2).reshape(-1, patches.shape[1])


def input_rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A layer's input as rows of the vectors its weight matrix multiplies: token vectors for linear layers, unfolded
    patches for convolutions."""
    if is_convolution(module):
        return conv_patches(module, x)
    return x.reshape(-1, x.shape[-1])


def linear_input_grams(model: nn.Module, taskpool: TaskPool, task: str, n_examples: int = 256, *,
                       batch_size: int = 32, device: torch.device | str = "cpu", modules: Sequence[str] | None = None,
                       progress: Progress | None = None, convolutions: bool = False) -> dict[str, torch.Tensor]:
    """{module name: XᵀX / rows} for the inputs X of every `nn.Linear` of `model` (or those in `modules`) on the
    first `n_examples` examples of `task`, collected with forward hooks under inference mode.

    Inputs with extra leading dimensions (tokens) are flattened to rows, so n counts rows. When `modules` is given
    the forward pass stops as soon as each of them has seen its input (RegMean++ asks for one layer at a time).
    With `convolutions`, Conv1d/Conv2d layers (groups = 1) are included too: their rows are the unfolded input
    patches at every output position (`conv_patches`), so the Gram belongs to the kernel's matrix view.
    """
    device = torch.device(device)
    model = model.to(device).eval()
    layers = gram_layers(model, convolutions)
    wanted = list(layers) if modules is None else list(modules)
    missing = [m for m in wanted if m not in layers]
    if missing:
        raise KeyError(f"not linear layers of the model: {missing}")
    grams = {m: torch.zeros(in_features(layers[m]), in_features(layers[m]), device=device) for m in wanted}
    rows = dict.fromkeys(wanted, 0)
    seen_in_batch: set[str] = set()
    stop_early = modules is not None

    def hook(name: str) -> Callable[..., None]:
        def record(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = input_rows(module, args[0].detach()).float()
            grams[name] += x.T @ x
            rows[name] += x.shape[0]
            seen_in_batch.add(name)
            if stop_early and len(seen_in_batch) == len(wanted):
                raise _StopForward
        return record

    handles = [layers[m].register_forward_pre_hook(hook(m)) for m in wanted]
    try:
        with torch.inference_mode():
            for inputs, _ in _train_batches(taskpool, task, n_examples, batch_size, progress, f"grams on {task}"):
                seen_in_batch.clear()
                try:
                    taskpool.logits(model, task, inputs.to(device))
                except _StopForward:
                    pass
    finally:
        for h in handles:
            h.remove()
    unused = [m for m in wanted if rows[m] == 0]
    if unused:
        raise ValueError(f"linear layers {unused} saw no input on task {task!r}")
    return {m: (grams[m] / rows[m]).cpu() for m in wanted}


def forward_order(model: nn.Module, taskpool: TaskPool, task: str, convolutions: bool = False) -> list[str]:
    """Names of the linear layers of `model` (and with `convolutions` its `gram_convolutions`) in the order a forward
    pass first calls them (layers never called are left out), from one example of `task`."""
    order: list[str] = []
    handles = [m.register_forward_pre_hook(lambda mod, args, n=name: order.append(n) if n not in order else None)
               for name, m in gram_layers(model, convolutions).items()]
    try:
        inputs, _ = next(iter(taskpool.batches(task, "train", batch_size=1, limit=1)))
        with torch.inference_mode():
            taskpool.logits(model.eval(), task, inputs.to(next(model.parameters()).device))
    finally:
        for h in handles:
            h.remove()
    return order


# -- cached entry points ------------------------------------------------------------------------------------------

def task_key(taskpool: TaskPool, task: str) -> str:
    return f"{taskpool.name}/{task}"


def cached_fisher(cache: StatsCache, pool: ModelPool, model_name: str, taskpool: TaskPool, task: str, *,
                  n_examples: int = 256, seed: int = 0, labels: FisherLabels = "empirical", batch_size: int = 32,
                  device: torch.device | str = "cpu", progress: Progress | None = None) -> dict[str, torch.Tensor]:
    """`fisher_diagonal` of pool model `model_name` on `task`, from the cache when it was computed before.

    The model is loaded only on a cache miss, so a cache hit costs one file read.
    """
    key = StatsKey(pool.identity(model_name), task_key(taskpool, task), f"fisher_{labels}", n_examples, seed)
    return cache.get_or_compute(key, lambda: fisher_diagonal(
        pool.load_model(model_name), taskpool, task, n_examples, seed=seed, labels=labels, batch_size=batch_size,
        device=device, progress=progress))


def cached_abs_gradient(cache: StatsCache, pool: ModelPool, model_name: str, taskpool: TaskPool, task: str, *,
                        n_examples: int = 128, batch_size: int = 32, device: torch.device | str = "cpu",
                        progress: Progress | None = None) -> dict[str, torch.Tensor]:
    """`mean_abs_gradient` of pool model `model_name` on `task`, cached (no randomness: the key's seed is 0)."""
    key = StatsKey(pool.identity(model_name), task_key(taskpool, task), "mean_abs_grad", n_examples, 0)
    return cache.get_or_compute(key, lambda: mean_abs_gradient(
        pool.load_model(model_name), taskpool, task, n_examples, batch_size=batch_size, device=device,
        progress=progress))


def cached_linear_grams(cache: StatsCache, pool: ModelPool, model_name: str, taskpool: TaskPool, task: str, *,
                        n_examples: int = 256, batch_size: int = 32, device: torch.device | str = "cpu",
                        progress: Progress | None = None, convolutions: bool = False) -> dict[str, torch.Tensor]:
    """`linear_input_grams` of pool model `model_name` on `task`, cached. Grams use no randomness: the seed in the
    key is always 0, so runs with different seeds share them. With `convolutions` the statistic is another entry
    ("linear_conv_grams"), so files cached before convolutions had Grams are never read as complete."""
    statistic = "linear_conv_grams" if convolutions else "linear_grams"
    key = StatsKey(pool.identity(model_name), task_key(taskpool, task), statistic, n_examples, 0)
    return cache.get_or_compute(key, lambda: linear_input_grams(
        pool.load_model(model_name), taskpool, task, n_examples, batch_size=batch_size, device=device,
        progress=progress, convolutions=convolutions))
