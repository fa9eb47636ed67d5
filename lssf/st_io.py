"""Streaming safetensors I/O: one tensor in memory at a time, whatever the checkpoint's size.

Tensors are read with ``pread`` into their own buffers (safetensors' ``safe_open`` maps whole
files, and the pages it touches stay in the resident set) or, in ``fuse``, as views of a
mapping whose pages are dropped once used. The format is small and documented
(https://github.com/huggingface/safetensors#format); headers are validated fully, so a corrupt
or truncated file fails before anything is computed.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import mmap
import os
import stat
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from lssf import hashcache
from lssf.errors import CheckpointError, NonFiniteError
from lssf.pipeline import drop_pages

if TYPE_CHECKING:
    from lssf.pipeline import BufferPool

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
MAX_HEADER_BYTES = 100 * 1024 * 1024
# Real tensor names are under 200 characters; a longer one is refused before anything matches
# a pattern against it (a megabyte name made the include regex run for minutes).
MAX_NAME_CHARS = 1024


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: ``start``/``end`` are absolute byte offsets in its file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


@dataclass(frozen=True)
class Header:
    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    data_start: int


def _corrupt(path: Path, why: str) -> CheckpointError:
    return CheckpointError(f"corrupt or truncated safetensors file {path}: {why}")


def short(value: object, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters: messages name a bad value, never dump it."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _parse_entry(path: Path, name: str, entry: object, data_start: int) -> TensorInfo:
    if not isinstance(entry, dict) or {"dtype", "shape", "data_offsets"} - entry.keys():
        raise _corrupt(path, f"tensor {short(name)} has a malformed header entry")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise _corrupt(path, f"tensor {short(name)} has unknown dtype {short(dtype)}")
    if not (isinstance(shape, list) and all(_is_int(d) and 0 <= d < 2**62 for d in shape)):
        raise _corrupt(path, f"tensor {short(name)} has invalid shape {short(shape)}")
    if not (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(_is_int(o) for o in offsets)
        and 0 <= offsets[0] <= offsets[1]
    ):
        raise _corrupt(path, f"tensor {short(name)} has invalid data_offsets {short(offsets)}")
    numel = 1
    for d in shape:
        numel *= d
    itemsize = torch.empty(0, dtype=DTYPES[dtype]).element_size()
    if offsets[1] - offsets[0] != numel * itemsize:
        raise _corrupt(
            path, f"tensor {short(name)} spans {offsets} bytes for shape {short(shape)} {dtype}"
        )
    return TensorInfo(name, dtype, tuple(shape), data_start + offsets[0], data_start + offsets[1])


def _metadata(path: Path, raw: object) -> dict[str, str]:
    """``__metadata__``: absent, or strings to strings (the safetensors library refuses else)."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise _corrupt(path, f"__metadata__ is a {type(raw).__name__}, not a JSON object")
    bad = [k for k, v in raw.items() if not isinstance(v, str)]
    if bad:
        raise _corrupt(path, f"__metadata__ value(s) of {short(bad)} are not strings")
    return dict(raw)


def _raw_header(path: Path) -> tuple[dict, int, int]:
    """The header's JSON object, its length and the file's size.

    Error messages say what is wrong, never the bytes found: the file may be anything.
    """
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise _corrupt(path, "not a regular file")
        size = st.st_size
        with path.open("rb") as fh:
            prefix = fh.read(8)
            if len(prefix) < 8:
                raise _corrupt(path, "file is shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", prefix)
            if n > min(MAX_HEADER_BYTES, size - 8):
                raise _corrupt(path, "the header length does not fit the file")
            text = fh.read(n).decode("utf-8")
        raw = json.loads(text)
    except OSError as exc:
        raise _corrupt(path, f"unreadable ({exc.strerror or type(exc).__name__})") from exc
    except UnicodeDecodeError as exc:
        raise _corrupt(path, "the header is not UTF-8 text") from exc
    except json.JSONDecodeError as exc:
        raise _corrupt(path, f"the header is not valid JSON ({exc.msg} at {exc.pos})") from exc
    except (ValueError, RecursionError) as exc:
        raise _corrupt(path, "the header is not valid JSON") from exc
    if not isinstance(raw, dict):
        raise _corrupt(path, "header is not a JSON object")
    return raw, n, size


