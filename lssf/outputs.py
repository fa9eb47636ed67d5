"""Output folders that never destroy what lssf did not write.

A folder is built in a hidden sibling ``.NAME.tmp-PID-RAND-HOST`` and moved into place when
complete with a rename that cannot replace anything, so a folder that appears at ``out``
meanwhile (another run, another user) is never deleted. ``overwrite`` replaces only a folder
lssf itself wrote (it has a provenance file), never one that is, contains or lies inside an input.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import glob
import json
import logging
import os
import secrets
import shutil
import socket
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from lssf.errors import OutputError, OutputExistsError

log = logging.getLogger(__name__)

PROVENANCE = "lssf_provenance.json"

_RENAMEAT2: Any = None
if sys.platform.startswith("linux"):
    with contextlib.suppress(OSError, AttributeError):  # no glibc >= 2.28 (musl, old systems)
        _RENAMEAT2 = ctypes.CDLL(None, use_errno=True).renameat2
        # (olddirfd, oldpath, newdirfd, newpath, flags); restype is c_int by default
        _RENAMEAT2.argtypes = [ctypes.c_int, ctypes.c_char_p] * 2 + [ctypes.c_uint]
_AT_FDCWD, _RENAME_NOREPLACE = -100, 1


def rename_noreplace(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst``; ``FileExistsError`` if ``dst`` exists, which is never touched.

    Linux ``renameat2(RENAME_NOREPLACE)`` checks and renames in one atomic step. Where it is
    missing (other systems, filesystems without the flag: ENOSYS/EINVAL) the fallback checks
    first and then renames; POSIX ``rename`` of a folder replaces at most an *empty* folder
    created in that instant, never one holding data (ENOTEMPTY), so nothing can be lost.
    """
    if _RENAMEAT2 is not None:
        args = (_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE)
        if _RENAMEAT2(*args) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.ENOSYS, errno.EINVAL):
            raise OSError(err, os.strerror(err), str(src), None, str(dst))
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
    os.rename(src, dst)


def check_output(out: Path, *, overwrite: bool, inputs: Iterable[Path] = ()) -> None:
    """Refuse, before any work, an ``out`` that writing or replacing would destroy data at."""
    if not out.name or out.name in (".", ".."):
        raise OutputError(f"output {out} must name a folder to create")
    real = Path(os.path.realpath(out))
    for given in inputs:
        inp = Path(os.path.realpath(given))
        if real == inp or real in inp.parents or inp in real.parents:
            how = "is" if real == inp else "contains" if real in inp.parents else "lies inside"
            raise OutputError(
                f"output {out} {how} the input {given}; write the output outside every input folder"
            )
    if not os.path.lexists(out):
        return
    if not overwrite:
        raise OutputExistsError(f"output {out} exists; pass overwrite=True (--overwrite)")
    if out.is_symlink() or not out.is_dir():
        raise OutputError(f"output {out} is not a folder; lssf replaces only folders it wrote")
    prov, data = out / PROVENANCE, None
    if prov.is_file() and not prov.is_symlink():  # never a FIFO (a read would block)
        with contextlib.suppress(OSError, ValueError):
            data = json.loads(prov.read_text(encoding="utf-8"))
    if not isinstance(data, dict) or data.get("tool") != "lssf":
        raise OutputError(
            f"output {out} exists and was not written by lssf (no {PROVENANCE}); "
            "--overwrite replaces only lssf's own outputs: remove it yourself or pick another --out"
        )


def _sibling(out: Path, kind: str) -> Path:
    host = socket.gethostname() or "localhost"
    return out.with_name(f".{out.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}-{host}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True  # another user's process, or not a pid we can judge: keep its folder
    return True


def clean_stale(out: Path) -> None:
    """Remove ``.NAME.tmp-*`` siblings of dead runs on this host; put back an ``.NAME.old-*``.

    A run killed between moving the previous output aside and the new one in leaves ``out`` missing.
    """
    host = socket.gethostname() or "localhost"
    for kind in ("tmp", "old"):
        prefix = f".{out.name}.{kind}-"
        for path in out.parent.glob(f"{glob.escape(prefix)}*"):
            pid, _, rest = path.name.removeprefix(prefix).partition("-")
            owner = rest.partition("-")[2]  # after RAND
            if not pid.isdigit() or owner != host or _alive(int(pid)):
                continue
            if kind == "old" and not os.path.lexists(out):
                try:
                    rename_noreplace(path, out)
                    log.warning("restored %s from %s, left by a killed run", out, path.name)
                except OSError:
                    log.warning("could not restore %s from %s; left it there", out, path)
                continue
            log.info("removing %s, left by a killed run", path)
            shutil.rmtree(path, ignore_errors=True)


def _make_tmp(out: Path) -> Path:
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = _sibling(out, "tmp")
        tmp.mkdir()  # mode 0o777 minus the umask, unlike tempfile.mkdtemp's 0o700
    except OSError as exc:
        blocker = next((p for p in out.parents if os.path.lexists(p)), None)
        why = exc.strerror or str(exc)
        if blocker is not None and not blocker.is_dir():
            why = f"{blocker} is a file, not a folder"
        raise OutputError(f"cannot create output {out}: {why}") from exc
    return tmp


def _publish(tmp: Path, out: Path, overwrite: bool, inputs: list[Path]) -> None:
    old = None
    if overwrite and os.path.lexists(out):
        check_output(out, overwrite=True, inputs=inputs)  # again: it may have changed meanwhile
        old = _sibling(out, "old")
        try:
            rename_noreplace(out, old)
        except FileNotFoundError:
            old = None
    try:
        rename_noreplace(tmp, out)
    except OSError as exc:
        kept = ""
        if old is not None:
            try:
                rename_noreplace(old, out)
            except OSError:
                kept = f"; the previous output is kept at {old}"
        if isinstance(exc, FileExistsError):
            raise OutputExistsError(
                f"output {out} appeared while lssf was writing it; left it untouched{kept}"
            ) from exc
        raise OutputError(f"cannot move the output into {out}: {exc.strerror}{kept}") from exc
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_folder(
    out: Path, *, overwrite: bool = False, inputs: Iterable[Path | str] = ()
) -> Iterator[Path]:
    """Yield a temporary folder that becomes ``out`` once complete, as the module says.

    On any exception it is removed; after a kill it stays until the next run to ``out``.
    """
    out = Path(out).absolute()
    inputs = [Path(p) for p in inputs]
    if out.name and out.parent.is_dir():
        clean_stale(out)  # first: it may put back a previous output a killed run moved aside
    check_output(out, overwrite=overwrite, inputs=inputs)
    tmp = _make_tmp(out)
    try:
        yield tmp
        _publish(tmp, out, overwrite, inputs)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_bytes(path: Path | str, data: bytes) -> Path:
    """Write ``data`` to ``path`` whole or not at all: a temp file beside it, fsync, rename."""
    path = Path(path)
    tmp = _sibling(path, "tmp")
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return path


def atomic_write_text(path: Path | str, text: str) -> Path:
    """``atomic_write_bytes`` of ``text`` in UTF-8."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: Path | str, data: Any) -> Path:
    """``data`` as indented JSON, written atomically."""
    return atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")
