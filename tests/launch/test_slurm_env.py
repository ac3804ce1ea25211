"""SLURM -> torch.distributed variable mapping (launch/slurm_env.py), multi-node allocations."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from launch.slurm_env import expand_hostlist, expand_tasks_per_node, master_port, torch_env

REPO = Path(__file__).resolve().parents[2]

# (hostlist, expansion written out by hand)
HOSTLISTS = [
    ("vm", ["vm"]),
    ("a,b,c", ["a", "b", "c"]),
    ("node[01-03,07],gpu-a[1-2]", ["node01", "node02", "node03", "node07", "gpu-a1", "gpu-a2"]),
    ("n[9-11]", ["n9", "n10", "n11"]),
    ("x[098-101]", ["x098", "x099", "x100", "x101"]),
    ("r[1-2]-n[01-02]", ["r1-n01", "r1-n02", "r2-n01", "r2-n02"]),
    ("cn[5],login1,cn[1-2]", ["cn5", "login1", "cn1", "cn2"]),
    ("h-a.b[3-4]", ["h-a.b3", "h-a.b4"]),
]


@pytest.mark.parametrize("hostlist,expected", HOSTLISTS)
def test_expand_hostlist(hostlist, expected):
    assert expand_hostlist(hostlist) == expected


@pytest.mark.parametrize("bad", ["", "n[1-2", "n1-2]", "n[3-1]", "n[a-b]", "a,,b", "n[1,]", "n[[1]]"])
def test_expand_hostlist_rejects(bad):
    with pytest.raises(ValueError):
        expand_hostlist(bad)


def test_expand_hostlist_matches_scontrol(slurm_cluster):
    """SLURM's own expansion is the reference."""
    for hostlist, _ in HOSTLISTS:
        out = slurm_cluster.run(["scontrol", "show", "hostnames", hostlist]).stdout.split()
        assert expand_hostlist(hostlist) == out, hostlist


@pytest.mark.parametrize(
    "spec,expected",
    [("8", [8]), ("8(x4)", [8, 8, 8, 8]), ("3,2(x2)", [3, 2, 2]), ("2(x3),1", [2, 2, 2, 1])],
)
def test_expand_tasks_per_node(spec, expected):
    assert expand_tasks_per_node(spec) == expected


@pytest.mark.parametrize("bad", ["", "2(x)", "x2", "2(3)"])
def test_expand_tasks_per_node_rejects(bad):
    with pytest.raises(ValueError):
        expand_tasks_per_node(bad)


def _srun_env(**overrides):
    """What srun exports to task 5 of `--nodes=2 --ntasks-per-node=4` on gpu[07-08]."""
    env = {
        "SLURM_JOB_ID": "123456",
        "SLURM_PROCID": "5",
        "SLURM_LOCALID": "1",
        "SLURM_NODEID": "1",
        "SLURM_NTASKS": "8",
        "SLURM_STEP_NUM_TASKS": "8",
        "SLURM_JOB_NODELIST": "gpu[07-08]",
        "SLURM_STEP_NODELIST": "gpu[07-08]",
        "SLURM_TASKS_PER_NODE": "4(x2)",
        "SLURM_STEP_TASKS_PER_NODE": "4(x2)",
    }
    env.update(overrides)
    return {k: v for k, v in env.items() if v is not None}


def test_torch_env_two_nodes():
    assert torch_env(_srun_env()) == {
        "RANK": "5",
        "WORLD_SIZE": "8",
        "LOCAL_RANK": "1",
        "LOCAL_WORLD_SIZE": "4",
        "NODE_RANK": "1",
        "MASTER_ADDR": "gpu07",
        "MASTER_PORT": str(10000 + 123456 % 20000),
    }


def test_torch_env_uneven_nodes():
    # 7 tasks over 3 nodes (3 + 2 + 2): the last task is local rank 1 of 2 on node 2.
    env = _srun_env(
        SLURM_PROCID="6", SLURM_LOCALID="1", SLURM_NODEID="2", SLURM_NTASKS="7", SLURM_STEP_NUM_TASKS="7",
        SLURM_JOB_NODELIST="a[1-3]", SLURM_STEP_NODELIST="a[1-3]",
        SLURM_TASKS_PER_NODE="3,2(x2)", SLURM_STEP_TASKS_PER_NODE="3,2(x2)",
    )  # fmt: skip
    got = torch_env(env)
    assert (got["RANK"], got["WORLD_SIZE"], got["LOCAL_RANK"]) == ("6", "7", "1")
    assert (got["LOCAL_WORLD_SIZE"], got["NODE_RANK"], got["MASTER_ADDR"]) == ("2", "2", "a1")


def test_torch_env_step_on_part_of_the_job():
    # srun on the last 2 of 4 allocated nodes: the step's variables win over the job's.
    env = _srun_env(SLURM_JOB_NODELIST="n[1-4]", SLURM_STEP_NODELIST="n[3-4]", SLURM_TASKS_PER_NODE="4(x4)")
    assert torch_env(env)["MASTER_ADDR"] == "n3"


def test_torch_env_job_variables_fallback():
    env = _srun_env(SLURM_STEP_NUM_TASKS=None, SLURM_STEP_NODELIST=None, SLURM_STEP_TASKS_PER_NODE=None)
    assert torch_env(env) == torch_env(_srun_env())


def test_master_port_per_job():
    ports = {master_port(job) for job in range(1, 50001, 7)}
    assert all(10000 <= p < 30000 for p in ports)  # below the kernel's ephemeral range
    assert (master_port(12), master_port(13), master_port(20012)) == (10012, 10013, 10012)
    assert torch_env(_srun_env(DSMOE_MASTER_PORT="29555"))["MASTER_PORT"] == "29555"


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"SLURM_PROCID": None}, "SLURM_PROCID"),
        ({"SLURM_PROCID": "8"}, "outside"),
        ({"SLURM_STEP_TASKS_PER_NODE": "4,3"}, "sum to 7"),
        ({"SLURM_STEP_NODELIST": "gpu[07-09]"}, "3 hosts"),
        ({"SLURM_LOCALID": "4"}, "runs 4 tasks"),
        ({"SLURM_NODEID": "x"}, "not an integer"),
    ],
)
def test_torch_env_rejects(overrides, message):
    with pytest.raises((KeyError, ValueError), match=message):
        torch_env(_srun_env(**overrides))


def _run_module(env, *cmd):
    base = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    return subprocess.run(
        [sys.executable, "-m", "launch.slurm_env", *cmd],
        cwd=REPO, env={**base, **env}, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_cli_execs_command_with_torch_env():
    code = "import os, json, sys; print(json.dumps([os.environ['RANK'], os.environ['MASTER_ADDR'], sys.argv[1:]]))"
    res = _run_module(_srun_env(), "--", sys.executable, "-c", code, "model=x", "trainer.max_steps=5")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == ["5", "gpu07", ["model=x", "trainer.max_steps=5"]]


def test_cli_outside_slurm_fails_clearly():
    res = _run_module({}, "--", "true")
    assert res.returncode == 2
    assert "SLURM_PROCID" in res.stderr and "srun" in res.stderr


def test_cli_without_command_prints_exports():
    res = _run_module(_srun_env())
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == [
        "export RANK=5", "export WORLD_SIZE=8", "export LOCAL_RANK=1", "export LOCAL_WORLD_SIZE=4",
        "export NODE_RANK=1", "export MASTER_ADDR=gpu07", f"export MASTER_PORT={10000 + 123456 % 20000}",
    ]  # fmt: skip