def read_header(path: Path) -> Header:
    """Parse and validate a safetensors header; the data must tile the rest of the file exactly."""
    path = Path(path)
    raw, n, size = _raw_header(path)
    metadata = _metadata(path, raw.pop("__metadata__", None))
    long_names = [name for name in raw if len(name) > MAX_NAME_CHARS]
    if long_names:
        raise _corrupt(
            path,
            f"tensor name {short(long_names[0])} is {len(long_names[0])} characters long "
            f"(at most {MAX_NAME_CHARS})",
        )
    data_start = 8 + n
    tensors = {name: _parse_entry(path, name, e, data_start) for name, e in raw.items()}
    end = data_start
    for info in sorted(tensors.values(), key=lambda t: (t.start, t.end)):
        if info.start != end:
            raise _corrupt(
                path, f"tensor {short(info.name)} starts at byte {info.start}, not {end}"
            )
        end = info.end
    if end != size:
        raise _corrupt(path, f"data should end at byte {end} but the file has {size} bytes")
    return Header(path, tensors, metadata, data_start)


def read_tensor(
    fd: int,
    info: TensorInfo,
    hasher: hashlib._Hash | None = None,
    pool: BufferPool | None = None,
) -> torch.Tensor:
    """Read one tensor with ``pread`` into its own buffer (no mmap, no extra copy).

    The buffer is new, or with ``pool`` a recycled one of the same size: fresh memory costs a
    page fault per 4 KiB, which on this machine cost more than the copy itself.
    """
    if info.nbytes == 0:
        return torch.empty(info.shape, dtype=info.torch_dtype)
    raw = (
        pool.take(info.nbytes) if pool is not None else torch.empty(info.nbytes, dtype=torch.uint8)
    )
    view, got = memoryview(raw.numpy()), 0
    while got < info.nbytes:
        n = os.preadv(fd, [view[got:]], info.start + got)
        if n == 0:
            raise CheckpointError(f"unexpected end of file while reading tensor {info.name!r}")
        got += n
    if hasher is not None:
        hasher.update(view)
    return raw.view(info.torch_dtype).reshape(info.shape)


def file_sha256(path: Path, chunk: int = 1 << 24) -> str:
    """SHA-256 of the file at ``path``, from ``lssf.hashcache`` when its stat data is unchanged.

    A hit means the bytes were not hashed again in this run (git's trust in stat data);
    ``LSSF_HASH_CACHE=0`` hashes every time.
    """
    return hashcache.file_sha256(path, chunk)


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = torch.empty(0, dtype=self.dtype).element_size()
        for d in self.shape:
            n *= d
        return n


_REDUCIBLE = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def is_finite(tensor: torch.Tensor) -> bool:
    """No NaN/Inf in ``tensor`` (always true for integer and bool tensors).

    ``aminmax`` propagates NaN and finds +-Inf at its extremes, reads the tensor once in its own
    dtype and allocates nothing: a float32 ``sum`` of a bf16 tensor first converts all of it
    (measured on a 32000x1024 bf16 tensor: 81 ms and 32 000 page faults against 5 ms and none).
    """
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return True
    t = tensor if tensor.dtype in _REDUCIBLE else tensor.float()  # float8
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def check_finite(name: str, tensor: torch.Tensor, where: Path) -> None:
    if not is_finite(tensor):
        raise NonFiniteError(f"tensor {name!r} to be written to {where} has NaN/Inf values")


def _check_metadata(path: Path, metadata: dict[str, str]) -> dict[str, str]:
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise CheckpointError(f"{path}: safetensors metadata must map strings to strings")
    return metadata


def _header_bytes(specs: Iterable[TensorSpec], metadata: dict[str, str]) -> bytes:
    header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for spec in specs:
        header[spec.name] = {
            "dtype": DTYPE_NAMES[spec.dtype],
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.nbytes],
        }
        offset += spec.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # keep the data 8-byte aligned, as safetensors does
    return struct.pack("<Q", len(raw)) + raw


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


class PlannedWriter:
    """Writes a safetensors file whose tensors are known up front, one tensor at a time.

    The header goes first; each ``write`` must then come in plan order with the planned dtype
    and shape, so the file is valid the moment the last tensor lands.
    """

    def __init__(
        self, path: Path, specs: list[TensorSpec], metadata: dict[str, str] | None = None
    ) -> None:
        """Create ``path`` and write the header."""
        self.path = Path(path)
        self._specs = list(specs)
        self._next = 0
        header = _header_bytes(self._specs, _check_metadata(path, metadata or {"format": "pt"}))
        self._fh = self.path.open("wb")
        self._fh.write(header)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._next >= len(self._specs):
            raise CheckpointError(f"{self.path}: tensor {name!r} is beyond the planned tensors")
        spec = self._specs[self._next]
        if (name, tensor.dtype, tuple(tensor.shape)) != (spec.name, spec.dtype, spec.shape):
            raise CheckpointError(
                f"{self.path}: expected {spec.name!r} {spec.dtype} {spec.shape}, "
                f"got {name!r} {tensor.dtype} {tuple(tensor.shape)}"
            )
        check_finite(name, tensor, self.path)
        self._fh.write(_tensor_bytes(tensor))
        self._next += 1

    def close(self) -> None:
        self._fh.close()
        if self._next != len(self._specs):
            missing = self._specs[self._next].name
            raise CheckpointError(f"{self.path}: closed before tensor {missing!r} was written")


