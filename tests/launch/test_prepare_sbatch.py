"""launch/prepare.sbatch on a real one-node SLURM cluster: a 4-task job array in which one task
fails, then the array resubmitted: only that task runs again, finalize gives the directory a
local preparation gives, and the tokens equal those of a single-task preparation."""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from data_prep.prepare import main, prepare
from deepseek_moe.data.meta import load_meta
from tests.data_prep.conftest import corpus_config, write_corpus
from tests.launch.slurm_cluster import FINISHED_STATES, REPO


def _overrides(root: Path, out: Path, tokenizer: Path) -> list[str]:
    return [
        "data=local_text",
        f"data.path={root}",
        "data.file_pattern=*.py",
        "data.exclude_dirs=[skipme]",
        "data.val_fraction=0.1",
        f"data.tokenizer_model={tokenizer}",
        "data.num_tasks=4",
        "data.shard_tokens=20000",
        f"data.out_dir={out}",
    ]


def _sbatch(cluster, tmp_path, args: list[str]) -> int:
    env = {
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "DSMOE_VENV": sys.prefix,
        "PYTHONPATH": str(REPO),
    }
    return cluster.sbatch([f"--output={tmp_path}/%x-%A_%a.out", *args], cwd=REPO, env=env)


def _wait_array(cluster, job: int, n: int, timeout: float = 120) -> dict[int, str]:
    """Wait until the n elements of array job `job` finished; returns element -> state."""
    deadline = time.monotonic() + timeout
    while True:
        states = {k: cluster.job(f"{job}_{k}")["JobState"] for k in range(n)}
        if all(s in FINISHED_STATES for s in states.values()):
            return states
        assert time.monotonic() < deadline, (states, cluster.logs())
        time.sleep(0.25)


def test_array_with_a_failed_task_resubmitted_matches_a_local_preparation(slurm_cluster, tmp_path):
    root = tmp_path / "corpus"
    write_corpus(root)
    # References, locally: one task (the tokens) and four tasks (the whole directory).
    one = load_meta(prepare(corpus_config(root, tmp_path / "one", num_tasks=1, num_proc=1, vocab_size=400)))
    tokenizer = tmp_path / "one" / "tokenizer.model"
    local = tmp_path / "local"
    main([*_overrides(root, local, tokenizer), "data.num_proc=1"])
    out = tmp_path / "out"
    args = _overrides(root, out, tokenizer)
    main(["--plan", *args])
    # Task 2 fails: a directory where it cleans up its own leftovers (unlink raises).
    blocker = tmp_path / ".out.work" / "train" / "00002-blocker"
    blocker.mkdir(parents=True)
    job = _sbatch(slurm_cluster, tmp_path, ["--array=0-3", "launch/prepare.sbatch", *args])
    states = _wait_array(slurm_cluster, job, 4)
    assert states == {0: "COMPLETED", 1: "COMPLETED", 2: "FAILED", 3: "COMPLETED"}, states
    log2 = (tmp_path / f"prepare-{job}_2.out").read_text()
    assert "IsADirectoryError" in log2 and "exited with status 1" in log2
    finished = {p.name: p.stat().st_mtime_ns for p in (tmp_path / ".out.work" / "tasks").iterdir()}
    assert sorted(finished) == ["00000.json", "00001.json", "00003.json"]
    assert not out.exists()

    shutil.rmtree(blocker)
    again = _sbatch(slurm_cluster, tmp_path, ["--array=0-3", "launch/prepare.sbatch", *args])
    final = _sbatch(
        slurm_cluster,
        tmp_path,
        [f"--dependency=afterok:{again}", "launch/prepare.sbatch", "--finalize", *args],
    )
    assert set(_wait_array(slurm_cluster, again, 4).values()) == {"COMPLETED"}
    info = slurm_cluster.wait_job(final, {"COMPLETED"}, timeout=120)
    assert "exited with status 0" in slurm_cluster.job_log(info)
    for k in (0, 1, 3):  # finished tasks were not redone
        assert "units" not in (tmp_path / f"prepare-{again}_{k}.out").read_text()
    assert "task 2/4: units" in (tmp_path / f"prepare-{again}_2.out").read_text()

    assert (out / "meta.json").read_text() == (local / "meta.json").read_text()
    meta = load_meta(out)
    for split in ("train", "val"):
        ids = [np.fromfile(meta.dir / h.file, dtype="<u2") for h in meta.splits[split].shards]
        ref = [np.fromfile(one.dir / h.file, dtype="<u2") for h in one.splits[split].shards]
        np.testing.assert_array_equal(np.concatenate(ids), np.concatenate(ref))
    assert len(meta.splits["train"].shards) > 4
