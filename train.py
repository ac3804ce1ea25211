"""Train a DeepSeekMoE model: compose the Hydra config, validate it, run the trainer.

    python train.py                                  # tiny model, python_stdlib data, 1 process
    python train.py model=deepseek_moe_2b optim=deepseek_step trainer=deepseek_2b
    deepspeed --num_gpus 8 train.py model=deepseek_moe_2b optim=deepseek_step trainer=deepseek_2b
    deepspeed --num_gpus 8 train.py model=deepseek_moe_16b parallel.ep_size=8 trainer.micro_batch_size=1 \
        trainer.global_batch_size=512          # 64 experts, 8 per GPU (2B's 63 do not split by 8)
    torchrun --nproc_per_node 2 train.py parallel.ep_size=2
    sbatch launch/...                                # multi-node, see README "Multi-node on SLURM"
    python train.py --cfg job                        # print the composed config and exit

Relaunching the same command resumes from the newest intact checkpoint in `run_dir`.
A mistake in the config, the data or the checkpoints ends the run with one line on stderr and
exit status 1; `DSMOE_TRACEBACK=1 python train.py ...` shows the traceback instead.
"""

import sys

from deepseek_moe.train.distributed import strip_launcher_args

# The deepspeed launcher appends --local_rank=N; Hydra would reject it (LOCAL_RANK is in the env).
sys.argv = [sys.argv[0], *strip_launcher_args(sys.argv[1:])]

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from deepseek_moe.errors import report_user_errors  # noqa: E402
from deepseek_moe.train.cli import apply_cli_intent, register_schema, run_entry, to_run_config  # noqa: E402

register_schema()


def train(cfg: DictConfig) -> None:
    apply_cli_intent(cfg, list(HydraConfig.get().overrides.task))
    run_cfg = to_run_config(cfg)
    from deepseek_moe.train.distributed import shutdown_distributed
    from deepseek_moe.train.trainer import Trainer  # heavy imports after the config is valid

    Trainer(run_cfg).fit()
    shutdown_distributed()  # success only: after a failure the other ranks may never arrive


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    # Reported inside the job: an exception leaving it gets an extra line from Hydra.
    report_user_errors(train, cfg)


if __name__ == "__main__":
    run_entry(main)
