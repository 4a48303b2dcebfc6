"""Writing safetensors files as tensors are produced: the merged model never needs to sit in memory whole, and a
failed write never leaves a half-written output behind."""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from mergebench_core.engine.safetensors_format import DTYPE_NAMES, pread_exact


class StreamingSafetensorsWriter:
    """Writes a safetensors file tensor by tensor, so the whole output never sits in memory.

    The header needs every shape and dtype up front; the caller declares them (they are known from the inputs).
    Bytes go to a temporary file that replaces `path` only on `commit()`: an error never leaves a half-written
    output behind. Large tensors can be written in blocks (`write_block`), so no tensor needs to exist whole.
    """

    patch_window: int = 1 << 22
    """Entries read back at a time by `patch`."""

    def __init__(self, path: str | os.PathLike[str], layout: Sequence[tuple[str, tuple[int, ...], torch.dtype]],
                 metadata: Mapping[str, str] | None = None):
        self.path = Path(path)
        self.tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}-{os.urandom(4).hex()}.partial")  # unique
        header: dict[str, object] = {}
        if metadata:
            header["__metadata__"] = dict(metadata)
        offset = 0
        self._expected: list[tuple[str, tuple[int, ...], torch.dtype]] = []
        self._offsets: dict[str, int] = {}
        for key, shape, dtype in layout:
            nbytes = torch.Size(shape).numel() * torch.tensor([], dtype=dtype).element_size()
            header[key] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            self._offsets[key] = offset
            offset += nbytes
            self._expected.append((key, tuple(shape), dtype))
        self._position = {key: i for i, (key, _, _) in enumerate(self._expected)}
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.tmp, "w+b")  # readable too: `patch` reads a written tensor back
        self._fh.write(struct.pack("<Q", len(blob)) + blob)
        self._data_start = 8 + len(blob)
        self._next = 0
        self._done = 0  # entries of tensor `_next` written so far (blocks)

    def write(self, key: str, tensor: torch.Tensor) -> None:
        """Write the whole of tensor `key`, the next one of the layout."""
        if self._next >= len(self._expected) or self._done:
            self.abort()
            raise ValueError(f"writer got {key} {tuple(tensor.shape)} {tensor.dtype} out of order")
        want_key, shape, dtype = self._expected[self._next]
        if key != want_key or tuple(tensor.shape) != shape or tensor.dtype != dtype:
            self.abort()
            raise ValueError(f"writer expected {want_key} {shape} {dtype}, got {key} {tuple(tensor.shape)} "
                             f"{tensor.dtype}")
        self.write_block(key, 0, tensor.reshape(-1))

    def write_block(self, key: str, start: int, values: torch.Tensor) -> None:
        """Write flat entries [start, start + values.numel()) of tensor `key`: the blocks of one tensor come in
        order and together cover it, and tensors come in the layout's order."""
        if self._next >= len(self._expected):
            self.abort()
            raise ValueError(f"writer got a block of {key} after every tensor was written")
        want_key, shape, dtype = self._expected[self._next]
        numel = torch.Size(shape).numel()
        if key != want_key or values.dtype != dtype or start != self._done or start + values.numel() > numel:
            self.abort()
            raise ValueError(f"writer expected entries {self._done}.. of {want_key} {shape} {dtype}, got {key} "
                             f"{values.dtype} entries {start}..{start + values.numel()}")
        t = values.detach().to("cpu").contiguous()
        if t.dtype == torch.bfloat16:  # numpy has no bfloat16: write its raw 16-bit pattern
            t = t.view(torch.int16)
        if t.numel():
            self._fh.write(memoryview(t.view(-1).view(torch.uint8).numpy()))  # no intermediate bytes copy
        self._done += values.numel()
        if self._done == numel:
            self._next += 1
            self._done = 0

    def patch(self, key: str, index: torch.Tensor | None, values: torch.Tensor) -> None:
        """Overwrite entries of a tensor already written: those at flat `index`, or all of it when `index` is None.

        A method that settles a few entries only after its merge pass corrects them here, before `commit()`. The
        tensor is read back and rewritten in windows of at most `patch_window` entries, so patching a large tensor
        holds no more of it than that.
        """
        position = self._position.get(key)
        if position is None or position >= self._next:
            raise ValueError(f"cannot patch {key!r}: it has not been written yet")
        _, shape, dtype = self._expected[position]
        numel = torch.Size(shape).numel()
        raw_dtype = torch.int16 if dtype == torch.bfloat16 else dtype  # numpy has no bfloat16
        values = values.detach().to("cpu").reshape(-1).to(dtype)
        if index is not None:
            index = index.detach().to("cpu").reshape(-1).to(torch.int64)
            order = torch.argsort(index)
            index, values = index[order], values[order]
        self._fh.flush()
        fd, size = self._fh.fileno(), torch.empty(0, dtype=dtype).element_size()
        for lo in range(0, numel, self.patch_window):
            hi = min(numel, lo + self.patch_window)
            offset = self._data_start + self._offsets[key] + lo * size
            window = torch.empty(hi - lo, dtype=dtype)
            if index is None:
                window.copy_(values[lo:hi])
            else:
                a, b = torch.searchsorted(index, torch.tensor([lo, hi])).tolist()
                if a == b:
                    continue
                pread_exact(fd, memoryview(window.view(raw_dtype).numpy()).cast("B"), offset)
                window[index[a:b] - lo] = values[a:b]
            buf, done = memoryview(window.view(raw_dtype).numpy()).cast("B"), 0
            while done < len(buf):
                done += os.pwrite(fd, buf[done:], offset + done)

    def commit(self) -> Path:
        if self._next != len(self._expected):
            self.abort()
            raise ValueError(f"writer got {self._next} of {len(self._expected)} tensors")
        self._fh.close()
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        if not self._fh.closed:
            self._fh.close()
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> StreamingSafetensorsWriter:
        return self

    def __exit__(self, exc_type, *_: object) -> None:
        if exc_type is not None:
            self.abort()


def save_state_dict(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike[str],
                    metadata: Mapping[str, str] | None = None) -> Path:
    """Write a state dict as safetensors atomically (temporary file, then rename)."""
    layout = [(k, tuple(v.shape), v.dtype) for k, v in tensors.items()]
    with StreamingSafetensorsWriter(path, layout, metadata) as w:
        for k, v in tensors.items():
            w.write(k, v)
        return w.commit()

