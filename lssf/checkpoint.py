"""Lazy access to a safetensors checkpoint folder, one tensor at a time.

Only safetensors is read. A folder holding only pickle weights (``*.bin``, ``*.pt``, ...) is
refused before anything is opened: unpickling runs arbitrary code.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch

from lssf.errors import CheckpointError, PickleRefusedError, ShapeMismatchError
from lssf.pipeline import BufferPool, ByteBudget, MappedFile
from lssf.st_io import Header, TensorInfo, read_header, read_tensor, short

if TYPE_CHECKING:
    from lssf.models import SourceRecord

INDEX_NAME = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# Adapter weights sit beside model weights in some folders; they are not the model.
NOT_MODEL_WEIGHTS = ("adapter_model.safetensors",)


def folder_file(folder: Path, name: str) -> Path | None:
    """``folder/name`` if it exists, else None; a name or symlink leaving the folder is refused."""
    folder = Path(folder)
    if not name or Path(name).is_absolute() or ".." in Path(name).parts or "\0" in name:
        raise CheckpointError(f"{folder}: file name {short(name)} leaves the folder; refused")
    path = folder / name
    if not os.path.lexists(path):
        return None
    real, root = Path(os.path.realpath(path)), Path(os.path.realpath(folder))
    # A Hub cache snapshot (models--org--name/snapshots/SHA) holds symlinks into the repo's blobs.
    if root.parent.name == "snapshots" and (root.parent.parent / "blobs").is_dir():
        root = root.parent.parent
    if root not in real.parents:
        raise CheckpointError(
            f"{path} is a symlink that leads outside the model folder; refused (copy the file "
            "into the folder if it is meant to be there)"
        )
    if not real.is_file():
        raise CheckpointError(f"{path} is not a regular file")
    return path


def _shard_name(index: Path, tensor: object, name: object) -> str:
    if not isinstance(tensor, str) or not isinstance(name, str):
        raise CheckpointError(f"{index}: weight_map must map tensor names to file names (strings)")
    plain = name not in ("", ".", "..") and not any(c in name for c in "/\\\0")
    if not plain or not name.endswith(".safetensors"):
        raise CheckpointError(
            f"{index}: weight_map names {short(name)} for tensor {short(tensor)}; shards must be "
            "*.safetensors files in the model folder itself (no paths)"
        )
    return name


def read_index(index: Path) -> dict[str, str]:
    """An index's ``weight_map`` (tensor -> shard file name), every entry checked."""
    try:
        raw = json.loads(Path(index).read_bytes())
    except OSError as exc:
        raise CheckpointError(f"unreadable index {index}: {exc.strerror}") from exc
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"unreadable index {index}: {exc.msg} at {exc.pos}") from exc
    except (ValueError, RecursionError) as exc:
        raise CheckpointError(f"unreadable index {index}: not JSON text") from exc
    weight_map = raw.get("weight_map") if isinstance(raw, dict) else None
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"unreadable index {index}: no weight_map object")
    return {t: _shard_name(index, t, n) for t, n in weight_map.items()}


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a model folder, via the index when there is one."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder {folder} does not exist")
    index = folder_file(folder, INDEX_NAME)
    if index is not None:
        names = sorted(set(read_index(index).values()))
        missing = [n for n in names if folder_file(folder, n) is None]
        if missing:
            raise CheckpointError(f"{index} names missing shard(s): {', '.join(missing)}")
        return [folder / n for n in names]
    files = sorted(p for p in folder.glob("*.safetensors") if p.name not in NOT_MODEL_WEIGHTS)
    if files:
        return [f for f in files if folder_file(folder, f.name)]
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise PickleRefusedError(
            f"{folder} holds only pickle weights ({', '.join(pickles)}); lssf requires "
            "safetensors and never unpickles model files. Convert them where you trust the "
            "source, e.g. model.save_pretrained(dir, safe_serialization=True)."
        )
    raise CheckpointError(f"no *.safetensors weights in {folder}")


class TensorSource(Protocol):
    """A model's tensors, read lazily: a ``Checkpoint``, or a LoRA fine-tune (``MergedView``)."""

    folder: Path
    headers: list[Header]  # the shards, in the order an output mirrors them
    sha256: dict[str, str]
    record: SourceRecord | None  # what the model reference resolved to; None from a bare folder
    folders: list[Path]  # every folder read (an output may not be or lie inside one)

    def __contains__(self, name: str) -> bool: ...

    def names(self) -> list[str]:
        """Tensor names, in header order."""

    def info(self, name: str) -> TensorInfo:
        """The header entry (shape, dtype, offsets) of tensor ``name``."""

    def get(self, name: str) -> torch.Tensor:
        """Tensor ``name``'s value."""

    def mapped(self, header: Header) -> MappedFile:
        """``header``'s file mapped, for ``iter_file(header, mapped=...)``."""

    def iter_file(
        self,
        header: Header,
        pool: BufferPool | None = None,
        mapped: MappedFile | None = None,
        *,
        hash: bool = True,  # noqa: A002
    ) -> Iterator[tuple[TensorInfo, torch.Tensor]]:
        """Every tensor of one shard in file order; ``sha256[shard]`` holds its hash afterwards.

        ``hash=False``: the digest is known already (``lssf.hashcache``); none is computed.
        """

    def __enter__(self) -> TensorSource: ...
    def __exit__(self, *exc: object) -> None: ...


