"""Document sources: a `Plan` of the inputs, then each task's documents in source order.

`make_plan(cfg)` runs once, before the tasks: it lists the inputs (`units`) in source order
and fingerprints them; task k of K reads the contiguous units [k*N//K, (k+1)*N//K) with
`task_documents`, so the tasks' outputs concatenated in task order are the source order
whatever K is. Every document's train/val side depends only on its place in the source,
never on K (`split_is_val`, `hash_is_val`).

- python_stdlib / local_text: one document per file, files in sorted relative-path order (so
  the corpus is identical on every machine with the same files). The plan reads every file
  once: files that are not valid UTF-8 are skipped and counted ("not_utf8"), never decoded
  lossily, so every kept document round-trips byte for byte; empty files are skipped and
  counted ("empty"). No newline translation: "\\r\\n" stays. Units = kept files; the split is
  an exact seeded choice of round(N * val_fraction) of them (`split_is_val`); fingerprint =
  relative paths + content hashes.
- json / csv / parquet: units = the table files (sorted); a task streams its files' rows, one
  batch in memory, no copy of the text: JSON Lines (.jsonl, .jsonl.gz) and parquet directly,
  .json and csv with `datasets.load_dataset(<format>, data_files=[file], streaming=True)`. One document per row of `text_column`; empty or null rows are
  skipped and counted. The split is a seeded hash of (file, row) (`hash_is_val`): a task
  never needs the row counts of other files. Fingerprint = relative paths + sizes (the
  content is covered by the shards' checksums); no pass over terabytes before the tasks.
- hf_hub: `datasets.load_dataset(path, hf_name, split=hf_split, revision=hf_revision)` into
  the Hugging Face cache; units = rows, split by `split_is_val`. With `streaming=True` the
  rows are streamed, split by a hash of the row index, and there is a single task.
"""

from __future__ import annotations

import fnmatch
import glob
import gzip
import hashlib
import os
import sysconfig
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import datasets
import numpy as np
from tqdm.auto import tqdm

from deepseek_moe.config.data import DataConfig
from deepseek_moe.data.meta import resolve_path
from deepseek_moe.errors import DataError

TABLE_EXTENSIONS = {
    "json": (".json", ".jsonl", ".json.gz", ".jsonl.gz"),
    "csv": (".csv", ".csv.gz"),
    "parquet": (".parquet",),
}


# Documents handed to the encoder at once: large enough to amortise the per-call cost, small
# enough that a batch of text and ids stays a few MB.
BATCH_DOCUMENTS = 256


@dataclass(kw_only=True)
class Plan:
    """What the tasks read (stored as plan.json in the work directory)."""

    kind: str
    """"files" (a document per file), "tables" (files of rows) or "rows" (a hub dataset)."""
    root: str
    """Directory the file units are relative to."""
    units: list[str]
    """files / tables: relative paths in source order; rows: empty."""
    limits: list[Optional[int]]
    """tables: rows to read from each file (data.max_documents), None = all."""
    num_units: int
    """files / tables: len(units); rows: the dataset's length (after max_documents)."""
    fingerprint: str
    skipped: dict[str, int] = field(default_factory=dict)
    """Documents the plan already left out (file sources)."""

    def task_range(self, task: int, num_tasks: int) -> tuple[int, int]:
        """The contiguous units of `task`: [task*N//K, (task+1)*N//K)."""
        n = self.num_units
        return task * n // num_tasks, (task + 1) * n // num_tasks

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        return cls(**json.loads(text))


def split_is_val(n: int, cfg: DataConfig) -> np.ndarray:
    """Boolean [n]: which of n documents go to val (exactly max(1, round(n * val_fraction)))."""
    if n < 2:
        raise DataError(
            f"the source has {n} usable document(s); a train/val split needs at "
            "least 2. Add documents (check data.path / data.max_documents)"
        )
    n_val = min(n - 1, max(1, round(n * cfg.val_fraction)))
    is_val = np.zeros(n, dtype=bool)
    is_val[np.random.default_rng(cfg.split_seed).permutation(n)[:n_val]] = True
    return is_val


