"""launch/train.sbatch on a real one-node SLURM cluster, with a stand-in trainer.

`fake_train.py` keeps train.py's launch contract (torch env vars, one gloo group, resume from
run_dir, checkpoint + exit 0 on USR1/TERM) but takes a second to start, so these tests pin down
the batch script's own logic: env mapping on one and on two nodes, the log file, SLURM's requeue
on SIGTERM, --kill-on-bad-exit, USR1 before the trainer's handler exists. test_train_slurm.py
runs the real train.py (including the USR1 checkpoint-requeue-resume path).
"""

import shutil
import time
from pathlib import Path

import pytest

from tests.launch.slurm_cluster import REPO, read_jsonl, submit, wait_for_steps


@pytest.fixture
def fake_repo(tmp_path):
    """A copy of launch/ next to the stand-in trainer as train.py."""
    repo = tmp_path / "repo"
    shutil.copytree(REPO / "launch", repo / "launch", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(Path(__file__).with_name("fake_train.py"), repo / "train.py")
    return repo


def test_two_tasks_one_process_group(slurm_cluster, fake_repo, tmp_path):
    overrides = ["trainer.max_steps=3", "step_seconds=0.1"]
    job = submit(slurm_cluster, fake_repo, tmp_path, "fake-ok", overrides, output=None)
    info = slurm_cluster.wait_job(job, {"COMPLETED"}, timeout=60)
    assert info["Restarts"] == "0"
    run_dir = tmp_path / "runs" / "fake-ok"
    assert [m["step"] for m in read_jsonl(run_dir / "metrics.jsonl")] == [1, 2, 3]
    # sum of ranks 0 + 1 over one all_reduce: both tasks joined one group of 2
    assert {(m["world_size"], m["ranks_sum"]) for m in read_jsonl(run_dir / "metrics.jsonl")} == {(2, 1.0)}
    for rank in (0, 1):
        (launch,) = read_jsonl(run_dir / f"launch_rank{rank}.jsonl")
        assert launch["env"] == {
            "RANK": str(rank),
            "WORLD_SIZE": "2",
            "LOCAL_RANK": str(rank),
            "LOCAL_WORLD_SIZE": "2",
            "NODE_RANK": "0",
            "MASTER_ADDR": slurm_cluster.node,
            "MASTER_PORT": str(10000 + job % 20000),
            "node": slurm_cluster.node,
        }
    # the script's default log: one file per job, <job name>-<job id>.out in the submit directory
    assert Path(info["StdOut"]) == fake_repo / f"fake-ok-{job}.out"
    assert "[train.sbatch" in (fake_repo / f"fake-ok-{job}.out").read_text()


def test_scontrol_requeue_resumes(slurm_cluster, fake_repo, tmp_path):
    """SIGTERM path: SLURM signals the tasks, they checkpoint, SLURM requeues the job. (Preemption
    with PreemptMode=REQUEUE also ends a job with SIGTERM and requeues it; not set up here.)"""
    run_dir = tmp_path / "runs" / "fake-term"
    job = submit(
        slurm_cluster, fake_repo, tmp_path, "fake-term", ["trainer.max_steps=10", "step_seconds=0.3"]
    )
    wait_for_steps(slurm_cluster, job, run_dir / "metrics.jsonl", 2)
    slurm_cluster.run(["scontrol", "requeue", str(job)])
    info = slurm_cluster.wait_job(job, {"COMPLETED"}, timeout=90, min_restarts=1)

    assert [m["step"] for m in read_jsonl(run_dir / "metrics.jsonl")] == list(range(1, 11))
    resumes = [r["resume_step"] for r in read_jsonl(run_dir / "launch_rank0.jsonl")]
    assert len(resumes) == 2 and resumes[0] == 0 and resumes[1] >= 2, resumes
    assert "SIGTERM" in slurm_cluster.job_log(info)


def test_failed_rank_ends_job_without_requeue(slurm_cluster, fake_repo, tmp_path):
    """Rank 1 exits 3 while rank 0 hangs: --kill-on-bad-exit ends the job, which is not requeued."""
    start = time.monotonic()
    job = submit(slurm_cluster, fake_repo, tmp_path, "fake-fail", ["fail_rank=1", "step_seconds=0.1"])
    info = slurm_cluster.wait_job(job, {"FAILED"}, timeout=60)
    assert time.monotonic() - start < 60
    assert info["Restarts"] == "0" and info["ExitCode"].split(":")[0] != "0"
    assert "failing on purpose" in slurm_cluster.job_log(info)


def test_usr1_during_startup_still_requeues(slurm_cluster, fake_repo, tmp_path):
    """USR1 before train.py installed its handler kills the tasks (status 138): still requeue."""
    run_dir = tmp_path / "runs" / "fake-early"
    overrides = ["trainer.max_steps=3", "step_seconds=0.1", "startup_seconds=3"]
    job = submit(slurm_cluster, fake_repo, tmp_path, "fake-early", overrides)
    deadline = time.monotonic() + 60
    while not all((run_dir / f"starting_rank{r}").exists() for r in (0, 1)):
        assert time.monotonic() < deadline, slurm_cluster.job_log(slurm_cluster.job(job))
        time.sleep(0.1)
    slurm_cluster.run(["scancel", "--signal=USR1", "--batch", str(job)])
    info = slurm_cluster.wait_job(job, {"COMPLETED"}, timeout=90, min_restarts=1)
    assert [m["step"] for m in read_jsonl(run_dir / "metrics.jsonl")] == [1, 2, 3]
    assert [r["resume_step"] for r in read_jsonl(run_dir / "launch_rank0.jsonl")] == [
        0
    ]  # first launch died early
    assert "(status 138)" in slurm_cluster.job_log(info)


def test_two_nodes_two_tasks_each(slurm_cluster_2nodes, fake_repo, tmp_path):
    """A real 2-node allocation (two slurmd on this machine): 4 ranks, 2 per node, one group."""
    cluster = slurm_cluster_2nodes
    job = submit(
        cluster, fake_repo, tmp_path, "fake-2n", ["trainer.max_steps=2", "step_seconds=0.1"], nodes=2
    )
    info = cluster.wait_job(job, {"COMPLETED"}, timeout=90)
    run_dir = tmp_path / "runs" / "fake-2n"
    assert [(m["step"], m["world_size"], m["ranks_sum"]) for m in read_jsonl(run_dir / "metrics.jsonl")] == [
        (1, 4, 6.0),
        (2, 4, 6.0),  # 0 + 1 + 2 + 3: all four ranks in one all_reduce
    ], cluster.job_log(info)
    for rank in range(4):
        (launch,) = read_jsonl(run_dir / f"launch_rank{rank}.jsonl")
        # SLURM's default block distribution: ranks 0-1 on the first node, 2-3 on the second.
        assert launch["env"] == {
            "RANK": str(rank),
            "WORLD_SIZE": "4",
            "LOCAL_RANK": str(rank % 2),
            "LOCAL_WORLD_SIZE": "2",
            "NODE_RANK": str(rank // 2),
            "MASTER_ADDR": cluster.nodes[0],
            "MASTER_PORT": str(10000 + job % 20000),
            "node": cluster.nodes[rank // 2],
        }
