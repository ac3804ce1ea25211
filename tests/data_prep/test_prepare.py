"""End-to-end preparation on a small corpus: round trip, determinism, atomicity, no-op re-runs."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from data_prep import prepare as prepare_mod
from data_prep.prepare import ensure_prepared, main, prepare
from deepseek_moe.data.loader import build_train_loader
from deepseek_moe.data.meta import load_meta
from deepseek_moe.data.tokenizer import Tokenizer
from deepseek_moe.errors import DataError
from tests.data_prep.conftest import corpus_config


def out_files(out: Path) -> list[str]:
    """Every file of a prepared directory, relative to it."""
    return sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())


def split_ids(meta, split: str) -> np.ndarray:
    """A split's token stream: its shard files read one by one and concatenated."""
    dtype = {"uint16": "<u2", "uint32": "<u4"}[meta.dtype]
    files = sorted((meta.dir / split).glob("*.bin"))
    assert [f"{split}/{f.name}" for f in files] == [h.file for h in meta.splits[split].shards]
    return np.concatenate([np.fromfile(f, dtype=dtype) for f in files])


def decode_split(meta, split: str) -> list[str]:
    """Documents of a split: the token stream cut at EOS, each piece decoded."""
    ids = split_ids(meta, split)
    cuts = np.flatnonzero(ids == meta.eos_id)
    assert len(ids) and cuts[-1] == len(ids) - 1, "every document, the last too, ends with EOS"
    tok = Tokenizer(meta.tokenizer_path)
    starts = np.concatenate([[0], cuts[:-1] + 1])
    return [tok.decode(ids[s:e]) for s, e in zip(starts, cuts)]


def test_round_trip_gives_back_every_document_once(prepared):
    cfg, out, expected = prepared
    meta = load_meta(out)
    train, val = decode_split(meta, "train"), decode_split(meta, "val")
    # All kept documents across train and val, none twice (the corpus has one duplicate file,
    # so compare multisets), nothing else.
    assert Counter(train + val) == Counter(expected.values())
    n = len(expected)
    assert len(val) == round(n * cfg.val_fraction)
    assert (meta.splits["train"].num_documents, meta.splits["val"].num_documents) == (len(train), len(val))
    assert meta.skipped_documents == {"not_utf8": 1, "empty": 1}
    # Documents keep their source order inside each split (sorted relative paths).
    in_order = iter([expected[k] for k in sorted(expected)])
    assert all(any(t == s for s in in_order) for t in val), "val is a subsequence of the source"
    assert meta.vocab_size == 512 and meta.dtype == "uint16"
    assert (meta.unk_id, meta.bos_id, meta.eos_id, meta.pad_id) == (0, 1, 2, 3)
    for split in ("train", "val"):
        ids = split_ids(meta, split)
        assert len(ids) == meta.splits[split].num_tokens and ids.max() < meta.vocab_size
        assert (ids == meta.bos_id).sum() == 0 and (ids == meta.unk_id).sum() == 0


def test_tokenizer_round_trips_edge_cases_and_uses_its_vocab(prepared):
    _, out, _ = prepared
    tok = Tokenizer(Path(out) / "tokenizer.model")
    text = "if x:\n        return {'a': [1, 2]}\n"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert len(ids) < len(text.encode()) / 1.5, "BPE merges should compress ordinary code"
    assert tok.sp.piece_to_id("▁▁▁▁") != tok.unk_id, "indentation runs are pieces"


def test_two_preparations_are_identical(prepared, corpus, tmp_path):
    cfg, out, _ = prepared
    again = prepare(corpus_config(corpus[0], tmp_path / "again", num_proc=2))
    assert out_files(out) == out_files(again)
    for name in out_files(out):
        assert (Path(out) / name).read_bytes() == (again / name).read_bytes(), name


def test_rerun_is_a_noop_unless_forced_and_config_changes_need_force(corpus, tmp_path):
    cfg = corpus_config(corpus[0], tmp_path / "out", max_documents=12, vocab_size=400)
    out = prepare(cfg)
    stamp = {n: (out / n).stat().st_mtime_ns for n in out_files(out)}
    assert prepare(cfg) == out
    assert {n: (out / n).stat().st_mtime_ns for n in out_files(out)} == stamp
    assert ensure_prepared(cfg).fingerprint == load_meta(out).fingerprint
    changed = corpus_config(corpus[0], tmp_path / "out", max_documents=12, vocab_size=420)
    with pytest.raises(ValueError, match=r"vocab_size: 400 there, 420 now.*data.force=true"):
        prepare(changed)
    changed.force = True
    prepare(changed)
    assert load_meta(out).vocab_size == 420
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"], "no temp dirs left behind"


