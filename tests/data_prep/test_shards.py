"""The shard writer against a loop reference: whole documents, a shard closes at the first
document end past shard_tokens, .idx = document ends, nothing left under a final name on abort."""

from __future__ import annotations

import hashlib

import numpy as np

from data_prep.shards import ShardWriter


def reference_shards(docs: list[list[int]], shard_tokens: int) -> list[list[list[int]]]:
    shards, current, n = [], [], 0
    for d in docs:
        current.append(d)
        n += len(d)
        if n >= shard_tokens:
            shards.append(current)
            current, n = [], 0
    return shards + ([current] if current else [])


def test_writer_cuts_shards_at_document_ends_and_indexes_them(tmp_path):
    rng = np.random.default_rng(0)
    docs = [list(rng.integers(3, 70000, int(n))) + [2] for n in rng.integers(0, 40, 60)]
    docs[:0] = [[9] * 49 + [2], [2], [8] * 60 + [2]]  # a shard of exactly 50; one doc past it
    w = ShardWriter(tmp_path, "train", 7, "uint32", shard_tokens=50)
    for a in range(0, len(docs), 9):  # batches that do not line up with shards
        w.write([list(d) for d in docs[a : a + 9]])
    metas = w.close()
    want = reference_shards(docs, 50)
    assert [m.file for m in metas] == [f"train/00007-{j:05d}.bin" for j in range(len(want))]
    for m, group in zip(metas, want):
        tokens = np.fromfile(tmp_path / m.file, dtype="<u4")
        flat = [t for d in group for t in d]
        assert tokens.tolist() == flat
        assert np.fromfile(tmp_path / m.index_file, dtype="<u8").tolist() == list(
            np.cumsum([len(d) for d in group])
        )
        assert (m.num_tokens, m.num_documents) == (len(flat), len(group))
        assert m.sha256 == hashlib.sha256(np.asarray(flat, dtype="<u4").tobytes()).hexdigest()
    assert sorted(p.name for p in (tmp_path / "train").iterdir()) == sorted(
        n for m in metas for n in (m.file.split("/")[1], m.index_file.split("/")[1])
    )


def test_abort_leaves_only_complete_shards(tmp_path):
    w = ShardWriter(tmp_path, "val", 0, "uint16", shard_tokens=10)
    w.write([[5] * 12 + [2], [6] * 3 + [2]])  # one complete shard, one open
    w.abort()
    assert sorted(p.name for p in (tmp_path / "val").iterdir()) == ["00000-00000.bin", "00000-00000.idx"]
