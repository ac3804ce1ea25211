"""Document sources: turn a `DataConfig` into a `datasets` dataset with one "text" column.

- python_stdlib / local_text: one document per file, files in sorted relative-path order (so
  the corpus is identical on every machine with the same files). Files are read as bytes and
  decoded as strict UTF-8; files that are not valid UTF-8 are skipped and counted
  ("not_utf8"), never decoded lossily, so every kept document round-trips byte for byte.
  Empty files are skipped and counted ("empty"). No newline translation: "\\r\\n" stays.
- json / csv / parquet: `datasets.load_dataset(<format>, data_files=...)`, one row per
  document from `text_column`; rows whose text is empty or null are skipped and counted.
- hf_hub: `datasets.load_dataset(path, hf_name, split=hf_split, revision=hf_revision)`.

`streaming=True` returns an `IterableDataset` (nothing is materialised); otherwise a map-style
`Dataset`. The fingerprint hashes every kept document (file sources: relative path + content
hash; table sources: the files' bytes; hub: dataset id, config, split and revision).
"""

from __future__ import annotations

import fnmatch
import glob
import hashlib
import os
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import datasets
from tqdm.auto import tqdm

from deepseek_moe.config.data import DataConfig
from deepseek_moe.data.meta import resolve_path
from deepseek_moe.errors import DataError

TABLE_EXTENSIONS = {
    "json": (".json", ".jsonl", ".json.gz", ".jsonl.gz"),
    "csv": (".csv", ".csv.gz"),
    "parquet": (".parquet",),
}


@dataclass
class Source:
    dataset: Union[datasets.Dataset, datasets.IterableDataset]
    """Rows with one column, "text"."""
    fingerprint: str
    skipped: dict[str, int] = field(default_factory=dict)


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _walk(root: Path, pattern: str, exclude_dirs: list[str]) -> list[Path]:
    """Files under `root` whose name matches `pattern`, sorted by relative POSIX path."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in exclude_dirs]
        found += [Path(dirpath, f) for f in filenames if fnmatch.fnmatch(f, pattern)]
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _expand(path: str, pattern: str, exclude_dirs: list[str]) -> tuple[Path, list[Path]]:
    """(root for relative names, files) for a directory, a file or a glob."""
    p = resolve_path(path)
    if p.is_dir():
        return p, _walk(p, pattern, exclude_dirs)
    if p.is_file():
        return p.parent, [p]
    matches = sorted(Path(m) for m in glob.glob(str(p), recursive=True) if Path(m).is_file())
    root = Path(os.path.commonpath([str(m) for m in matches])) if matches else p.parent
    return (root if root.is_dir() else root.parent), matches


def _no_files(cfg: DataConfig, where: str) -> DataError:
    return DataError(
        f"data.path={cfg.path!r} ({where}) matches no files for "
        f"data.source={cfg.source}; check data.path"
        + (f" and data.file_pattern={cfg.file_pattern!r}" if cfg.source == "local_text" else "")
    )


def _read_utf8(path: str) -> Optional[str]:
    """The file's text, or None if it is empty or not valid UTF-8."""
    raw = Path(path).read_bytes()
    try:
        return raw.decode("utf-8") or None
    except UnicodeDecodeError:
        return None


def _file_rows(paths: list[str]):
    """datasets generator: one row per kept file (bounded memory: one file at a time)."""
    for path in paths:
        yield {"text": _read_utf8(path)}


def _file_documents(cfg: DataConfig, cache_dir: Path) -> Source:
    if cfg.source == "python_stdlib":
        root = stdlib_dir()
        files = _walk(root, "*.py", cfg.excluded_dirs())
    else:
        root, files = _expand(cfg.path, cfg.file_pattern, cfg.excluded_dirs())
    if not files:
        raise _no_files(cfg, str(resolve_path(cfg.path or root)))
    if cfg.max_documents is not None:
        files = files[: cfg.max_documents]
    # Pass 1 (bytes only): decide what to keep, count what is skipped, fingerprint the kept
    # bytes. Pass 2 (the generator) reads the kept files again, one at a time.
    kept: list[str] = []
    skipped = {"not_utf8": 0, "empty": 0}
    h = hashlib.sha256(cfg.source.encode())
    for f in tqdm(files, desc=f"scan {cfg.source}", unit="file", mininterval=2):
        raw = f.read_bytes()
        if not raw:
            skipped["empty"] += 1
            continue
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            skipped["not_utf8"] += 1
            continue
        h.update(f"{f.relative_to(root).as_posix()}\0{hashlib.sha256(raw).hexdigest()}\0".encode())
        kept.append(str(f))
    if not kept:
        raise DataError(
            f"data.source={cfg.source} at {root}: all {len(files)} files are empty "
            f"or not UTF-8 ({skipped}); point data.path at real text"
        )
    # An on-disk arrow copy in the temp dir: bounded memory whatever the corpus size. (With
    # streaming we iterate that copy; IterableDataset.from_generator would write lock files
    # to ~/.cache.)
    features = datasets.Features({"text": datasets.Value("string")})
    ds = datasets.Dataset.from_generator(
        _file_rows, features=features, gen_kwargs={"paths": kept}, cache_dir=str(cache_dir)
    )
    return Source(ds.to_iterable_dataset() if cfg.streaming else ds, h.hexdigest()[:16], skipped)


