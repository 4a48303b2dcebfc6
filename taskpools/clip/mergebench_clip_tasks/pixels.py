"""Decode and preprocess each test set once; every later evaluation reads pixels from a memory-mapped file.

Decoding JPEG/PNG and resizing with PIL costs far more than a ViT-B/32 forward pass on a GPU, and a leaderboard
evaluates the same test sets hundreds of times. So the first evaluation runs the base checkpoint's image
processor (convert("RGB"), resize, center crop) over the split with DataLoader workers and stores the result as
uint8 in a `.npy` file; later evaluations memory-map it and only rescale and normalise (done on the device, inside
the task pool's `logits`, because uint8 moves to a GPU four times faster than float32).

The resize and crop of CLIP's processor produce 8-bit images, so storing uint8 is lossless: rescaling and
normalising them afterwards gives the processor's own output up to float rounding.

A cache is keyed by dataset id, config, revision, split and a hash of the processor's settings. A `--limit N` run
without a full cache decodes only the first N examples, into its own prefix cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

FORMAT_VERSION = 1


def processor_digest(image_processor: Any) -> str:
    """A hash of every setting of an image processor (size, crop, resample, mean, std, ...)."""
    settings = image_processor.to_dict()
    settings.pop("processor_class", None)
    blob = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class PixelKey:
    dataset: str
    config: str | None
    revision: str
    split: str
    processor: str

    def folder_name(self) -> str:
        readable = f"{self.dataset.replace('/', '--')}--{self.config or 'default'}--{self.split}"
        digest = hashlib.sha256(json.dumps([FORMAT_VERSION, self.dataset, self.config, self.revision, self.split,
                                            self.processor]).encode()).hexdigest()[:16]
        return f"{readable}-{digest}"


@dataclass
class CachedSplit:
    """Preprocessed uint8 pixels (N, 3, H, W), memory-mapped, and their integer labels."""

    pixels: np.ndarray
    labels: np.ndarray
    complete: bool
    """True when this holds the whole split, False for a prefix written by a --limit run."""

    def __len__(self) -> int:
        return len(self.labels)

    def batches(self, batch_size: int, limit: int | None = None,
                pin: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self) if limit is None else min(limit, len(self))
        for i in range(0, n, batch_size):
            j = min(i + batch_size, n)
            x = torch.from_numpy(np.array(self.pixels[i:j]))  # one read from the memory map
            y = torch.from_numpy(self.labels[i:j].astype(np.int64))
            yield (x.pin_memory(), y.pin_memory()) if pin else (x, y)


class _Decoded(torch.utils.data.Dataset):
    """Item i of a Hugging Face split as (uint8 CHW pixels after resize and crop, label)."""

    def __init__(self, ds: Any, image_processor: Any, image_column: str, label_column: str):
        self.ds, self.proc = ds, image_processor
        self.image_column, self.label_column = image_column, label_column

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        row = self.ds[i]
        image = row[self.image_column].convert("RGB")
        out = self.proc(images=[image], do_rescale=False, do_normalize=False, return_tensors="pt")["pixel_values"][0]
        if out.dtype != torch.uint8:  # backends that resize in float: round back to the 8-bit grid
            out = out.round().clamp(0, 255).to(torch.uint8)
        return out, int(row[self.label_column])


class PixelCache:
    """Folders of preprocessed splits under `root`, one per PixelKey (and per prefix length for --limit runs)."""

    def __init__(self, root: Path):
        self.root = root

    def _folders(self, key: PixelKey) -> tuple[Path, Path]:
        base = self.root / key.folder_name()
        return base / "full", base

    @staticmethod
    def _open(folder: Path) -> CachedSplit | None:
        meta = folder / "meta.json"
        if not meta.is_file():
            return None
        info = json.loads(meta.read_text())
        return CachedSplit(np.load(folder / "pixels.npy", mmap_mode="r"), np.load(folder / "labels.npy"),
                           bool(info["complete"]))

    def find(self, key: PixelKey, limit: int | None = None) -> CachedSplit | None:
        """The full split if cached; else, for a limited run, the shortest cached prefix that is long enough."""
        full, base = self._folders(key)
        found = self._open(full)
        if found is not None or limit is None:
            return found
        prefixes = sorted((int(p.name.split("-")[1]), p) for p in base.glob("first-*") if (p / "meta.json").is_file())
        for n, folder in prefixes:
            if n >= limit:
                return self._open(folder)
        return None

    def build(self, key: PixelKey, open_split: Callable[[], Any], image_processor: Any, image_column: str,
              label_column: str, limit: int | None = None, num_workers: int | None = None) -> CachedSplit:
        """Decode and preprocess the split (or its first `limit` examples) once, and memory-map the result."""
        ds = open_split()
        total = len(ds)
        n = total if limit is None else min(limit, total)
        full, base = self._folders(key)
        final = full if n == total else base / f"first-{n}"
        if n < total:
            ds = ds.select(range(n))
        if num_workers is None:
            num_workers = 0 if n < 512 else max(1, min(8, (os.cpu_count() or 2) - 1))
        loader = torch.utils.data.DataLoader(
            _Decoded(ds, image_processor, image_column, label_column), batch_size=64, num_workers=num_workers,
            pin_memory=False, persistent_workers=False)
        tmp = base / f".partial-{os.getpid()}-{final.name}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        log.info("decoding %s [%s]: %d images, %d workers (once; later evaluations read %s)",
                 key.dataset, key.split, n, num_workers, final)
        pixels: np.ndarray | None = None
        labels = np.empty(n, dtype=np.int64)
        i = 0
        try:
            for x, y in loader:
                if pixels is None:
                    pixels = np.lib.format.open_memmap(tmp / "pixels.npy", mode="w+", dtype=np.uint8,
                                                       shape=(n, *x.shape[1:]))
                pixels[i:i + len(x)] = x.numpy()
                labels[i:i + len(x)] = y.numpy()
                i += len(x)
            if pixels is None or i != n:
                raise RuntimeError(f"{key.dataset} [{key.split}] yielded {i} of {n} examples")
            pixels.flush()
            del pixels
            np.save(tmp / "labels.npy", labels)
            (tmp / "meta.json").write_text(json.dumps({
                "dataset": key.dataset, "config": key.config, "revision": key.revision, "split": key.split,
                "processor": key.processor, "count": n, "complete": n == total, "format": FORMAT_VERSION}))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)  # the cache appears whole or not at all
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        opened = self._open(final)
        assert opened is not None
        return opened
