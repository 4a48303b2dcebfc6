"""Offline stand-ins for tests and benchmarks: tiny random CLIP models and tiny image datasets, placed exactly where
the real loading code looks (the Hugging Face hub cache layout under the real repository ids, and the documented
$MERGEBENCH_CLIP_DATA_DIR override for datasets). Nothing here is used by a real run.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .catalog import BASE_MODELS, suite, task

FAKE_REVISION = "0123456789abcdef0123456789abcdef01234567"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def tiny_vocab() -> dict[str, int]:
    """Every byte, with and without CLIP's end-of-word suffix, plus the two special tokens (no merges)."""
    chars = list(_bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return vocab


def tiny_clip(seed: int = 0, image_size: int = 32, patch_size: int = 16, hidden: int = 32):
    """(CLIPModel, CLIPProcessor) with 2-layer towers of width `hidden`, random weights from `seed`."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    vocab = tiny_vocab()
    text = dict(vocab_size=len(vocab), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=77, bos_token_id=vocab["<|startoftext|>"],
                eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"])
    vision = dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2, num_attention_heads=2,
                  image_size=image_size, patch_size=patch_size)
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = CLIPModel(config).eval()
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    image_processor = CLIPImageProcessor(size={"shortest_edge": image_size},
                                         crop_size={"height": image_size, "width": image_size})
    return model, CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


def place_in_hub_cache(folder: Path, repo_id: str, hub_cache: Path, repo_type: str = "model",
                       revision: str = FAKE_REVISION) -> Path:
    """Copy a saved model folder into the hub cache layout (refs/main -> snapshots/<revision>/...)."""
    repo = hub_cache / f"{repo_type}s--{repo_id.replace('/', '--')}"
    snap = repo / "snapshots" / revision
    snap.mkdir(parents=True, exist_ok=True)
    for f in folder.iterdir():
        if f.is_file():
            shutil.copy2(f, snap / f.name)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    return snap


def expert_id(size: str, task_name: str) -> str:
    return f"tanganke/{BASE_MODELS[size].split('/')[1]}_{task_name}"


def write_tiny_dataset(data_dir: Path, task_name: str, n: int, seed: int, split: str | None = None,
                       sides: tuple[int, int] = (24, 48)) -> Path:
    """`n` random RGB images of varied sizes with labels over the task's classes, saved where the pool looks."""
    from datasets import ClassLabel, Dataset, Features, Image, Value  # noqa: F401
    from PIL import Image as PILImage

    spec = task(task_name)
    split = split or spec.test_split
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for _ in range(n):
        h, w = int(rng.integers(*sides)), int(rng.integers(*sides))
        mode = "L" if rng.random() < 0.3 else "RGB"  # grey images exercise convert("RGB")
        shape = (h, w) if mode == "L" else (h, w, 3)
        images.append(PILImage.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode))
        labels.append(int(rng.integers(0, len(spec.classnames))))
    features = Features({spec.image_column: Image(), spec.label_column: Value("int64")})
    ds = Dataset.from_dict({spec.image_column: images, spec.label_column: labels}, features=features)
    folder = data_dir / spec.dataset
    if spec.config:
        folder = folder / spec.config
    folder = folder / split
    ds.save_to_disk(str(folder))
    return folder


@dataclass
class OfflineWorld:
    hub_cache: Path
    data_dir: Path
    size: str
    tasks: list[str]


def build_offline_world(root: Path, size: str = "b32", suite_name: str = "TA8", n_images: int = 8,
                        seed: int = 0, expert_noise: float = 0.05, image_sides: tuple[int, int] = (24, 48),
                        **clip_kwargs) -> OfflineWorld:
    """A hub cache holding a tiny base CLIP under the real base id and one perturbed vision tower per task under the
    real expert ids, and a data dir holding `n_images` test images per task."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    hub_cache, data_dir = root / "hub", root / "data"
    model, processor = tiny_clip(seed, **clip_kwargs)
    base_dir = root / "build" / "base"
    model.save_pretrained(base_dir)
    processor.save_pretrained(base_dir)
    place_in_hub_cache(base_dir, BASE_MODELS[size], hub_cache)
    tasks = suite(suite_name)
    vision_state = {k.removeprefix("vision_model."): v for k, v in model.state_dict().items()
                    if k.startswith("vision_model.")}
    vconf = CLIPVisionConfig(**model.config.vision_config.to_dict())
    for i, name in enumerate(tasks):
        expert = CLIPVisionModel(vconf).eval()
        gen = torch.Generator().manual_seed(seed + 1000 + i)
        own = expert.state_dict()
        new = {}
        for k in own:
            src = vision_state.get(k, vision_state.get(k.removeprefix("vision_model."), own[k]))
            new[k] = src + expert_noise * torch.randn(src.shape, generator=gen) if src.is_floating_point() else src
        expert.load_state_dict(new)
        folder = root / "build" / name
        expert.save_pretrained(folder)
        processor.save_pretrained(folder)
        place_in_hub_cache(folder, expert_id(size, name), hub_cache)
        write_tiny_dataset(data_dir, name, n_images, seed + i, sides=image_sides)
    (root / "world.json").write_text(json.dumps({"size": size, "suite": suite_name, "tasks": tasks}))
    return OfflineWorld(hub_cache, data_dir, size, tasks)
