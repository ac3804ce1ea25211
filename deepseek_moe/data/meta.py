"""`meta.json`: what a prepared data directory holds, and the checks run before trusting it.

A prepared directory (`data.out_dir`, written by `python -m data_prep.prepare`) contains

    train/TTTTT-SSSSS.bin  token shards of each split: flat little-endian token ids (`dtype`
    val/TTTTT-SSSSS.bin    below), every document followed by EOS. Task TTTTT wrote shards
                           SSSSS = 0, 1, ... of its contiguous range of documents; a shard
                           holds whole documents and closes once it has `data.shard_tokens`.
                           The split is the shards' concatenation in manifest order, which
                           is the source order of its documents.
    train/TTTTT-SSSSS.idx  next to each shard: the end offset (in tokens, from the shard's
                           start) of each of its documents, little-endian uint64
    tokenizer.model        the sentencepiece model that produced them (or tokenizer.json:
                           the Hugging Face tokenizer given as data.tokenizer)
    meta.json              the manifest: dtype, vocab_size, bos/eos/pad/unk ids, per split
                           its token/document counts and its shards (file, tokens,
                           documents, sha256), tokenizer_sha256, source_fingerprint and
                           `fingerprint` (a hash of all of the above that the loader stores
                           in checkpoints: computed from the manifest, no token is re-read)

The trainer reads `DataMeta.vocab_size`, sizes the model vocab with `padded_vocab_size` and
calls `check_model_vocab` so a tokenizer/model mismatch fails before any step runs.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from deepseek_moe.errors import ConfigError, DataError

META_FILE = "meta.json"
TOKENIZER_FILE = "tokenizer.model"
SPLITS = ("train", "val")
FORMAT_VERSION = 2
INDEX_DTYPE = "<u8"
DTYPES = {"uint16": "<u2", "uint32": "<u4"}


@dataclass(kw_only=True)
class ShardMeta:
    """One token shard of a split (its document index is `file` with the suffix .idx)."""

    file: str
    """Path inside the data directory, e.g. "train/00003-00000.bin"."""
    num_tokens: int
    """Tokens in the file, EOS included."""
    num_documents: int
    """Documents in the file (= number of EOS tokens = entries of its .idx)."""
    sha256: str
    """sha256 of the .bin file's bytes."""

    @property
    def index_file(self) -> str:
        return self.file[: -len(".bin")] + ".idx"


@dataclass(kw_only=True)
class SplitMeta:
    """One split: its shards in stream order."""

    num_tokens: int
    """Tokens of all shards, EOS included."""
    num_documents: int
    """Documents of all shards."""
    shards: list[ShardMeta]
    """The shards in order; the split's token stream is their concatenation."""


