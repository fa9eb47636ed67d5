"""Streaming safetensors I/O without mmap: one tensor in memory at a time.

safetensors' own ``safe_open`` maps whole files; the pages it touches count in the process's
resident set, so a full pass over a 10 GB checkpoint looks like 10 GB of RSS. Here tensors are
read with ``pread`` into a fresh buffer and written straight from the tensor's memory, so peak
memory is the largest tensor, whatever the checkpoint's size. The format is small and
documented (https://github.com/huggingface/safetensors#format); headers are validated fully so a
corrupt or truncated file fails before anything is computed.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from lssf.errors import CheckpointError

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


def _parse_entry(path: Path, name: str, entry: object, data_start: int) -> TensorInfo:
    if not isinstance(entry, dict) or {"dtype", "shape", "data_offsets"} - entry.keys():
        raise _corrupt(path, f"tensor {name!r} has a malformed header entry {entry!r}")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in DTYPES:
        raise _corrupt(path, f"tensor {name!r} has unknown dtype {dtype!r}")
    if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
        raise _corrupt(path, f"tensor {name!r} has invalid shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and 0 <= offsets[0] <= offsets[1]):
        raise _corrupt(path, f"tensor {name!r} has invalid data_offsets {offsets!r}")
    numel = 1
    for d in shape:
        numel *= d
    itemsize = torch.empty(0, dtype=DTYPES[dtype]).element_size()
    if offsets[1] - offsets[0] != numel * itemsize:
        raise _corrupt(path, f"tensor {name!r} spans {offsets} bytes for shape {shape} {dtype}")
    return TensorInfo(name, dtype, tuple(shape), data_start + offsets[0], data_start + offsets[1])


def read_header(path: Path) -> Header:
    """Parse and validate a safetensors header; the data must tile the rest of the file exactly."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            prefix = fh.read(8)
            if len(prefix) < 8:
                raise _corrupt(path, f"file is {size} bytes, shorter than the 8-byte prefix")
            (n,) = struct.unpack("<Q", prefix)
            if n > min(MAX_HEADER_BYTES, size - 8):
                raise _corrupt(path, f"header length {n} does not fit a {size}-byte file")
            raw = json.loads(fh.read(n))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _corrupt(path, f"unreadable header ({exc})") from exc
    if not isinstance(raw, dict):
        raise _corrupt(path, "header is not a JSON object")
    metadata = raw.pop("__metadata__", None) or {}
    data_start = 8 + n
    tensors = {name: _parse_entry(path, name, e, data_start) for name, e in raw.items()}
    end = data_start
    for info in sorted(tensors.values(), key=lambda t: (t.start, t.end)):
        if info.start != end:
            raise _corrupt(path, f"tensor {info.name!r} starts at byte {info.start}, not {end}")
        end = info.end
    if end != size:
        raise _corrupt(path, f"data should end at byte {end} but the file has {size} bytes")
    return Header(path, tensors, dict(metadata), data_start)


def read_tensor(fd: int, info: TensorInfo, hasher: hashlib._Hash | None = None) -> torch.Tensor:
    """Read one tensor with ``pread`` into its own buffer (no mmap, no extra copy)."""
    buf = bytearray(info.nbytes)
    view, got = memoryview(buf), 0
    while got < info.nbytes:
        n = os.preadv(fd, [view[got:]], info.start + got)
        if n == 0:
            raise CheckpointError(f"unexpected end of file while reading tensor {info.name!r}")
        got += n
    if hasher is not None:
        hasher.update(buf)
    if info.nbytes == 0:
        return torch.empty(info.shape, dtype=info.torch_dtype)
    return torch.frombuffer(buf, dtype=info.torch_dtype).reshape(info.shape)


def file_sha256(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


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

    def __init__(self, path: Path, specs: list[TensorSpec], metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self._specs = list(specs)
        self._next = 0
        self._fh = self.path.open("wb")
        self._fh.write(_header_bytes(self._specs, metadata or {"format": "pt"}))

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._next >= len(self._specs):
            raise CheckpointError(f"{self.path}: tensor {name!r} is beyond the planned tensors")
        spec = self._specs[self._next]
        if (name, tensor.dtype, tuple(tensor.shape)) != (spec.name, spec.dtype, spec.shape):
            raise CheckpointError(
                f"{self.path}: expected {spec.name!r} {spec.dtype} {spec.shape}, "
                f"got {name!r} {tensor.dtype} {tuple(tensor.shape)}"
            )
        self._fh.write(_tensor_bytes(tensor))
        self._next += 1

    def close(self) -> None:
        self._fh.close()
        if self._next != len(self._specs):
            missing = self._specs[self._next].name
            raise CheckpointError(f"{self.path}: closed before tensor {missing!r} was written")


class AppendingWriter:
    """Writes a safetensors file whose tensors are only known as they come.

    Data is appended to a side file; ``close`` writes the header and streams the data after it
    in fixed-size chunks, so memory stays one tensor plus one chunk.
    """

    def __init__(self, path: Path, metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self._body_path = self.path.with_name(self.path.name + ".body")
        self._body = self._body_path.open("wb")
        self._specs: list[TensorSpec] = []
        self._metadata = metadata or {"format": "pt"}

    def write(self, name: str, tensor: torch.Tensor) -> None:
        self._specs.append(TensorSpec(name, tensor.dtype, tuple(tensor.shape)))
        self._body.write(_tensor_bytes(tensor))

    def close(self, chunk: int = 1 << 24) -> None:
        self._body.close()
        with self.path.open("wb") as out, self._body_path.open("rb") as body:
            out.write(_header_bytes(self._specs, self._metadata))
            while block := body.read(chunk):
                out.write(block)
        self._body_path.unlink()
