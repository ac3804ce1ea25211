"""A prepared data directory written by hand (no sentencepiece), so loader tests know every token.

Token i of a split is `i % 50000`, so a window's first input token tells which window it is.
Each split is cut into shards of `shard_tokens` (the last one shorter), so every loader test
also reads windows across shard boundaries.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from deepseek_moe.data.meta import FORMAT_VERSION, DataMeta, ShardMeta, SplitMeta, load_meta


def write_prepared(
    out: Path,
    num_train: int,
    num_val: int,
    vocab_size: int = 50000,
    dtype: str = "uint16",
    offset: int = 0,
    shard_tokens: int = 37,
) -> DataMeta:
    """Token i of each split is `offset + i % vocab_size`; one document per shard."""
    out.mkdir(parents=True, exist_ok=True)
    splits = {}
    for split, n in (("train", num_train), ("val", num_val)):
        tokens = (offset + np.arange(n) % vocab_size).astype({"uint16": "<u2", "uint32": "<u4"}[dtype])
        (out / split).mkdir(exist_ok=True)
        shards = []
        for j, start in enumerate(range(0, n, shard_tokens)):
            piece = tokens[start : start + shard_tokens]
            (out / split / f"00000-{j:05d}.bin").write_bytes(piece.tobytes())
            np.array([len(piece)], dtype="<u8").tofile(out / split / f"00000-{j:05d}.idx")
            shards.append(
                ShardMeta(
                    file=f"{split}/00000-{j:05d}.bin", num_tokens=len(piece), num_documents=1, sha256="fake"
                )
            )
        splits[split] = SplitMeta(num_tokens=n, num_documents=len(shards), shards=shards)
    (out / "tokenizer.model").write_bytes(b"not a real model")
    meta = DataMeta(
        format_version=FORMAT_VERSION,
        name="fake",
        source="local_text",
        vocab_size=offset + vocab_size,
        bos_id=1,
        eos_id=2,
        pad_id=3,
        unk_id=0,
        dtype=dtype,
        splits=splits,
        tokenizer_file="tokenizer.model",
        tokenizer_sha256="fake",
        source_fingerprint=f"fake-{num_train}-{num_val}",
    )
    meta.fingerprint = meta.compute_fingerprint()
    (out / "meta.json").write_text(meta.to_json())
    return load_meta(out)


@pytest.fixture
def make_prepared(tmp_path):
    """make_prepared(num_train, num_val, name="d") -> DataMeta of a fresh directory."""

    def make(num_train: int, num_val: int, name: str = "d") -> DataMeta:
        return write_prepared(tmp_path / name, num_train, num_val)

    return make
