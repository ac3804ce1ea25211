"""What an evaluation reads: a training checkpoint or a Hugging Face model directory, the config
it is evaluated under (with the command's `key=value` overrides) and its weights.

    src = open_source("runs/tiny", ["data.out_dir=data/other"])   # newest complete checkpoint
    src = open_source("hf/tiny", ["data.out_dir=data/python_stdlib"])
    src.run_cfg.model, src.run_cfg.data, src.step, src.train_world_size
    src.load_weights(model)     # any EP size: each rank keeps (HF dir: reads) only its experts

A checkpoint is evaluated under its run's `config.yaml` (model, data, seq_len, eval batches);
an HF directory under its own config.json's model and the default trainer settings with
`seq_len` = the model's context, and it has no data of its own (`data.out_dir=` is required).
Only the keys in `OVERRIDABLE` may be overridden: the model is what the weights say.
`data.out_dir=DIR` alone evaluates that directory, also for a run trained on a mixture.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from torch import nn

from deepseek_moe.config.train import RunConfig
from deepseek_moe.errors import EvaluateError, ExportError

OVERRIDABLE = ("data.", "trainer.seq_len", "trainer.micro_batch_size", "trainer.eval_batches")
"""Override keys (prefixes) an evaluation accepts."""
_SCHEMA_NODE = "_evaluate_source"
_MODEL_STATES = "mp_rank_00_model_states.pt"


@dataclass(kw_only=True)
class EvalSource:
    """A model to evaluate and the configuration it is evaluated under."""

    path: Path
    """The directory given (absolute)."""
    kind: str
    """"checkpoint" (a training checkpoint) or "hf" (a Hugging Face model directory)."""
    run_cfg: RunConfig
    """Model, data and trainer settings, overrides applied."""
    step: Optional[int] = None
    """The checkpoint's optimizer step (None for an HF directory)."""
    train_world_size: Optional[int] = None
    """Processes of the launch that wrote the checkpoint (its validation sample depends on it)."""
    export_source: Optional[object] = None
    """The checkpoint as `deepseek_moe.export.source.Source` (its weights reader)."""

    def load_weights(self, model: nn.Module) -> None:
        """Load the weights into `model` (built from `run_cfg.model`, at any EP size): a
        checkpoint's consolidated weights (fp32 masters where a bf16 run has them), or the HF
        directory's tensors, reading only this rank's routed experts."""
        from deepseek_moe.checkpoint.keys import load_consolidated_state_dict

        if self.kind == "checkpoint":
            from deepseek_moe.export.source import read_weights

            weights, _ = read_weights(self.export_source)
        else:
            from deepseek_moe.export.importer import init_weights
            from deepseek_moe.model.moe import MoELayer

            own = {
                m.layer_idx: range(m.local_expert_offset, m.local_expert_offset + m.num_local_experts)
                for m in model.modules()
                if isinstance(m, MoELayer)
            }
            try:
                weights = init_weights(self.path, self.run_cfg.model, own)
            except ExportError as err:
                raise EvaluateError(f"{self.path}: {err}") from err
        load_consolidated_state_dict(model, weights)


def open_source(path: str | Path, overrides: Sequence[str] = ()) -> EvalSource:
    """Resolve SOURCE (run directory, checkpoint tag directory or HF model directory) and compose
    its config with `overrides`; every problem is one EvaluateError/ConfigError line."""
    check_overrides(overrides)
    path = Path(path).expanduser().absolute()
    if not path.exists():
        raise EvaluateError(
            f"{path} does not exist; pass a run directory, a checkpoint (RUN/checkpoints/step_XXXXXXXX) "
            "or a Hugging Face model directory"
        )
    keys = {o.split("=", 1)[0].lstrip("+~") for o in overrides}
    if "data.out_dir" in keys and "data.sources" not in keys:
        overrides = [*overrides, "data.sources=[]"]  # one directory replaces a run's mixture
    if (path / "config.json").is_file() and not (path / _MODEL_STATES).is_file():
        return _hf_source(path, overrides, keys)
    return _checkpoint_source(path, overrides)


def check_overrides(overrides: Sequence[str]) -> None:
    for item in overrides:
        key = item.split("=", 1)[0].lstrip("+~")
        if "=" not in item or not any(
            key == k or (k.endswith(".") and key.startswith(k)) for k in OVERRIDABLE
        ):
            raise EvaluateError(
                f"cannot override {item!r}: evaluate takes key=value for {', '.join(k + '*' if k.endswith('.') else k for k in OVERRIDABLE)} "
                "(the model is the checkpoint's)"
            )


def _checkpoint_source(path: Path, overrides: Sequence[str]) -> EvalSource:
    from omegaconf import OmegaConf

    from deepseek_moe.checkpoint import files as ckpt
    from deepseek_moe.export.source import find_source

    try:
        src = find_source(path)
    except ExportError as err:
        raise EvaluateError(str(err).replace("export needs", "evaluate needs")) from err
    info = json.loads((src.tag_dir / ckpt.COMPLETE).read_text())
    node = OmegaConf.merge(OmegaConf.structured(RunConfig), OmegaConf.load(src.run_dir / "config.yaml"))
    return EvalSource(
        path=path,
        kind="checkpoint",
        run_cfg=_compose(node, overrides),
        step=int(info["step"]),
        train_world_size=info.get("world_size"),
        export_source=src,
    )


def _hf_source(path: Path, overrides: Sequence[str], keys: set[str]) -> EvalSource:
    from omegaconf import OmegaConf

    from deepseek_moe.config.model import ModelConfig, MoEConfig
    from deepseek_moe.config.train import TrainerConfig
    from deepseek_moe.export.importer import read_model_config

    if not keys & {"data.out_dir", "data.sources"}:
        raise EvaluateError(
            f"{path} is a Hugging Face model directory, which holds no data: pass the prepared "
            "data to evaluate on, e.g. data.out_dir=data/python_stdlib (prepared with the model's tokenizer)"
        )
    _, fields = read_model_config(path)
    moe = fields.pop("moe")
    model = ModelConfig(**fields, moe=None if moe is None else MoEConfig(**moe))
    node = OmegaConf.structured(RunConfig(model=model, trainer=TrainerConfig(seq_len=None)))
    return EvalSource(path=path, kind="hf", run_cfg=_compose(node, overrides))


def _compose(node, overrides: Sequence[str]) -> RunConfig:
    """`node` (a RunConfig DictConfig) with Hydra `overrides` (`data.sources.1.weight=0.5`
    works as in train.py), validated into a RunConfig."""
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from deepseek_moe.config.compose import compose, register
    from deepseek_moe.errors import config_error_from_hydra

    register(_SCHEMA_NODE, node)
    try:
        return OmegaConf.to_object(compose(_SCHEMA_NODE, overrides) if overrides else node)
    except (HydraException, OmegaConfBaseException, ValueError) as err:
        raise config_error_from_hydra(
            err,
            "evaluate takes data.* (DataConfig, deepseek_moe/config/data.py), trainer.seq_len, "
            "trainer.micro_batch_size and trainer.eval_batches",
        ) from None
