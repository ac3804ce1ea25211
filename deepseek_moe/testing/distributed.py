"""Run a function in several gloo CPU processes, for multi-process tests.

    from deepseek_moe.testing.distributed import run_distributed

    def _check_allreduce(rank, world_size, value):      # module level: it is pickled
        t = torch.tensor([float(rank + value)])
        torch.distributed.all_reduce(t)
        return t

    def test_allreduce():
        results = run_distributed(_check_allreduce, 2, 1.0)   # one entry per rank
        assert results[0].item() == 3.0

How it works (and why):
- Each rank is a fresh `spawn`ed interpreter (never `fork`: a forked child inherits the parent's
  torch thread pools and any half-initialised process group). `MASTER_ADDR`, `MASTER_PORT` (a free
  port), `RANK`, `WORLD_SIZE`, `LOCAL_RANK` are set, and by default the default process group is
  initialised with gloo before `fn(rank, world_size, *args)` runs, so DeepSpeed's
  `deepspeed.init_distributed()` finds it and reuses it.
- Results and tracebacks travel through files in a temp dir (`torch.save`), not a pipe: a CPU
  tensor sent through a multiprocessing queue is shared by file descriptor and dies with its
  process, and a large result in a pipe can deadlock a `join`.
- A rank that raises makes `run_distributed` raise `RuntimeError` carrying that rank's traceback
  (the earliest error first: its peers typically fail next with "connection closed"); the other
  ranks are terminated after a 3 s grace (they may be blocked in a collective forever). A rank that dies
  without a report (segfault, `os._exit`) is reported with its exit code.
- `timeout` bounds the whole run: a hang fails the test instead of blocking CI. gloo collectives
  also get the same timeout, so a rank stuck in a collective raises on its own.
- Each rank uses one intra-op thread (`torch.set_num_threads(1)`): CI has two cores and several
  ranks; oversubscribed thread pools make small collectives tests many times slower.
"""

from __future__ import annotations

import datetime
import os
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch
import torch.multiprocessing as mp

from deepseek_moe.atomic import atomic_torch_save
from deepseek_moe.train.distributed import free_port

__all__ = ["run_distributed"]


def _worker(
    rank: int,
    world_size: int,
    port: int,
    out_dir: str,
    init_process_group: bool,
    timeout_s: float,
    fn: Callable[..., Any],
    args: tuple,
) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_SIZE=str(world_size),
        OMP_NUM_THREADS="1",
    )
    torch.set_num_threads(1)
    try:
        if init_process_group:
            torch.distributed.init_process_group(
                "gloo",
                rank=rank,
                world_size=world_size,
                timeout=datetime.timedelta(seconds=timeout_s),
            )
        result = fn(rank, world_size, *args)
        atomic_torch_save({"ok": True, "result": result}, Path(out_dir) / f"rank{rank}.pt")
    except BaseException:  # noqa: BLE001 - everything, including SystemExit, goes to the parent
        atomic_torch_save({"ok": False, "error": traceback.format_exc()}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        if init_process_group and torch.distributed.is_initialized():
            try:
                torch.distributed.destroy_process_group()
            except Exception:  # noqa: BLE001 - teardown after a failure must not mask it
                pass


def _root_cause(out_dir: str, world_size: int, first_seen: str) -> str:
    """The earliest-written error report first (a rank that raised makes its peers fail with
    "connection closed" a moment later), then one line per other failing rank."""
    reports = []
    for rank in range(world_size):
        path = os.path.join(out_dir, f"rank{rank}.pt")
        if os.path.exists(path):
            report = torch.load(path, weights_only=False)
            if not report["ok"]:
                reports.append((os.stat(path).st_mtime_ns, rank, report["error"]))
    reports.sort()
    if "without reporting" in first_seen or not reports:
        msg = first_seen  # a silent crash is the root cause; the reports came after it
    else:
        _, rank, error = reports.pop(0)
        msg = f"rank {rank} of {world_size} raised:\n{error}"
    for _, other, err in reports:
        last = err.strip().splitlines()[-1] if err.strip() else ""
        msg += f"\n(then rank {other} raised: {last[:300]})"
    return msg


def run_distributed(
    fn: Callable[..., Any],
    world_size: int = 2,
    *args: Any,
    timeout: float = 180.0,
    init_process_group: bool = True,
) -> list[Any]:
    """Run `fn(rank, world_size, *args)` in `world_size` spawned gloo processes.

    Args:
        fn: a module-level (picklable) function. Its return value must be `torch.save`-able
            (tensors, numbers, dicts, lists...); return CPU tensors, not views of huge buffers.
        world_size: number of processes.
        *args: extra positional arguments, passed to every rank (pickled).
        timeout: seconds for the whole run (spawn + fn); also the gloo collective timeout.
        init_process_group: initialise the default gloo process group before calling `fn`
            (set False if `fn` wants to call `init_process_group` itself; the env vars are set).

    Returns:
        `[result of rank 0, result of rank 1, ...]`.

    Raises:
        RuntimeError: a rank raised (message holds its traceback) or died without reporting.
        TimeoutError: not all ranks finished within `timeout` seconds.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="run_distributed_") as out_dir:
        port = free_port()
        procs = []
        for rank in range(world_size):
            p = ctx.Process(
                target=_worker,
                args=(rank, world_size, port, out_dir, init_process_group, timeout, fn, args),
                daemon=True,
            )
            p.start()
            procs.append(p)

        deadline = time.monotonic() + timeout
        results: dict[int, Any] = {}
        failure: str | None = None
        try:
            while len(results) < world_size and failure is None:
                for rank, p in enumerate(procs):
                    if rank in results:
                        continue
                    path = os.path.join(out_dir, f"rank{rank}.pt")
                    if os.path.exists(path):
                        report = torch.load(path, weights_only=False)
                        if report["ok"]:
                            results[rank] = report["result"]
                        else:
                            failure = f"rank {rank} of {world_size} raised:\n{report['error']}"
                            break
                    elif p.exitcode is not None and not os.path.exists(path):
                        failure = (
                            f"rank {rank} of {world_size} exited with code {p.exitcode} "
                            "without reporting a result (crash or os._exit)"
                        )
                        break
                if failure is not None:
                    # the other ranks usually fail right after (peer connection closed): give
                    # them a moment to report so the root cause can be picked by time
                    grace = time.monotonic() + 3.0
                    while time.monotonic() < grace and any(p.is_alive() for p in procs):
                        time.sleep(0.05)
                if len(results) < world_size and failure is None:
                    if time.monotonic() > deadline:
                        missing = [r for r in range(world_size) if r not in results]
                        raise TimeoutError(
                            f"run_distributed({getattr(fn, '__name__', fn)}): ranks {missing} "
                            f"did not finish within {timeout:.0f}s (a hang in a collective? "
                            "raise `timeout=` if the work is just slow)"
                        )
                    time.sleep(0.05)
        finally:
            for p in procs:
                if failure is not None or len(results) < world_size:
                    if p.is_alive():
                        p.terminate()
                p.join(timeout=10)
                if p.is_alive():
                    p.kill()
                    p.join()
        if failure is not None:
            raise RuntimeError(_root_cause(out_dir, world_size, failure))
        return [results[r] for r in range(world_size)]
