"""Permutation specs, weight matching and activation collection (mergebench_core.fusion.alignment)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mergebench_core import MergebenchError, TaskPool
from mergebench_core.fusion.alignment import (
    PermutationSpec,
    apply_permutation,
    collect_activations,
    mlp_permutation_spec,
    weight_matching,
)
from mergebench_core.data.statistics import StatsCache


class NormMLP(nn.Module):
    """fc1 → LayerNorm → ReLU → fc2 → LayerNorm → ReLU → fc3: a hidden permutation must move the norms too."""

    def __init__(self, d_in: int = 7, hidden: int = 16, d_out: int = 5):
        super().__init__()
        self.fc1, self.ln1 = nn.Linear(d_in, hidden), nn.LayerNorm(hidden)
        self.fc2, self.ln2 = nn.Linear(hidden, hidden), nn.LayerNorm(hidden)
        self.fc3 = nn.Linear(hidden, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.ln1(self.fc1(x)))
        x = F.relu(self.ln2(self.fc2(x)))
        return self.fc3(x)


SPEC = mlp_permutation_spec(["fc1", "fc2", "fc3"], norms={"fc1": "ln1", "fc2": "ln2"})


def random_model(seed: int) -> NormMLP:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = NormMLP()
        with torch.no_grad():  # LayerNorm starts at (1, 0): give it entries a wrong permutation would misplace
            for ln in (model.ln1, model.ln2):
                ln.weight.normal_()
                ln.bias.normal_()
    return model.eval()


def random_perms(sizes: dict[str, int], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {p: torch.randperm(n, generator=g) for p, n in sizes.items()}


def test_the_mlp_helper_builds_the_expected_spec():
    assert SPEC.axes["fc1.weight"] == ("P_fc1", None) and SPEC.axes["fc1.bias"] == ("P_fc1",)
    assert SPEC.axes["fc2.weight"] == ("P_fc2", "P_fc1") and SPEC.axes["ln2.bias"] == ("P_fc2",)
    assert SPEC.axes["fc3.weight"] == (None, "P_fc2") and SPEC.axes["fc3.bias"] == (None,)
    assert SPEC.perms["P_fc1"] == [("fc1.weight", 0), ("fc1.bias", 0), ("ln1.weight", 0), ("ln1.bias", 0),
                                   ("fc2.weight", 1)]
    assert SPEC.sizes(random_model(0).state_dict()) == {"P_fc1": 16, "P_fc2": 16}


def test_permuting_hidden_units_leaves_the_function_unchanged():
    model = random_model(0)
    state = model.state_dict()
    before = {k: v.clone() for k, v in state.items()}
    perms = random_perms(SPEC.sizes(state), 1)
    permuted = apply_permutation(SPEC, state, perms)
    assert all(torch.equal(state[k], before[k]) for k in state)  # the input is untouched
    assert not torch.equal(permuted["fc2.weight"], state["fc2.weight"])
    # the documented convention: output unit i is input unit perms[p][i]
    assert torch.equal(permuted["fc1.bias"], state["fc1.bias"][perms["P_fc1"]])
    assert torch.equal(permuted["fc2.weight"], state["fc2.weight"][perms["P_fc2"]][:, perms["P_fc1"]])
    other = NormMLP().eval()
    other.load_state_dict(permuted)
    x = torch.randn(64, 7, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(other(x), model(x), atol=1e-5, rtol=1e-5)


def test_weight_matching_recovers_a_planted_permutation():
    state = random_model(3).state_dict()
    planted = random_perms(SPEC.sizes(state), 4)
    shuffled = apply_permutation(SPEC, state, planted)
    found = weight_matching(SPEC, state, shuffled, generator=torch.Generator().manual_seed(5))
    for p, perm in planted.items():
        assert torch.equal(found[p], torch.argsort(perm)), p  # the inverse of the planted shuffle
    realigned = apply_permutation(SPEC, shuffled, found)
    assert all(torch.equal(realigned[k], state[k]) for k in state)


def test_weight_matching_ends_where_no_swap_of_two_units_helps():
    """On two unrelated models the answer is a coordinate-wise optimum: swapping any two units of any permutation
    (with the others held) cannot raise Σ ⟨W_a, π(W_b)⟩, and it beats the identity."""
    a, b = random_model(10).state_dict(), random_model(11).state_dict()  # a pair that needs several sweeps
    perms = weight_matching(SPEC, a, b)

    def similarity(p: dict[str, torch.Tensor]) -> float:
        other = apply_permutation(SPEC, b, p)
        return sum(float((a[k].double() * other[k].double()).sum()) for k in SPEC.axes)

    best = similarity(perms)
    assert best > similarity({})
    for name, perm in perms.items():
        for i in range(len(perm)):
            for j in range(i + 1, len(perm)):
                swapped = perm.clone()
                swapped[[i, j]] = perm[[j, i]]
                assert similarity({**perms, name: swapped}) <= best + 1e-9, (name, i, j)
    again = weight_matching(SPEC, a, b)  # seeded: the same answer twice
    assert all(torch.equal(perms[p], again[p]) for p in perms)


def test_validation_names_the_key_and_the_fix():
    state = random_model(0).state_dict()
    with pytest.raises(MergebenchError, match="'fc9.weight'.*lacks"):
        PermutationSpec({**SPEC.axes, "fc9.weight": ("P_fc1", None)}).validate(state)
    with pytest.raises(MergebenchError, match="'fc1.bias' 2 axes"):
        PermutationSpec({**SPEC.axes, "fc1.bias": ("P_fc1", None)}).validate(state)
    with pytest.raises(MergebenchError, match="'P_fc1' acts on axes of different sizes"):
        PermutationSpec({**SPEC.axes, "fc3.weight": ("P_fc1", "P_fc2")}).validate(state)
    with pytest.raises(MergebenchError, match="not a permutation"):
        apply_permutation(SPEC, state, {"P_fc1": torch.zeros(16, dtype=torch.long)})
    with pytest.raises(MergebenchError, match="not in the spec"):
        apply_permutation(SPEC, state, {"P_nope": torch.arange(16)})
    with pytest.raises(ValueError, match="norms name layers"):
        mlp_permutation_spec(["fc1", "fc2"], norms={"fc7": "ln"})
    with pytest.raises(MergebenchError, match="shape"):
        weight_matching(SPEC, state, NormMLP(hidden=8).state_dict())


class TokenModel(nn.Module):
    """(batch, 12) → (batch, 3 tokens, 4) → linear → (batch, 3, 6); counts its forward calls."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 6)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.proj(x.view(len(x), 3, 4)).mean(1)


