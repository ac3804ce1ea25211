"""wandb from rank 0, never blocking: offline unless an API key is present.

The run lives under `<run_dir>/wandb/`. Its id is stored in every checkpoint, so a relaunch that
resumes the checkpoint also resumes the same wandb run (`resume="allow"`).
"""

from __future__ import annotations

import logging
import os
import secrets
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from deepseek_moe.config.train import LoggerConfig

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger("deepseek_moe.train")


def resolve_mode(cfg: LoggerConfig) -> str:
    """WANDB_MODE env wins; else cfg.mode; "auto" = online iff WANDB_API_KEY is set."""
    env = os.environ.get("WANDB_MODE")
    if env:
        return env
    if cfg.mode != "auto":
        return cfg.mode
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


class WandbLogger:
    """Thin wrapper; `run_id` is None for a fresh run (a new id is generated).

    wandb is a side channel: once a call fails (its service process died, e.g. because a
    launcher signalled the whole process tree on preemption) it is switched off with a warning,
    and training, checkpointing and metrics.jsonl carry on."""

    def __init__(
        self, cfg: LoggerConfig, run_dir: Path, config: dict[str, Any], run_id: Optional[str]
    ) -> None:
        import wandb  # imported lazily: logger=none runs never pay for it

        self.mode = resolve_mode(cfg)
        # secrets, not random: drawing from the seeded RNGs would change the training run
        self.run_id = run_id or secrets.token_hex(4)
        run_dir.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=cfg.project,
            entity=cfg.entity,
            name=cfg.name or run_dir.name,
            tags=list(cfg.tags),
            id=self.run_id,
            resume="allow",
            dir=str(run_dir),
            config=config,
            mode=self.mode,
            # console="off": do not wrap stdout (launchers and our progress lines own it);
            # no git/code scanning: the run directory may be anywhere.
            settings=wandb.Settings(
                console="off", silent=True, disable_git=True, save_code=False, init_timeout=120
            ),
        )

        self.run_path: Optional[str] = getattr(self.run, "dir", None)

    def log(self, record: dict[str, Any], step: int) -> None:
        if self.run is None:
            return
        try:
            self.run.log({k: v for k, v in record.items() if k != "step" and v is not None}, step=step)
        except Exception as err:  # noqa: BLE001 - never let the tracker stop training
            log.warning(
                "wandb.log failed (%s: %s); wandb is off for the rest of this launch, "
                "metrics.jsonl still has everything",
                type(err).__name__,
                err,
            )
            self.run = None

    def log_expert_loads(self, layers: list[int], counts_LE: Any, step: int) -> None:
        """A layer x expert heatmap of one logging interval's loads (load / fair share, 0 to
        2+, viridis; one row per MoE layer), as `moe/expert_loads`."""
        if self.run is None:
            return
        import wandb

        image = expert_load_image(counts_LE)
        caption = (
            f"rows: MoE layers {layers[0]}..{layers[-1]}; columns: experts; colour: load / fair share (0-2)"
        )
        self.log({"moe/expert_loads": wandb.Image(image, caption=caption)}, step=step)

    def alert(self, title: str, text: str) -> None:
        """A wandb alert (email/Slack per the user's wandb settings). Online runs only: an offline
        run has no service to send it; the alarm is in the log and metrics.jsonl either way."""
        if self.run is None or self.mode != "online":
            return
        try:
            import wandb

            self.run.alert(title=title, text=text, level=wandb.AlertLevel.WARN, wait_duration=0)
        except Exception as err:  # noqa: BLE001 - never let the tracker stop training
            log.warning("wandb.alert failed (%s: %s)", type(err).__name__, err)

    def finish(self) -> None:
        if self.run is None:
            return
        try:
            self.run.finish()
        except Exception as err:  # noqa: BLE001
            log.warning("wandb.finish failed (%s: %s)", type(err).__name__, err)
        self.run = None


def start_wandb(
    cfg: LoggerConfig, run_dir: Path, config: dict[str, Any], run_id: Optional[str]
) -> Optional[WandbLogger]:
    """The logger, or None with a warning when wandb cannot start: the tracker must not block
    training (metrics.jsonl is written either way)."""
    try:
        return WandbLogger(cfg, run_dir, config, run_id)
    except Exception as err:  # noqa: BLE001 - the tracker must not block training
        log.warning(
            "wandb.init failed (%s: %s); training without wandb (metrics.jsonl "
            "is still written; logger=none silences this)",
            type(err).__name__,
            err,
        )
        return None


def expert_load_image(counts_LE: Any, cell: int = 0) -> "np.ndarray":
    """uint8 RGB [L*c, E*c, 3]: each layer's loads over its fair share (mean), 0..2 on viridis,
    each value a c x c block (c chosen so the image is about 512 pixels wide)."""
    import numpy as np
    from matplotlib import colormaps

    counts = np.asarray(counts_LE, dtype=np.float64)
    mean = counts.mean(axis=1, keepdims=True)
    ratio = np.divide(counts, mean, out=np.zeros_like(counts), where=mean > 0)
    rgb = (colormaps["viridis"](np.clip(ratio / 2, 0, 1))[..., :3] * 255).astype(np.uint8)
    c = cell or max(1, min(32, 512 // counts.shape[1]))
    return rgb.repeat(c, axis=0).repeat(c, axis=1)