def hash_is_val(key: str, cfg: DataConfig) -> bool:
    """Split of a document known only by its key (no count known in advance): a seeded hash."""
    digest = hashlib.sha256(f"{cfg.split_seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") < cfg.val_fraction * 2.0**64


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


def _read_utf8(path: Path) -> str:
    """A kept file's text (checked by the plan; a file changed since raises)."""
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is no longer valid UTF-8 since the plan; re-run with data.force=true") from e
    if not text:
        raise DataError(f"{path} became empty since the plan; re-run with data.force=true")
    return text


def _plan_files(cfg: DataConfig) -> Plan:
    if cfg.source == "python_stdlib":
        root = stdlib_dir()
        files = _walk(root, "*.py", cfg.excluded_dirs())
    else:
        root, files = _expand(cfg.path, cfg.file_pattern, cfg.excluded_dirs())
    if not files:
        raise _no_files(cfg, str(resolve_path(cfg.path or root)))
    if cfg.max_documents is not None:
        files = files[: cfg.max_documents]
    # One pass over the bytes: decide what to keep, count what is skipped, fingerprint the
    # kept bytes. The tasks read the kept files again, one at a time.
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
        rel = f.relative_to(root).as_posix()
        h.update(f"{rel}\0{hashlib.sha256(raw).hexdigest()}\0".encode())
        kept.append(rel)
    if not kept:
        raise DataError(
            f"data.source={cfg.source} at {root}: all {len(files)} files are empty "
            f"or not UTF-8 ({skipped}); point data.path at real text"
        )
    split_is_val(len(kept), cfg)  # fail before the tokenizer if no split is possible
    return Plan(
        kind="files",
        root=str(root),
        units=kept,
        limits=[None] * len(kept),
        num_units=len(kept),
        fingerprint=h.hexdigest()[:16],
        skipped=skipped,
    )


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


def _missing_column(cfg: DataConfig, where, columns) -> DataError:
    return DataError(
        f"data.text_column={cfg.text_column!r} is not a column of {where} "
        f"(columns: {list(columns)}); set data.text_column to one of them"
    )


def _jsonl_rows(cfg: DataConfig, path: Path) -> Iterator[list]:
    opener = gzip.open if path.name.endswith(".gz") else open
    batch: list = []
    first = True
    with opener(path, "rt", encoding="utf-8") as f:
        for n, line in enumerate(f):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n + 1} is not a JSON object ({e}); check data.path") from e
            if not isinstance(row, dict):
                raise DataError(f"{path}:{n + 1} is not a JSON object; JSON Lines hold one object per line")
            if first and cfg.text_column not in row:
                raise _missing_column(cfg, path, row)
            first = False
            batch.append(row.get(cfg.text_column))
            if len(batch) == BATCH_DOCUMENTS:
                yield batch
                batch = []
    if batch:
        yield batch


def _parquet_rows(cfg: DataConfig, path: Path) -> Iterator[list]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    if cfg.text_column not in pf.schema_arrow.names:
        raise _missing_column(cfg, path, pf.schema_arrow.names)
    for rb in pf.iter_batches(batch_size=BATCH_DOCUMENTS, columns=[cfg.text_column]):
        yield rb.column(0).to_pylist()


def _datasets_rows(cfg: DataConfig, path: Path, cache_dir: Path) -> Iterator[list]:
    try:
        ds = datasets.load_dataset(
            cfg.source, data_files=[str(path)], split="train", streaming=True, cache_dir=str(cache_dir)
        )
    except Exception as e:  # datasets raises many types for unreadable files
        raise DataError(f"could not read {path} as {cfg.source}: {e}; check data.path and data.source") from e
    ds = _check_column(ds, cfg, str(path))
    for batch in ds.iter(batch_size=BATCH_DOCUMENTS):
        yield batch["text"]


