#!/usr/bin/env bash
# Install Debian/Ubuntu's SLURM (slurmctld, slurmd, client commands) and munge for the tests in
# tests/launch, which start a throwaway one-node cluster (tests/launch/slurm_cluster.py).
# Idempotent, non-interactive; needs root (or passwordless sudo). Called by .ci/run.
#
#   sudo .ci/install_slurm.sh
set -euo pipefail

needed=(slurmctld slurmd munged mungekey sbatch srun squeue scontrol scancel sinfo)
missing=()
for bin in "${needed[@]}"; do
    command -v "$bin" >/dev/null 2>&1 || [[ -x "/usr/sbin/$bin" ]] || missing+=("$bin")
done
if [[ ${#missing[@]} -eq 0 ]]; then
    echo "[install_slurm] slurm-wlm and munge already installed ($(/usr/sbin/slurmd -V 2>/dev/null || slurmd -V))"
    exit 0
fi
echo "[install_slurm] missing: ${missing[*]}; installing slurm-wlm munge"

if [[ "$(id -u)" -eq 0 ]]; then
    sudo=()
elif command -v sudo >/dev/null 2>&1; then
    sudo=(sudo -n)
else
    echo "[install_slurm] error: need root or sudo to apt-get install slurm-wlm munge" >&2
    exit 1
fi
"${sudo[@]}" apt-get update -q
"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge
echo "[install_slurm] installed $(/usr/sbin/slurmd -V)"
