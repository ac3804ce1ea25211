"""A prepared data directory written by hand (no sentencepiece), so loader tests know every token.

Token i of a split is `i % 50000`, so a window's first input token tells which window it is.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from deepseek_moe.data.meta import FORMAT_VERSION, DataMeta, SplitMeta, load_meta


def write_prepared(
    out: Path, num_train: int, num_val: int, vocab_size: int = 50000, dtype: str = "uint16", offset: int = 0
) -> DataMeta:
    """Token i of each split is `offset + i % vocab_size`."""
    out.mkdir(parents=True, exist_ok=True)
    splits = {}
    for split, n in (("train", num_train), ("val", num_val)):
        tokens = (offset + np.arange(n) % vocab_size).astype({"uint16": "<u2", "uint32": "<u4"}[dtype])
        (out / f"{split}.bin").write_bytes(tokens.tobytes())
        splits[split] = SplitMeta(
            file=f"{split}.bin", num_tokens=n, num_documents=1, sha256=f"fake-{split}-{n}"
        )
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
