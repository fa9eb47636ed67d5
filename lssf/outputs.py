"""Atomic output folders: build in a hidden sibling, rename into place when complete."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lssf.errors import OutputExistsError


@contextlib.contextmanager
def atomic_folder(out: Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder next to ``out``; on success it becomes ``out``.

    On any exception (or a kill) the temporary folder is removed or left as a hidden
    ``.out.tmp-*`` sibling, never as ``out``. With ``overwrite`` an existing ``out`` is replaced
    only after the new one is complete.
    """
    out = Path(out).absolute()
    if out.exists() and not overwrite:
        raise OutputExistsError(f"output {out} exists; pass overwrite=True (--overwrite)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
