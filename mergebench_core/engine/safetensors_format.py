"""The safetensors file format as mergebench reads it: dtype codes, positioned reads, and the header checks that
stand between a hostile or corrupt file and any tensor read.

A downloaded checkpoint is untrusted input. Its header is parsed under caps (bytes, tensor count) and every field a
reader relies on is checked before anything else happens, so a bad file fails early, by name, with a
`CheckpointError` that says what is wrong, never with a crash deep inside a merge.
"""

from __future__ import annotations

import itertools
import json
import os
import struct
from pathlib import Path

import torch

from mergebench_core.errors import CheckpointError

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
ELEMENT_SIZES = {k: torch.empty(0, dtype=v).element_size() for k, v in DTYPES.items()}


def pread_exact(fd: int, buf: memoryview, offset: int) -> None:
    """Fill `buf` from file offset `offset`, however many reads it takes; a file that ends first is an error."""
    done = 0
    while done < len(buf):
        n = os.preadv(fd, [buf[done:]], offset + done)
        if n <= 0:
            raise OSError(f"file ended after {done} of {len(buf)} bytes")
        done += n


MAX_HEADER_BYTES_ENV = "MERGEBENCH_MAX_HEADER_BYTES"
MAX_TENSORS_ENV = "MERGEBENCH_MAX_TENSORS"


def max_header_bytes() -> int:
    """The largest safetensors header read (16 MiB; `MERGEBENCH_MAX_HEADER_BYTES` to change). Real headers take
    about 120 bytes a tensor, so this allows 100,000+ tensors in one file while a hostile length is refused before
    anything is parsed."""
    return int(os.environ.get(MAX_HEADER_BYTES_ENV, str(16 << 20)))


def max_tensors() -> int:
    """The most tensors one safetensors file may declare (200,000; `MERGEBENCH_MAX_TENSORS` to change)."""
    return int(os.environ.get(MAX_TENSORS_ENV, "200000"))


def clipped_repr(value: object, limit: int = 120) -> str:
    """repr(value), cut to `limit` characters: error messages quote values from files that may be hostile."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"the key {clipped_repr(key)} appears twice")
        out[key] = value
    return out


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)




def parse_header(path: Path) -> tuple[dict[str, dict], int]:
    """(validated tensor entries, byte offset of the data section) of a safetensors file.

    Everything a reader relies on is checked before any tensor is read, and every problem is a `CheckpointError`
    naming the file: the header's length against the file and the cap, its JSON (an object, UTF-8, no duplicate
    keys), the tensor count, and per tensor its dtype, a shape of non-negative integers, and `data_offsets` that are
    two integers 0 <= start <= end inside the data section, span exactly shape x dtype bytes, and overlap no other
    tensor's bytes.
    """
    def bad(problem: str) -> CheckpointError:
        return CheckpointError(f"{path} is not a valid safetensors file: {problem}")

    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            raw = fh.read(8)
            if len(raw) < 8:
                raise bad("the file is shorter than its 8-byte header length (corrupt or truncated?)")
            (n,) = struct.unpack("<Q", raw)
            if n > size - 8:
                raise bad(f"its header length {n} exceeds the file size {size} (corrupt or truncated?)")
            if n > max_header_bytes():
                raise bad(f"its header is {n} bytes, more than the {max_header_bytes()} mergebench reads "
                          f"(set {MAX_HEADER_BYTES_ENV} to allow more)")
            blob = fh.read(n)
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from exc
    # every entry needs at least 4 ':' (name, dtype, shape, data_offsets): refuse an absurd count before parsing
    if blob.count(b":") > 4 * max_tensors() + 65_536:
        raise bad(f"its header declares more than {max_tensors()} tensors (set {MAX_TENSORS_ENV} to allow more)")
    try:
        header = json.loads(blob.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (ValueError, RecursionError) as exc:
        raise bad(f"its header is not valid JSON ({exc}); the file is corrupt or truncated?") from None
    if not isinstance(header, dict):
        raise bad(f"its header is a JSON {type(header).__name__}, not an object")
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (isinstance(metadata, dict) and
                                     all(isinstance(v, str) for v in metadata.values())):
        raise bad("its __metadata__ is not an object of strings")
    if len(header) > max_tensors():
        raise bad(f"its header declares {len(header)} tensors, more than {max_tensors()} "
                  f"(set {MAX_TENSORS_ENV} to allow more)")
    data_len = size - 8 - n
    spans = []
    for key, meta in header.items():
        where = f"tensor {clipped_repr(key)}"
        if not isinstance(meta, dict) or not {"dtype", "shape", "data_offsets"} <= meta.keys():
            raise bad(f"{where} is not an object with dtype, shape and data_offsets")
        dtype, shape, offsets = meta["dtype"], meta["shape"], meta["data_offsets"]
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise CheckpointError(f"{path}: tensor {clipped_repr(key)} has unsupported dtype {clipped_repr(dtype)}")
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise bad(f"{where} has shape {clipped_repr(shape)}; a shape is a list of non-negative integers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            raise bad(f"{where} has data_offsets {clipped_repr(offsets)}; they must be two integers 0 <= start <= end")
        start, end = offsets
        if end > data_len:
            raise CheckpointError(f"{path} is truncated: tensor {clipped_repr(key)} ends at byte {end} of the data "
                                  f"section, which holds only {data_len} bytes")
        numel = 1
        for d in shape:
            numel *= d
        if end - start != numel * ELEMENT_SIZES[dtype]:
            raise bad(f"{where} has {end - start} bytes for shape {clipped_repr(shape)} of {dtype}, which needs "
                      f"{numel * ELEMENT_SIZES[dtype]}")
        if end > start:
            spans.append((start, end, key))
    spans.sort()
    for (_, end_a, key_a), (start_b, _, key_b) in itertools.pairwise(spans):
        if start_b < end_a:
            raise bad(f"the bytes of tensors {clipped_repr(key_a)} and {clipped_repr(key_b)} overlap")
    return header, 8 + n


def read_safetensors_header(path: Path) -> dict[str, dict]:
    """Parse and validate a safetensors header without reading tensor data (see `parse_header`)."""
    return parse_header(path)[0]


