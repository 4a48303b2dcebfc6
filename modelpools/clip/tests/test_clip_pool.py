"""The CLIP model pools end to end, offline: tiny random CLIP models under the real hub ids, tiny image datasets in
the documented data override, `mergebench run --method ties --modelpool clip-vit-b32_TA8 --limit 8`, and the stored
accuracies checked against an independent zero-shot computation with plain transformers."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mergebench_core import PRETRAINED, CheckpointError
from mergebench_core.cli import main
from mergebench_core.engine.merging import merge_sources
from mergebench_core.results.store import ResultStore
from mergebench_core.engine.tensors import StateDictSource, read_pickle_checkpoint
from mergebench_clip_tasks import task
from mergebench_clip_tasks.testing import FAKE_REVISION, build_offline_world, expert_id

LIMIT = 8
BASE = "openai/clip-vit-base-patch32"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_offline_world(tmp_path_factory.mktemp("clip-world"), "b32", "TA8", n_images=LIMIT + 2)


@pytest.fixture()
def offline_env(world, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(world.hub_cache))
    monkeypatch.setenv("MERGEBENCH_CLIP_DATA_DIR", str(world.data_dir))
    monkeypatch.setenv("MERGEBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MERGEBENCH_PLUGINS", "clip,clip_tasks,ties")
    import mergebench_core.contract.registry as registry

    monkeypatch.setattr(registry, "_REGISTRY", None)
    return tmp_path


def _snapshot(world, repo: str) -> str:
    return str(world.hub_cache / f"models--{repo.replace('/', '--')}" / "snapshots" / FAKE_REVISION)


class IndependentZeroShot:
    """Zero-shot accuracy and loss computed with transformers only: the processor on PIL images, the text tower on
    every prompt (truncated to CLIP's 77 tokens), normalise / average over templates / normalise, and
    logit_scale.exp() * cosine similarity."""

    def __init__(self, world):
        from transformers import CLIPModel, CLIPProcessor

        self.world = world
        self.clip = CLIPModel.from_pretrained(_snapshot(world, BASE)).eval()
        self.proc = CLIPProcessor.from_pretrained(_snapshot(world, BASE))
        self._data: dict[str, tuple] = {}

    @torch.no_grad()
    def _task(self, name: str) -> tuple:
        if name not in self._data:
            from datasets import load_from_disk

            spec = task(name)
            folder = self.world.data_dir / spec.dataset / (spec.config or "") / spec.test_split
            rows = load_from_disk(str(folder)).select(range(LIMIT))
            pixels = self.proc(images=[im.convert("RGB") for im in rows[spec.image_column]],
                               return_tensors="pt")["pixel_values"]
            heads = []
            for c in spec.classnames:
                tokens = self.proc.tokenizer([t.format(c) for t in spec.templates], padding=True, truncation=True,
                                             max_length=77, return_tensors="pt")
                e = self.clip.get_text_features(**tokens)
                e = e if isinstance(e, torch.Tensor) else e.pooler_output
                e = e / e.norm(dim=-1, keepdim=True)
                m = e.mean(0)
                heads.append(m / m.norm())
            self._data[name] = (pixels, torch.stack(heads), torch.tensor(rows[spec.label_column]))
        return self._data[name]

    @torch.no_grad()
    def metrics(self, vision: nn.Module, tasks: list[str]) -> dict[str, dict[str, float]]:
        out = {}
        for name in tasks:
            pixels, heads, labels = self._task(name)
            image = F.normalize(self.clip.visual_projection(vision(pixel_values=pixels).pooler_output), dim=-1)
            logits = self.clip.logit_scale.exp() * image @ heads.T
            out[name] = {"accuracy": float((logits.argmax(-1) == labels).float().mean()),
                         "loss": float(F.cross_entropy(logits, labels))}
        return out


def _check(stored: dict[str, dict[str, float]], expected: dict[str, dict[str, float]]) -> None:
    assert set(stored) >= set(expected)
    for t, m in expected.items():
        assert stored[t]["examples"] == LIMIT
        assert stored[t]["accuracy"] == pytest.approx(m["accuracy"]), t
        assert math.isclose(stored[t]["loss"], m["loss"], rel_tol=1e-4, abs_tol=1e-4), (t, stored[t], m)


def test_ties_on_clip_vit_b32_ta8_offline_matches_independent_zero_shot(world, offline_env, capsys):
    from transformers import CLIPVisionModel
    from mergebench_ties import Ties

    store_path = offline_env / "results.sqlite"
    code = main(["run", "--method", "ties", "--modelpool", "clip-vit-b32_TA8", "--limit", str(LIMIT),
                 "--store", str(store_path)])
    assert code == 0, capsys.readouterr().err
    rows = {r.method: r for r in ResultStore(store_path).all()}
    assert {"pretrained", "individual", "ties"} <= set(rows)
    assert all(r.status == "ok" for r in rows.values()), [r.error for r in rows.values()]

    def vision(repo: str) -> nn.Module:
        return CLIPVisionModel.from_pretrained(_snapshot(world, repo)).eval()

    reference = IndependentZeroShot(world)
    base = vision(BASE)
    experts = {t: vision(expert_id("b32", t)) for t in world.tasks}
    _check(rows["pretrained"].metrics, reference.metrics(base, world.tasks))
    individual = rows["individual"].metrics
    for t in world.tasks:
        _check({t: individual[t]}, reference.metrics(experts[t], [t]))

    merged: dict[str, torch.Tensor] = {}
    merge_sources(Ties(), StateDictSource(base.state_dict(), "base"),
                  [StateDictSource(experts[t].state_dict(), t) for t in world.tasks], sink=merged)
    merged_model = vision(BASE)
    merged_model.load_state_dict(merged)
    _check(rows["ties"].metrics, reference.metrics(merged_model, world.tasks))
    assert rows["ties"].metrics != rows["pretrained"].metrics  # the merge changed the model


def test_offline_run_with_empty_cache_lists_every_missing_resource(offline_env, monkeypatch, capsys):
    empty = offline_env / "empty-hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(empty))
    monkeypatch.setenv("MERGEBENCH_CLIP_DATA_DIR", str(offline_env / "no-data"))
    store_path = offline_env / "results.sqlite"
    code = main(["run", "--method", "ties", "--modelpool", "clip-vit-b32_TA8", "--limit", "8",
                 "--store", str(store_path)])
    err = capsys.readouterr().err
    assert code == 2
    assert f"model {BASE}" in err
    for t in task("mnist").name, "sun397", "stanford-cars", "dtd":
        assert f"model {expert_id('b32', t)}" in err
    for dataset in ("tanganke/sun397", "tanganke/stanford_cars", "tanganke/resisc45", "tanganke/eurosat",
                    "ufldl-stanford/svhn (cropped_digits)", "tanganke/gtsrb", "ylecun/mnist", "tanganke/dtd"):
        assert f"dataset {dataset} [test]" in err
    assert "mergebench download --modelpool clip-vit-b32_TA8" in err
    assert "17 resource(s)" in err
    assert ResultStore(store_path).all() == []  # nothing ran


def test_pool_reads_vision_tower_lazily_in_module_key_order(world, offline_env):
    from transformers import CLIPVisionModel
    from mergebench_clip import CLIPVisionPool

    pool = CLIPVisionPool("b32", "TA8", dtype="bfloat16")
    model = pool.load_model("mnist")
    assert next(model.parameters()).dtype == torch.bfloat16
    reference = CLIPVisionModel.from_pretrained(_snapshot(world, expert_id("b32", "mnist"))).state_dict()
    src = pool.tensor_source("mnist")
    assert src.keys() == list(reference)
    for k in reference:
        assert torch.equal(src.get(k), reference[k]), k
    base_src = pool.tensor_source(PRETRAINED)  # a full CLIPModel checkpoint: only the vision tower is exposed
    assert base_src.keys() == list(reference)
    assert pool.identity("mnist").endswith("@" + FAKE_REVISION)


# -- pickles ----------------------------------------------------------------------------------------------------
def _encoder(seed: int) -> nn.Module:
    """A whole nn.Module shaped like the task-vectors ImageEncoder (`model.visual.*`), pickled as an object."""
    torch.manual_seed(seed)
    enc = nn.Module()
    enc.model = nn.Module()
    enc.model.visual = nn.Linear(4, 3)
    enc.model.logit_scale = nn.Parameter(torch.tensor(4.6))
    return enc


def _release(root: Path) -> dict[str, nn.Module]:
    from mergebench_clip.openclip_pool import FOLDERS

    arch = root / "ViT-B-32"
    modules = {PRETRAINED: _encoder(0)}
    arch.mkdir(parents=True)
    torch.save(modules[PRETRAINED], arch / "zeroshot.pt")
    for i, (t, folder) in enumerate(FOLDERS.items()):
        modules[t] = _encoder(i + 1)
        (arch / folder).mkdir()
        torch.save(modules[t], arch / folder / "finetuned.pt")
        torch.save(nn.Linear(3, 5, bias=False), arch / f"head_{folder}.pt")
    return modules


def test_pickle_checkpoint_refused_without_opt_in_and_loaded_with_it(tmp_path, monkeypatch, capsys):
    from mergebench_clip import OpenCLIPPool

    monkeypatch.delenv("MERGEBENCH_TRUST_PICKLE", raising=False)
    modules = _release(tmp_path / "release")
    refused = OpenCLIPPool("b32", root=tmp_path / "release")
    with pytest.raises(CheckpointError, match="--trust-pickle"):
        refused.tensor_source(PRETRAINED)
    with pytest.raises(CheckpointError, match="--trust-pickle"):
        read_pickle_checkpoint(tmp_path / "release" / "ViT-B-32" / "zeroshot.pt")

    trusted = OpenCLIPPool("b32", root=tmp_path / "release")
    trusted.configure(trust_pickle=True)
    sd = trusted.state_dict("mnist")
    assert sorted(sd) == ["bias", "weight"]  # the image tower only, under its own names
    assert torch.equal(sd["weight"], modules["mnist"].model.visual.weight.detach())

    # `mergebench convert` unpickles once (opted in); afterwards no opt-in is needed, and nothing is unpickled.
    monkeypatch.setenv("MERGEBENCH_OPENCLIP_DIR", str(tmp_path / "release"))
    monkeypatch.setenv("MERGEBENCH_PLUGINS", "clip,clip_tasks")
    import mergebench_core.contract.registry as registry

    monkeypatch.setattr(registry, "_REGISTRY", None)
    assert main(["convert", "--modelpool", "openclip-vit-b32_TA8"]) == 2  # refused without the flag
    assert "--trust-pickle" in capsys.readouterr().err
    assert main(["convert", "--modelpool", "openclip-vit-b32_TA8", "--trust-pickle"]) == 0
    assert len(list((tmp_path / "release").rglob("*.safetensors"))) == 17  # 1 + 8 experts + 8 heads
    for p in (tmp_path / "release").rglob("*.pt"):
        p.write_bytes(b"not a pickle any more")  # proves later reads never touch the pickles
    fresh = OpenCLIPPool("b32", root=tmp_path / "release")
    assert torch.equal(fresh.state_dict(PRETRAINED)["bias"], modules[PRETRAINED].model.visual.bias.detach())


def test_plain_state_dict_pickle_loads_with_the_weights_only_loader(tmp_path):
    sd = {"a": torch.arange(3.0), "b": {"c": torch.ones(2)}}
    torch.save(sd, tmp_path / "plain.pt")
    loaded = read_pickle_checkpoint(tmp_path / "plain.pt")
    assert torch.equal(loaded["a"], sd["a"]) and torch.equal(loaded["b.c"], sd["b"]["c"])
