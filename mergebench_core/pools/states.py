"""Pools held as state dicts: an independent pool over state dicts in memory, and the check that a pool's models
share one architecture.

Fusion methods, their tests and scripts often have models in memory rather than on disk (a model and permuted copies
of it, models trained in the same script); `StateDictPool` makes them a pool without writing files. `load_states`
reads a pool's models and refuses them, naming the first difference, when they are not one architecture: fusion
pairs tensors by name and shape, so anything else would fail later with a less useful error.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from mergebench_core.contract.api import ModelPool
from mergebench_core.errors import MergebenchError

if TYPE_CHECKING:
    from mergebench_core.fusion.alignment import PermutationSpec


def load_states(pool: ModelPool, names: Sequence[str] | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """{model: state dict} for `names` (every model by default), after checking that they share one architecture:
    the same tensor names with the same shapes. A mismatch is a `MergebenchError` naming the models and the first
    differing tensors (fusion needs models of one architecture; align widths before fusing)."""
    names = list(names if names is not None else pool.expert_names)
    states = {n: pool.state_dict(n) for n in names}
    first, ref = names[0], states[names[0]]
    for name in names[1:]:
        other = states[name]
        missing, extra = sorted(set(ref) - set(other)), sorted(set(other) - set(ref))
        if missing or extra:
            raise MergebenchError(
                f"models {first!r} and {name!r} of pool {pool.name!r} are not one architecture: "
                + (f"{name!r} lacks {missing[:5]}" if missing else "")
                + ("; " if missing and extra else "") + (f"{name!r} has extra {extra[:5]}" if extra else "")
                + "; fusion needs models with the same tensors (use models built by one architecture)")
        shapes = [k for k in ref if ref[k].shape != other[k].shape]
        if shapes:
            k = shapes[0]
            raise MergebenchError(
                f"models {first!r} and {name!r} of pool {pool.name!r} are not one architecture: tensor {k!r} has "
                f"shape {tuple(ref[k].shape)} in {first!r} and {tuple(other[k].shape)} in {name!r}"
                + (f" ({len(shapes)} tensors differ)" if len(shapes) > 1 else "")
                + "; fusion needs equal widths (train the models with one architecture)")
    return states


class StateDictPool(ModelPool):
    """An independent pool over state dicts held in memory: `build_model()` makes an instance of the architecture
    and `spec` says how to align it. For scripts and tests; `pools.folder.CheckpointFolderPool` reads the same from
    a folder."""

    relation = "independent"
    has_pretrained = False

    def __init__(self, build_model: Callable[[], nn.Module], states: Mapping[str, Mapping[str, torch.Tensor]],
                 spec: PermutationSpec | None = None, *, name: str = "state-dicts",
                 default_taskpool: str | None = None):
        self.build_model, self.states, self.spec = build_model, dict(states), spec
        self.name, self.default_taskpool = name, default_taskpool

    @property
    def expert_names(self) -> list[str]:
        return list(self.states)

    def _check(self, name: str) -> None:
        if name not in self.states:
            raise KeyError(f"pool {self.name!r} has no model {name!r}; models: {', '.join(self.states)}")

    def state_dict(self, name: str) -> dict[str, torch.Tensor]:
        self._check(name)
        return dict(self.states[name])

    def load_model(self, name: str) -> nn.Module:
        model = self.build_model()
        model.load_state_dict(self.state_dict(name))
        return model.eval()

    def task_of(self, expert: str) -> str:
        return expert

    def identity(self, name: str) -> str:
        """Changes with the weights (a hash of every tensor), so cached activations never outlive them."""
        self._check(name)
        digest = hashlib.sha256()
        for key, t in sorted(self.states[name].items()):
            digest.update(key.encode())
            digest.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        return f"{self.name}/{name}@{digest.hexdigest()[:16]}"

    def permutation_spec(self) -> PermutationSpec | None:
        return self.spec
