"""Hydra glue for `train.py`: the structured schema, DictConfig -> RunConfig, and the entry
wrapper that turns every user error (Hydra's composition errors included) into one line."""

from __future__ import annotations

import dataclasses
import os
import sys
import typing
from typing import Callable

from omegaconf import DictConfig, OmegaConf

from deepseek_moe.config.compose import register
from deepseek_moe.config.train import RunConfig
from deepseek_moe.errors import ConfigError, config_error_from_hydra, report_user_errors, traceback_requested
from deepseek_moe.train.distributed import main_print

SCHEMA_NAME = "run_schema"


def register_schema() -> None:
    """Make `run_schema` (the RunConfig dataclass) available to `conf/config.yaml`'s defaults.

    Composing YAML onto it gives struct mode (unknown keys fail) and type checks (a string for an
    int fails) at composition time, before anything is built."""
    register(SCHEMA_NAME, RunConfig)


def apply_cli_intent(cfg: DictConfig, task_overrides: list[str]) -> None:
    """Command-line choices that the schema cannot see:
    - an explicit `model.vocab_size=N` means "use N", not "follow the tokenizer" (unless
      vocab_from_tokenizer is also given);
    - a run shorter than the warmup it did not ask for (`python train.py trainer.max_steps=6`,
      a smoke test, with the default or a preset's optim.warmup_steps) warms up over all but
      its last step, with one warning. A warmup set on the command line is taken as meant: if
      it does not fit, RunConfig's check reports it."""
    keys = {o.split("=", 1)[0].lstrip("+~") for o in task_overrides}
    if "model.vocab_size" in keys and "vocab_from_tokenizer" not in keys:
        cfg.vocab_from_tokenizer = False
    optim = cfg.optim
    decay = optim.decay_steps if optim.decay_steps is not None else cfg.trainer.max_steps
    if (
        "optim.warmup_steps" not in keys
        and optim.schedule != "constant"
        and isinstance(decay, int)
        and decay >= 1
        and optim.warmup_steps >= decay
    ):
        main_print(
            f"Warning: optim.warmup_steps={optim.warmup_steps} does not fit a schedule of "
            f"{decay} steps; warming up over {decay - 1} instead (set optim.warmup_steps "
            "to choose)",
            file=sys.stderr,
        )
        optim.warmup_steps = decay - 1


def _dataclass_of(tp) -> type | None:
    """The dataclass in `tp` (also inside Optional[...]), else None."""
    if dataclasses.is_dataclass(tp):
        return tp
    for arg in typing.get_args(tp):
        if dataclasses.is_dataclass(arg):
            return arg
    return None


def unknown_keys(cfg: DictConfig, schema: type, prefix: str = "") -> list[str]:
    """Keys of `cfg` that `schema` does not declare, dotted. Hydra's `+key=value` bypasses struct
    mode and OmegaConf.to_object drops such keys silently: a typo must not pass unnoticed."""
    hints = typing.get_type_hints(schema)
    names = {f.name for f in dataclasses.fields(schema)}
    bad = []
    for key in cfg.keys():
        dotted = f"{prefix}{key}"
        if key not in names:
            bad.append(dotted)
            continue
        sub_schema = _dataclass_of(hints[key])
        if sub_schema is None or OmegaConf.is_missing(cfg, key):
            continue
        value = cfg[key]  # a nested config, or None (e.g. model.moe: null)
        if isinstance(value, DictConfig):
            bad.extend(unknown_keys(value, sub_schema, f"{dotted}."))
    return bad


def to_run_config(cfg: DictConfig) -> RunConfig:
    """Validate into our dataclasses; a bad value raises ConfigError with the check's message."""
    bad = unknown_keys(cfg, RunConfig)
    if bad:
        raise ConfigError(
            f"unknown key(s) {bad}; check the spelling against "
            "`python train.py --cfg job` (the schema is deepseek_moe/config/*.py)"
        )
    try:
        run_cfg = OmegaConf.to_object(cfg)
    except Exception as err:  # noqa: BLE001 - OmegaConf wraps __post_init__ errors
        cause = err
        while cause.__cause__ is not None or cause.__context__ is not None:
            nxt = cause.__cause__ or cause.__context__
            if isinstance(cause, ValueError) and not type(cause).__module__.startswith("omegaconf"):
                break
            cause = nxt
        if traceback_requested():
            raise
        raise ConfigError(str(cause)) from None
    assert isinstance(run_cfg, RunConfig)
    return run_cfg


def run_entry(main: Callable[[], None]) -> None:
    """Run a `@hydra.main` function so that a user error ends it with one line on stderr.

    HYDRA_FULL_ERROR=1 makes Hydra re-raise instead of printing its multi-line report, so the
    composition errors reach us and are reported like every other config error."""
    from hydra.errors import HydraException

    os.environ["HYDRA_FULL_ERROR"] = "1"

    def composed() -> None:
        try:
            main()
        except HydraException as err:
            if traceback_requested():
                raise
            raise config_error_from_hydra(
                err, "`python train.py --cfg job` prints every key with its value"
            ) from None

    report_user_errors(composed)