def check_tensors(
    source: TensorSource, wanted: dict[str, Sequence[int]], floats: set[str], wanted_by: str
) -> None:
    """Each ``wanted`` name -> shape is a tensor of ``source`` (floating-point if in ``floats``)."""
    for name, shape in wanted.items():
        if name not in source:
            raise ShapeMismatchError(
                f"{wanted_by} changes tensor {name!r}, which {source.folder} does not have"
            )
        info = source.info(name)
        if tuple(info.shape) != tuple(shape):
            raise ShapeMismatchError(
                f"tensor {name!r} has shape {list(info.shape)} in {source.folder} but "
                f"{list(shape)} in {wanted_by}"
            )
        if name in floats and not info.torch_dtype.is_floating_point:
            raise ShapeMismatchError(
                f"tensor {name!r} is {info.dtype} in {source.folder}; {wanted_by} changes it, "
                "and only floating-point tensors can be changed"
            )


class Checkpoint:
    """Shard headers read up front, tensor data when asked for; a context manager (closes fds)."""

    def __init__(
        self, folder: Path, files: list[Path] | None = None, record: SourceRecord | None = None
    ) -> None:
        """``files``: the shards to read (default: the folder's); ``record``: where it came from."""
        self.folder = Path(folder)
        self.folders = [self.folder]
        self.record = record
        self.files = weight_files(self.folder) if files is None else list(files)
        self.headers: list[Header] = [read_header(f) for f in self.files]
        self._where: dict[str, tuple[Header, TensorInfo]] = {}
        for header in self.headers:
            for name, info in header.tensors.items():
                if name in self._where:
                    other = self._where[name][0].path.name
                    raise CheckpointError(
                        f"tensor {name!r} appears in both {other} and {header.path.name}"
                    )
                self._where[name] = (header, info)
        index = folder_file(self.folder, INDEX_NAME) if files is None else None
        # Every tensor the index lists must be in the shard it names, else loaders fail on it.
        for tensor, shard in (read_index(index) if index else {}).items():
            if tensor not in self._where or self._where[tensor][0].path.name != shard:
                raise CheckpointError(
                    f"{index} maps tensor {short(tensor)} to {shard}, which does not hold it"
                )
        self._fds: dict[Path, int] = {}
        # Filled by iter_file: SHA-256 of each shard read through it, by file name.
        self.sha256: dict[str, str] = {}

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the shards' file descriptors (reopened if read again)."""
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def is_float(self, name: str) -> bool:
        """Whether tensor ``name`` is floating-point (only those can be patched)."""
        return self.info(name).torch_dtype.is_floating_point

    def names(self) -> list[str]:
        """Tensor names, shard by shard in header order."""
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def info(self, name: str) -> TensorInfo:
        """The header entry of tensor ``name``; a ``CheckpointError`` if there is none."""
        if name not in self._where:
            raise CheckpointError(f"tensor {name!r} is not in checkpoint {self.folder}")
        return self._where[name][1]

    def _fd(self, path: Path) -> int:
        if path not in self._fds:
            self._fds[path] = os.open(path, os.O_RDONLY)
        return self._fds[path]

    def get(self, name: str) -> torch.Tensor:
        """Tensor ``name`` read from its shard."""
        info = self.info(name)  # first: it names a missing tensor
        return read_tensor(self._fd(self._where[name][0].path), info)

    def mapped(self, header: Header) -> MappedFile:
        """``header``'s file mapped, for ``iter_file(header, mapped=...)``."""
        return MappedFile(self._fd(header.path), header.path)

    def iter_file(
        self,
        header: Header,
        pool: BufferPool | None = None,
        mapped: MappedFile | None = None,
        *,
        prefetch: int = 64 << 20,
        hash: bool = True,  # noqa: A002 - the name the brief and callers use
    ) -> Iterator[tuple[TensorInfo, torch.Tensor]]:
        """Every tensor of one shard in file order, hashing exactly the bytes handed out.

        A reader thread reads and hashes (both release the GIL) up to ``prefetch`` bytes ahead,
        at least one tensor; tensors are buffers from ``pool`` or views of ``mapped``, each given
        back when done. ``hash=False`` (digest known, e.g. from ``lssf.hashcache``): no hashing.
        """
        fd = self._fd(header.path)
        infos = sorted(header.tensors.values(), key=lambda t: t.start)
        budget = ByteBudget(prefetch)
        ready: queue.SimpleQueue = queue.SimpleQueue()
        hasher = hashlib.sha256() if hash else None

        def read_ahead() -> None:  # the reader thread: tensors in file order, or the error
            try:
                if hasher is not None:
                    hasher.update(os.pread(fd, header.data_start, 0))
                for info in infos:
                    if not budget.acquire(info.nbytes):
                        return
                    if mapped is not None:
                        ready.put(mapped.tensor(info, hasher))
                    else:
                        ready.put(read_tensor(fd, info, hasher, pool))
            except BaseException as exc:  # handed to the consuming thread
                ready.put(exc)

        reader = threading.Thread(target=read_ahead, name="lssf-read", daemon=True)
        reader.start()
        try:
            for info in infos:
                item = ready.get()
                if isinstance(item, BaseException):
                    raise item
                yield info, item
                budget.release(info.nbytes)
        finally:
            budget.cancel()
            reader.join()
        if hasher is not None:
            self.sha256[header.path.name] = hasher.hexdigest()

    def fstat(self, header: Header) -> os.stat_result:
        """``fstat`` of the descriptor ``header``'s file is read through (opened if need be)."""
        return os.fstat(self._fd(header.path))
