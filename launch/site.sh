# shellcheck shell=bash
# =====================================================================================
#  SITE CONFIGURATION: the one file to edit for your cluster.
# =====================================================================================
# Sourced by launch/train.sbatch (on the first node of the allocation, from the repository
# root, with $REPO set) right before `srun` starts the training tasks; srun hands the
# environment set here to every task on every node.
#
# Partition, account, QOS and wall time are sbatch options: the scheduler reads them before
# this file runs, so they cannot live here. Pass them on the command line
# (`sbatch --partition=gpu --account=myproj --time=24:00:00 launch/train.sbatch ...`) or export
# them once in your shell profile, which sbatch reads as defaults:
#     export SBATCH_PARTITION=gpu SBATCH_ACCOUNT=myproj SBATCH_TIMELIMIT=24:00:00
# -------------------------------------------------------------------------------------

# --- 1. Modules --------------------------------------------------------------------------
# module purge
# module load cuda/12.4 nccl/2.21 gcc/12

# --- 2. Python environment -----------------------------------------------------------------
# The repository's venv (or set DSMOE_VENV to another one). Skipped when it does not exist,
# e.g. when the environment active at submission time (exported by sbatch) is the right one.
DSMOE_VENV="${DSMOE_VENV:-$REPO/.venv}"
if [[ -f "$DSMOE_VENV/bin/activate" ]]; then
    # shellcheck disable=SC1091
    source "$DSMOE_VENV/bin/activate"
fi
# conda activate deepseek-moe

# --- 3. Network / NCCL ---------------------------------------------------------------------
# export NCCL_SOCKET_IFNAME=ib0          # interface for NCCL's bootstrap and socket transport
# export NCCL_IB_HCA=mlx5                # InfiniBand adapters to use
# export NCCL_DEBUG=WARN                 # INFO when debugging hangs or slow all-to-alls
# A failed or timed-out NCCL collective tears the process down (then --kill-on-bad-exit ends the
# step) instead of blocking the job until its time limit; torchrun sets the same for its workers.
export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"

# --- 4. Threads ----------------------------------------------------------------------------
# One intra-op thread per allocated CPU; without this every task starts one thread per core of
# the node and the tasks oversubscribe it.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"

# --- 5. Where runs live --------------------------------------------------------------------
# Each job's run directory is $DSMOE_RUN_ROOT/<job name>; requeues of the job share it.
# Point this at a shared filesystem that every node sees (checkpoints are written there).
DSMOE_RUN_ROOT="${DSMOE_RUN_ROOT:-$REPO/runs}"
