"""Tensor roles: what each tensor of a state dict *is*, so methods treat a convolution as a layer, not a blob.

A method that merges weights as matrices (an SVD, a least-squares solve) needs to know which tensors are the weight
of a linear map and how to read them as a matrix; a merge must also know which tensors are not weights at all
(batch-norm running averages are properties of the data, not of training, and are settled by a declared rule,
`bn_stats`, instead of being trimmed or elected like weights). Whether a tensor is merged used to depend only on
its dtype, and every tensor that was not 2-D fell back to a plain mean, so convolutional networks were merged
as if their kernels were biases.

Each tensor gets a `Role`: a `kind` and, for the weights of linear maps, a `MatrixView` that reshapes the tensor to
a matrix and back:

- ``weight``: nn.Linear (out × in, as stored; transformers' `Conv1D` stores in × out and is kept as stored, as the
  reference implementations of the matrix methods do), Conv{1,2,3}d kernels (out, in/groups, *k) read as
  out × (in/groups · prod(k)), the layout `torch.nn.functional.unfold` gives patches in;
- ``embedding``: nn.Embedding (vocab × dim);
- ``head``: a classifier's output layer, when a pool declares one (found by no rule);
- ``bias``, ``norm`` (scale and shift of a normalisation layer), ``running_stat`` (BatchNorm's running_mean,
  running_var, num_batches_tracked), ``buffer`` (any other buffer), ``other``.

Roles come from the model when there is one (`roles_of(module)`), from a pool that declares them
(`TensorRolesPool.tensor_roles`), and from names and shapes when there is only a file (`role_from_name`:
`mergebench merge`). `Fallbacks` is how a method reports a tensor it could not treat as its role asks (a grouped
convolution given to an SVD method): a warning once per run and a count in the result's extras, never silently.
"""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

import torch
from torch import nn

from mergebench_core.engine.bn_stats import BN_STATS_RULES, DEFAULT_BN_STATS, BnStats, BnStatsName  # noqa: F401

log = logging.getLogger(__name__)

RoleKind = Literal["weight", "embedding", "head", "bias", "norm", "running_stat", "buffer", "other"]
BnStatsRule = BnStatsName  # the rule's names, by their earlier name here; the rule itself is `bn_stats.BnStats`

RUNNING_STAT_NAMES = ("running_mean", "running_var", "num_batches_tracked")
ViewKind = Literal["linear", "conv", "embedding"]


@dataclass(frozen=True)
class MatrixView:
    """How a weight tensor is read as the matrix of a linear map, and written back.

    `linear` and `embedding` tensors are matrices as stored. A `conv` kernel (out, in/groups, *k) is the matrix
    out × (in/groups · prod(k)) that multiplies unfolded input patches; with `groups` > 1 that matrix is only the
    stack of the groups' blocks, not the layer's map, so `usable` is False and matrix methods refuse it.
    """

    kind: ViewKind = "linear"
    groups: int = 1

    @property
    def usable(self) -> bool:
        """Whether the matrix is the layer's whole linear map (False for grouped convolutions)."""
        return self.groups == 1

    def matrix_shape(self, shape: tuple[int, ...]) -> tuple[int, int]:
        return (shape[0], math.prod(shape[1:])) if self.kind == "conv" else (shape[0], shape[1])

    def to_matrix(self, tensor: torch.Tensor, batch_dims: int = 0) -> torch.Tensor:
        """The tensor as a matrix; `batch_dims` leading dimensions (stacked experts) are kept."""
        shape = tuple(tensor.shape[batch_dims:])
        if len(shape) == 2 and self.kind != "conv":
            return tensor
        return tensor.reshape(*tensor.shape[:batch_dims], *self.matrix_shape(shape))

    def from_matrix(self, matrix: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """A matrix in this view back in the tensor's own `shape` (leading batch dimensions kept)."""
        batch = tuple(matrix.shape[:-2])
        return matrix.reshape(*batch, *shape)


@dataclass(frozen=True)
class Role:
    """What one tensor is: its `kind`, and for weights of linear maps the `view` that makes them a matrix."""

    kind: RoleKind
    view: MatrixView | None = None

    @property
    def is_running_stat(self) -> bool:
        return self.kind == "running_stat"


LINEAR = Role("weight", MatrixView("linear"))
BIAS, NORM, RUNNING_STAT = Role("bias"), Role("norm"), Role("running_stat")
BUFFER, OTHER = Role("buffer"), Role("other")


@runtime_checkable
class TensorRolesPool(Protocol):
    """A model pool that declares roles for some or all of its tensors (a head the walk cannot recognise, a custom
    layer whose weight is a matrix). Declared roles take precedence over those derived from the model."""

    def tensor_roles(self) -> Mapping[str, Role]: ...


# -- the layer taxonomy: which modules are linear maps, and how their weights read as matrices ---------------------
# The one place that decides it: roles below, and the data statistics (`data.statistics`: Grams of layer inputs), ask
# these functions.

def _conv1d_class() -> type | None:
    """transformers' `Conv1D` (y = x W + b with W stored (in, out)), when transformers is loaded: a model that holds
    one has imported it, so nothing is imported here."""
    return getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)


