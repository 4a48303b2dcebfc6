"""Named tensors, read lazily from state dicts or safetensors files, and written as they are produced.

Every data-free method is written once against `TensorSource`, so it runs on any architecture and on checkpoints
larger than memory: a source hands out one tensor at a time, and `StreamingSafetensorsWriter` writes each merged
tensor to disk as soon as it exists.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import struct
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

from mergebench_core.errors import CheckpointError


@runtime_checkable
class TensorSource(Protocol):
    """Named tensors that can be read one at a time."""

    name: str

    def keys(self) -> list[str]: ...

    def shape(self, key: str) -> tuple[int, ...]: ...

    def dtype(self, key: str) -> torch.dtype: ...

    def get(self, key: str) -> torch.Tensor: ...


@runtime_checkable
class SupportsReadInto(Protocol):
    """A source that reads part of a tensor into memory the caller owns (block streaming, no allocation per read)."""

    def read_into(self, key: str, out: torch.Tensor, start: int = 0) -> None:
        """Read `out.numel()` entries of tensor `key`, from flat index `start` on, into `out` (contiguous, the
        tensor's dtype)."""


@runtime_checkable
class SupportsReadSlices(Protocol):
    """A source that reads many short runs of a tensor at once (the samples of `sparsify.bracket_thresholds`)."""

    def read_slices(self, key: str, starts: Sequence[int], out: torch.Tensor) -> None:
        """Read `out.shape[1]` entries of tensor `key` from each flat index in `starts` into the rows of `out`."""


class StateDictSource:
    """A state dict already in memory."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], name: str = "state dict"):
        self.tensors, self.name = tensors, name

    def keys(self) -> list[str]:
        return list(self.tensors)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.tensors[key].shape)

    def dtype(self, key: str) -> torch.dtype:
        return self.tensors[key].dtype

    def get(self, key: str) -> torch.Tensor:
        return self.tensors[key]

    def read_into(self, key: str, out: torch.Tensor, start: int = 0) -> None:
        flat = self.tensors[key].detach().reshape(-1)
        if out.dtype != flat.dtype or start < 0 or start + out.numel() > flat.numel():
            raise ValueError(f"read_into({key!r}) needs a {flat.dtype} tensor of at most {flat.numel() - start} "
                             f"entries, got {out.dtype} {list(out.shape)} from index {start}")
        out.view(-1).copy_(flat[start:start + out.numel()])

    def read_slices(self, key: str, starts: Sequence[int], out: torch.Tensor) -> None:
        flat = self.tensors[key].detach().reshape(-1)
        length = out.shape[1]
        index = (torch.as_tensor(list(starts), dtype=torch.int64).view(-1, 1) + torch.arange(length)).view(-1)
        out.copy_(flat[index.to(flat.device)].view(len(starts), length))


_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}
_ELEMENT_SIZE = {k: torch.empty(0, dtype=v).element_size() for k, v in _ST_DTYPES.items()}


class SafetensorsSource:
    """One or more safetensors files (a sharded checkpoint, or a Hugging Face model folder), read lazily.

    The header of each file is parsed and checked up front (so a truncated or corrupt file is reported by name
    before any work starts); tensor data is read only when asked for, one tensor at a time.
    """

    def __init__(self, path: str | os.PathLike[str], name: str | None = None):
        self.path = Path(path)
        self.name = name or str(self.path)
        self.files = resolve_checkpoint_files(self.path)
        self._where: dict[str, Path] = {}
        self._meta: dict[str, dict] = {}
        self._data_start: dict[Path, int] = {}
        self._fds: dict[Path, int] = {}
        for f in self.files:
            header, self._data_start[f] = _parse_header(f)
            for key, meta in header.items():
                if key in self._where:
                    raise CheckpointError(f"tensor {_short(key)} appears in both {self._where[key]} and {f}")
                self._where[key], self._meta[key] = f, meta

    def keys(self) -> list[str]:
        return list(self._where)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._meta[key]["shape"])

    def dtype(self, key: str) -> torch.dtype:
        return _ST_DTYPES[self._meta[key]["dtype"]]

    def get(self, key: str) -> torch.Tensor:
        """A fresh tensor read with one positioned read (pread) into memory the caller owns.

        Reading into an anonymous buffer, not a memory map of the file, keeps the process's resident memory at the
        tensors actually alive: pages of a mapped file stay resident (and counted) for as long as the file is open,
        so a merge of nine 350 MB checkpoints would otherwise hold all 3 GB of them.
        """
        out = torch.empty(self.shape(key), dtype=self.dtype(key))
        self.read_into(key, out)
        return out

    def read_into(self, key: str, out: torch.Tensor, start: int = 0) -> None:
        """Read `out.numel()` entries of tensor `key`, from flat index `start` on, into `out` (contiguous, same dtype).

        With the default `start` and an `out` of the tensor's size this reads the whole tensor without allocating;
        a smaller `out` reads a slice (the sampling pass of `sparsify.OnePassTopK` reads a few of them).
        """
        f = self._where[key]
        numel = torch.Size(self.shape(key)).numel()
        if out.dtype != self.dtype(key) or not out.is_contiguous() or start < 0 or start + out.numel() > numel:
            raise ValueError(f"read_into({key!r}) needs a contiguous {self.dtype(key)} tensor of at most "
                             f"{numel - start} entries, got {out.dtype} {list(out.shape)} from index {start}")
        if out.numel() == 0:
            return
        offset = self._data_start[f] + self._meta[key]["data_offsets"][0] + start * out.element_size()
        try:
            _pread_exact(self._fd(f), memoryview(out.view(-1).view(torch.uint8).numpy()), offset)
        except Exception as exc:
            raise CheckpointError(f"cannot read tensor {key!r} from {f}: {exc}") from exc

    def _fd(self, f: Path) -> int:
        """The file's descriptor, opened on first use and kept until `close`."""
        fd = self._fds.get(f)
        if fd is None:
            fd = self._fds[f] = os.open(f, os.O_RDONLY)
        return fd

    def read_slices(self, key: str, starts: Sequence[int], out: torch.Tensor) -> None:
        """Read `out.shape[1]` entries of tensor `key` from each flat index in `starts` into the rows of `out`.

        One positioned read per slice and no other per-slice work: the sampling pass of `sparsify.OnePassTopK`
        reads thousands of small slices.
        """
        if len(starts) == 0:
            return
        length = out.shape[1]
        numel = torch.Size(self.shape(key)).numel()
        if out.dtype != self.dtype(key) or not out.is_contiguous() or out.shape[0] != len(starts) \
                or min(starts) < 0 or max(starts) + length > numel:
            raise ValueError(f"read_slices({key!r}) needs a contiguous {self.dtype(key)} tensor of "
                             f"{len(starts)} rows and slices inside the tensor's {numel} entries")
        f = self._where[key]
        size = out.element_size()
        nbytes = length * size
        begin = self._data_start[f] + self._meta[key]["data_offsets"][0]
        buf = memoryview(out.view(-1).view(torch.uint8).numpy())
        try:
            fd = self._fd(f)
            for i, start in enumerate(starts):
                if os.preadv(fd, [buf[i * nbytes:(i + 1) * nbytes]], begin + start * size) != nbytes:
                    self.read_into(key, out[i], start)  # a short read: the careful path retries or names the error
        except OSError as exc:
            raise CheckpointError(f"cannot read tensor {key!r} from {f}: {exc}") from exc

    def close(self) -> None:
        fds, self._fds = self._fds, {}
        for fd in fds.values():
            os.close(fd)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # pragma: no cover - interpreter shutdown
            pass


def _pread_exact(fd: int, buf: memoryview, offset: int) -> None:
    """Fill `buf` from file offset `offset`, however many reads it takes; a file that ends first is an error."""
    done = 0
    while done < len(buf):
        n = os.preadv(fd, [buf[done:]], offset + done)
        if n <= 0:
            raise OSError(f"file ended after {done} of {len(buf)} bytes")
        done += n


def resolve_checkpoint_files(path: Path) -> list[Path]:
    """The safetensors files that make up a checkpoint: a file, an index json, or a model folder.

    Files found through a folder or an index must lie inside that folder (`input_root`): an index naming an
    absolute path or one with `..`, or a symlink leading elsewhere, is refused, so a downloaded checkpoint cannot
    make mergebench read (and merge into its output) files it was not pointed at.
    """
    if path.is_dir():
        for index in ("model.safetensors.index.json", "diffusion_pytorch_model.safetensors.index.json"):
            if (path / index).is_file():
                return _files_from_index(path / index)
        files = sorted(path.glob("*.safetensors"))
        if files:
            return [_inside(path, f, f"{path} holds {f.name}") for f in files]
        if any(path.glob("*.bin")) or any(path.glob("*.pt")):
            raise CheckpointError(f"{path} holds only pickle checkpoints (.bin/.pt); convert them to safetensors "
                                  f"first (`mergebench convert`), mergebench never unpickles by default")
        raise CheckpointError(f"{path} contains no .safetensors file")
    if path.name.endswith(".index.json") and path.is_file():
        return _files_from_index(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.suffix in (".bin", ".pt", ".pth", ".ckpt"):
        raise CheckpointError(f"{path} is a pickle checkpoint; convert it to safetensors first "
                              f"(`mergebench convert`), mergebench never unpickles by default")
    return [path]


def input_root(folder: Path) -> Path:
    """The folder that a checkpoint folder's files (shards, configs) may resolve into.

    That is the folder itself, except in a Hugging Face cache snapshot (`models--org--name/snapshots/<revision>/`),
    whose files are symlinks into the repository's `blobs/` folder: there it is the repository folder.
    """
    folder = Path(os.path.abspath(folder))
    if folder.parent.name == "snapshots" and (folder.parent.parent / "blobs").is_dir():
        return folder.parent.parent.resolve()
    return folder.resolve()


def resolves_inside(folder: Path, f: Path) -> bool:
    """Whether `f` (a path in `folder`), after following every symlink, lies inside `input_root(folder)`."""
    try:
        f.resolve(strict=True).relative_to(input_root(folder))
    except (OSError, ValueError, RuntimeError):
        return False
    return True


def _inside(folder: Path, f: Path, what: str) -> Path:
    if not resolves_inside(folder, f):
        raise CheckpointError(f"{what}, which resolves to {os.path.realpath(f)}, outside the checkpoint folder; "
                              f"mergebench reads only files inside the folder it is given")
    return f


def _files_from_index(index: Path) -> list[Path]:
    try:
        size = index.stat().st_size
        if size > 4 * max_header_bytes():
            raise ValueError(f"{size} bytes, more than the {4 * max_header_bytes()} an index may have")
        data = json.loads(index.read_bytes().decode("utf-8"))
        weight_map = data["weight_map"] if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ValueError("its weight_map is not an object of tensor name -> shard file name")
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f"{index} is not a valid safetensors index ({exc})") from exc
    files = []
    for name in sorted(set(weight_map.values())):
        parts = name.replace("\\", "/").split("/")
        if not name or os.path.isabs(name) or name.startswith(("/", "\\")) or ".." in parts or ":" in parts[0]:
            raise CheckpointError(f"{index} names shard {_short(name)}, a path outside the checkpoint folder; "
                                  f"shards must be files inside it")
        f = index.parent / name
        if not f.is_file():
            raise CheckpointError(f"{index} names shard {_short(name)}, which is missing")
        files.append(_inside(index.parent, f, f"{index} names shard {_short(name)}"))
    return files


def copy_side_files(folder: Path, out: Path) -> list[str]:
    """Copy a checkpoint folder's other files (config, tokenizer) into `out`; returns a line per file skipped.

    Only regular files at the folder's top level are copied, never weights, and never through a symlink that leads
    outside the folder (`resolves_inside`): a `config.json` linked to a private file stays where it is. What is
    copied is the file's content, not the link.
    """
    skipped = []
    for f in sorted(folder.iterdir()):
        if f.name.endswith((".safetensors", ".bin", ".index.json", ".pt", ".pth", ".ckpt")) or f.name.startswith("."):
            continue
        if not resolves_inside(folder, f):
            skipped.append(f"{f} (a link to {os.path.realpath(f)}, outside {folder})")
            continue
        if not f.resolve().is_file():
            continue
        out.mkdir(parents=True, exist_ok=True)
        target = out / f.name
        if target.is_symlink():
            target.unlink()
        shutil.copyfile(f.resolve(), target)
    return skipped


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


def _short(value: object, limit: int = 120) -> str:
    """repr(value), cut to `limit` characters: error messages quote values from files that may be hostile."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"the key {_short(key)} appears twice")
        out[key] = value
    return out


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _parse_header(path: Path) -> tuple[dict[str, dict], int]:
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
        where = f"tensor {_short(key)}"
        if not isinstance(meta, dict) or not {"dtype", "shape", "data_offsets"} <= meta.keys():
            raise bad(f"{where} is not an object with dtype, shape and data_offsets")
        dtype, shape, offsets = meta["dtype"], meta["shape"], meta["data_offsets"]
        if not isinstance(dtype, str) or dtype not in _ST_DTYPES:
            raise CheckpointError(f"{path}: tensor {_short(key)} has unsupported dtype {_short(dtype)}")
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise bad(f"{where} has shape {_short(shape)}; a shape is a list of non-negative integers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            raise bad(f"{where} has data_offsets {_short(offsets)}; they must be two integers 0 <= start <= end")
        start, end = offsets
        if end > data_len:
            raise CheckpointError(f"{path} is truncated: tensor {_short(key)} ends at byte {end} of the data "
                                  f"section, which holds only {data_len} bytes")
        numel = 1
        for d in shape:
            numel *= d
        if end - start != numel * _ELEMENT_SIZE[dtype]:
            raise bad(f"{where} has {end - start} bytes for shape {_short(shape)} of {dtype}, which needs "
                      f"{numel * _ELEMENT_SIZE[dtype]}")
        if end > start:
            spans.append((start, end, key))
    spans.sort()
    for (_, end_a, key_a), (start_b, _, key_b) in itertools.pairwise(spans):
        if start_b < end_a:
            raise bad(f"the bytes of tensors {_short(key_a)} and {_short(key_b)} overlap")
    return header, 8 + n


def read_safetensors_header(path: Path) -> dict[str, dict]:
    """Parse and validate a safetensors header without reading tensor data (see `_parse_header`)."""
    return _parse_header(path)[0]


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
            header[key] = {"dtype": _ST_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
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
                _pread_exact(fd, memoryview(window.view(raw_dtype).numpy()).cast("B"), offset)
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


def check_compatible(sources: Sequence[TensorSource], keys: Iterable[str] | None = None) -> list[str]:
    """The keys to merge, after checking every source has the same names and shapes as the first."""
    ref = sources[0]
    ref_keys = list(keys) if keys is not None else ref.keys()
    ref_set = set(ref_keys)
    for src in sources[1:]:
        other = set(src.keys())
        missing = [k for k in ref_keys if k not in other]
        if missing:
            raise CheckpointError(f"{src.name} has no tensor {missing[0]!r}, which {ref.name} has "
                                  f"({len(missing)} missing in all)")
        extra = sorted(other - ref_set) if keys is None else []
        if extra:
            raise CheckpointError(f"{src.name} has a tensor {extra[0]!r} that {ref.name} lacks "
                                  f"({len(extra)} extra in all)")
        for k in ref_keys:
            if src.shape(k) != ref.shape(k):
                raise CheckpointError(f"tensor {k!r} has shape {list(ref.shape(k))} in {ref.name} but "
                                      f"{list(src.shape(k))} in {src.name}")
    return ref_keys


def check_finite(tensor: torch.Tensor, key: str, source: str) -> None:
    """Raise if `tensor` holds NaN or ±inf.

    min and max of a tensor are both finite exactly when every entry is (NaN propagates through them); one fused
    min/max reduction costs about as much as a sum, where `isfinite(t).all()` writes a mask first (~20x slower).
    """
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return
    lo, hi = torch.aminmax(tensor)
    if not (bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))):
        bad = int((~torch.isfinite(tensor)).sum())
        raise CheckpointError(f"tensor {key!r} in {source} has {bad} non-finite values (NaN or inf)")


def task_vectors(experts: Sequence[torch.Tensor], base: torch.Tensor,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Stacked task vectors, shape (n_experts, *base.shape), written in place into one fresh tensor.

    Subtracting into slices of a preallocated result avoids the temporary per expert that `torch.stack` would copy,
    and tensors already in `dtype` are not converted at all.
    """
    b = base if base.dtype == dtype else base.to(dtype)
    out = torch.empty((len(experts), *base.shape), dtype=dtype, device=base.device)
    for i, e in enumerate(experts):
        torch.sub(e if e.dtype == dtype else e.to(dtype), b, out=out[i])
    return out


def is_mergeable(tensor_dtype: torch.dtype) -> bool:
    """Only floating-point tensors are merged; integer buffers (position ids, counters) are copied."""
    return tensor_dtype.is_floating_point


def polar_factor(a: torch.Tensor) -> torch.Tensor:
    """The orthonormal matrix nearest to `a` in Frobenius norm (orthogonal Procrustes): U Vᵀ from a = U Σ Vᵀ.

    The spectral methods (TSV-M, Iso-CTS) use it to decorrelate concatenated singular bases.
    """
    u, _, vh = torch.linalg.svd(a, full_matrices=False)
    return u @ vh


def save_state_dict(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike[str],
                    metadata: Mapping[str, str] | None = None) -> Path:
    """Write a state dict as safetensors atomically (temporary file, then rename)."""
    layout = [(k, tuple(v.shape), v.dtype) for k, v in tensors.items()]
    with StreamingSafetensorsWriter(path, layout, metadata) as w:
        for k, v in tensors.items():
            w.write(k, v)
        return w.commit()


def load_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    src = SafetensorsSource(path)
    return {k: src.get(k) for k in src.keys()}


TRUST_PICKLE_ENV = "MERGEBENCH_TRUST_PICKLE"


def read_pickle_checkpoint(path: str | os.PathLike[str], *, trust_pickle: bool = False,
                           pickle_module: object | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a pickle checkpoint (.pt/.bin/.ckpt): a state dict, a dict holding one, or a whole module.

    By default only torch's weights-only loader runs, which builds tensors and plain containers and nothing else.
    Anything more (a pickled nn.Module, custom classes) needs full unpickling, which can run arbitrary code: it
    happens only with `trust_pickle=True` (`--trust-pickle`), and `mergebench convert` does it once so later runs
    read safetensors. `pickle_module` lets a pool map the classes its checkpoints name (see torch.load).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if trust_pickle:
        extra = {"pickle_module": pickle_module} if pickle_module is not None else {}
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False, **extra)
        except ModuleNotFoundError as exc:
            raise CheckpointError(f"unpickling {path} needs the module {exc.name!r}, which is not installed") from exc
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CheckpointError(
                f"{path} is a pickle that holds more than tensors ({first[:200]}). mergebench does not unpickle "
                f"files by default, because unpickling can run arbitrary code. If you trust the file, pass "
                f"--trust-pickle (or set {TRUST_PICKLE_ENV}=1), or convert it once with "
                f"`mergebench convert --trust-pickle {path}`.") from None
    return _tensors_of(obj, str(path))


def _tensors_of(obj: object, where: str) -> dict[str, torch.Tensor]:
    if isinstance(obj, torch.nn.Module):
        return {k: v.detach() for k, v in obj.state_dict().items()}
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model_state_dict", "model"):
            if key in obj and isinstance(obj[key], (Mapping, torch.nn.Module)) and len(obj) <= 4:
                return _tensors_of(obj[key], where)
        out: dict[str, torch.Tensor] = {}
        for k, v in obj.items():
            if isinstance(v, torch.Tensor):
                out[str(k)] = v
            elif isinstance(v, (Mapping, torch.nn.Module)):
                out.update({f"{k}.{kk}": vv for kk, vv in _tensors_of(v, where).items()})
        if out:
            return out
    raise CheckpointError(f"{where} holds a {type(obj).__name__}, not a state dict or a module")


def convert_pickle_checkpoint(path: str | os.PathLike[str], out: str | os.PathLike[str] | None = None, *,
                              trust_pickle: bool = False, pickle_module: object | None = None) -> Path:
    """Write the tensors of a pickle checkpoint as safetensors (default: beside it, same stem)."""
    path = Path(path)
    target = Path(out) if out is not None else path.with_suffix(".safetensors")
    tensors = read_pickle_checkpoint(path, trust_pickle=trust_pickle, pickle_module=pickle_module)
    contiguous = {k: v.contiguous() for k, v in tensors.items()}
    return save_state_dict(contiguous, target, {"format": "pt", "converted_from": path.name})