def _table_rows(cfg: DataConfig, path: Path, cache_dir: Path) -> Iterator[list]:
    """Batches of one table file's `text_column` values in row order, streamed: JSON Lines
    and parquet read directly (one batch in memory), other formats (.json, csv) through
    `datasets` streaming."""
    try:
        if cfg.source == "json" and path.name.endswith((".jsonl", ".jsonl.gz")):
            yield from _jsonl_rows(cfg, path)
        elif cfg.source == "parquet":
            yield from _parquet_rows(cfg, path)
        else:
            yield from _datasets_rows(cfg, path, cache_dir)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"could not read {path} as {cfg.source}: {e}; check data.path and data.source") from e


def _plan_tables(cfg: DataConfig, cache_dir: Path) -> Plan:
    exts = TABLE_EXTENSIONS[cfg.source]
    root, files = _expand(cfg.path, "*", [])
    files = [f for f in files if f.name.endswith(exts)]
    if not files:
        raise _no_files(cfg, f"looking for {', '.join(exts)}")
    h = hashlib.sha256(f"{cfg.source}\0{cfg.text_column}".encode())
    for f in files:
        h.update(f"{f.relative_to(root).as_posix()}\0{f.stat().st_size}\0".encode())
    next(_table_rows(cfg, files[0], cache_dir), None)  # a wrong column fails here, before any task
    limits: list[Optional[int]] = [None] * len(files)
    if cfg.max_documents is not None:  # count rows from the head until the limit is reached
        left = cfg.max_documents
        for i, f in enumerate(files):
            rows = sum(len(b) for b in _table_rows(cfg, f, cache_dir))
            limits[i] = min(rows, left)
            left -= limits[i]
            if left == 0:
                files, limits = files[: i + 1], limits[: i + 1]
                break
        h.update(f"max_documents={cfg.max_documents}".encode())
    return Plan(
        kind="tables",
        root=str(root),
        units=[f.relative_to(root).as_posix() for f in files],
        limits=limits,
        num_units=len(files),
        fingerprint=h.hexdigest()[:16],
    )


def _hub_dataset(cfg: DataConfig):
    # Unlike local files, hub data uses the usual Hugging Face cache (HF_HOME): a re-run, a
    # forced rebuild or another task does not download it again.
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
    if cfg.max_documents is not None:
        ds = (
            ds.take(cfg.max_documents) if cfg.streaming else ds.select(range(min(cfg.max_documents, len(ds))))
        )
    return ds


def _plan_rows(cfg: DataConfig) -> Plan:
    ds = _hub_dataset(cfg)
    key = f"hf_hub\0{cfg.path}\0{cfg.hf_name}\0{cfg.hf_split}\0{cfg.hf_revision}"
    n = 0
    if not cfg.streaming:
        key += f"\0{ds._fingerprint}"  # datasets' hash of the downloaded files
        n = len(ds)
        split_is_val(n, cfg)
    return Plan(
        kind="rows",
        root="",
        units=[],
        limits=[],
        num_units=n,
        fingerprint=hashlib.sha256(key.encode()).hexdigest()[:16],
    )


def make_plan(cfg: DataConfig, cache_dir: Path) -> Plan:
    """List and fingerprint the inputs of `cfg` (see the module docstring)."""
    if cfg.source in ("python_stdlib", "local_text"):
        return _plan_files(cfg)
    if cfg.source in TABLE_EXTENSIONS:
        return _plan_tables(cfg, cache_dir)
    return _plan_rows(cfg)


# ---- documents ------------------------------------------------------------------------------
# Each generator yields (texts, is_val) batches of non-empty documents in source order and adds
# what it drops to `skipped`.


def _file_batches(plan: Plan, cfg: DataConfig, lo: int, hi: int, skipped) -> Iterator:
    is_val = split_is_val(plan.num_units, cfg)[lo:hi]
    root = Path(plan.root)
    for a in range(lo, hi, BATCH_DOCUMENTS):
        b = min(a + BATCH_DOCUMENTS, hi)
        yield [_read_utf8(root / u) for u in plan.units[a:b]], is_val[a - lo : b - lo]


def _keep(texts, keys, cfg: DataConfig, skipped) -> tuple[list[str], np.ndarray]:
    kept = [(t, k) for t, k in zip(texts, keys) if t]
    if len(kept) < len(texts):
        skipped["empty"] = skipped.get("empty", 0) + len(texts) - len(kept)
    return [t for t, _ in kept], np.array([hash_is_val(k, cfg) for _, k in kept], dtype=bool)