def is_linear_layer(module: nn.Module) -> bool:
    """`nn.Linear`, or transformers' `Conv1D` (GPT-2's attention and MLP layers)."""
    conv1d = _conv1d_class()
    return isinstance(module, nn.Linear) or (conv1d is not None and isinstance(module, conv1d))


def weight_is_transposed(module: nn.Module) -> bool:
    """True when the layer stores its weight as (in, out) (`Conv1D`), False for `nn.Linear`'s (out, in)."""
    conv1d = _conv1d_class()
    return conv1d is not None and isinstance(module, conv1d)


def is_convolution(module: nn.Module) -> bool:
    """Any convolution, transposed ones included (`weight_view` tells which have a matrix view)."""
    return isinstance(module, nn.modules.conv._ConvNd)


def weight_view(module: nn.Module) -> MatrixView | None:
    """How `module.weight` reads as the matrix of a linear map: linear layers as stored, convolutions (not
    transposed) as out × (in/groups · prod(k)), embeddings as vocab × dim; None for anything else (a transposed
    convolution's (in, out/groups, *k) kernel has no view yet)."""
    if is_linear_layer(module):
        return MatrixView("linear")
    if is_convolution(module) and not isinstance(module, nn.modules.conv._ConvTransposeNd):
        return MatrixView("conv", module.groups)
    if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
        return MatrixView("embedding")
    return None


