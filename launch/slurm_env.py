"""Map SLURM's per-task variables to the ones torch.distributed / DeepSpeed read, then exec.

`launch/train.sbatch` runs one SLURM task per training process:

    srun python -m launch.slurm_env -- python train.py <hydra overrides>

Every task computes its own variables from what `srun` exported (no `scontrol` call per task,
so a 512-task job does not hammer slurmctld) and `exec`s the command with:

    RANK              = SLURM_PROCID          global rank of this process
    WORLD_SIZE        = SLURM_STEP_NUM_TASKS  processes in this srun step (SLURM_NTASKS fallback)
    LOCAL_RANK        = SLURM_LOCALID         rank on this node (picks the GPU)
    LOCAL_WORLD_SIZE  = tasks on this node, from SLURM_STEP_TASKS_PER_NODE ("8(x4)", "3,2(x2)")
    NODE_RANK         = SLURM_NODEID          index of this node in the step's node list
    MASTER_ADDR       = first host of SLURM_STEP_NODELIST (SLURM_JOB_NODELIST fallback)
    MASTER_PORT       = derived from SLURM_JOB_ID (same on every node and on every requeue of
                        the job); set DSMOE_MASTER_PORT to force a port.

Run without a command (`python -m launch.slurm_env`) inside an allocation to print the
variables as `export K=V` lines.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping

# MASTER_PORT = PORT_BASE + job_id % PORT_SPAN: [10000, 30000) sits above the well-known and
# registered ports SLURM itself uses (6817-6819) and below Linux's ephemeral range (32768+), so
# the rendezvous port never collides with a port the kernel handed to an outgoing connection.
PORT_BASE = 10000
PORT_SPAN = 20000

_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")
_TASKS_ITEM = re.compile(r"^(\d+)(?:\(x(\d+)\))?$")


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside brackets: "a[1,2],b" -> ["a[1,2]", "b"]."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
            if depth > 1:
                raise ValueError(f"nested '[' in hostlist {text!r}")
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ']' in hostlist {text!r}")
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth != 0:
        raise ValueError(f"unbalanced '[' in hostlist {text!r}")
    parts.append(text[start:])
    return parts


def _expand_range_set(body: str, hostlist: str) -> list[str]:
    """ "01-03,07" -> ["01", "02", "03", "07"]; zero padding follows the lower bound like SLURM."""
    out: list[str] = []
    for item in body.split(","):
        match = _RANGE.match(item.strip())
        if not match:
            raise ValueError(f"bad range {item!r} in hostlist {hostlist!r}; expected N or N-M")
        lo_text, hi_text = match.group(1), match.group(2)
        if hi_text is None:
            out.append(lo_text)
            continue
        lo, hi = int(lo_text), int(hi_text)
        if hi < lo:
            raise ValueError(f"range {item!r} in hostlist {hostlist!r} runs backwards")
        width = len(lo_text)
        out.extend(str(n).zfill(width) for n in range(lo, hi + 1))
    return out


def expand_hostlist(hostlist: str) -> list[str]:
    """Expand a SLURM hostlist expression, in order, like `scontrol show hostnames`.

    "node[01-03,07],gpu-a[1-2]" -> node01 node02 node03 node07 gpu-a1 gpu-a2;
    "rack[1-2]-n[1-2]" -> rack1-n1 rack1-n2 rack2-n1 rack2-n2 (several brackets: a product).
    """
    hostlist = hostlist.strip()
    if not hostlist:
        raise ValueError("empty hostlist; expected e.g. 'node[01-04]'")
    hosts: list[str] = []
    for part in _split_top_level(hostlist):
        if not part:
            raise ValueError(f"empty host name in hostlist {hostlist!r}")
        # Alternate literal text and bracket bodies: "r[1-2]-n[3]" -> ["r", "1-2", "-n", "3", ""].
        pieces = re.split(r"\[([^\]]*)\]", part)
        names = [""]
        for i, piece in enumerate(pieces):
            options = _expand_range_set(piece, hostlist) if i % 2 else [piece]
            names = [name + opt for name in names for opt in options]
        hosts.extend(names)
    return hosts


def expand_tasks_per_node(spec: str) -> list[int]:
    """SLURM's compressed per-node task counts: "2(x3),1" -> [2, 2, 2, 1]."""
    counts: list[int] = []
    for item in spec.split(","):
        match = _TASKS_ITEM.match(item.strip())
        if not match:
            raise ValueError(f"bad tasks-per-node item {item!r} in {spec!r}; expected N or N(xM)")
        counts.extend([int(match.group(1))] * int(match.group(2) or 1))
    return counts