def _check_column(ds, cfg: DataConfig, where: str):
    columns = ds.column_names
    if columns is None:  # streaming without known features: peek at the first row
        first = next(iter(ds), None)
        if first is None:
            raise DataError(f"{where} holds no rows; check data.path")
        columns = list(first)
    if cfg.text_column not in columns:
        raise DataError(
            f"data.text_column={cfg.text_column!r} is not a column of {where} "
            f"(columns: {columns}); set data.text_column to one of them"
        )
    ds = ds.select_columns([cfg.text_column])
    return ds.rename_column(cfg.text_column, "text") if cfg.text_column != "text" else ds


def _table_documents(cfg: DataConfig, cache_dir: Path) -> Source:
    exts = TABLE_EXTENSIONS[cfg.source]
    root, files = _expand(cfg.path, "*", [])
    files = [f for f in files if f.name.endswith(exts)]
    if not files:
        raise _no_files(cfg, f"looking for {', '.join(exts)}")
    h = hashlib.sha256(f"{cfg.source}\0{cfg.text_column}".encode())
    for f in files:
        h.update(f"{f.relative_to(root).as_posix()}\0".encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 24), b""):
                h.update(chunk)
    try:
        ds = datasets.load_dataset(
            cfg.source,
            data_files=[str(f) for f in files],
            split="train",
            streaming=cfg.streaming,
            cache_dir=str(cache_dir),
        )
    except Exception as e:  # datasets raises many types for unreadable files
        raise DataError(
            f"could not read {[str(f) for f in files[:3]]}... as "
            f"{cfg.source}: {e}; check data.path and data.source"
        ) from e
    ds = _check_column(ds, cfg, f"{cfg.path}")
    return _finish(ds, cfg, h.hexdigest()[:16])


def _hub_documents(cfg: DataConfig, cache_dir: Path) -> Source:
    # Unlike local files, hub data uses the usual Hugging Face cache (HF_HOME): a re-run or a
    # forced rebuild does not download it again. `cache_dir` is unused on purpose.
    try:
        ds = datasets.load_dataset(
            cfg.path, cfg.hf_name, split=cfg.hf_split, revision=cfg.hf_revision, streaming=cfg.streaming
        )
    except Exception as e:
        raise DataError(
            f"could not load hub dataset data.path={cfg.path!r} "
            f"(hf_name={cfg.hf_name!r}, split={cfg.hf_split!r}): {e}; check the "
            "name and your network, or use a local source"
        ) from e
    ds = _check_column(ds, cfg, f"hub dataset {cfg.path}")
    key = f"hf_hub\0{cfg.path}\0{cfg.hf_name}\0{cfg.hf_split}\0{cfg.hf_revision}"
    if not cfg.streaming:
        key += f"\0{ds._fingerprint}"  # datasets' hash of the downloaded files
    return _finish(ds, cfg, hashlib.sha256(key.encode()).hexdigest()[:16])


def _finish(ds, cfg: DataConfig, fingerprint: str) -> Source:
    if cfg.max_documents is not None:
        ds = (
            ds.take(cfg.max_documents) if cfg.streaming else ds.select(range(min(cfg.max_documents, len(ds))))
        )
    skipped = {}
    if not cfg.streaming:  # streaming: empty rows are dropped (and counted) when written
        before = len(ds)
        ds = ds.filter(lambda b: [bool(t) for t in b["text"]], batched=True, desc="drop empty documents")
        skipped["empty"] = before - len(ds)
        if len(ds) == 0:
            raise DataError(
                f"data.path={cfg.path!r}: every row of {cfg.text_column!r} is empty; check data.text_column"
            )
    return Source(ds, fingerprint, skipped)


def load_documents(cfg: DataConfig, cache_dir: Path) -> Source:
    """The documents of `cfg` as a dataset with a "text" column (see the module docstring)."""
    if cfg.source in ("python_stdlib", "local_text"):
        return _file_documents(cfg, cache_dir)
    if cfg.source in TABLE_EXTENSIONS:
        return _table_documents(cfg, cache_dir)
    return _hub_documents(cfg, cache_dir)
