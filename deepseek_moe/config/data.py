"""Data configuration: which corpus, which tokenizer, where the packed shards live.

`DataConfig` is the `data` node of the Hydra tree (`conf/data/<preset>.yaml`). The same group is
composed by `python -m data_prep.prepare data=<preset>` (which writes the shards) and by
`train.py data=<preset>` (which reads them), so both agree on `out_dir`.

Path resolution: relative `path`, `out_dir`, `tokenizer_model` and `tokenizer` are resolved against the
directory the command was started from (Hydra's original cwd; `conf/config.yaml` sets
`hydra.job.chdir: false`, so that is the process cwd). `out_dir=None` means `data/<name>`.
See `deepseek_moe.data.meta.resolve_path`.

Sources (`source`):
- "python_stdlib": every `*.py` under the running interpreter's stdlib
  (`sysconfig.get_paths()["stdlib"]`), minus `exclude_dirs`; `path` must be unset.
- "local_text": one document per file; `path` is a directory (searched recursively for
  `file_pattern`), a single file or a glob.
- "json" (also .jsonl), "csv", "parquet": local files read by `datasets.load_dataset(<source>)`;
  `path` is a file, a directory or a glob; each row's `text_column` is one document.
- "hf_hub": `datasets.load_dataset(path, hf_name, split=hf_split)` (needs internet).

Mixtures (`sources`, preset `data=mixture`): training reads several prepared directories that
share one tokenizer, each with a weight and an optional repetition cap (see
`deepseek_moe/data/mixture.py`). The single-corpus fields above then only matter to
`python -m data_prep.prepare`; each source is prepared by its own prepare command first.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

SOURCES = ("python_stdlib", "local_text", "json", "csv", "parquet", "hf_hub")
# The stdlib's test suites are ~60% of its bytes, hold deliberately mis-encoded files and
# generated data; the default corpus is the library code itself.
STDLIB_EXCLUDE_DIRS = ["site-packages", "test", "tests", "idle_test", "__pycache__"]

# DataConfig fields that only training reads: they never change the prepared files, so the
# preparation neither records nor compares them (data_prep/prepare.py).
TRAINING_ONLY_FIELDS = ("sources", "prepare_in_job_max_mb")

# sentencepiece reserves these ids (unk, bos, eos, pad) and one piece per byte (byte_fallback);
# a BPE vocab needs room for the corpus' characters on top, which sentencepiece checks itself.
MIN_VOCAB_SIZE = 4 + 256 + 1
# ids must fit the uint32 shards and a model embedding; beyond this nothing sensible is trained.
MAX_VOCAB_SIZE = 1 << 20


@dataclass(kw_only=True)
class MixtureSource:
    """One prepared dataset of a mixture (an element of `data.sources`)."""

    out_dir: str
    """A prepared directory (what `python -m data_prep.prepare` wrote: meta.json, train/val
    tokens, tokenizer); relative paths resolve against the launch directory."""
    weight: float = 1.0
    """Relative share of the training tokens; weights are divided by their sum, so [7, 3] and
    [0.7, 0.3] mean the same mix."""
    max_repetitions: Optional[float] = None
    """The most times the run may read this source's training windows (1.0: each at most once,
    2.5: two and a half epochs); a mix that would need more within trainer.max_steps fails at
    launch. None: no cap."""
    name: Optional[str] = None
    """Label in the metrics (`tokens_seen/<name>`, `val_loss/<name>`); None = the name of
    out_dir's last directory."""

    @property
    def label(self) -> str:
        return self.name or os.path.basename(os.path.normpath(self.out_dir))


