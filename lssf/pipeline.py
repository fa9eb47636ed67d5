"""The threads and buffers of a streaming pass: read ahead, compute, write behind.

``ByteBudget`` bounds the bytes in flight between two threads; ``WriteBehind`` writes a
``PlannedWriter``'s tensors from a thread; ``BufferPool`` recycles buffers by size and
``MappedFile`` hands out views of a mapped shard, so steady-state streaming neither copies nor
page-faults more than it must. Memory stays a few tensors, whatever the checkpoint's size.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import queue
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from lssf.errors import CheckpointError

if TYPE_CHECKING:  # st_io imports this module's BufferPool the same way: no cycle at run time
    from lssf.st_io import PlannedWriter, TensorInfo


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

    def tensor(self, info: TensorInfo, hasher: hashlib._Hash | None = None) -> torch.Tensor:
        """A view of ``info``'s bytes in the mapping, hashed into ``hasher`` on the way."""
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=info.torch_dtype)
        if hasher is not None:
            with memoryview(self._mm) as view:
                hasher.update(view[info.start : info.end])
        numel = info.nbytes // torch.empty(0, dtype=info.torch_dtype).element_size()
        t = torch.frombuffer(self._mm, dtype=info.torch_dtype, count=numel, offset=info.start)
        self._ranges[t.data_ptr()] = (info.start, info.end)
        return t.reshape(info.shape)

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


class WriteBehind:
    """A ``PlannedWriter`` fed through a thread, so writing overlaps the caller's computing.

    ``write`` queues a tensor (blocking while ``limit`` bytes wait) and re-raises the first
    error of the writing thread; ``close`` waits for the queue to drain and closes the file.
    Used as a context manager, an exception abandons the file (the caller's output folder is
    temporary) after the thread has stopped.
    """

    def __init__(
        self,
        writer: PlannedWriter,
        limit: int = 64 << 20,
        release: Callable[[torch.Tensor], object] | None = None,
    ) -> None:
        """``release``: called with each tensor once written (the caller hands over ownership)."""
        self.writer = writer
        self._release = release
        self._budget = ByteBudget(limit)
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="lssf-write", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            name, tensor, nbytes = item
            try:
                if self._error is None:
                    self.writer.write(name, tensor)
            except BaseException as exc:  # handed to the caller's thread
                self._error = exc
                self._budget.cancel()
            if self._release is not None:
                self._release(tensor)
            del item, tensor
            self._budget.release(nbytes)

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Queue ``tensor`` for writing; raises the writer thread's first error."""
        self._raise()
        nbytes = tensor.numel() * tensor.element_size()
        self._budget.acquire(nbytes)
        self._raise()
        self._queue.put((name, tensor, nbytes))

    def _stop(self) -> None:
        self._queue.put(None)
        self._thread.join()

    def close(self) -> None:
        """Drain the queue, then close the file."""
        self._stop()
        self._raise()
        self.writer.close()

    def __enter__(self) -> WriteBehind:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is None:
            self.close()
            return
        self._budget.cancel()
        self._stop()
        self.writer.discard()
