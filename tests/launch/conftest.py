"""Session fixture: a real one-node SLURM cluster (see slurm_cluster.py).

Without slurm-wlm/munge installed the SLURM tests skip locally but FAIL in CI (CI=true), where
`.ci/install_slurm.sh` installs them: a CI run must never pass without exercising SLURM.
"""

from __future__ import annotations

import os

import pytest

from tests.launch.slurm_cluster import SlurmCluster, missing_binaries


def _unavailable(reason: str) -> None:
    message = f"{reason}; install with `sudo .ci/install_slurm.sh` (apt-get install slurm-wlm munge)"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"SLURM tests cannot run in CI: {message}", pytrace=False)
    pytest.skip(message)


def _cluster(num_nodes: int):
    missing = missing_binaries()
    if missing:
        _unavailable(f"SLURM binaries not found: {', '.join(missing)}")
    cluster = SlurmCluster(num_nodes)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def slurm_cluster():
    """One node: this machine."""
    yield from _cluster(1)


@pytest.fixture(scope="module")
def slurm_cluster_2nodes():
    """Two emulated nodes on this machine (one slurmd each), for a multi-node allocation."""
    yield from _cluster(2)
