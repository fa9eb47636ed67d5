"""Output folders that never destroy what lssf did not write: THE output rule of every command.

A folder is built in a hidden sibling ``.NAME.tmp-PID-RAND-HOST`` and moved into place when
complete with a rename that cannot replace anything, so a folder that appears at ``out``
meanwhile (another run, another user) is never deleted, and nothing is written through a
symlink already there. Every folder lssf creates carries its marker (``lssf_provenance.json``
with ``"tool": "lssf"``, :func:`mark_folder`); ``overwrite`` replaces only a folder with that
marker (or an empty one), never a symlink, ``/``, the current folder or one above it, nor one
that is, contains or lies inside an input. Work folders that several outputs go into (a world,
the demo's and the quickstart's) are claimed with :func:`claim_folder` under the same rule.
Single files: :func:`atomic_file` (a fresh ``O_EXCL`` temp file renamed into place).
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

from lssf._version import __version__
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


def _cwd() -> Path | None:
    """The current folder, resolved; None when it was removed (nothing of it to protect)."""
    try:
        return Path(os.path.realpath(os.getcwd()))
    except OSError:
        return None


def output_path(out: Path | str) -> Path:
    """``out`` as lssf writes it: its parent resolved (``X/../X`` is ``X``), its name kept.

    Refuses a path that names no folder to create: ``/``, ``.``, ``..``, or one ending in them.
    """
    given = Path(out)
    name = os.path.basename(os.fspath(given))
    if name in ("", ".", ".."):
        real, here = Path(os.path.realpath(given)), _cwd()
        what = (
            "the root folder" if real == real.parent
            else "the current folder" if real == here
            else "a folder above the current one" if here and real in here.parents
            else f"the folder {real}"
        )  # fmt: skip
        raise OutputError(f"output {out} is {what}; name a new folder or file to write")
    return Path(os.path.realpath(given.parent)) / name


def _check_place(
    out: Path, given: Path | str, inputs: Iterable[Path | str], holds_inputs: bool = False
) -> None:
    """Refuse an ``out`` (canonical) that is the current folder or above it, or near an input.

    ``holds_inputs``: a work folder may contain an input (only its outputs are replaced).
    """
    here = _cwd()
    real = Path(os.path.realpath(out))
    if here is not None and (real == here or real in here.parents):
        how = "is" if real == here else "contains"
        raise OutputError(f"output {given} {how} the current folder; pick a folder below it")
    for inp_given in inputs:
        inp = Path(os.path.realpath(inp_given))
        if real == inp or (real in inp.parents and not holds_inputs) or inp in real.parents:
            how = "is" if real == inp else "contains" if real in inp.parents else "lies inside"
            raise OutputError(
                f"output {given} {how} the input {inp_given}; "
                "write the output outside every input folder"
            )


def is_lssf_folder(folder: Path | str) -> bool:
    """True when ``folder`` (not a symlink) carries lssf's marker, ``"tool": "lssf"``."""
    folder = Path(folder)
    if folder.is_symlink() or not folder.is_dir():
        return False
    marker = folder / PROVENANCE
    try:  # a regular file only (a FIFO would block), of a sane size
        if marker.is_symlink() or not marker.is_file() or marker.stat().st_size > 1 << 20:
            return False
        data = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(data, dict) and data.get("tool") == "lssf"


def _replaceable(folder: Path) -> bool:
    """A folder with lssf's marker, or an empty one (removing it loses nothing)."""
    if is_lssf_folder(folder):
        return True
    try:
        return not folder.is_symlink() and folder.is_dir() and not any(os.scandir(folder))
    except OSError:
        return False


def check_output(out: Path, *, overwrite: bool, inputs: Iterable[Path] = ()) -> None:
    """Refuse, before any work, an ``out`` that writing or replacing would destroy data at."""
    given, out = out, output_path(out)
    _check_place(out, given, inputs)
    if not os.path.lexists(out):
        return
    if not overwrite:
        raise OutputExistsError(f"output {given} exists; pass overwrite=True (--overwrite)")
    if out.is_symlink() or not out.is_dir():
        raise OutputError(f"output {given} is not a folder; lssf replaces only folders it wrote")
    if not _replaceable(out):
        raise OutputError(
            f"output {given} exists and was not written by lssf (no {PROVENANCE}); "
            "--overwrite replaces only lssf's own outputs: remove it yourself or pick another --out"
        )


