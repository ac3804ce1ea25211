"""Writes that never leave half a file or half a directory under the final name.

One home for every atomic write of the package (checkpoints, run files, metrics, exports,
prepared data, multi-process test results): write beside the target, then `os.replace`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

__all__ = ["atomic_torch_save", "atomic_write_bytes", "replace_dir"]


def _write_beside(path: Path, write: Callable[[str], None]) -> None:
    """`write(tmp)` to a temp file in `path`'s directory, then os.replace it onto `path`; the
    temp file is removed if anything fails."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` beside `path`, fsync, then os.replace: never half a file."""

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    _write_beside(path, write)


def atomic_torch_save(obj: Any, path: Path) -> None:
    """`torch.save` beside `path`, then os.replace: never half a file."""
    _write_beside(path, lambda tmp: torch.save(obj, tmp))


def replace_dir(tmp: Path, out: Path) -> None:
    """Put the finished directory `tmp` at `out` (same parent). An existing `out` is renamed
    aside first and deleted only after the new one is in place, so `out` is always either the
    old or the new directory. Callers decide whether an existing `out` may be replaced."""
    if not out.exists():
        os.replace(tmp, out)
        return
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old) if old.is_dir() else old.unlink()
