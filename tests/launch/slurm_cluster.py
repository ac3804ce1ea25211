"""A throwaway one-node SLURM cluster on localhost for the launch tests.

Debian's slurm-wlm: munged, slurmctld and slurmd run in the foreground as children of the test
process, with keys, config, state, spool, sockets and logs in one temp directory, on free ports;
`stop()` cancels every job, waits for it to leave the node and kills the three daemons. Client
commands get the cluster through `SLURM_CONF` in `self.env` (never written to os.environ).
Everything runs as the current user (SlurmUser = SlurmdUser = you), so root is not required.

Install: `.ci/install_slurm.sh` (apt-get install slurm-wlm munge).
"""

from __future__ import annotations

import getpass
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from deepseek_moe.train.distributed import free_port

REPO = Path(__file__).resolve().parents[2]
REQUIRED = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel", "sinfo")
FINISHED_STATES = {
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
}  # fmt: skip


def missing_binaries() -> list[str]:
    """SLURM/munge programs not on PATH (nor in /usr/sbin, often not on a user's PATH)."""
    return [name for name in REQUIRED if shutil.which(name) is None and not Path("/usr/sbin", name).exists()]


def _which(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


def _die_with_parent() -> None:
    """preexec_fn: the kernel sends SIGTERM to the daemon when the test process dies, so a killed
    pytest does not leave a cluster behind (Linux prctl PR_SET_PDEATHSIG; no-op elsewhere)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except OSError:
        pass


class SlurmCluster:
    """`num_nodes` nodes on this machine (each with all its CPUs), one partition `debug`.

    One node is this host under its own name. Two nodes emulate a multi-node allocation with one
    slurmd per node (`slurmd -N <name>`, each on its own port): this host's name, which resolves
    (so MASTER_ADDR = the first node works as on a real cluster), then `<host>-n2`, which sorts
    after it in SLURM's node lists. Only the first node's name needs to resolve: it is the one
    every rank connects to."""

    def __init__(self, num_nodes: int = 1) -> None:
        if num_nodes not in (1, 2):
            raise ValueError(f"num_nodes={num_nodes}; this fixture emulates 1 or 2 nodes")
        self.num_nodes = num_nodes
        # munged insists that every directory above its socket is world-executable, which the
        # 0700 pytest temp root is not: use our own short directory (unix socket paths are short).
        self.root = Path(tempfile.mkdtemp(prefix="slurm-", dir="/tmp"))
        os.chmod(self.root, 0o755)
        self.user = getpass.getuser()
        self.procs: dict[str, subprocess.Popen] = {}
        self.nodes: list[str] = []
        self.env: dict[str, str] = {}

    # ---------------------------------------------------------------- lifecycle
    def start(self, timeout: float = 30.0) -> None:
        try:
            self._start_munge()
            self._write_conf()
            self.env = {
                k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))
            }
            self.env["SLURM_CONF"] = str(self.root / "slurm.conf")
            self._spawn("slurmctld", [_which("slurmctld"), "-D", "-c", "-f", str(self.root / "slurm.conf")])
            for node in self.nodes:
                self._spawn(
                    f"slurmd-{node}",
                    [_which("slurmd"), "-D", "-N", node, "-f", str(self.root / "slurm.conf")],
                )
            self._wait_idle(timeout)
        except BaseException:
            self.stop()
            raise

    def _spawn(self, name: str, cmd: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.stdout", "wb")
        # Own session: the daemons ignore the terminal's ^C; stop() signals them by pid.
        self.procs[name] = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=self.env or None,
            preexec_fn=_die_with_parent,
        )
        log.close()

    def _start_munge(self) -> None:
        key_dir = self.root / "munge"  # 0700: munged refuses a key others can read
        run_dir = self.root / "run"  # 0755: clients must reach the socket
        key_dir.mkdir(mode=0o700)
        run_dir.mkdir(mode=0o755)
        (self.root / "log").mkdir()
        key = key_dir / "munge.key"
        subprocess.run(
            [_which("mungekey"), "--create", "--keyfile", str(key)], check=True, capture_output=True
        )
        self.munge_socket = run_dir / "munge.socket"
        cmd = [
            _which("munged"), "--foreground", f"--key-file={key}", f"--socket={self.munge_socket}",
            f"--pid-file={run_dir / 'munged.pid'}", f"--log-file={key_dir / 'munged.log'}",
            f"--seed-file={key_dir / 'munged.seed'}",
        ]  # fmt: skip
        self._spawn("munged", cmd)
        deadline = time.monotonic() + 10
        while not self.munge_socket.exists():
            if self.procs["munged"].poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"munged did not start:\n{self.logs()}")
            time.sleep(0.05)

    @property
    def node(self) -> str:
        """The first node: MASTER_ADDR of a job that gets every node."""
        return self.nodes[0]

    def _node_lines(self) -> str:
        """Node definitions with this machine's hardware as slurmd sees it (`slurmd -C`), so the
        configured CPUs/sockets/cores match and no node is drained as invalid."""
        out = subprocess.run([_which("slurmd"), "-C"], check=True, capture_output=True, text=True).stdout
        line = next(l for l in out.splitlines() if l.startswith("NodeName="))
        fields = dict(item.split("=", 1) for item in line.split())
        host = fields["NodeName"]
        keep = ("CPUs", "Boards", "SocketsPerBoard", "CoresPerSocket", "ThreadsPerCore")
        hw = " ".join(f"{k}={fields[k]}" for k in keep if k in fields)
        self.nodes = [host] if self.num_nodes == 1 else [host, f"{host}-n2"]
        try:
            socket.getaddrinfo(host, None)
        except socket.gaierror:
            raise RuntimeError(
                f"this host's name {host!r} does not resolve, so no rank could reach MASTER_ADDR={host}: "
                f"add '127.0.0.1 {host}' to /etc/hosts"
            ) from None
        return "\n".join(
            f"NodeName={node} NodeAddr=127.0.0.1 Port={free_port()} {hw} RealMemory=1000 State=UNKNOWN"
            for node in self.nodes
        )

    def _write_conf(self) -> None:
        r = self.root
        (r / "state").mkdir()
        node_lines = self._node_lines()
        for node in self.nodes:
            (r / f"spool-{node}").mkdir()
        conf = f"""\
ClusterName=pytest
SlurmctldHost={self.nodes[0]}(127.0.0.1)
SlurmctldPort={free_port()}
SlurmUser={self.user}
SlurmdUser={self.user}
AuthType=auth/munge
CredType=cred/munge
# cred_expire also delays a requeued job's restart (default 120 s); 5 s is SLURM's minimum.
AuthInfo=socket={self.munge_socket},cred_expire=5
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool-%n
SlurmctldPidFile={r}/run/slurmctld.pid
SlurmdPidFile={r}/run/slurmd-%n.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
SwitchType=switch/none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
ReturnToService=2
JobRequeue=1
# Seconds between SIGTERM and SIGKILL: the trainer's time to checkpoint on cancel/requeue.
KillWait=10
MinJobAge=600
# Requeued jobs become eligible later: look at pending jobs every second, not every minute.
SchedulerParameters=sched_interval=1,bf_interval=1
{node_lines}
PartitionName=debug Nodes={",".join(self.nodes)} Default=YES MaxTime=INFINITE State=UP
"""
        (r / "slurm.conf").write_text(conf)

    def _wait_idle(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode}:\n{self.logs()}")
            res = self.run(["sinfo", "-h", "-N", "-o", "%N %T"], check=False)
            state = res.stdout.strip()
            if sorted(state.splitlines()) == sorted(f"{node} idle" for node in self.nodes):
                return
            time.sleep(0.2)
        raise RuntimeError(f"nodes {self.nodes} not idle after {timeout}s (sinfo: {state!r}):\n{self.logs()}")

    def stop(self) -> None:
        """Cancel all jobs, wait until they left the nodes, then stop the daemons."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            self.run(["scancel", "--user", self.user], check=False)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                res = self.run(["squeue", "-h", "-o", "%i"], check=False)
                if res.returncode != 0 or not res.stdout.strip():
                    break
                time.sleep(0.2)
        for name in [*(f"slurmd-{node}" for node in self.nodes), "slurmctld", "munged"]:
            proc = self.procs.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(self.root, ignore_errors=True)

    # ---------------------------------------------------------------- clients
    def run(self, cmd: list[str], check: bool = True, cwd: str | os.PathLike | None = None,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:  # fmt: skip
        full_env = dict(self.env)
        full_env.update(env or {})
        res = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=full_env, timeout=60)
        if check and res.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
        return res

    def sbatch(self, args: list[str], cwd: str | os.PathLike, env: dict[str, str] | None = None) -> int:
        res = self.run(["sbatch", "--parsable", *args], cwd=cwd, env=env)
        return int(res.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, StdOut, ...)."""
        out = self.run(["scontrol", "-o", "show", "job", str(job_id)]).stdout
        return dict(m.groups() for m in re.finditer(r"(\w+)=(\S*)", out))

    def wait_job(
        self, job_id: int, states: set[str], timeout: float, min_restarts: int = 0
    ) -> dict[str, str]:
        """Poll until the job is in one of `states` with Restarts >= min_restarts."""
        deadline = time.monotonic() + timeout
        info: dict[str, str] = {}
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info["JobState"] in states and int(info.get("Restarts", 0)) >= min_restarts:
                return info
            if info["JobState"] in FINISHED_STATES and info["JobState"] not in states:
                break
            time.sleep(0.25)
        raise AssertionError(
            f"job {job_id} did not reach {states} (restarts >= {min_restarts}) in {timeout}s; "
            f"state {info.get('JobState')} restarts {info.get('Restarts')}\n{self.job_log(info)}\n{self.logs()}"
        )

    @staticmethod
    def job_log(info: dict[str, str]) -> str:
        path = Path(info.get("StdOut", ""))
        return path.read_text(errors="replace") if path.is_file() else f"(no job log at {path})"

    def logs(self, tail: int = 30) -> str:
        parts = []
        for path in sorted((self.root / "log").glob("*")) + sorted((self.root / "munge").glob("*.log")):
            lines = path.read_text(errors="replace").splitlines()[-tail:]
            parts.append(f"--- {path.name}\n" + "\n".join(lines))
        return "\n".join(parts)


# ---------------------------------------------------------------- launch/train.sbatch jobs
def submit(cluster, repo, tmp_path, name, overrides, tasks=2, nodes=1, output="tmp"):
    """sbatch launch/train.sbatch from `repo`; runs under tmp_path/runs/<name>. Returns the job id.

    The job log goes to tmp_path (output="tmp") or, with output=None, where the script's own
    `#SBATCH --output` puts it (the submit directory, `repo`)."""
    env = {
        "DSMOE_RUN_ROOT": str(tmp_path / "runs"),
        # The job inherits this environment (sbatch --export=ALL): run it with this interpreter's
        # venv (launch/site.sh activates DSMOE_VENV), whichever venv pytest runs in.
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "DSMOE_VENV": sys.prefix,
    }
    args = [f"--job-name={name}", f"--nodes={nodes}", f"--ntasks-per-node={tasks}"]
    if output == "tmp":
        args.append(f"--output={tmp_path}/%x-%j.out")
    return cluster.sbatch([*args, "launch/train.sbatch", *overrides], cwd=repo, env=env)


def read_jsonl(path):
    """Records of a .jsonl file; [] if it does not exist."""
    return [json.loads(line) for line in Path(path).read_text().splitlines()] if Path(path).exists() else []


def wait_for_steps(cluster, job_id, metrics, n, timeout=60):
    """Wait until `metrics` has n complete lines (the job is running and past its n-th step)."""
    deadline = time.monotonic() + timeout
    while (Path(metrics).read_text().count("\n") if Path(metrics).exists() else 0) < n:
        info = cluster.job(job_id)
        assert time.monotonic() < deadline and info["JobState"] in ("PENDING", "RUNNING", "CONFIGURING"), (
            f"no step {n} in {metrics}: job {info['JobState']}\n{cluster.job_log(info)}"
        )
        time.sleep(0.2)
