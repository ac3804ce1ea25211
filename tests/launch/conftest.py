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


@pytest.fixture(scope="session")
def slurm_cluster():
    missing = missing_binaries()
    if missing:
        _unavailable(f"SLURM binaries not found: {', '.join(missing)}")
    cluster = SlurmCluster()
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()
