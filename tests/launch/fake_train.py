"""Stand-in for train.py with the same launch contract, for testing launch/train.sbatch alone.

Contract (what the real trainer does too): reads RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/
MASTER_PORT, joins one gloo process group, resumes from the last checkpoint in `run_dir`,
appends one line per step to `<run_dir>/metrics.jsonl` (rank 0), and on SIGUSR1/SIGTERM finishes
the current step, checkpoints and exits 0. Overrides: run_dir=, trainer.max_steps=, step_seconds=,
fail_rank= (that rank exits 3 at step 2 while the others hang, to test
--kill-on-bad-exit), startup_seconds= (sleep before installing the signal handlers).
"""

import json
import os
import signal
import sys
import time

import torch
import torch.distributed as dist


def main(argv: list[str]) -> int:
    args = dict(arg.split("=", 1) for arg in argv)
    run_dir = args["run_dir"]
    max_steps = int(args.get("trainer.max_steps", "6"))
    step_seconds = float(args.get("step_seconds", "0.5"))
    fail_rank = int(args.get("fail_rank", "-1"))

    startup_seconds = float(args.get("startup_seconds", "0"))

    # A slow start (imports, data, engine) before the handlers exist: a signal now kills us.
    os.makedirs(run_dir, exist_ok=True)
    open(os.path.join(run_dir, f"starting_rank{os.environ['RANK']}"), "a").close()
    time.sleep(startup_seconds)

    stop = {"signal": None}

    def on_signal(signum, frame):
        stop["signal"] = signal.Signals(signum).name

    signal.signal(signal.SIGUSR1, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    dist.init_process_group("gloo", init_method="env://")
    rank, world = dist.get_rank(), dist.get_world_size()
    os.makedirs(run_dir, exist_ok=True)
    ckpt = os.path.join(run_dir, "checkpoint.json")
    step = json.load(open(ckpt))["step"] if os.path.exists(ckpt) else 0
    with open(os.path.join(run_dir, f"launch_rank{rank}.jsonl"), "a") as f:
        keys = (
            "RANK",
            "WORLD_SIZE",
            "LOCAL_RANK",
            "LOCAL_WORLD_SIZE",
            "NODE_RANK",
            "MASTER_ADDR",
            "MASTER_PORT",
        )
        env = {k: os.environ[k] for k in keys}
        env["node"] = os.environ["SLURMD_NODENAME"]  # where SLURM placed this task
        f.write(json.dumps({"resume_step": step, "job": os.environ["SLURM_JOB_ID"], "env": env}) + "\n")

    while step < max_steps:
        time.sleep(step_seconds)  # "compute"
        if fail_rank >= 0 and step == 2:
            if rank == fail_rank:
                print(f"rank {rank} failing on purpose", flush=True)
                return 3
            time.sleep(600)  # the others hang as if in a collective: only srun can end them
        ranks_sum = torch.tensor([float(rank)])
        dist.all_reduce(ranks_sum)  # proves every rank joined one group
        step += 1
        if rank == 0:
            with open(os.path.join(run_dir, "metrics.jsonl"), "a") as f:
                f.write(json.dumps({"step": step, "world_size": world, "ranks_sum": ranks_sum.item()}) + "\n")
        flag = torch.tensor([1 if stop["signal"] else 0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # stop together, even if one rank saw it
        if flag.item():
            break
    if rank == 0:
        tmp = ckpt + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"step": step}, f)
        os.replace(tmp, ckpt)
        print(f"checkpoint at step {step} ({stop['signal'] or 'finished'})", flush=True)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
