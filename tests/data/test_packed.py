"""PackedTokens over many shards equals one concatenated array (written and read independently)."""

from __future__ import annotations

import os

import numpy as np
import pytest

from deepseek_moe.data.meta import FORMAT_VERSION, DataMeta, ShardMeta, SplitMeta, load_meta
from deepseek_moe.data import packed as packed_mod
from deepseek_moe.data.packed import PackedTokens


def write_shards(out, docs_per_shard: list[list[np.ndarray]]) -> DataMeta:
    """A train split whose shard j holds the documents docs_per_shard[j] (val: the first shard)."""
    splits = {}
    for split, groups in (("train", docs_per_shard), ("val", docs_per_shard[:1])):
        (out / split).mkdir(parents=True)
        shards = []
        for j, docs in enumerate(groups):
            name = f"{split}/00000-{j:05d}"
            tokens = np.concatenate(docs).astype("<u2") if docs else np.zeros(0, "<u2")
            tokens.tofile(out / f"{name}.bin")
            np.cumsum([len(d) for d in docs], dtype=np.uint64).astype("<u8").tofile(out / f"{name}.idx")
            shards.append(
                ShardMeta(file=f"{name}.bin", num_tokens=len(tokens), num_documents=len(docs), sha256="-")
            )
        splits[split] = SplitMeta(
            num_tokens=sum(s.num_tokens for s in shards),
            num_documents=sum(s.num_documents for s in shards),
            shards=shards,
        )
    (out / "tokenizer.model").write_bytes(b"x")
    meta = DataMeta(
        format_version=FORMAT_VERSION, name="t", source="local_text", vocab_size=1000, bos_id=1, eos_id=2,
        pad_id=3, unk_id=0, dtype="uint16", splits=splits, tokenizer_file="tokenizer.model",
        tokenizer_sha256="-", source_fingerprint="-",
    )  # fmt: skip
    meta.fingerprint = meta.compute_fingerprint()
    (out / "meta.json").write_text(meta.to_json())
    return load_meta(out)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("seq_len", [1, 3, 7, 50])
@pytest.mark.parametrize("max_open", [128, 2])
def test_windows_over_shards_equal_the_concatenated_stream(tmp_path, monkeypatch, seq_len, max_open):
    """Also with at most 2 shards mapped at a time: then at most 2 more open files."""
    monkeypatch.setattr(packed_mod, "MAX_OPEN_SHARDS", max_open)
    rng = np.random.default_rng(0)
    # Shards of very different sizes, one empty, documents ending in EOS (2).
    sizes = [[5, 1, 9], [], [2], [30, 4], [1], [13, 13, 13]]
    groups = [[np.append(rng.integers(4, 1000, n - 1), 2) for n in shard] for shard in sizes]
    meta = write_shards(tmp_path, groups)
    stream = np.concatenate([d for g in groups for d in g])  # the reference: one flat array
    fds = open_fds()
    packed = PackedTokens(meta, "train")
    assert len(packed) == len(stream) == 91 and packed.num_shards == 5
    n = (len(stream) - 1) // seq_len
    assert packed.num_windows(seq_len) == n
    idx = rng.permutation(n)
    expected = np.stack([stream[i * seq_len : i * seq_len + seq_len + 1] for i in idx])
    np.testing.assert_array_equal(packed.windows(idx, seq_len), expected)
    assert open_fds() - fds <= min(max_open, 5)
    doc_ends = np.cumsum([len(d) for g in groups for d in g])
    np.testing.assert_array_equal(packed.document_ends(), doc_ends)
    assert set(np.flatnonzero(stream == 2) + 1) == set(doc_ends)
