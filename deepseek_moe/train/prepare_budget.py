"""Which corpora a training job may prepare itself, and the command to run first for the rest.

The trainer prepares an unprepared corpus on rank 0 while every other rank waits in a
collective, under the process-group timeout (`parallel.process_group_timeout_min`). A small
corpus (the default python_stdlib, ~12 MB of source files, prepares in seconds) is fine; a
large one would time the job out or hold a whole allocation for hours. So a corpus whose source
is estimated above `data.prepare_in_job_max_mb` is refused with one line that prints the
preparation command; a hub dataset's size is unknown before it is downloaded, so it is always
prepared first. An already prepared directory is never estimated.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import shlex
import sysconfig
from pathlib import Path
from typing import Optional

from deepseek_moe.config.data import TRAINING_ONLY_FIELDS, DataConfig
from deepseek_moe.data.meta import META_FILE, resolve_out_dir, resolve_path
from deepseek_moe.errors import DataError

# Fields that do not shape the prepared files (training-only, or the switch of this check).
_NOT_PREPARE_FIELDS = ("force", *TRAINING_ONLY_FIELDS)


def _files(cfg: DataConfig) -> list[Path]:
    """The source files a file-based corpus would read (a superset is fine: an estimate)."""
    excluded = set(cfg.excluded_dirs())
    if cfg.source == "python_stdlib":
        root, pattern = Path(sysconfig.get_paths()["stdlib"]), "*.py"
    else:
        root, pattern = resolve_path(cfg.path), cfg.file_pattern if cfg.source == "local_text" else "*"
    if root.is_file():
        return [root]
    if not root.is_dir():
        return [Path(p) for p in sorted(glob.glob(str(root), recursive=True)) if os.path.isfile(p)]
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in excluded]
        out += [Path(dirpath) / f for f in filenames if Path(f).match(pattern)]
    return out


def estimated_source_bytes(cfg: DataConfig) -> Optional[int]:
    """Bytes of source the preparation would read (scaled by data.max_documents for
    one-document-per-file sources); None when unknown before downloading (hf_hub)."""
    if cfg.source == "hf_hub":
        return None
    files = _files(cfg)
    total = sum(p.stat().st_size for p in files)
    if cfg.max_documents is not None and cfg.source in ("python_stdlib", "local_text") and files:
        total = total * min(1.0, cfg.max_documents / len(files))
    return int(total)


def prepare_command(cfg: DataConfig) -> str:
    """`python -m data_prep.prepare` with every data.* value that differs from the defaults,
    so it writes exactly the directory this training config reads."""
    default = DataConfig()
    args = []
    for f in dataclasses.fields(DataConfig):
        value = getattr(cfg, f.name)
        if f.name in _NOT_PREPARE_FIELDS or value == getattr(default, f.name):
            continue
        if value is None:
            text = "null"
        elif isinstance(value, bool):
            text = str(value).lower()
        elif isinstance(value, list):
            text = "[" + ",".join(str(v) for v in value) + "]"
        else:
            text = str(value)
        args.append(shlex.quote(f"data.{f.name}={text}"))
    return " ".join(["python -m data_prep.prepare", *args])


def check_in_job_budget(cfg: DataConfig) -> None:
    """Raise a DataError with the preparation command when the training job should not
    prepare `cfg` itself (see the module docstring)."""
    out_dir = resolve_out_dir(cfg)
    if (out_dir / META_FILE).is_file():
        return  # prepared (ensure_prepared checks that it matches)
    size = estimated_source_bytes(cfg)
    budget = cfg.prepare_in_job_max_mb * 1_000_000
    if size is not None and size <= budget:
        return
    what = (
        "a hub dataset (size unknown before download)"
        if size is None
        else f"about {size / 1e6:,.0f} MB of source, above data.prepare_in_job_max_mb={cfg.prepare_in_job_max_mb}"
    )
    raise DataError(
        f"{out_dir} is not prepared and data.source={cfg.source} is {what}: the training job only "
        f"prepares small corpora itself. Prepare it first (once, on one machine), then relaunch: "
        f"{prepare_command(cfg)}"
    )