def mark_folder(folder: Path | str, kind: str) -> Path:
    """Write lssf's marker into a folder lssf made; from then on lssf may replace it.

    Outputs with a richer provenance record (patches, models, data dirs) write that instead.
    """
    record = {"tool": "lssf", "lssf_version": __version__, "kind": kind}
    return write_json(Path(folder) / PROVENANCE, record)


def claim_folder(folder: Path | str, kind: str, inputs: Iterable[Path | str] = ()) -> Path:
    """A work folder that lssf writes several outputs into; its canonical path.

    Created (with the marker) when missing; an existing one must be a real folder that is
    empty (then marked) or lssf's own. Never ``/``, the current folder or above, an input or
    inside one (an input may lie inside it: check each output in it against the inputs).
    """
    given, folder = folder, output_path(folder)
    _check_place(folder, given, inputs, holds_inputs=True)
    if not os.path.lexists(folder):
        try:
            folder.parent.mkdir(parents=True, exist_ok=True)
            folder.mkdir()
        except FileExistsError:
            pass  # made meanwhile: judged below like any existing folder
        except OSError as exc:
            raise OutputError(f"cannot create {given}: {exc.strerror or exc}") from exc
        else:
            mark_folder(folder, kind)
            return folder
    if folder.is_symlink() or not folder.is_dir():
        raise OutputError(f"{given} is not a folder (a file or a symlink); pick a new folder")
    if not is_lssf_folder(folder):
        if not _replaceable(folder):
            raise OutputError(
                f"{given} exists and was not made by lssf (no {PROVENANCE}); lssf writes only "
                "into a new or empty folder or one it made: remove it yourself or pick another"
            )
        mark_folder(folder, kind)
    return folder


def replace_folder(tmp: Path, out: Path, *, inputs: Iterable[Path | str] = ()) -> None:
    """Move a finished sibling ``tmp`` to ``out``, replacing only what ``check_output`` allows.

    A previous folder is moved aside first and removed last (put back if the move fails).
    """
    check_output(out, overwrite=True, inputs=[Path(p) for p in inputs])
    _publish(Path(tmp), output_path(out), True, [Path(p) for p in inputs])


def discard(path: Path) -> None:
    """Remove a temp ``path`` lssf named: a link or file is unlinked (never followed)."""
    if path.is_symlink() or (os.path.lexists(path) and not path.is_dir()):
        path.unlink()
    else:
        shutil.rmtree(path, ignore_errors=True)


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
    given, out = out, output_path(out)  # X/../X is X: renaming X aside keeps X/.. usable
    inputs = [Path(p) for p in inputs]
    if out.parent.is_dir():
        clean_stale(out)  # first: it may put back a previous output a killed run moved aside
    check_output(given, overwrite=overwrite, inputs=inputs)
    tmp = _make_tmp(out)
    try:
        yield tmp
        _publish(tmp, out, overwrite, inputs)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(path: Path | str, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temp file beside ``path`` (same suffix) that becomes ``path`` once written.

    The temp file is created with ``O_EXCL | O_NOFOLLOW``, so nothing is written through a
    symlink; no folder is created. An existing ``path`` is refused without ``overwrite``, and
    with it only a regular file is replaced (never a symlink, a folder or a device).
    """
    given, path = path, output_path(path)
    if not path.parent.is_dir():
        raise OutputError(f"cannot write {given}: the folder {path.parent} does not exist")

    def check() -> None:
        if not os.path.lexists(path):
            return
        if not overwrite:
            raise OutputExistsError(f"output {given} exists; pass --overwrite to replace it")
        if path.is_symlink() or not path.is_file():
            raise OutputError(f"output {given} is not a regular file; lssf replaces only files")

    check()
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}-{secrets.token_hex(4)}{path.suffix}")
    try:
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o666))
    except OSError as exc:
        raise OutputError(f"cannot write {given}: {exc.strerror or exc}") from exc
    try:
        yield tmp
        check()  # again: it may have changed meanwhile
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                rename_noreplace(tmp, path)
            except FileExistsError as exc:
                raise OutputExistsError(f"output {given} appeared meanwhile; left it") from exc
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
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
