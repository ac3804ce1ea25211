"""Check a prepared data directory byte for byte before spending GPU time on it.

    python -m data_prep.verify                          # the default preset's out_dir
    python -m data_prep.verify data=local_text data.path=... data.out_dir=/scratch/books

The loader only checks file sizes (cheap, on every launch). This reads every file once and
checks, for each split: the sha256 recorded in meta.json, that every id is < vocab_size, that
the number of EOS tokens equals the document count and that the file ends with EOS; and the
tokenizer's sha256. Any mismatch raises naming the file and the fix (rebuild with force).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Optional

import numpy as np
from tqdm.auto import tqdm

from deepseek_moe.data.meta import SPLITS, DataMeta, load_meta
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
        tokens = PackedTokens(meta, split).tokens  # size check
        sha, eos, top = hashlib.sha256(), 0, 0
        for start in tqdm(
            range(0, len(tokens), CHUNK_TOKENS), desc=f"verify {split}", unit="chunk", mininterval=2
        ):
            chunk = np.asarray(tokens[start : start + CHUNK_TOKENS])
            sha.update(chunk.tobytes())
            eos += int((chunk == meta.eos_id).sum())
            top = max(top, int(chunk.max()))
        path, info = meta.split_path(split), meta.splits[split]
        if sha.hexdigest() != info.sha256:
            raise DataError(f"{path} does not match its sha256 in meta.json (corrupt); {fix}")
        if top >= meta.vocab_size:
            raise DataError(f"{path} holds id {top} >= vocab_size {meta.vocab_size}; {fix}")
        if eos != info.num_documents or int(tokens[-1]) != meta.eos_id:
            raise DataError(
                f"{path} has {eos} EOS tokens (last token {int(tokens[-1])}) but "
                f"meta.json says {info.num_documents} documents, each ending in "
                f"EOS; {fix}"
            )
    return meta


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
