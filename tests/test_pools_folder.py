"""The checkpoint-pool bases (`mergebench_core.pools.folder`): where a model's file is, what is refused, and that
nothing is read before it is needed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from mergebench_core import PRETRAINED, CheckpointError, MergebenchError
from mergebench_core.engine.tensors import StateDictSource, save_state_dict
from mergebench_core.pools.folder import CheckpointFolderPool, RenamedSource, SafetensorsFolderPool


def linear(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"weight": torch.randn(3, 4, generator=gen), "bias": torch.randn(3, generator=gen)}


class LinearPool(SafetensorsFolderPool):
    """A pool of nn.Linear(4, 3) models in `root`, whose folder is 'built' (counted) on first use."""

    def __init__(self, root: Path, experts: list[str], *, pretrained: bool = True):
        self.name, self.root, self.experts, self.has_pretrained = "linear", root, experts, pretrained
        self.builds = 0

    @property
    def folder(self) -> Path:
        self.builds += 1
        return self.root

    @property
    def expert_names(self) -> list[str]:
        return list(self.experts)

    def build_model(self) -> nn.Module:
        return nn.Linear(4, 3)


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "models"
    root.mkdir()
    for i, name in enumerate([PRETRAINED, "a", "b"]):
        save_state_dict(linear(i), root / f"{name}.safetensors")
    return root


def test_models_load_from_their_files(folder):
    pool = LinearPool(folder, ["a", "b"])
    model = pool.load_model("b")
    assert isinstance(model, nn.Linear) and not model.training
    assert torch.equal(model.weight.detach(), linear(2)["weight"]) and torch.equal(model.bias.detach(), linear(2)["bias"])
    assert {k: v.tolist() for k, v in pool.state_dict(PRETRAINED).items()} == \
        {k: v.tolist() for k, v in linear(0).items()}
    src = pool.tensor_source("a")
    assert sorted(src.keys()) == ["bias", "weight"] and src.shape("weight") == (3, 4)
    assert src.name == "linear/a"


def test_nothing_is_read_before_a_model_is(folder):
    pool = LinearPool(folder, ["a", "b"])
    assert pool.expert_names == ["a", "b"] and pool.model_names() == [PRETRAINED, "a", "b"]
    assert pool.builds == 0  # listing models never asks for (or builds) the folder
    src = pool.tensor_source("a")
    assert pool.builds == 1
    # tensor data is read when asked for, not when the source opens: change the file's bytes in place and the
    # source returns the new values
    path = folder / "a.safetensors"
    data = bytearray(path.read_bytes())
    start = 8 + int.from_bytes(data[:8], "little")  # the tensors' bytes follow the 8-byte length and the header
    data[start:] = b"\0" * (len(data) - start)
    path.write_bytes(bytes(data))
    assert all(torch.equal(src.get(k), torch.zeros_like(v)) for k, v in linear(1).items())


def test_unknown_names_list_the_models(folder):
    pool = LinearPool(folder, ["a", "b"])
    with pytest.raises(KeyError, match=r"has no model 'c'; models: _pretrained_, a, b"):
        pool.state_dict("c")
    independent = LinearPool(folder, ["a", "b"], pretrained=False)
    with pytest.raises(KeyError, match=r"has no model '_pretrained_' \(it has no pretrained model\); models: a, b"):
        independent.load_model(PRETRAINED)


def test_a_missing_file_is_named(folder):
    pool = LinearPool(folder, ["a", "b", "c"])
    with pytest.raises(CheckpointError, match=r"checkpoint of model 'c' is missing \(.*c\.safetensors\)"):
        pool.tensor_source("c")


def test_paths_that_escape_the_folder_are_refused(folder, tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    save_state_dict(linear(7), outside / "secret.safetensors")
    (folder / "linked.safetensors").symlink_to(outside / "secret.safetensors")
    pool = LinearPool(folder, ["a", "linked"])
    with pytest.raises(CheckpointError, match="leads outside"):
        pool.state_dict("linked")
    save_state_dict(linear(8), tmp_path / "up.safetensors")
    sneaky = LinearPool(folder, ["a", "../up"])
    with pytest.raises(CheckpointError, match="outside the pool's folder"):
        sneaky.load_model("../up")


def test_a_pool_reads_some_models_from_another_folder(folder, tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    save_state_dict(linear(5), shared / f"{PRETRAINED}.safetensors")

    class Shared(LinearPool):
        def folder_of(self, name: str) -> Path:
            return shared if name == PRETRAINED else self.folder

    pool = Shared(folder, ["a"])
    assert torch.equal(pool.state_dict(PRETRAINED)["weight"], linear(5)["weight"])
    assert torch.equal(pool.state_dict("a")["weight"], linear(1)["weight"])


def test_renamed_source_finds_prefixed_aliased_and_stripped_keys():
    stored = StateDictSource({"roberta.encoder.w": torch.ones(2), "shared.weight": torch.zeros(3),
                              "vision_model.ln.bias": torch.full((1,), 2.0)}, "ckpt")
    src = RenamedSource.for_module(stored, ["encoder.w", "decoder.embed", "vision_model.vision_model.ln.bias"],
                                   "ckpt", prefixes=("", "roberta."), aliases={"decoder.embed": "shared.weight"},
                                   strip=("vision_model.",))
    assert src.keys() == ["encoder.w", "decoder.embed", "vision_model.vision_model.ln.bias"]
    assert torch.equal(src.get("encoder.w"), torch.ones(2)) and src.shape("decoder.embed") == (3,)
    assert float(src.get("vision_model.vision_model.ln.bias")) == 2.0
    with pytest.raises(CheckpointError, match=r"no tensor for 'head\.w' \(looked for head\.w, roberta\.head\.w\)"):
        RenamedSource.for_module(stored, ["head.w"], "ckpt", prefixes=("", "roberta."))


def write_user_folder(root: Path, names: list[str]) -> Path:
    root.mkdir(parents=True)
    (root / "model.py").write_text("from torch import nn\n\ndef build_model():\n    return nn.Linear(4, 3)\n")
    for i, name in enumerate(names):
        save_state_dict(linear(i), root / f"{name}.safetensors")
    return root


def test_your_own_folder_is_read_lazily_through_the_base(tmp_path):
    pool = CheckpointFolderPool(write_user_folder(tmp_path / "mine", ["m1", "m2"]))
    assert pool.expert_names == ["m1", "m2"] and pool.relation == "independent" and not pool.has_pretrained
    src = pool.tensor_source("m2")  # the engine streams from it instead of loading whole state dicts
    assert torch.equal(src.get("weight"), linear(1)["weight"])
    assert torch.equal(pool.load_model("m1").bias.detach(), linear(0)["bias"])
    assert isinstance(pool.build_model(), nn.Linear)


def test_your_own_folder_refuses_a_link_out_of_it_when_it_opens(tmp_path):
    root = write_user_folder(tmp_path / "mine", ["m1", "m2"])
    save_state_dict(linear(3), tmp_path / "private.safetensors")
    (root / "m3.safetensors").symlink_to(tmp_path / "private.safetensors")
    with pytest.raises(CheckpointError, match="m3.safetensors leads outside"):
        CheckpointFolderPool(root)


def test_a_spec_that_is_not_one_is_refused(tmp_path):
    root = write_user_folder(tmp_path / "mine", ["m1", "m2"])
    (root / "model.py").write_text((root / "model.py").read_text() + "\ndef permutation_spec():\n    return 42\n")
    with pytest.raises(MergebenchError, match="must return a mergebench_core.contract.permutations.PermutationSpec, got int"):
        CheckpointFolderPool(root)


def test_the_fusion_face_gives_the_same_objects():
    import mergebench_core.fusion as fusion
    from mergebench_core.pools import folder, states

    assert fusion.CheckpointFolderPool is folder.CheckpointFolderPool
    assert fusion.folder_pool_from_env is folder.folder_pool_from_env and fusion.FOLDER_ENV == folder.FOLDER_ENV
    assert fusion.StateDictPool is states.StateDictPool and fusion.load_states is states.load_states


@pytest.mark.parametrize("first", ["mergebench_core.pools.folder", "mergebench_core.pools.states",
                                   "mergebench_core.fusion", "mergebench_core.fusion.alignment"])
def test_the_pools_and_fusion_import_in_any_order(first):
    """`mergebench_core.fusion` re-exports the pools, so the pools must not import the fusion package back."""
    code = (f"import {first}\nimport mergebench_core.pools.folder, mergebench_core.pools.states, "
            f"mergebench_core.fusion\nprint('ok')")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
