"""Preparation as independent tasks: the tokens do not depend on the number of tasks, a failed
task is redone alone, and the staged CLI (what a SLURM array runs) gives the same directory."""

from __future__ import annotations

import json

import numpy as np
import pytest

from data_prep import shards as shards_mod
from data_prep import tasks as tasks_mod
from data_prep.prepare import finalize_stage, main, prepare
from data_prep.verify import verify
from deepseek_moe.data.meta import load_meta
from deepseek_moe.errors import DataError
from tests.data_prep.conftest import corpus_config, jsonl_config
from tests.data_prep.test_prepare import decode_split, out_files, split_ids


def doc_ends(meta, split: str) -> np.ndarray:
    """Document ends of a split from its .idx files, shifted by the shards' offsets."""
    ends, start = [], 0
    for h in meta.splits[split].shards:
        ends.append(np.fromfile(meta.dir / h.index_file, dtype="<u8").astype(np.int64) + start)
        start += h.num_tokens
    return np.concatenate(ends)


@pytest.mark.parametrize("source", ["local_text", "json"])
def test_one_task_and_four_tasks_give_the_same_tokens(corpus, jsonl_corpus, tmp_path, monkeypatch, source):
    if source == "local_text":
        tok = {"tokenizer_model": str(tmp_path / "one" / "tokenizer.model")}
        one = load_meta(
            prepare(corpus_config(corpus[0], tmp_path / "one", num_tasks=1, num_proc=1, vocab_size=400))
        )
        four_cfg = corpus_config(
            corpus[0], tmp_path / "four", num_tasks=4, num_proc=2, shard_tokens=5000, **tok
        )
    else:
        one = load_meta(prepare(jsonl_config(jsonl_corpus[0], tmp_path / "one", num_tasks=1)))
        tok = {"tokenizer_model": str(tmp_path / "one" / "tokenizer.model")}
        # 4 tasks over 2 files: two tasks have nothing to do
        four_cfg = jsonl_config(
            jsonl_corpus[0], tmp_path / "four", num_tasks=4, num_proc=2, shard_tokens=5000, **tok
        )
    monkeypatch.setattr(tasks_mod, "ENCODE_CHARS", 3000)  # and encoded in small batches
    four = load_meta(prepare(four_cfg))
    assert four.num_tasks == 4 and one.num_tasks == 1
    assert len(four.splits["train"].shards) > len(one.splits["train"].shards)
    for split in ("train", "val"):
        np.testing.assert_array_equal(split_ids(one, split), split_ids(four, split))
        np.testing.assert_array_equal(doc_ends(one, split), doc_ends(four, split))
        # the index agrees with the EOS positions of the concatenated stream
        ids = split_ids(four, split)
        np.testing.assert_array_equal(doc_ends(four, split), np.flatnonzero(ids == four.eos_id) + 1)
    # shards are bounded: each closes at the first document end past shard_tokens
    for h in four.splits["train"].shards:
        ends = np.fromfile(four.dir / h.index_file, dtype="<u8")
        assert len(ends) == 1 or ends[-2] < 5000, h
    assert one.skipped_documents == four.skipped_documents
    verify(four.dir)


def test_a_task_killed_midway_is_redone_alone_and_gives_the_same_manifest(corpus, tmp_path, monkeypatch):
    cfg = corpus_config(
        corpus[0], tmp_path / "out", num_tasks=4, num_proc=1, vocab_size=400, shard_tokens=8000
    )
    clean = prepare(corpus_config(corpus[0], tmp_path / "clean", num_tasks=4, num_proc=1, vocab_size=400,
                                  shard_tokens=8000))  # fmt: skip
    real_close, closed = shards_mod.ShardWriter._close, []

    def dies_in_task_2(self):  # task 2 dies after its first complete shard
        if self.task == 2 and closed.count(2) == 1:
            raise KeyboardInterrupt
        closed.append(self.task)
        real_close(self)

    monkeypatch.setattr(shards_mod.ShardWriter, "_close", dies_in_task_2)
    with pytest.raises(KeyboardInterrupt):
        prepare(cfg)
    work = tmp_path / ".out.work"
    assert sorted(p.name for p in (work / "tasks").iterdir()) == ["00000.json", "00001.json"]
    assert any(p.name.startswith("00002-") for p in (work / "train").iterdir()), "task 2 left a shard"
    assert not (tmp_path / "out").exists()
    done = {p: p.stat().st_mtime_ns for p in (work / "train").glob("0000[01]-*")}
    monkeypatch.setattr(shards_mod.ShardWriter, "_close", real_close)
    out = prepare(cfg)
    assert (out / "meta.json").read_text() == (clean / "meta.json").read_text()
    assert out_files(out) == out_files(clean)
    assert {p: (out / "train" / p.name).stat().st_mtime_ns for p in done} == done, "tasks 0, 1 kept"
    assert decode_split(load_meta(out), "val") == decode_split(load_meta(clean), "val")


def test_staged_cli_matches_one_call_and_finalize_waits_for_every_task(corpus, tmp_path, capsys):
    common = [
        "data=local_text",
        f"data.path={corpus[0]}",
        "data.file_pattern=*.py",
        "data.exclude_dirs=[skipme]",
        "data.vocab_size=400",
        "data.val_fraction=0.1",
        "data.num_tasks=3",
        "data.num_proc=1",
    ]
    main(common + [f"data.out_dir={tmp_path / 'one'}"])
    staged = common + [f"data.out_dir={tmp_path / 'staged'}"]
    main(["--plan"] + staged)
    main(["--task", "2"] + staged)
    with pytest.raises(SystemExit):
        main(["--finalize"] + staged)
    assert "2 of 3 tasks" in capsys.readouterr().err and not (tmp_path / "staged").exists()
    with pytest.raises(SystemExit):
        main(["--task", "0"] + staged[:-2] + ["data.num_tasks=4", staged[-1]])
    assert "planned with other data.* values (data.num_tasks)" in capsys.readouterr().err
    main(["--task", "1"] + staged)
    main(["--task", "0"] + staged)
    main(["--finalize"] + staged)
    one, two = tmp_path / "one", tmp_path / "staged"
    assert out_files(one) == out_files(two)
    assert all((one / f).read_bytes() == (two / f).read_bytes() for f in out_files(one))
    main(["--task", "1"] + staged)  # a requeued task after finalize: nothing to do
    assert json.loads((two / "meta.json").read_text())["num_tasks"] == 3


def test_streaming_hub_needs_one_task(tmp_path):
    from deepseek_moe.config.data import DataConfig

    cfg = DataConfig(
        name="h", source="hf_hub", path="x/y", streaming=True, num_tasks=2, out_dir=str(tmp_path / "o")
    )
    with pytest.raises(ValueError, match="data.num_tasks=1"):
        prepare(cfg)
    with pytest.raises(DataError, match=r"plan.json is missing.*--plan"):
        finalize_stage(cfg)