class TwoTasks(TaskPool):
    name = "two-tasks"

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.x = {t: torch.randn(20, 12, generator=g) for t in self.tasks}

    @property
    def tasks(self) -> list[str]:
        return ["a", "b"]

    def batches(self, task: str, split: str = "test", *, batch_size: int = 256,
                limit: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        x = self.x[task][:limit]
        for i in range(0, len(x), batch_size):
            yield x[i:i + batch_size], torch.zeros(len(x[i:i + batch_size]), dtype=torch.long)

    def logits(self, model: nn.Module, task: str, inputs: torch.Tensor) -> torch.Tensor:
        return model(inputs)


def test_activations_have_rows_per_example_and_token_and_come_from_the_cache(tmp_path):
    model, tasks = TokenModel(), TwoTasks()
    cache = StatsCache(tmp_path)
    kwargs = dict(n_examples=8, batch_size=3, cache=cache, model_identity="pool/m")
    acts = collect_activations(model, tasks, ["a", "b"], ["proj", ""], **kwargs)
    assert acts["proj"].shape == (2 * 8 * 3, 6)  # tasks × examples × tokens rows, features last
    assert acts[""].shape == (2 * 8, 6)
    expected = model.proj(tasks.x["b"][:8].view(8, 3, 4)).reshape(-1, 6).detach()
    torch.testing.assert_close(acts["proj"][24:], expected)  # task order kept: "b" after "a"
    calls = model.calls
    assert calls == 2 * 3  # ceil(8 / 3) batches per task
    again = collect_activations(model, tasks, ["a", "b"], ["proj", ""], **kwargs)
    assert model.calls == calls and cache.hits == 4  # a hit runs no forward pass
    assert all(torch.equal(again[p], acts[p]) for p in acts)
    collect_activations(model, tasks, ["a"], ["proj"], **{**kwargs, "n_examples": 5})
    assert model.calls > calls  # another n is another key
    with pytest.raises(MergebenchError, match="not submodules"):
        collect_activations(model, tasks, ["a"], ["nope"])
