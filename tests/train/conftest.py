import pytest

from tests.train.helpers import tiny_data_overrides


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """Prepare a small python_stdlib corpus once per session; returns the data overrides."""
    from omegaconf import OmegaConf

    from deepseek_moe.config.data import DataConfig
    from data_prep.prepare import ensure_prepared

    overrides = tiny_data_overrides(tmp_path_factory.mktemp("data") / "stdlib_tiny")
    base = OmegaConf.structured(DataConfig)
    base.merge_with(OmegaConf.load(_conf("data/python_stdlib.yaml")))
    base.merge_with(OmegaConf.from_dotlist([o.removeprefix("data.") for o in overrides]))
    ensure_prepared(OmegaConf.to_object(base))
    return overrides


def _conf(rel):
    from tests.train.helpers import REPO

    return REPO / "conf" / rel
