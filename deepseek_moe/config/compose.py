"""The one way a config is composed from conf/: Hydra's compose API over the repository's conf/
directory, onto a registered dataclass schema. `train.py` gets the same result through
`@hydra.main` (it needs Hydra's command line); every other entry point and the tests call
`compose` here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from omegaconf import DictConfig

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
"""The Hydra config tree: config.yaml (training), prepare.yaml (data preparation), groups."""


def register(name: str, node, group: str | None = None) -> None:
    """Make `node` (a dataclass schema, or a loaded yaml) known to Hydra as `group/name`."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name=name, node=node, group=group)


def compose(config_name: str, overrides: Sequence[str] = ()) -> DictConfig:
    """conf/<config_name>.yaml with Hydra `overrides` (`group=preset`, `key=value`), composed
    like the entry points compose it. Raises Hydra's errors (ConfigCompositionException)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=list(overrides))