class MappedWriter:
    """A safetensors file laid out from its plan, filled in place through a shared mapping.

    The whole file is allocated first (a full disk fails here, before any work), then the
    header is written; ``slot(name)`` is a writable view of one tensor's bytes in the file,
    which the caller fills (a fused weight is computed straight into the page cache: no copy
    through ``write``), and ``done(name)`` drops its pages from the resident set (the page
    cache keeps them). ``close`` checks every tensor was filled.
    """

    def __init__(
        self, path: Path, specs: list[TensorSpec], metadata: dict[str, str] | None = None
    ) -> None:
        """Create ``path`` (truncated if it exists) at its final size."""
        self.path = Path(path)
        header = _header_bytes(specs, _check_metadata(self.path, metadata or {"format": "pt"}))
        self._at: dict[str, tuple[int, TensorSpec]] = {}
        offset = len(header)
        for spec in specs:
            self._at[spec.name] = (offset, spec)
            offset += spec.nbytes
        self._left = set(self._at)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o666)
        try:
            try:
                os.posix_fallocate(self._fd, 0, offset)
            except OSError as exc:  # a file system without it: sized, not reserved
                if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
                    raise
                os.ftruncate(self._fd, offset)
            os.pwrite(self._fd, header, 0)
            self._mm = mmap.mmap(self._fd, offset, mmap.MAP_SHARED)
        except OSError as exc:
            os.close(self._fd)
            why = exc.strerror or type(exc).__name__
            raise CheckpointError(f"cannot write {offset} bytes to {self.path}: {why}") from exc

    def slot(self, name: str) -> torch.Tensor:
        """The planned tensor ``name``'s bytes in the file, as a writable tensor."""
        offset, spec = self._at[name]
        if spec.nbytes == 0:
            return torch.empty(spec.shape, dtype=spec.dtype)
        count = spec.nbytes // torch.empty(0, dtype=spec.dtype).element_size()
        t = torch.frombuffer(self._mm, dtype=spec.dtype, count=count, offset=offset)
        return t.reshape(spec.shape)

    def drop(self, name: str, lo: int, hi: int) -> None:
        """Bytes ``lo:hi`` of ``name`` are filled: their pages leave the resident set."""
        drop_pages(self._mm, self._at[name][0] + lo, self._at[name][0] + hi)

    def done(self, name: str) -> None:
        """``name`` is filled: its pages leave the resident set (still in the page cache)."""
        offset, spec = self._at[name]
        self._left.discard(name)
        if spec.nbytes:
            start = offset - offset % mmap.PAGESIZE
            self._mm.madvise(mmap.MADV_DONTNEED, start, offset + spec.nbytes - start)

    def discard(self) -> None:
        """Close after a failure; the caller removes the incomplete output."""
        with contextlib.suppress(BufferError):  # a view still alive: unmapped when it dies
            self._mm.close()
        os.close(self._fd)

    def __enter__(self) -> MappedWriter:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        """Closed (and checked complete) on success, discarded on an exception."""
        if exc_type is None:
            self.close()
        else:
            self.discard()

    def close(self) -> None:
        """Unmap and close; a tensor never filled is an error."""
        self.discard()
        if self._left:
            first = next(name for name in self._at if name in self._left)
            raise CheckpointError(f"{self.path}: closed before tensor {first!r} was written")


class AppendingWriter:
    """Writes a safetensors file whose tensors are only known as they come.

    Data is appended to a side file; ``close`` writes the header and streams the data after it
    in fixed-size chunks, so memory stays one tensor plus one chunk.
    """

    def __init__(self, path: Path, metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self._metadata = _check_metadata(self.path, metadata or {"format": "pt"})
        self._body_path = self.path.with_name(self.path.name + ".body")
        self._body = self._body_path.open("wb")
        self._specs: list[TensorSpec] = []
        self._names: set[str] = set()

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._names:
            raise CheckpointError(f"{self.path}: tensor {name!r} is written twice")
        check_finite(name, tensor, self.path)
        self._names.add(name)
        self._specs.append(TensorSpec(name, tensor.dtype, tuple(tensor.shape)))
        self._body.write(_tensor_bytes(tensor))

    def close(self, chunk: int = 1 << 24) -> None:
        self._body.close()
        with self.path.open("wb") as out, self._body_path.open("rb") as body:
            out.write(_header_bytes(self._specs, self._metadata))
            while block := body.read(chunk):
                out.write(block)
        self._body_path.unlink()
