"""The real train.py through launch/train.sbatch on a local SLURM cluster (gloo on CPU): 1 node x
2 tasks, USR1 preemption -> requeue -> resume, and 2 emulated nodes with expert parallelism
(then resumed on 1 node)."""

import re
import time

import pytest

from tests.launch.slurm_cluster import REPO, read_jsonl, submit, wait_for_steps
from tests.train.helpers import TINY, tiny_data_overrides


@pytest.fixture(scope="module")
def overrides(tmp_path_factory):
    """Tiny model; the first job prepares the small python_stdlib corpus (rank 0 prepares, rank 1
    waits), later jobs find it prepared."""
    data = tiny_data_overrides(tmp_path_factory.mktemp("slurm_data") / "stdlib_tiny")
    return [*TINY, *data, "logger=none", "trainer.log_every=25"]


def step_records(run_dir):
    return [m["step"] for m in read_jsonl(run_dir / "metrics.jsonl") if "loss" in m]


def test_train_two_tasks(slurm_cluster, overrides, tmp_path):
    job = submit(slurm_cluster, REPO, tmp_path, "tiny-2tasks", [*overrides, "trainer.max_steps=6"])
    # Generous: on a fresh machine the first deepspeed.initialize JIT-compiles a comm op (~1 min).
    info = slurm_cluster.wait_job(job, {"COMPLETED"}, timeout=300)
    log = slurm_cluster.job_log(info)

    run_dir = tmp_path / "runs" / "tiny-2tasks"  # from the job name
    assert step_records(run_dir) == [1, 2, 3, 4, 5, 6], log
    assert re.search(r"run_dir \S+/tiny-2tasks \| world 2 ", log), log
    # ZeRO-1 sharded the optimizer over both ranks: they were one process group of size 2.
    final = run_dir / "checkpoints" / "step_00000006"
    assert (final / "COMPLETE").exists()
    assert {p.name for p in final.glob("zero_pp_rank_*_optim_states.pt")} == {
        "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt",
    }


def test_preempted_job_checkpoints_requeues_and_resumes(slurm_cluster, overrides, tmp_path):
    """USR1 to the batch shell (what SLURM sends 300 s before the time limit): train.py saves and
    exits 0, the script requeues the job, the requeued job resumes: every step logged once."""
    max_steps = 100
    run_dir = tmp_path / "runs" / "tiny-preempt"
    ov = [*overrides, f"trainer.max_steps={max_steps}", "checkpoint.every=1000", "trainer.eval_every=0"]
    job = submit(slurm_cluster, REPO, tmp_path, "tiny-preempt", ov)
    wait_for_steps(slurm_cluster, job, run_dir / "metrics.jsonl", 3, timeout=240)
    slurm_cluster.run(["scancel", "--signal=USR1", "--batch", str(job)])
    t0 = time.monotonic()
    slurm_cluster.wait_job(job, {"PENDING", "RUNNING"}, timeout=60, min_restarts=1)
    requeue_s = time.monotonic() - t0
    info = slurm_cluster.wait_job(job, {"COMPLETED"}, timeout=240, min_restarts=1)
    log = slurm_cluster.job_log(info)

    assert info["Restarts"] == "1", log
    stop = re.search(r"step (\d+): stop requested by signal", log)
    assert stop, log
    stopped_at = int(stop.group(1))
    assert 3 <= stopped_at < max_steps, log
    assert f"steps {stopped_at}->{max_steps}" in log, log  # the requeued launch resumed there
    assert step_records(run_dir) == list(range(1, max_steps + 1)), log  # no repeats, no gaps
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))
    assert ckpts == [f"step_{stopped_at:08d}", f"step_{max_steps:08d}"]
    assert requeue_s < 60


def test_train_two_nodes_expert_parallel(slurm_cluster_2nodes, overrides, tmp_path):
    """2 nodes x 1 task (two slurmd on this machine) with the experts sharded across the nodes;
    resubmitted with --nodes=1, the run continues."""
    cluster = slurm_cluster_2nodes
    ov = [*overrides, "trainer.max_steps=4", "parallel.ep_size=2"]
    job = submit(cluster, REPO, tmp_path, "tiny-2nodes", ov, tasks=1, nodes=2)
    info = cluster.wait_job(job, {"COMPLETED"}, timeout=240)
    log = cluster.job_log(info)

    assert f"world 2 on 2 node(s), master {cluster.nodes[0]}:" in log, log
    assert "| world 2 (ep 2, zero 1" in log, log
    run_dir = tmp_path / "runs" / "tiny-2nodes"
    assert step_records(run_dir) == [1, 2, 3, 4], log
    assert (run_dir / "checkpoints" / "step_00000004" / "COMPLETE").exists()

    # the same job name on one node, one task, no EP: the run continues, resharded on load
    ov = [*overrides, "trainer.max_steps=6", "parallel.ep_size=1"]
    job = submit(cluster, REPO, tmp_path, "tiny-2nodes", ov, tasks=1, nodes=1)
    log = cluster.job_log(cluster.wait_job(job, {"COMPLETED"}, timeout=240))
    assert "with another layout: world 2 -> 1, ep 2 -> 1" in log and "steps 4->6" in log, log
    assert step_records(run_dir) == [1, 2, 3, 4, 5, 6], log
