"""Tokenize each split once, lazily, in chunks, and keep the token ids on disk.

A split is cut into chunks of `CHUNK` examples; a chunk is tokenized the first time any of its examples is asked
for and saved as one `.npz` (flat int32 token ids, offsets, labels). A method that reads 256 training examples thus
tokenizes 4,096, not 400,000, and an evaluation reads the test split's chunks back without touching the tokenizer or
the dataset. The cache folder is named by a hash of everything that changes the tokens: dataset, config, split and
content revision, tokenizer (repository and revision), truncation length, and the preprocessing (prompt) used.

Batches are (inputs, labels): inputs are int64 token ids of shape (batch, max_length), right-padded with `PAD = -1`
(so a mask is `inputs >= 0`, whatever the tokenizer's own pad id); every batch of a split has the same width, so
batches can be stacked across reads (the core's shuffled training order does). Task pools trim the padding away
before the forward pass.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

PAD = -1
CHUNK = 4096
FORMAT_VERSION = 1

Encoder = Callable[[Mapping[str, Sequence[Any]]], tuple[list[list[int]], list[float]]]
"""Columns of a slice of the dataset -> (token ids per example, label per example)."""


def cache_key(**parts: Any) -> str:
    blob = json.dumps({"format": FORMAT_VERSION, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


class TokenizedSplit:
    """The examples of one split as token ids, tokenized chunk by chunk on first use and cached in `folder`."""

    def __init__(self, folder: Path, open_dataset: Callable[[], Any], encode: Encoder, max_length: int,
                 regression: bool = False, description: str = ""):
        self.folder, self._open, self._encode = Path(folder), open_dataset, encode
        self.max_length, self.regression, self.description = max_length, regression, description
        self._dataset: Any = None
        self._chunks: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    # -- size -------------------------------------------------------------------------------------------------
    def _meta_path(self) -> Path:
        return self.folder / "meta.json"

    def known_length(self) -> int | None:
        """The number of examples, when a previous use recorded it (no dataset is opened)."""
        try:
            return int(json.loads(self._meta_path().read_text())["examples"])
        except (OSError, ValueError, KeyError):
            return None

    def __len__(self) -> int:
        n = self.known_length()
        if n is None:
            n = len(self.dataset)
            self.folder.mkdir(parents=True, exist_ok=True)
            _atomic_write(self._meta_path(), json.dumps({"examples": n, "what": self.description}).encode())
        return n

    @property
    def dataset(self) -> Any:
        if self._dataset is None:
            self._dataset = self._open()
        return self._dataset

    # -- chunks -----------------------------------------------------------------------------------------------
    def _chunk(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if index in self._chunks:
            return self._chunks[index]
        path = self.folder / f"chunk-{index:05d}.npz"
        if path.is_file():
            with np.load(path) as z:
                found = (z["ids"], z["offsets"], z["labels"])
        else:
            start = index * CHUNK
            stop = min(start + CHUNK, len(self))
            columns = self.dataset[start:stop]
            ids, labels = self._encode(columns)
            lengths = np.array([min(len(x), self.max_length) for x in ids], dtype=np.int64)
            offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
            flat = np.fromiter((t for x in ids for t in x[:self.max_length]), dtype=np.int32, count=int(offsets[-1]))
            found = (flat, offsets, np.asarray(labels, dtype=np.float32 if self.regression else np.int64))
            self.folder.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}.npz")
            np.savez(tmp, ids=found[0], offsets=found[1], labels=found[2])
            os.replace(tmp, path)
        if len(self._chunks) >= 4:  # a few chunks in memory are plenty for sequential reads
            self._chunks.pop(next(iter(self._chunks)))
        self._chunks[index] = found
        return found

    def rows(self, indices: Sequence[int] | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs (len, max_length) padded with PAD, labels) for the given example indices."""
        indices = np.asarray(indices, dtype=np.int64)
        inputs = torch.full((len(indices), self.max_length), PAD, dtype=torch.int64)
        labels = torch.empty(len(indices), dtype=torch.float32 if self.regression else torch.int64)
        for row, i in enumerate(indices.tolist()):
            ids, offsets, labs = self._chunk(i // CHUNK)
            j = i % CHUNK
            tokens = ids[offsets[j]:offsets[j + 1]]
            inputs[row, :len(tokens)] = torch.from_numpy(tokens.astype(np.int64))
            labels[row] = float(labs[j]) if self.regression else int(labs[j])
        return inputs, labels

    def batches(self, batch_size: int, limit: int | None = None,
                indices: np.ndarray | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = np.arange(len(self)) if indices is None else np.asarray(indices)
        if limit is not None:
            order = order[:limit]
        for i in range(0, len(order), batch_size):
            yield self.rows(order[i:i + batch_size])


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def trim(inputs: torch.Tensor) -> torch.Tensor:
    """`inputs` without the trailing columns that are padding in every row (nothing is trimmed inside torch.func
    transforms, where the width cannot depend on the data)."""
    try:
        width = int((inputs >= 0).sum(-1).max())
    except RuntimeError:  # vmap / grad transforms refuse data-dependent shapes: keep the full width
        return inputs
    return inputs[..., :max(width, 1)]