@dataclass(kw_only=True)
class DataMeta:
    """The parsed `meta.json` of a prepared data directory; `dir` is where it was read from."""

    format_version: int
    name: str
    source: str
    vocab_size: int
    """Size of the tokenizer vocab; every id in the shards is < vocab_size."""
    bos_id: int
    eos_id: int
    pad_id: int
    unk_id: int
    dtype: str
    """"uint16" when vocab_size <= 65536, else "uint32" (always little-endian)."""
    splits: dict[str, SplitMeta]
    tokenizer_file: str
    tokenizer_sha256: str
    source_fingerprint: str
    """Hash of the source documents (or of the hub dataset id/revision)."""
    skipped_documents: dict[str, int] = field(default_factory=dict)
    """Documents left out of the data and why, e.g. {"not_utf8": 0, "empty": 12}."""
    fingerprint: str = ""
    """Hash of the tokenizer, the source and every split's bytes; resumed loaders check it."""
    text_escape: str = ""
    """How text was escaped before encoding (see `deepseek_moe.data.tokenizer`)."""
    prepare_config: dict = field(default_factory=dict)
    """The DataConfig fields that shaped these files; a re-run with other values must force."""
    num_tasks: int = 0
    """Tasks the preparation ran (each wrote its own shards; the tokens do not depend on it)."""
    shard_tokens: int = 0
    """`data.shard_tokens` of the preparation: a shard closes at the first document end past it."""
    dir: Optional[Path] = None
    """Directory this meta was loaded from (not serialised)."""

    def compute_fingerprint(self) -> str:
        payload = {
            "tokenizer": self.tokenizer_sha256,
            "source": self.source_fingerprint,
            "dtype": self.dtype,
            "splits": {
                k: [s.num_tokens, s.num_documents, [[h.num_tokens, h.sha256] for h in s.shards]]
                for k, s in sorted(self.splits.items())
            },
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    def to_json(self) -> str:
        d = asdict(self)
        d.pop("dir")
        return json.dumps(d, indent=2, sort_keys=True) + "\n"

    def split_dir(self, split: str) -> Path:
        """The directory of `split`'s shards (named in errors about the split)."""
        if split not in self.splits:
            raise DataError(f"split {split!r} is not in {self.dir / META_FILE} (has {sorted(self.splits)})")
        return self.dir / split

    @property
    def tokenizer_path(self) -> Path:
        return self.dir / self.tokenizer_file


def dtype_for_vocab(vocab_size: int) -> str:
    """Smallest unsigned dtype that holds ids in [0, vocab_size)."""
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def launch_dir() -> Path:
    """The directory the command was started from (Hydra's original cwd when Hydra changed it)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            return Path(HydraConfig.get().runtime.cwd)
    except (ImportError, ValueError):
        pass
    return Path.cwd()


def resolve_path(path: str | os.PathLike) -> Path:
    """Expand `~` and resolve a relative path against the launch directory."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else launch_dir() / p


def resolve_out_dir(data_cfg) -> Path:
    """`data.out_dir`, or `data/<name>` under the launch directory when it is unset."""
    return resolve_path(data_cfg.out_dir if data_cfg.out_dir else Path("data") / data_cfg.name)


def load_meta(data_dir: str | os.PathLike) -> DataMeta:
    """Read and check `<data_dir>/meta.json`; errors name the file and say how to fix it."""
    data_dir = Path(data_dir)
    meta_path = data_dir / META_FILE
    fix = (
        "run `python -m data_prep.prepare data=<preset>` (add data.force=true to rebuild) "
        "or point data.out_dir at a prepared directory"
    )
    if not meta_path.is_file():
        raise DataError(f"{meta_path} is missing: {data_dir} is not a prepared data directory; {fix}")
    try:
        raw = json.loads(meta_path.read_text())
        version = raw.get("format_version")
    except (json.JSONDecodeError, AttributeError) as e:
        raise DataError(f"{meta_path} is corrupt ({e!r}); {fix}") from e
    if version != FORMAT_VERSION:
        raise DataError(
            f"{meta_path} has format_version={version}, this code reads {FORMAT_VERSION} (sharded); "
            "re-prepare it: `python -m data_prep.prepare data=<preset> data.force=true`"
        )
    try:
        for split in raw["splits"].values():
            split["shards"] = [ShardMeta(**h) for h in split["shards"]]
        raw["splits"] = {k: SplitMeta(**v) for k, v in raw["splits"].items()}
        meta = DataMeta(**raw, dir=data_dir)
    except (KeyError, TypeError, AttributeError) as e:
        raise DataError(f"{meta_path} is corrupt ({e!r}); {fix}") from e
    if meta.dtype not in DTYPES:
        raise DataError(f"{meta_path}: dtype={meta.dtype!r} is not one of {list(DTYPES)}; {fix}")
    for split in SPLITS:
        if split not in meta.splits:
            raise DataError(f"{meta_path} has no {split!r} split; {fix}")
    if meta.fingerprint != meta.compute_fingerprint():
        raise DataError(
            f"{meta_path} was edited or is corrupt (its fingerprint does not match its contents); {fix}"
        )
    if not meta.tokenizer_path.is_file():
        raise DataError(f"{meta.tokenizer_path} is missing next to {meta_path}; {fix}")
    return meta


def padded_vocab_size(vocab_size: int, multiple: int = 64) -> int:
    """Round the vocab up to a multiple (64 keeps the embedding/LM-head matmuls aligned)."""
    return -(-vocab_size // multiple) * multiple


def check_model_vocab(meta: DataMeta, model_vocab_size: int) -> None:
    """Raise if the model cannot embed every id the tokenizer produces."""
    if model_vocab_size < meta.vocab_size:
        raise ConfigError(
            f"model.vocab_size={model_vocab_size} is smaller than the tokenizer vocab "
            f"{meta.vocab_size} of {meta.tokenizer_path}; set model.vocab_size >= "
            f"{padded_vocab_size(meta.vocab_size)} (or leave it to the trainer to take it from "
            f"{META_FILE}), or prepare the data with a smaller data.vocab_size"
        )
