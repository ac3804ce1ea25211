"""One preparation task: its contiguous range of documents -> token shards + a completion marker.

A task is a pure function of (plan, tokenizer, task id, number of tasks): it reads its units in
source order (`sources.task_documents`), encodes them in batches, appends EOS and streams the
ids into its train/val shards (`shards.ShardWriter`). Its marker `tasks/<task>.json` (shards,
skipped documents) is written last, atomically: a task without a marker is unfinished, and
rerunning it first deletes whatever it left (`remove_task_files`) and starts it over. So a
killed task, a failed SLURM array element or a requeued one never leaves anything trusted.

Locally, `run_tasks` runs the unfinished tasks `num_proc` at a time in forked processes; on a
cluster every task is one element of a SLURM job array (`launch/prepare.sbatch`).
"""

from __future__ import annotations

import json
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from data_prep.shards import ShardWriter, remove_task_files
from data_prep.sources import Plan, task_documents
from deepseek_moe.atomic import atomic_write_bytes
from deepseek_moe.config.data import DataConfig
from deepseek_moe.data.meta import SPLITS
from deepseek_moe.data.tokenizer import load_tokenizer
from deepseek_moe.errors import DataError

# Characters encoded in one call. The encoder returns Python lists (about 36 bytes per token),
# so a batch is capped by its text, not by its document count: a task's memory then does not
# depend on how long the documents of a corpus are (one longer document is its own batch).
ENCODE_CHARS = 1 << 20

PLAN_FILE = "plan.json"
TASKS_DIR = "tasks"
CACHE_DIR = "cache"


def marker_path(work: Path, task: int) -> Path:
    return work / TASKS_DIR / f"{task:05d}.json"


def read_stamp(work: Path) -> dict:
    """plan.json of a work directory: {"plan", "prepare_config", "num_tasks", "shard_tokens",
    "tokenizer_file", "special_ids", "dtype"}."""
    return json.loads((work / PLAN_FILE).read_text())


def unfinished_tasks(work: Path, num_tasks: int) -> list[int]:
    return [k for k in range(num_tasks) if not marker_path(work, k).is_file()]


def run_task(work: Path, cfg: DataConfig, task: int) -> dict:
    """Run task `task` of the plan in `work` unless its marker exists; returns the marker."""
    marker = marker_path(work, task)
    if marker.is_file():
        return json.loads(marker.read_text())
    stamp = read_stamp(work)
    plan, num_tasks = Plan(**stamp["plan"]), stamp["num_tasks"]
    if not 0 <= task < num_tasks:
        raise DataError(
            f"task {task} does not exist: {work} was planned with {num_tasks} tasks (0..{num_tasks - 1})"
        )
    t0 = time.perf_counter()
    tok = load_tokenizer(work / stamp["tokenizer_file"], stamp["special_ids"])
    eos = tok.eos_id
    remove_task_files(work, task, SPLITS)
    cache = work / CACHE_DIR / f"task-{task:05d}"
    writers = {s: ShardWriter(work, s, task, stamp["dtype"], stamp["shard_tokens"]) for s in SPLITS}
    lo, hi = plan.task_range(task, num_tasks)
    skipped: dict[str, int] = {}
    try:
        for texts, is_val in task_documents(plan, cfg, lo, hi, skipped, cache):
            for a, b in _chunks(texts, ENCODE_CHARS):
                ids = tok.encode_batch(texts[a:b])
                for split, mask in (("train", ~is_val[a:b]), ("val", is_val[a:b])):
                    docs = [ids[i] for i in np.flatnonzero(mask)]
                    for d in docs:
                        d.append(eos)
                    writers[split].write(docs)
                del ids
        shards = {s: [asdict(h) for h in w.close()] for s, w in writers.items()}
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    result = {"task": task, "units": [lo, hi], "shards": shards, "skipped": skipped}
    atomic_write_bytes(marker, (json.dumps(result, indent=1) + "\n").encode())
    tokens = sum(h["num_tokens"] for s in shards.values() for h in s)
    print(
        f"[prepare] task {task}/{num_tasks}: units [{lo}, {hi}), {tokens:,} tokens in "
        f"{time.perf_counter() - t0:.1f}s",
        flush=True,
    )
    return result


def _chunks(texts: list[str], max_chars: int):
    """[a, b) ranges of consecutive texts of at most `max_chars` characters (at least one text)."""
    a = 0
    while a < len(texts):
        b, size = a + 1, len(texts[a])
        while b < len(texts) and size + len(texts[b]) <= max_chars:
            size += len(texts[b])
            b += 1
        yield a, b
        a = b


def run_tasks(work: Path, cfg: DataConfig, num_proc: int) -> None:
    """Run every unfinished task of `work`, `num_proc` at a time; all run even if one fails,
    then the first failure is raised (a rerun redoes only the failed ones)."""
    pending = unfinished_tasks(work, read_stamp(work)["num_tasks"])
    if num_proc <= 1 or len(pending) <= 1:
        for k in pending:
            run_task(work, cfg, k)
        return
    # fork: the workers inherit the parent's modules (no re-import per task).
    with ProcessPoolExecutor(min(num_proc, len(pending)), mp_context=get_context("fork")) as pool:
        futures = [pool.submit(run_task, work, cfg, k) for k in pending]
        errors = [f.exception() for f in futures]
    first = next((e for e in errors if e is not None), None)
    if first is not None:
        raise first
