"""Lazy access to a safetensors checkpoint folder, one tensor at a time.

Only safetensors is read. A folder holding only pickle weights (``*.bin``, ``*.pt``, ...) is
refused before anything is opened: unpickling runs arbitrary code.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from lssf.errors import CheckpointError, PickleRefusedError
from lssf.st_io import Header, TensorInfo, read_header, read_tensor

INDEX_NAME = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# Adapter weights sit beside model weights in some folders; they are not the model.
NOT_MODEL_WEIGHTS = ("adapter_model.safetensors",)


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a model folder, via the index when there is one."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder {folder} does not exist")
    index = folder / INDEX_NAME
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"unreadable index {index}: {exc}") from exc
        files = sorted({folder / f for f in weight_map.values()})
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise CheckpointError(f"{index} names missing shard(s): {', '.join(missing)}")
        return files
    files = sorted(p for p in folder.glob("*.safetensors") if p.name not in NOT_MODEL_WEIGHTS)
    if files:
        return files
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise PickleRefusedError(
            f"{folder} holds only pickle weights ({', '.join(pickles)}); lssf requires "
            "safetensors and never unpickles model files. Convert them where you trust the "
            "source, e.g. model.save_pretrained(dir, safe_serialization=True)."
        )
    raise CheckpointError(f"no *.safetensors weights in {folder}")


class Checkpoint:
    """Headers of every shard, read up front; tensor data read only when asked for.

    Use as a context manager so file descriptors are closed.
    """

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.files = weight_files(self.folder)
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
        self._fds: dict[Path, int] = {}
        # Filled by iter_file: SHA-256 of each shard read through it, by file name.
        self.sha256: dict[str, str] = {}

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def names(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def info(self, name: str) -> TensorInfo:
        if name not in self._where:
            raise CheckpointError(f"tensor {name!r} is not in checkpoint {self.folder}")
        return self._where[name][1]

    def _fd(self, path: Path) -> int:
        if path not in self._fds:
            self._fds[path] = os.open(path, os.O_RDONLY)
        return self._fds[path]

    def get(self, name: str) -> torch.Tensor:
        header, info = self._where.get(name, (None, None))
        if header is None or info is None:
            raise CheckpointError(f"tensor {name!r} is not in checkpoint {self.folder}")
        return read_tensor(self._fd(header.path), info)

    def iter_file(self, header: Header) -> Iterator[tuple[TensorInfo, torch.Tensor]]:
        """Every tensor of one shard in file order, hashing the whole file as it goes.

        After the loop, ``self.sha256[header.path.name]`` is the file's SHA-256, at no extra read.
        """
        hasher = hashlib.sha256()
        fd = self._fd(header.path)
        hasher.update(os.pread(fd, header.data_start, 0))
        infos = sorted(header.tensors.values(), key=lambda t: t.start)
        # Read the next tensor in a thread while the caller computes and writes this one;
        # pread and the hashing release the GIL. Reads stay in file order, so the hash is right.
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="lssf-read") as pool:
            pending = pool.submit(read_tensor, fd, infos[0], hasher) if infos else None
            for k, info in enumerate(infos):
                tensor = pending.result()
                if k + 1 < len(infos):
                    pending = pool.submit(read_tensor, fd, infos[k + 1], hasher)
                yield info, tensor
        self.sha256[header.path.name] = hasher.hexdigest()
