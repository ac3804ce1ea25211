"""Table sources (jsonl, parquet, streaming) and every bad input the issue lists."""

from __future__ import annotations

import hashlib
import json
from collections import Counter

import pytest

from data_prep.prepare import prepare
from deepseek_moe.config.data import DataConfig
from deepseek_moe.data.meta import load_meta
from deepseek_moe.errors import DataError
from tests.data_prep.conftest import corpus_config, jsonl_config
from tests.data_prep.test_prepare import decode_split


@pytest.mark.parametrize("streaming", [False, True])
def test_jsonl_round_trip(jsonl_corpus, tmp_path, streaming):
    root, docs = jsonl_corpus
    out = prepare(jsonl_config(root, tmp_path / "out", streaming=streaming))
    meta = load_meta(out)
    train, val = decode_split(meta, "train"), decode_split(meta, "val")
    assert Counter(train + val) == Counter(docs)
    assert meta.skipped_documents == {"empty": 4}
    # The split of a row is a seeded hash of (file, row) whatever data.streaming says: it does
    # not need the row counts of other files (reference: the rule as the docs state it).
    want_val = []
    for part in (0, 1):
        lines = (root / f"part{part}.jsonl").read_text().splitlines()
        for row, line in enumerate(lines):
            text = json.loads(line)["content"]
            digest = hashlib.sha256(f"1234:part{part}.jsonl:{row}".encode()).digest()
            if text and int.from_bytes(digest[:8], "little") < 0.2 * 2.0**64:
                want_val.append(text)
    assert val == want_val and train


def test_parquet_source_and_max_documents(jsonl_corpus, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    _, docs = jsonl_corpus
    pq.write_table(pa.table({"text": docs}), tmp_path / "d.parquet")
    out = prepare(
        DataConfig(
            name="pq",
            source="parquet",
            path=str(tmp_path / "d.parquet"),
            vocab_size=512,
            max_documents=20,
            val_fraction=0.1,
            num_proc=1,
            out_dir=str(tmp_path / "out"),
        )
    )
    meta = load_meta(out)
    assert Counter(decode_split(meta, "train") + decode_split(meta, "val")) == Counter(docs[:20])


# ---- bad input -----------------------------------------------------------------------------


def test_missing_source_path(tmp_path):
    with pytest.raises(ValueError, match=r"matches no files.*check data.path"):
        prepare(
            DataConfig(
                name="x", source="local_text", path=str(tmp_path / "nope"), out_dir=str(tmp_path / "out")
            )
        )
    with pytest.raises(ValueError, match="needs data.path"):
        DataConfig(name="x", source="json")


def test_empty_source(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.txt").write_bytes(b"")
    (tmp_path / "src" / "b.txt").write_bytes(b"")
    with pytest.raises(ValueError, match=r"all 2 files are empty or not UTF-8"):
        prepare(
            DataConfig(
                name="x", source="local_text", path=str(tmp_path / "src"), out_dir=str(tmp_path / "out")
            )
        )
    with pytest.raises(ValueError, match=r"matches no files.*file_pattern='\*.md'"):
        prepare(
            DataConfig(
                name="x",
                source="local_text",
                path=str(tmp_path / "src"),
                file_pattern="*.md",
                out_dir=str(tmp_path / "out"),
            )
        )
    assert not (tmp_path / "out").exists()


def test_missing_text_column(jsonl_corpus, tmp_path):
    root, _ = jsonl_corpus
    for streaming in (False, True):
        with pytest.raises(ValueError, match=r"data.text_column='body' is not a column.*'content'"):
            prepare(jsonl_config(root, tmp_path / "out", text_column="body", streaming=streaming))


def test_vocab_size_out_of_range(corpus, tmp_path):
    with pytest.raises(ValueError, match=r"data.vocab_size=100 must be in \[261"):
        corpus_config(corpus[0], tmp_path / "o", vocab_size=100)
    with pytest.raises(ValueError, match=r"data.vocab_size=270 is too small.*set data.vocab_size >= \d+"):
        prepare(corpus_config(corpus[0], tmp_path / "o", vocab_size=270, max_documents=4))
    with pytest.raises(ValueError, match=r"data.vocab_size=60000 is too large.*<= \d+"):
        prepare(corpus_config(corpus[0], tmp_path / "o", vocab_size=60000, max_documents=4))
    assert not (tmp_path / "o").exists()


def test_tokenizer_model_reuse_and_bad_path(prepared, corpus, tmp_path):
    _, out, _ = prepared
    with pytest.raises(DataError, match=r"data.tokenizer_model=.*missing.model does not exist"):
        prepare(corpus_config(corpus[0], tmp_path / "o", tokenizer_model=str(tmp_path / "missing.model")))
    (tmp_path / "junk.model").write_bytes(b"junk")
    with pytest.raises(ValueError, match="is not a sentencepiece model"):
        prepare(corpus_config(corpus[0], tmp_path / "o", tokenizer_model=str(tmp_path / "junk.model")))
    reused = prepare(
        corpus_config(
            corpus[0], tmp_path / "o", max_documents=5, tokenizer_model=str(out / "tokenizer.model")
        )
    )
    assert (reused / "tokenizer.model").read_bytes() == (out / "tokenizer.model").read_bytes()
    assert load_meta(reused).tokenizer_sha256 == load_meta(out).tokenizer_sha256


def test_hf_hub_source_without_network(jsonl_corpus, tmp_path, monkeypatch):
    """The hub path (column check, fingerprint, split) with load_dataset faked: CI is offline."""
    import datasets

    from data_prep import sources

    _, docs = jsonl_corpus
    calls = []

    def fake_load_dataset(path, name=None, *, split, revision, streaming):
        calls.append((path, name, split, revision, streaming))
        return datasets.Dataset.from_dict({"story": docs, "n": list(range(len(docs)))})

    monkeypatch.setattr(sources.datasets, "load_dataset", fake_load_dataset)
    cfg = DataConfig(
        name="hub",
        source="hf_hub",
        path="someone/stories",
        hf_name="en",
        hf_revision="abc123",
        text_column="story",
        vocab_size=512,
        num_proc=1,
        val_fraction=0.1,
        out_dir=str(tmp_path / "out"),
    )
    meta = load_meta(prepare(cfg))
    # plan, tokenizer sample and the task each open it (the Hugging Face cache downloads once)
    assert set(calls) == {("someone/stories", "en", "train", "abc123", False)}
    assert Counter(decode_split(meta, "train") + decode_split(meta, "val")) == Counter(docs)
    with pytest.raises(ValueError, match=r"data.text_column='text' is not a column of hub"):
        prepare(
            DataConfig(name="hub", source="hf_hub", path="someone/stories", out_dir=str(tmp_path / "out2"))
        )


@pytest.mark.parametrize("streaming", [False, True])
def test_datasets_cache_stays_in_the_temp_output(corpus, jsonl_corpus, tmp_path, monkeypatch, streaming):
    import datasets

    sentinel = tmp_path / "hf_cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", sentinel)
    monkeypatch.setattr(datasets.config, "DOWNLOADED_DATASETS_PATH", sentinel / "downloads")
    prepare(
        corpus_config(
            corpus[0], tmp_path / "a", max_documents=8, vocab_size=400, val_fraction=0.3, streaming=streaming
        )
    )
    prepare(jsonl_config(jsonl_corpus[0], tmp_path / "b", streaming=streaming))
    assert not sentinel.exists() or not any(sentinel.rglob("*"))
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "hf_cache") == ["a", "b"]
