"""Check a prepared data directory byte for byte before spending GPU time on it.

    python -m data_prep.verify                          # the default preset's out_dir
    python -m data_prep.verify data=local_text data.path=... data.out_dir=/scratch/books

The loader only checks file sizes (cheap, on every launch). This reads every file once and
checks, for each shard of each split: the sha256 recorded in meta.json, that every id is
< vocab_size, that its .idx lists one end offset per document, increasing, the last one at
the shard's end, and that the EOS tokens sit exactly at those ends; and the tokenizer's
sha256. Any mismatch raises naming the file and the fix (rebuild with force).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Optional

import numpy as np
from tqdm.auto import tqdm

from deepseek_moe.data.meta import DTYPES, INDEX_DTYPE, SPLITS, DataMeta, ShardMeta, load_meta
from deepseek_moe.data.packed import PackedTokens
from deepseek_moe.errors import DataError

CHUNK_TOKENS = 1 << 24


def verify(data_dir) -> DataMeta:
    """Verify `data_dir`; returns its meta, raises ValueError on the first problem."""
    meta = load_meta(data_dir)
    fix = f"rebuild it: python -m data_prep.prepare data=<preset> data.force=true (out_dir {meta.dir})"
    if hashlib.sha256(meta.tokenizer_path.read_bytes()).hexdigest() != meta.tokenizer_sha256:
        raise DataError(f"{meta.tokenizer_path} does not match tokenizer_sha256 in meta.json; {fix}")
    for split in SPLITS:
        packed = PackedTokens(meta, split)  # size checks
        shards = meta.splits[split].shards
        for shard in tqdm(shards, desc=f"verify {split}", unit="shard", mininterval=2):
            _verify_shard(meta, shard, fix)
        del packed
    return meta


def _verify_shard(meta: DataMeta, shard: ShardMeta, fix: str) -> None:
    path = meta.dir / shard.file
    tokens = np.memmap(path, dtype=DTYPES[meta.dtype], mode="r") if shard.num_tokens else np.zeros(0)
    ends = np.fromfile(meta.dir / shard.index_file, dtype=INDEX_DTYPE).astype(np.int64)
    sha, top, eos_at = hashlib.sha256(), 0, []
    for start in range(0, len(tokens), CHUNK_TOKENS):
        chunk = np.asarray(tokens[start : start + CHUNK_TOKENS])
        sha.update(chunk.tobytes())
        top = max(top, int(chunk.max()))
        eos_at.append(np.flatnonzero(chunk == meta.eos_id) + start)
    if sha.hexdigest() != shard.sha256:
        raise DataError(f"{path} does not match its sha256 in meta.json (corrupt); {fix}")
    if top >= meta.vocab_size:
        raise DataError(f"{path} holds id {top} >= vocab_size {meta.vocab_size}; {fix}")
    eos = np.concatenate(eos_at) if eos_at else np.zeros(0, np.int64)
    if len(eos) != shard.num_documents or len(tokens) == 0 or int(tokens[-1]) != meta.eos_id:
        raise DataError(
            f"{path} has {len(eos)} EOS tokens (last token {int(tokens[-1]) if len(tokens) else None}) "
            f"but meta.json says {shard.num_documents} documents, each ending in EOS; {fix}"
        )
    if len(ends) != shard.num_documents or not np.array_equal(ends, eos + 1):
        raise DataError(
            f"{meta.dir / shard.index_file} does not list the document ends of {path} "
            f"({len(ends)} entries for {shard.num_documents} documents); {fix}"
        )


def _verify_prepared(data_cfg) -> None:
    from deepseek_moe.data.meta import resolve_out_dir

    out: Path = resolve_out_dir(data_cfg)
    meta = verify(out)
    counts = ", ".join(f"{s} {meta.splits[s].num_tokens:,} tokens" for s in SPLITS)
    print(f"[verify] {out}: OK ({counts})")


def main(argv: Optional[list[str]] = None) -> None:
    from data_prep.prepare import run_data_cli

    run_data_cli("data_prep.verify", __doc__, argv, _verify_prepared)


if __name__ == "__main__":
    main()
