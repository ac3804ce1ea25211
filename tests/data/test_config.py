"""DataConfig checks (deepseek_moe/config/data.py): bad values name the key and the fix."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from deepseek_moe.config.data import STDLIB_EXCLUDE_DIRS, DataConfig, MixtureSource


def test_defaults_are_the_stdlib_preset_and_structured_config_compatible():
    cfg = DataConfig()
    assert cfg.source == "python_stdlib" and cfg.excluded_dirs() == STDLIB_EXCLUDE_DIRS
    assert DataConfig(source="local_text", path="x").excluded_dirs() == []
    node = OmegaConf.merge(OmegaConf.structured(DataConfig), {"vocab_size": 1024})
    assert OmegaConf.to_object(node) == DataConfig(vocab_size=1024)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(source="txt"), r"data.source='txt' is not one of"),
        (dict(path="/x"), r"python_stdlib reads the interpreter's stdlib.*unset data.path"),
        (dict(source="parquet"), r"data.source=parquet needs data.path"),
        (dict(val_fraction=0.0), r"data.val_fraction=0.0 must be in \(0, 1\)"),
        (dict(vocab_size=200), r"data.vocab_size=200 must be in \[261, "),
        (dict(max_documents=1), r"data.max_documents=1 must be >= 2"),
        (dict(num_proc=0), r"data.num_proc=0 must be >= 1"),
        (dict(name="a/b"), r"data.name='a/b'"),
        (dict(sources=[MixtureSource(out_dir="d/a", weight=0)]), r"data.sources\[0\].weight=0 must be > 0"),
        (
            dict(sources=[MixtureSource(out_dir="a"), MixtureSource(out_dir="b", max_repetitions=-1)]),
            r"data.sources\[1\].max_repetitions=-1 must be > 0",
        ),
        (
            dict(sources=[MixtureSource(out_dir="x/web"), MixtureSource(out_dir="y/web/")]),
            r"several sources named \['web'\]; give each a distinct data.sources\[i\].name",
        ),
    ],
)
def test_bad_values_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DataConfig(**kwargs)
