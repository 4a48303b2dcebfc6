"""Named tensors, read lazily from state dicts or safetensors files, and written as they are produced.

Every data-free method is written once against `TensorSource`, so it runs on any architecture and on checkpoints
larger than memory: a source hands out one tensor at a time, and `StreamingSafetensorsWriter` writes each merged
tensor to disk as soon as it exists.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

from .errors import CheckpointError


@runtime_checkable
class TensorSource(Protocol):
    """Named tensors that can be read one at a time."""

    name: str

    def keys(self) -> list[str]: ...

    def shape(self, key: str) -> tuple[int, ...]: ...

    def dtype(self, key: str) -> torch.dtype: ...

    def get(self, key: str) -> torch.Tensor: ...


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


_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}


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
            for key, meta in read_safetensors_header(f).items():
                if key in self._where:
                    raise CheckpointError(f"tensor {key!r} appears in both {self._where[key]} and {f}")
                self._where[key], self._meta[key] = f, meta
            with open(f, "rb") as fh:
                self._data_start[f] = 8 + struct.unpack("<Q", fh.read(8))[0]

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
    """The safetensors files that make up a checkpoint: a file, an index json, or a model folder."""
    if path.is_dir():
        for index in ("model.safetensors.index.json", "diffusion_pytorch_model.safetensors.index.json"):
            if (path / index).is_file():
                return _files_from_index(path / index)
        files = sorted(path.glob("*.safetensors"))
        if files:
            return files
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


def _files_from_index(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except Exception as exc:
        raise CheckpointError(f"{index} is not a valid safetensors index ({exc})") from exc
    files = sorted({index.parent / f for f in weight_map.values()})
    for f in files:
        if not f.is_file():
            raise CheckpointError(f"{index} names shard {f.name}, which is missing")
    return files


def read_safetensors_header(path: Path) -> dict[str, dict]:
    """Parse and validate a safetensors header without reading tensor data."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            raw = fh.read(8)
            if len(raw) < 8:
                raise ValueError("file shorter than its 8-byte header length")
            (n,) = struct.unpack("<Q", raw)
            if n > size - 8 or n > 100_000_000:
                raise ValueError(f"header length {n} exceeds the file size {size}")
            header = json.loads(fh.read(n))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file (corrupt or truncated?): {exc}") from exc
    header.pop("__metadata__", None)
    data_len = size - 8 - n
    for key, meta in header.items():
        try:
            start, end = meta["data_offsets"]
            dtype = meta["dtype"]
            numel = 1
            for d in meta["shape"]:
                numel *= d
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{path}: malformed header entry for {key!r}") from exc
        if dtype not in _ST_DTYPES:
            raise CheckpointError(f"{path}: tensor {key!r} has unsupported dtype {dtype}")
        if end > data_len:
            raise CheckpointError(f"{path} is truncated: tensor {key!r} ends at byte {end} of the data section, "
                                  f"which holds only {data_len} bytes")
        if end - start != numel * torch.tensor([], dtype=_ST_DTYPES[dtype]).element_size():
            raise CheckpointError(f"{path}: tensor {key!r} has {end - start} bytes for shape {meta['shape']}")
    return header


class StreamingSafetensorsWriter:
    """Writes a safetensors file tensor by tensor, so the whole output never sits in memory.

    The header needs every shape and dtype up front; the caller declares them (they are known from the inputs).
    Bytes go to a temporary file that replaces `path` only on `commit()`: an error never leaves a half-written
    output behind.
    """

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

    def write(self, key: str, tensor: torch.Tensor) -> None:
        want_key, shape, dtype = self._expected[self._next]
        if key != want_key or tuple(tensor.shape) != shape or tensor.dtype != dtype:
            self.abort()
            raise ValueError(f"writer expected {want_key} {shape} {dtype}, got {key} {tuple(tensor.shape)} "
                             f"{tensor.dtype}")
        t = tensor.detach().to("cpu").contiguous()
        if t.dtype == torch.bfloat16:  # numpy has no bfloat16: write its raw 16-bit pattern
            t = t.view(torch.int16)
        if t.numel():
            self._fh.write(memoryview(t.view(-1).view(torch.uint8).numpy()))  # no intermediate bytes copy
        self._next += 1

    def patch(self, key: str, index: torch.Tensor | None, values: torch.Tensor) -> None:
        """Overwrite entries of a tensor already written: those at flat `index`, or all of it when `index` is None.

        A method that settles a few entries only after its merge pass (TIES's one-pass top-k) corrects them here,
        before `commit()`; only that tensor is read back.
        """
        position = self._position.get(key)
        if position is None or position >= self._next:
            raise ValueError(f"cannot patch {key!r}: it has not been written yet")
        _, shape, dtype = self._expected[position]
        raw_dtype = torch.int16 if dtype == torch.bfloat16 else dtype  # numpy has no bfloat16
        current = torch.empty(torch.Size(shape).numel(), dtype=dtype)
        if index is None:
            current.copy_(values.reshape(-1))
        else:
            self._fh.flush()
            _pread_exact(self._fh.fileno(), memoryview(current.view(raw_dtype).numpy()).cast("B"),
                         self._data_start + self._offsets[key])
            current[index] = values.to(dtype)
        self._fh.flush()
        buf = memoryview(current.view(raw_dtype).numpy()).cast("B")
        offset, done = self._data_start + self._offsets[key], 0
        while done < len(buf):
            done += os.pwrite(self._fh.fileno(), buf[done:], offset + done)

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