@dataclass(kw_only=True)
class DataConfig:
    """A corpus, its tokenizer and its packed token shards (see `data_prep/prepare.py`)."""

    name: str = "python_stdlib"
    """Preset name; also names the default output directory `data/<name>`."""
    source: str = "python_stdlib"
    """Where documents come from: "python_stdlib", "local_text", "json", "csv", "parquet" or
    "hf_hub" (see the module docstring)."""
    path: Optional[str] = None
    """Directory, file or glob for local sources; dataset name for "hf_hub"; unset for
    "python_stdlib"."""
    file_pattern: str = "*.txt"
    """local_text with a directory `path`: files matching this name pattern, searched
    recursively. (python_stdlib always uses "*.py".)"""
    exclude_dirs: Optional[list[str]] = None
    """Directory names skipped while walking a directory source; None = the source's default
    (python_stdlib: STDLIB_EXCLUDE_DIRS, local_text: none)."""
    text_column: str = "text"
    """Column holding the document text for json/csv/parquet/hf_hub sources."""
    hf_name: Optional[str] = None
    """hf_hub: dataset configuration name (the second argument of `load_dataset`)."""
    hf_split: str = "train"
    """hf_hub and local table sources: the split to read; we make our own train/val split."""
    hf_revision: Optional[str] = None
    """hf_hub: a git revision to pin, so the source fingerprint means something."""
    streaming: bool = False
    """hf_hub: stream the dataset instead of downloading it to the Hugging Face cache; it is
    then one task (data.num_tasks=1) and the split is a seeded per-document hash. (Local
    json/csv/parquet files are always streamed file by file, never copied.)"""
    max_documents: Optional[int] = None
    """Read only the first N files / rows of the source (tests and smoke runs), before empty or
    non-UTF-8 ones are dropped; None reads all."""
    val_fraction: float = 0.05
    """Fraction of documents held out for validation (at least one document). 0.05 suits the
    small default corpus; the local/hub presets use 0.01."""
    split_seed: int = 1234
    """Seed of the train/val document split; the same seed gives the same split everywhere."""
    vocab_size: int = 8192
    """Sentencepiece vocabulary size to train (ignored when `tokenizer_model` or `tokenizer`
    is given)."""
    tokenizer_model: Optional[str] = None
    """Reuse this existing sentencepiece `.model` instead of training one."""
    tokenizer: Optional[str] = None
    """A Hugging Face tokenizer directory (holding `tokenizer.json`, e.g. a downloaded
    deepseek-moe-16b-base) to use instead of training a sentencepiece model: continued
    pretraining needs the checkpoint's own tokenizer. It must be lossless on the corpus
    (checked); the model's vocab size follows it. Excludes `tokenizer_model`."""
    tokenizer_sentences: int = 300_000
    """Sentencepiece trains on at most this many lines, sampled with a fixed seed."""
    tokenizer_max_sentence_length: int = 4192
    """Lines longer than this (bytes) are left out of tokenizer training (not out of the data)."""
    tokenizer_threads: int = 2
    """Threads for sentencepiece training. The learned pieces do not depend on it (checked on
    the stdlib), but the .model file records it, so it is part of the data fingerprint."""
    num_proc: int = 2
    """Preparation tasks run at once by `python -m data_prep.prepare` (1 = in-process)."""
    num_tasks: Optional[int] = None
    """Independent preparation tasks, each a contiguous range of the inputs (files for
    json/csv/parquet, documents otherwise) writing its own shards; None = num_proc. On a
    cluster, one SLURM array element per task (launch/prepare.sbatch). The tokens do not
    depend on it."""
    shard_tokens: int = 1 << 28
    """A token shard closes at the first document end past this many tokens (2^28 = 512 MiB
    at uint16), so shards stay a manageable size for copies and checksums."""
    out_dir: Optional[str] = None
    """Where the shards (train/, val/), meta.json and tokenizer.model are written; None = data/<name>.
    Relative paths resolve against the launch directory."""
    force: bool = False
    """`python -m data_prep.prepare`: rebuild even if `out_dir` holds a complete preparation
    (needed after changing a data.* value). Training ignores it and never rebuilds."""
    prepare_in_job_max_mb: int = 200
    """Training only: a corpus that is not prepared yet is prepared by the training job itself
    (rank 0, while the other ranks wait) only when its source files are estimated at most this
    many MB (python_stdlib: ~12 MB, seconds); a larger one, or any hf_hub dataset, stops with
    one line printing the `python -m data_prep.prepare ...` command to run first."""
    sources: list[MixtureSource] = field(default_factory=list)
    """Empty (default): train on the corpus above (`out_dir`). Otherwise train on a weighted
    mixture of these prepared directories, e.g. `data.sources='[{out_dir: data/web, weight:
    0.7}, {out_dir: data/code, weight: 0.3, max_repetitions: 2}]'` (preset `data=mixture`);
    they must share one tokenizer, and each must already be prepared."""

    def excluded_dirs(self) -> list[str]:
        """`exclude_dirs`, or the source's default when it is None."""
        if self.exclude_dirs is not None:
            return list(self.exclude_dirs)
        return list(STDLIB_EXCLUDE_DIRS) if self.source == "python_stdlib" else []

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name:
            raise ValueError(f"data.name={self.name!r} must be a non-empty name without '/'")
        if self.source not in SOURCES:
            raise ValueError(
                f"data.source={self.source!r} is not one of {list(SOURCES)}; set data.source to one of them"
            )
        if self.source == "python_stdlib" and self.path is not None:
            raise ValueError(
                f"data.source=python_stdlib reads the interpreter's stdlib, but "
                f"data.path={self.path!r} is set; unset data.path or use "
                "data.source=local_text"
            )
        if self.source not in ("python_stdlib",) and not self.path:
            raise ValueError(
                f"data.source={self.source} needs data.path (a directory, file or "
                "glob; a dataset name for hf_hub); set data.path=..."
            )
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"data.val_fraction={self.val_fraction} must be in (0, 1), e.g. 0.01")
        if self.tokenizer is not None and self.tokenizer_model is not None:
            raise ValueError(
                f"data.tokenizer={self.tokenizer!r} and data.tokenizer_model="
                f"{self.tokenizer_model!r} are both set; keep one of them"
            )
        if (
            self.tokenizer is None
            and self.tokenizer_model is None
            and not MIN_VOCAB_SIZE <= self.vocab_size <= MAX_VOCAB_SIZE
        ):
            raise ValueError(
                f"data.vocab_size={self.vocab_size} must be in "
                f"[{MIN_VOCAB_SIZE}, {MAX_VOCAB_SIZE}] (4 special ids + 256 byte "
                "pieces + merges); e.g. data.vocab_size=8192"
            )
        if self.max_documents is not None and self.max_documents < 2:
            raise ValueError(
                f"data.max_documents={self.max_documents} must be >= 2 (one train "
                "and one val document) or null for all"
            )
        if self.prepare_in_job_max_mb < 0:
            raise ValueError(f"data.prepare_in_job_max_mb={self.prepare_in_job_max_mb} must be >= 0")
        for key in (
            "num_proc",
            "shard_tokens",
            "tokenizer_threads",
            "tokenizer_sentences",
            "tokenizer_max_sentence_length",
        ):
            if getattr(self, key) < 1:
                raise ValueError(f"data.{key}={getattr(self, key)} must be >= 1")
        if self.num_tasks is not None and self.num_tasks < 1:
            raise ValueError(f"data.num_tasks={self.num_tasks} must be >= 1 (or null for num_proc)")
        if not self.text_column:
            raise ValueError("data.text_column must name the column holding the text")
        self._check_sources()

    def _check_sources(self) -> None:
        labels = []
        for i, src in enumerate(self.sources):
            if not src.out_dir:
                raise ValueError(f"data.sources[{i}].out_dir is empty; name a prepared directory")
            if not src.weight > 0:
                raise ValueError(f"data.sources[{i}].weight={src.weight} must be > 0")
            if src.max_repetitions is not None and not src.max_repetitions > 0:
                raise ValueError(
                    f"data.sources[{i}].max_repetitions={src.max_repetitions} must be > 0 "
                    "(1.0 = each window at most once) or null for no cap"
                )
            if not src.label or "/" in src.label:
                raise ValueError(f"data.sources[{i}].name={src.label!r} must be a non-empty name without '/'")
            labels.append(src.label)
        dupes = sorted({x for x in labels if labels.count(x) > 1})
        if dupes:
            raise ValueError(
                f"data.sources has several sources named {dupes}; give each a distinct data.sources[i].name"
            )
