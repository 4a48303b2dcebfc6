"""The CLIP task pool: the catalog's facts, zero-shot head construction against a hand-computed case, the
decode-once pixel cache against the processor's own output, and the offline missing-resource report."""

from __future__ import annotations

import math

import pytest
import torch

from mergebench_clip_tasks import CLIPZeroShotTaskPool, suite, task
from mergebench_clip_tasks.heads import zeroshot_heads
from mergebench_clip_tasks.testing import tiny_clip, write_tiny_dataset
from mergebench_core import MergebenchError


def test_catalog_matches_the_published_suites():
    counts = {"sun397": 2, "stanford-cars": 8, "resisc45": 18, "eurosat": 3, "svhn": 1, "gtsrb": 3, "mnist": 1,
              "dtd": 8}
    assert suite("TA8") == list(counts)
    assert {t: len(task(t).templates) for t in suite("TA8")} == counts
    assert [len(suite(s)) for s in ("TA8", "TA14", "TA20")] == [8, 14, 20]
    assert suite("TA20")[:14] == suite("TA14") and suite("TA14")[:8] == suite("TA8")
    classes = {"sun397": 397, "stanford-cars": 196, "resisc45": 45, "eurosat": 10, "gtsrb": 43, "dtd": 47,
               "cifar100": 100, "oxford_flowers102": 102, "food101": 101, "emnist_letters": 26}
    assert {t: len(task(t).classnames) for t in classes} == classes
    assert task("svhn").dataset == "ufldl-stanford/svhn" and task("svhn").config == "cropped_digits"
    assert task("food101").split_name("test") == "validation"
    assert task("mnist").prompts("3") == ['a photo of the number: "3".']


def test_zeroshot_heads_average_normalised_prompt_embeddings_by_hand():
    table = {"a x": [3.0, 4.0], "b x": [0.0, 2.0], "a y": [1.0, 0.0], "b y": [0.0, -5.0]}
    calls = []

    def embed(texts):
        calls.append(list(texts))
        return torch.tensor([table[t] for t in texts])

    heads = zeroshot_heads(embed, ["x", "y"], ["a {}", "b {}"])
    # class x: normalise (3,4)->(0.6,0.8) and (0,2)->(0,1); mean (0.3,0.9); normalise -> (1,3)/sqrt(10)
    # class y: (1,0) and (0,-1); mean (0.5,-0.5); normalise -> (1,-1)/sqrt(2)
    expected = torch.tensor([[1 / math.sqrt(10), 3 / math.sqrt(10)], [1 / math.sqrt(2), -1 / math.sqrt(2)]])
    assert torch.allclose(heads, expected, atol=1e-6)
    assert calls == [["a x", "b x", "a y", "b y"]]
    chunked = zeroshot_heads(embed, ["x", "y"], ["a {}", "b {}"], chunk=3)  # chunking does not change the heads
    assert torch.allclose(chunked, expected, atol=1e-6)


@pytest.fixture()
def tiny_base(tmp_path, monkeypatch):
    """A tiny CLIP under the real base id in a temporary hub cache, and 10 MNIST-like test images."""
    from mergebench_clip_tasks.testing import place_in_hub_cache

    model, processor = tiny_clip(seed=3)
    model.save_pretrained(tmp_path / "base")
    processor.save_pretrained(tmp_path / "base")
    place_in_hub_cache(tmp_path / "base", "openai/clip-vit-base-patch32", tmp_path / "hub")
    write_tiny_dataset(tmp_path / "data", "mnist", 10, seed=1)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("MERGEBENCH_CLIP_DATA_DIR", str(tmp_path / "data"))
    return model, processor, tmp_path


def test_pixel_cache_equals_the_processor_and_later_reads_never_decode(tiny_base, monkeypatch):
    from datasets import load_from_disk

    from mergebench_core.pools import hub

    model, processor, root = tiny_base
    pool = CLIPZeroShotTaskPool("b32", "TA8", tasks=["mnist"], cache_root=root / "cache")
    first = list(pool.batches("mnist", batch_size=4, limit=6))
    assert [len(y) for _, y in first] == [4, 2]
    assert first[0][0].dtype == torch.uint8
    rows = load_from_disk(str(root / "data" / "ylecun/mnist" / "test")).select(range(6))
    expected = processor(images=[im.convert("RGB") for im in rows["image"]], return_tensors="pt")["pixel_values"]
    got = pool.normalize(torch.cat([x for x, _ in first]))
    assert torch.allclose(got, expected, atol=1e-5)
    assert torch.equal(torch.cat([y for _, y in first]), torch.tensor(rows["label"]))

    def no_decoding(*args, **kwargs):
        raise AssertionError("the dataset was opened again")

    monkeypatch.setattr(hub, "open_dataset", no_decoding)
    again = CLIPZeroShotTaskPool("b32", "TA8", tasks=["mnist"], cache_root=root / "cache")
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, again.batches("mnist", batch_size=4, limit=6)))
    with pytest.raises(AssertionError, match="opened again"):  # the full split is not cached yet: it must decode
        list(again.batches("mnist", batch_size=4))


def test_logits_are_scaled_cosines_against_the_cached_heads(tiny_base):
    model, processor, root = tiny_base
    pool = CLIPZeroShotTaskPool("b32", "TA8", tasks=["mnist"], cache_root=root / "cache")
    x, _ = next(iter(pool.batches("mnist", batch_size=5)))
    vision = model.vision_model
    with torch.no_grad():
        logits = pool.logits(vision, "mnist", x)
        image = torch.nn.functional.normalize(model.visual_projection(vision(pixel_values=pool.normalize(x))
                                                                      .pooler_output), dim=-1)
    head = pool.head("mnist")
    assert head.shape == (10, 16) and torch.allclose(head.norm(dim=-1), torch.ones(10))
    assert torch.allclose(logits, model.logit_scale.exp() * image @ head.T, atol=1e-5)
    cached = CLIPZeroShotTaskPool("b32", "TA8", tasks=["mnist"], cache_root=root / "cache")
    assert torch.equal(cached.head("mnist"), head)  # read back from disk, no text tower
    assert not cached.heads.text_tower_loaded


def test_missing_resources_only_offline_and_only_what_is_absent(tiny_base, monkeypatch):
    _, _, root = tiny_base
    pool = CLIPZeroShotTaskPool("b32", "TA8", cache_root=root / "cache")
    missing = pool.missing_resources()
    assert "model openai/clip-vit-base-patch32" not in missing
    assert "dataset ylecun/mnist [test]" not in missing  # the local copy counts
    assert len(missing) == 7 and "dataset ufldl-stanford/svhn (cropped_digits) [test]" in missing
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    from mergebench_core.pools import hub

    monkeypatch.setattr(hub, "hub_reachable", lambda timeout=3.0: True)
    assert pool.missing_resources() == []  # online, everything can be fetched on first use
    monkeypatch.setattr(hub, "hub_reachable", lambda timeout=3.0: False)
    assert len(pool.missing_resources()) == 7  # no network: as good as offline, reported before any work
    with pytest.raises(MergebenchError, match=r"cannot fetch \d+ item\(s\)(.|\n)*svhn \(cropped_digits\) \[train\]"):
        pool.download()
