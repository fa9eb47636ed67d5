"""The threads and buffers of a streaming pass: read ahead, then compute.

``ByteBudget`` bounds the bytes in flight between two threads; ``BufferPool`` recycles buffers
by size and ``MappedFile`` hands out views of a mapped shard (the first ``POPULATE_BYTES`` of
each mapped in by the reader's thread), so steady-state streaming neither copies nor
page-faults more than it must. Memory stays a few tensors, whatever the checkpoint's size.
(Outputs: ``st_io.MappedWriter``.)
"""

from __future__ import annotations

import hashlib
import mmap
import os
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from lssf.errors import CheckpointError

# Linux's madvise(2) advice value (5.14+); Python's mmap module does not name it.
MADV_POPULATE_READ = 22
# The reader maps at most this much of a tensor ahead; the rest faults in as it is used, so a
# large tensor (an embedding) consumed a block at a time is never resident whole (``drop``).
POPULATE_BYTES = 16 << 20

if TYPE_CHECKING:  # st_io imports this module's BufferPool the same way: no cycle at run time
    from lssf.st_io import TensorInfo


class BufferPool:
    """Byte buffers kept by size for reuse, at most ``keep`` bytes of them.

    A streaming pass allocates the same few sizes again and again (one per module shape); taking
    them from here instead of fresh memory saves the page faults. Only tensors the caller owns
    outright may be given back: whoever takes a buffer next overwrites it.
    """

    def __init__(self, keep: int = 256 << 20) -> None:
        self._keep, self._held = keep, 0
        self._free: dict[int, list[torch.Tensor]] = {}
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> torch.Tensor:
        """A ``uint8`` buffer of ``nbytes``, recycled when one is free."""
        with self._lock:
            free = self._free.get(nbytes)
            if free:
                self._held -= nbytes
                return free.pop()
        return torch.empty(nbytes, dtype=torch.uint8)

    def empty_like(self, t: torch.Tensor) -> torch.Tensor:
        """An uninitialised tensor of ``t``'s shape and dtype from the pool."""
        return self.take(t.numel() * t.element_size()).view(t.dtype).reshape(t.shape)

    def give(self, t: torch.Tensor) -> None:
        """Keep ``t``'s memory for reuse (the caller must own it outright)."""
        nbytes = t.numel() * t.element_size()
        if nbytes == 0 or not t.is_contiguous() or t.device.type != "cpu":
            return
        with self._lock:
            if self._held + nbytes <= self._keep:
                self._free.setdefault(nbytes, []).append(t.reshape(-1).view(torch.uint8))
                self._held += nbytes


def give_back(t: torch.Tensor, pool: BufferPool | None, mapped: MappedFile | None) -> None:
    """A tensor the caller is done with: its pages dropped if ``mapped`` made it, else pooled."""
    if mapped is not None and mapped.give(t):
        return
    if pool is not None:
        pool.give(t)


class MappedFile:
    """One shard mapped copy-on-write (never written): tensors are views, no copy is read.

    Pages count in the resident set while mapped, so each tensor's pages are dropped again
    (``MADV_DONTNEED``; the page cache keeps them) when it is given back: resident memory stays a
    few tensors. The bytes hashed are the bytes used only while nobody writes the file, so its
    identity and times are compared on exit and a change fails the run. A file truncated under
    the mapping kills the process (SIGBUS) rather than raising: no output is published then.
    """

    def __init__(self, fd: int, path: Path) -> None:
        self.path = Path(path)
        self._stat = _identity(os.fstat(fd))
        self._mm = mmap.mmap(fd, 0, access=mmap.ACCESS_COPY)
        self._ranges: dict[int, tuple[int, int]] = {}
        self._can_populate = sys.platform == "linux"

    def tensor(self, info: TensorInfo, hasher: hashlib._Hash | None = None) -> torch.Tensor:
        """A view of ``info``'s bytes in the mapping, hashed into ``hasher`` on the way."""
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=info.torch_dtype)
        if hasher is not None:
            with memoryview(self._mm) as view:
                hasher.update(view[info.start : info.end])
        numel = info.nbytes // torch.empty(0, dtype=info.torch_dtype).element_size()
        self._populate(info.start, min(info.end, info.start + POPULATE_BYTES))
        t = torch.frombuffer(self._mm, dtype=info.torch_dtype, count=numel, offset=info.start)
        self._ranges[t.data_ptr()] = (info.start, info.end)
        return t.reshape(info.shape)

    def _populate(self, start: int, end: int) -> None:
        """Map the range's pages now (in the reader's thread), not one fault at a time later."""
        if self._can_populate:
            start -= start % mmap.PAGESIZE
            try:
                self._mm.madvise(MADV_POPULATE_READ, start, end - start)
            except OSError:  # a kernel before 5.14: the pages fault in when used instead
                self._can_populate = False

    def drop(self, t: torch.Tensor, lo: int, hi: int) -> None:
        """Drop the pages of bytes ``lo:hi`` of a tensor made here, once used (if it was)."""
        span = self._ranges.get(t.data_ptr())
        if span is not None:
            drop_pages(self._mm, span[0] + lo, span[0] + hi)

    def give(self, t: torch.Tensor) -> bool:
        """Drop the pages of a tensor made here from the resident set; False if not one."""
        span = self._ranges.pop(t.data_ptr(), None)
        if span is None:
            return False
        start = span[0] - span[0] % mmap.PAGESIZE
        self._mm.madvise(mmap.MADV_DONTNEED, start, span[1] - start)
        return True

    def __enter__(self) -> MappedFile:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is None and _identity(os.stat(self.path)) != self._stat:
            raise CheckpointError(f"{self.path} changed while it was being read; run again")


def _identity(st: os.stat_result) -> tuple[int, ...]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class ByteBudget:
    """At most ``limit`` bytes in flight between two threads; one item always passes alone.

    ``acquire`` blocks the producer while the consumer is behind; ``cancel`` wakes it for good
    (``acquire`` then returns False), so a failing consumer never leaves a thread waiting.
    """

    def __init__(self, limit: int) -> None:
        self._limit, self._held, self._cancelled = limit, 0, False
        self._cv = threading.Condition()

    def acquire(self, n: int) -> bool:
        """Wait until ``n`` more bytes fit; False once cancelled."""
        with self._cv:
            self._cv.wait_for(
                lambda: self._cancelled or self._held == 0 or self._held + n <= self._limit
            )
            self._held += n
            return not self._cancelled

    def release(self, n: int) -> None:
        """``n`` bytes left the pipeline."""
        with self._cv:
            self._held -= n
            self._cv.notify_all()

    def cancel(self) -> None:
        """Wake every waiter for good."""
        with self._cv:
            self._cancelled = True
            self._cv.notify_all()


def drop_pages(mm: mmap.mmap, lo: int, hi: int) -> None:
    """``MADV_DONTNEED`` the pages of bytes ``lo:hi`` that end by ``hi`` (page cache keeps them).

    The page ``hi`` falls in stays mapped: the next bytes still need it. The first page may hold
    bytes before ``lo``: they are used already.
    """
    start, end = lo - lo % mmap.PAGESIZE, hi - hi % mmap.PAGESIZE
    if end > start:
        mm.madvise(mmap.MADV_DONTNEED, start, end - start)