def master_port(job_id: int) -> int:
    """Rendezvous port for a job: the same on every node and on every requeue of the job."""
    return PORT_BASE + job_id % PORT_SPAN


def _get(env: Mapping[str, str], *names: str) -> str:
    for name in names:
        if env.get(name):
            return env[name]
    raise KeyError(
        f"{' / '.join(names)} is not set: this is not a SLURM task. Start it with "
        "`srun python -m launch.slurm_env -- <command>` inside an allocation (see launch/train.sbatch)"
    )


def _get_int(env: Mapping[str, str], *names: str) -> int:
    value = _get(env, *names)
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{names[0]}={value!r} is not an integer") from None


def torch_env(env: Mapping[str, str]) -> dict[str, str]:
    """The torch.distributed variables for the SLURM task described by `env` (e.g. os.environ).

    Raises KeyError naming the missing SLURM variable outside `srun`, ValueError if the SLURM
    variables contradict each other."""
    rank = _get_int(env, "SLURM_PROCID")
    world = _get_int(env, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_NPROCS")
    local_rank = _get_int(env, "SLURM_LOCALID")
    node_rank = _get_int(env, "SLURM_NODEID")
    hosts = expand_hostlist(_get(env, "SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST"))
    tasks = expand_tasks_per_node(_get(env, "SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE"))
    job_id = _get_int(env, "SLURM_JOB_ID", "SLURM_JOBID")

    if len(tasks) != len(hosts):
        raise ValueError(f"{len(hosts)} hosts {hosts} but tasks-per-node lists {len(tasks)} nodes {tasks}")
    if sum(tasks) != world:
        raise ValueError(f"tasks per node {tasks} sum to {sum(tasks)}, but the step has {world} tasks")
    if not 0 <= rank < world:
        raise ValueError(f"SLURM_PROCID={rank} is outside [0, {world})")
    if not 0 <= node_rank < len(hosts):
        raise ValueError(f"SLURM_NODEID={node_rank} is outside the {len(hosts)} nodes {hosts}")
    if not 0 <= local_rank < tasks[node_rank]:
        raise ValueError(f"SLURM_LOCALID={local_rank} but node {node_rank} runs {tasks[node_rank]} tasks")

    port = env.get("DSMOE_MASTER_PORT") or str(master_port(job_id))
    return {
        "RANK": str(rank),
        "WORLD_SIZE": str(world),
        "LOCAL_RANK": str(local_rank),
        "LOCAL_WORLD_SIZE": str(tasks[node_rank]),
        "NODE_RANK": str(node_rank),
        "MASTER_ADDR": hosts[0],
        "MASTER_PORT": port,
    }


def main(argv: list[str]) -> int:
    """`python -m launch.slurm_env [-- command ...]`: exec the command with the torch vars set."""
    if argv and argv[0] == "--":
        argv = argv[1:]
    try:
        values = torch_env(os.environ)
    except (KeyError, ValueError) as err:
        print(f"launch.slurm_env: error: {err.args[0]}", file=sys.stderr)
        return 2
    if not argv:
        for key, value in values.items():
            print(f"export {key}={value}")
        return 0
    if values["RANK"] == "0":
        print(
            f"[slurm_env] world {values['WORLD_SIZE']} on {os.environ.get('SLURM_STEP_NUM_NODES', '?')} "
            f"node(s), master {values['MASTER_ADDR']}:{values['MASTER_PORT']}",
            file=sys.stderr,
            flush=True,
        )
    os.environ.update(values)
    os.execvp(argv[0], argv)  # replaces this process: signals from SLURM reach the trainer
    return 1  # unreachable


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