def test_interrupted_run_leaves_nothing_that_looks_complete(corpus, tmp_path, monkeypatch):
    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    cfg = corpus_config(corpus[0], tmp_path / "out", max_documents=6, vocab_size=400)
    monkeypatch.setattr(prepare_mod, "run_tasks", crash)
    with pytest.raises(KeyboardInterrupt):
        prepare(cfg)
    assert [p.name for p in tmp_path.iterdir()] == [".out.work"], "only the work dir, to resume"
    with pytest.raises(DataError, match=r"meta.json is missing"):
        load_meta(tmp_path / "out")
    monkeypatch.undo()
    load_meta(prepare(cfg))
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_refuses_to_replace_a_directory_it_did_not_write(corpus, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("user data")
    with pytest.raises(ValueError, match="refusing to replace"):
        prepare(corpus_config(corpus[0], out, max_documents=6, vocab_size=400))
    assert (out / "precious.txt").read_text() == "user data"


def test_cli_composes_the_data_group_and_feeds_the_loader(corpus, tmp_path, capsys):
    out = tmp_path / "cli"
    main(
        [
            "data=local_text",
            f"data.path={corpus[0]}",
            "data.file_pattern=*.py",
            f"data.out_dir={out}",
            "data.vocab_size=400",
            "data.max_documents=8",
            "data.num_proc=1",
            "data.val_fraction=0.25",
        ]
    )
    assert "train" in capsys.readouterr().out
    meta = load_meta(out)
    assert meta.vocab_size == 400 and meta.splits["val"].num_documents == 2
    assert meta.prepare_config["source"] == "local_text"
    batch = next(build_train_loader(out, seq_len=16, global_batch_size=4, micro_batch_size=2))
    assert batch["input_ids"].shape == (2, 16)
    assert json.loads((out / "meta.json").read_text())["tokenizer_sha256"] == meta.tokenizer_sha256


def test_streaming_local_text_round_trip(corpus, tmp_path):
    root, expected = corpus
    cfg = corpus_config(root, tmp_path / "s", streaming=True, vocab_size=400, val_fraction=0.3)
    meta = load_meta(prepare(cfg))
    train, val = decode_split(meta, "train"), decode_split(meta, "val")
    assert Counter(train + val) == Counter(expected.values()) and train and val
    assert meta.skipped_documents == {"not_utf8": 1, "empty": 1}


def test_cli_reports_user_errors_without_a_traceback(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["data=local_text", f"data.path={tmp_path / 'none'}", f"data.out_dir={tmp_path / 'o'}"])
    assert exit_.value.code == 1
    assert re.fullmatch(
        r"Data error: data.path=.*matches no files.*check data.path.*\n", capsys.readouterr().err
    )
    with pytest.raises(SystemExit):
        main(["data.vocab_siz=10"])
    err = capsys.readouterr().err
    assert err.startswith("Config error: ") and "data.vocab_siz" in err and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


def test_uint32_shards_round_trip(corpus, tmp_path, monkeypatch):
    """The writer's uint32 path (vocab > 65536), forced on a small vocab to keep the test fast."""
    monkeypatch.setattr(prepare_mod, "dtype_for_vocab", lambda vocab_size: "uint32")
    root, expected = corpus
    meta = load_meta(prepare(corpus_config(root, tmp_path / "u32", vocab_size=400)))
    assert meta.dtype == "uint32"
    assert sum((meta.dir / h.file).stat().st_size for h in meta.splits["train"].shards) == (
        4 * meta.splits["train"].num_tokens
    )
    assert Counter(decode_split(meta, "train") + decode_split(meta, "val")) == Counter(expected.values())
    batch = next(build_train_loader(meta, seq_len=32, global_batch_size=2, micro_batch_size=2))
    assert int(batch["input_ids"].max()) < 400


def test_a_single_file_format_directory_is_refused_then_rebuilt_with_force(corpus, tmp_path):
    """format_version 1 (train.bin / val.bin): one line asking for force; force replaces it."""
    out = tmp_path / "out"
    out.mkdir()
    for name in ("train.bin", "val.bin", "tokenizer.model"):
        (out / name).write_bytes(b"\x02\x00" * 4)
    (out / "meta.json").write_text(json.dumps({"format_version": 1, "splits": {}}))
    cfg = corpus_config(corpus[0], out, max_documents=6, vocab_size=400, num_proc=1)
    with pytest.raises(DataError, match=r"format_version=1, this code reads 2.*data.force=true"):
        prepare(cfg)
    cfg.force = True
    meta = load_meta(prepare(cfg))
    assert meta.format_version == 2 and not (out / "train.bin").exists()
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "tokenizer.model", "train", "val"]