def linear_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every linear layer of `model` (`is_linear_layer`), by name, in `named_modules` order."""
    return {name: m for name, m in model.named_modules() if is_linear_layer(m)}


def in_features(module: nn.Module) -> int:
    """The width of a layer's input rows: a linear layer's input, whichever way it stores its weight; a
    convolution's unfolded patch (in_channels · prod(kernel_size), groups = 1)."""
    if is_convolution(module):
        return int(module.in_channels // module.groups * math.prod(module.kernel_size))
    weight = module.weight
    return int(weight.shape[0] if weight_is_transposed(module) else weight.shape[1])


_NORMS: tuple[type[nn.Module], ...] = tuple(
    c for c in (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, getattr(nn, "RMSNorm", None))
    if c is not None)


def _module_role(module: nn.Module, local: str, tensor: torch.Tensor, is_buffer: bool) -> Role | None:
    """The role of tensor `local` owned directly by `module`, or None when the module's type says nothing."""
    if isinstance(module, nn.modules.batchnorm._NormBase) and local in RUNNING_STAT_NAMES:
        return RUNNING_STAT
    if is_linear_layer(module) or is_convolution(module):
        return {"weight": Role("weight", weight_view(module)), "bias": BIAS}.get(local)
    if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
        return Role("embedding", weight_view(module)) if local == "weight" else None
    if isinstance(module, _NORMS):
        return NORM if not is_buffer else None
    return None


def role_from_name(name: str, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> Role:
    """The role a tensor's name and shape suggest, for files with no module to walk.

    BatchNorm's running-average buffers are `running_stat` by name; a 4-D or 5-D `*weight` is a convolution kernel
    (groups are not recorded in a file, so it is read as groups = 1); every 2-D tensor is a matrix as stored (what
    the matrix methods have always done); `*bias` is a bias; other 1-D `*weight`s are norm scales.
    """
    local = name.rpartition(".")[2]
    if local in RUNNING_STAT_NAMES:
        return RUNNING_STAT
    if not dtype.is_floating_point:
        return BUFFER
    if len(shape) in (4, 5) and local.endswith("weight"):
        return Role("weight", MatrixView("conv"))
    if len(shape) == 2:
        return Role("embedding", MatrixView("embedding")) if "embed" in name.lower() and "proj" not in name.lower() \
            else LINEAR
    if local.endswith("bias"):
        return BIAS
    if len(shape) == 1 and local.endswith("weight"):
        return NORM
    return OTHER


def roles_of(module: nn.Module) -> dict[str, Role]:
    """The role of every tensor of `module.state_dict()`, from the type of the module that owns it (names under
    every path a shared module is reachable by); tensors of modules no rule knows get `role_from_name`."""
    roles: dict[str, Role] = {}
    for prefix, sub in module.named_modules(remove_duplicate=False):
        owned = [(n, t, False) for n, t in sub.named_parameters(recurse=False)] + \
            [(n, t, True) for n, t in sub.named_buffers(recurse=False)]
        for local, tensor, is_buffer in owned:
            if tensor is None:
                continue
            name = f"{prefix}.{local}" if prefix else local
            role = _module_role(sub, local, tensor, is_buffer)
            if role is None:
                role = role_from_name(name, tuple(tensor.shape), tensor.dtype)
                if is_buffer and role.kind != "running_stat":
                    role = BUFFER
            roles[name] = role
    return roles


def resolve_roles(keys: Iterable[str], shapes: Mapping[str, tuple[int, ...]], dtypes: Mapping[str, torch.dtype],
                  known: Mapping[str, Role] | None = None) -> dict[str, Role]:
    """A role for every key: from `known` (a module's walk, a pool's declaration) where it names the key, else from
    the key's name and shape."""
    known = known or {}
    return {k: known[k] if k in known else role_from_name(k, tuple(shapes[k]), dtypes[k]) for k in keys}


def model_roles(model: nn.Module | None, declared: Mapping[str, Role] | None = None) -> dict[str, Role]:
    """Roles derived from `model` (when there is one) with a pool's `declared` roles on top."""
    roles = roles_of(model) if model is not None else {}
    roles.update(declared or {})
    return roles


def declared_roles(pool: object) -> dict[str, Role]:
    """What a pool declares (`TensorRolesPool`), or nothing."""
    return dict(pool.tensor_roles()) if isinstance(pool, TensorRolesPool) else {}


def has_running_stats(roles: Mapping[str, Role]) -> bool:
    return any(r.is_running_stat for r in roles.values())


def has_conv_kernels(roles: Mapping[str, Role]) -> bool:
    return any(r.view is not None and r.view.kind == "conv" for r in roles.values())


def check_bn_stats(rule: str) -> BnStatsRule:
    """`rule` when it is one of `BN_STATS_RULES`, else a ConfigError naming them: `BnStats.parse`, as a name."""
    return BnStats.parse(rule).name


class Fallbacks:
    """Tensors a method merged by a fallback rule because it could not treat them as their role asks.

    `add` logs a warning the first time each reason occurs in a run (naming the tensor and the rule) and counts every
    occurrence; `counts` goes into the result's extras as `fallback_tensors`, so a table can show that a method met
    layers it does not handle. Nothing falls back silently.
    """

    def __init__(self, method: str):
        self.method = method
        self.counts: dict[str, int] = {}
        self._warned: set[str] = set()

    def add(self, key: str, rule: str, reason: str, detail: str = "") -> None:
        """Count tensor `key`, merged by `rule` because it is `reason` (warned about once per run; `detail` is
        added to that warning only)."""
        self.counts[rule] = self.counts.get(rule, 0) + 1
        if reason not in self._warned:
            self._warned.add(reason)
            log.warning("%s: %s is %s%s, so it is merged by the %s instead (further such tensors are counted in the "
                        "result's extras, fallback_tensors)", self.method, key, reason, detail, rule)

    def __bool__(self) -> bool:
        return bool(self.counts)
