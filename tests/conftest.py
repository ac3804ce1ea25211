"""Session-wide test setup, and the prepared tiny corpus that the training and checkpoint tests share."""

import glob
import os
import time

import pytest

_SHM_PATTERN = "/dev/shm/deepspeed_allreduce_buffer_*"
_session_start = time.time()


def pytest_sessionstart(session):
    """Build (or load) DeepSpeed's JIT-compiled shared-memory comm op once, in this process,
    before any test spawns ranks.

    On a CPU machine every `deepspeed.init_distributed` loads this op and compiles it with gcc
    the first time (20-80 s). When two freshly spawned ranks of a test race to compile it, one
    holds torch's build lock while the other waits; a rank killed by a test timeout during that
    window leaves a stale lock behind and every later DeepSpeed test then hangs (seen here).
    Compiling it up front, outside any timeout, keeps the tests' DeepSpeed start-up to a load.
    """
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() == "cpu":
        from deepspeed.comm.torch import build_shm_op

        build_shm_op()


def pytest_sessionfinish(session, exitstatus):
    """Remove the shared-memory buffers DeepSpeed's CPU all-reduce left in /dev/shm.

    DeepSpeed 0.19.8 creates one ~70 MB segment per rank and never unlinks it; the suite starts
    dozens of engines, and repeated runs filled this machine's 23 GB /dev/shm (RAM), after which
    everything crawled. Only segments created during this session are removed.
    """
    for path in glob.glob(_SHM_PATTERN):
        try:
            if os.path.getmtime(path) >= _session_start - 1:
                os.unlink(path)
        except OSError:
            pass


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """Prepare a small python_stdlib corpus once per session; returns the data overrides."""
    from omegaconf import OmegaConf

    from data_prep.prepare import ensure_prepared
    from deepseek_moe.config.data import DataConfig
    from tests.train.helpers import REPO, tiny_data_overrides

    overrides = tiny_data_overrides(tmp_path_factory.mktemp("data") / "stdlib_tiny")
    base = OmegaConf.structured(DataConfig)
    base.merge_with(OmegaConf.load(REPO / "conf" / "data" / "python_stdlib.yaml"))
    base.merge_with(OmegaConf.from_dotlist([o.removeprefix("data.") for o in overrides]))
    ensure_prepared(OmegaConf.to_object(base))
    return overrides