def _table_batches(plan: Plan, cfg: DataConfig, lo: int, hi: int, skipped, cache_dir: Path) -> Iterator:
    for unit, limit in zip(plan.units[lo:hi], plan.limits[lo:hi]):
        row = 0
        for batch in _table_rows(cfg, Path(plan.root) / unit, cache_dir):
            texts = batch if limit is None else batch[: limit - row]
            keys = [f"{unit}:{row + i}" for i in range(len(texts))]
            row += len(texts)
            yield _keep(texts, keys, cfg, skipped)
            if limit is not None and row >= limit:
                break


def _row_batches(plan: Plan, cfg: DataConfig, lo: int, hi: int, skipped) -> Iterator:
    ds = _hub_dataset(cfg)
    if cfg.streaming:  # a single task (checked by the caller): keys are stream positions
        row = 0
        for batch in ds.iter(batch_size=BATCH_DOCUMENTS):
            texts = batch["text"]
            yield _keep(texts, [str(row + i) for i in range(len(texts))], cfg, skipped)
            row += len(texts)
        return
    is_val = split_is_val(plan.num_units, cfg)[lo:hi]
    for a in range(lo, hi, BATCH_DOCUMENTS):
        b = min(a + BATCH_DOCUMENTS, hi)
        texts = ds.select(range(a, b))["text"]
        keep = np.array([bool(t) for t in texts], dtype=bool)
        if not keep.all():
            skipped["empty"] = skipped.get("empty", 0) + int((~keep).sum())
        yield [t for t in texts if t], is_val[a - lo : b - lo][keep]


def task_documents(plan: Plan, cfg: DataConfig, lo: int, hi: int, skipped, cache_dir: Path) -> Iterator:
    """(texts, is_val) batches of units [lo, hi) in source order; drops empty documents into
    `skipped`. `cache_dir`: scratch for `datasets` (table sources), deleted by the caller."""
    if plan.kind == "files":
        return _file_batches(plan, cfg, lo, hi, skipped)
    if plan.kind == "tables":
        return _table_batches(plan, cfg, lo, hi, skipped, cache_dir)
    return _row_batches(plan, cfg, lo, hi, skipped)


def train_texts(plan: Plan, cfg: DataConfig, cache_dir: Path) -> Iterator[str]:
    """Training documents for the tokenizer sample, in an order that spans the corpus: file
    and hub sources a seeded random order of the train documents; tables the train rows of
    the files in a seeded random order; a hub stream its head."""
    rng = np.random.default_rng(cfg.split_seed + 1)
    if plan.kind == "files":
        is_val = split_is_val(plan.num_units, cfg)
        for i in rng.permutation(np.flatnonzero(~is_val)):
            yield _read_utf8(Path(plan.root) / plan.units[i])
    elif plan.kind == "tables":
        for i in rng.permutation(plan.num_units):
            for texts, is_val in _table_batches(plan, cfg, int(i), int(i) + 1, {}, cache_dir):
                yield from (t for t, v in zip(texts, is_val) if not v)
    elif cfg.streaming:
        for texts, is_val in _row_batches(plan, cfg, 0, 0, {}):
            yield from (t for t, v in zip(texts, is_val) if not v)
    else:
        ds = _hub_dataset(cfg)
        order = rng.permutation(np.flatnonzero(~split_is_val(plan.num_units, cfg)))
        for a in range(0, len(order), BATCH_DOCUMENTS):
            yield from (t for t in ds.select(order[a : a + BATCH_DOCUMENTS])["text"] if t)


def head_texts(plan: Plan, cfg: DataConfig, n: int, cache_dir: Path) -> list[str]:
    """The first `n` non-empty documents in source order (tokenizer checks)."""
    out: list[str] = []
    for texts, _ in task_documents(plan, cfg, 0, plan.num_units if plan.num_units else 0, {}, cache_dir):
        out += texts
        if len(out) >= n:
            break
    return out[:n]
