"""meta.json and token-file checks: each bad directory fails naming the file and the fix."""

from __future__ import annotations

import json

import pytest

from deepseek_moe.data.loader import build_train_loader
from deepseek_moe.data.meta import check_model_vocab, load_meta, padded_vocab_size
from deepseek_moe.data.packed import PackedTokens
from deepseek_moe.errors import DataError


def test_missing_meta_names_file_and_command(tmp_path):
    with pytest.raises(DataError, match=r"meta.json is missing.*data_prep.prepare"):
        load_meta(tmp_path)


def test_truncated_bin_is_rejected(make_prepared):
    meta = make_prepared(1000, 100)
    path = meta.dir / "train/00000-00001.bin"
    path.write_bytes(path.read_bytes()[:-2])  # one uint16 token short
    with pytest.raises(ValueError, match=r"train/00000-00001.bin is truncated or corrupt.*force=true"):
        PackedTokens(load_meta(meta.dir), "train")
    with pytest.raises(ValueError, match="truncated"):
        build_train_loader(meta.dir, seq_len=8, global_batch_size=2, micro_batch_size=1)


def test_missing_bin_is_rejected(make_prepared):
    meta = make_prepared(1000, 100)
    (meta.dir / "val/00000-00002.bin").unlink()
    with pytest.raises(DataError, match="val/00000-00002.bin is missing"):
        PackedTokens(meta, "val")


def test_edited_or_corrupt_meta_is_rejected(make_prepared):
    meta = make_prepared(1000, 100)
    raw = json.loads((meta.dir / "meta.json").read_text())
    raw["splits"]["train"]["shards"][1]["num_tokens"] = 38  # claims a different file
    (meta.dir / "meta.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="fingerprint does not match"):
        load_meta(meta.dir)
    (meta.dir / "meta.json").write_text("{not json")
    with pytest.raises(ValueError, match="meta.json is corrupt"):
        load_meta(meta.dir)


def test_missing_tokenizer_is_rejected(make_prepared):
    meta = make_prepared(1000, 100)
    (meta.dir / "tokenizer.model").unlink()
    with pytest.raises(DataError, match="tokenizer.model is missing"):
        load_meta(meta.dir)


def test_model_vocab_must_hold_the_tokenizer_vocab(make_prepared):
    meta = make_prepared(1000, 100)  # vocab 50000
    assert padded_vocab_size(50000) == 50048 and padded_vocab_size(64) == 64
    check_model_vocab(meta, 50048)
    check_model_vocab(meta, 50000)
    with pytest.raises(ValueError, match=r"model.vocab_size=49999 is smaller.*>= 50048"):
        check_model_vocab(meta, 49999)


def test_a_single_file_format_directory_asks_for_a_rebuild(make_prepared):
    """A version-1 meta.json (one train.bin per split) is refused in one line naming the fix."""
    meta = make_prepared(1000, 100)
    raw = json.loads((meta.dir / "meta.json").read_text())
    raw["format_version"] = 1
    raw["splits"] = {
        s: {"file": f"{s}.bin", "num_tokens": 5, "num_documents": 1, "sha256": "x"} for s in raw["splits"]
    }
    (meta.dir / "meta.json").write_text(json.dumps(raw))
    with pytest.raises(DataError, match=r"format_version=1, this code reads 2.*data.force=true"):
        load_meta(meta.dir)
