"""Launch `train.py` as a subprocess with a tiny model, for the end-to-end tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from deepseek_moe.train.distributed import free_port

REPO = Path(__file__).resolve().parents[2]

# A tiny DeepSeekMoE (first layer dense, shared + 4 routed experts, top-2, 2 groups, M=1) on 64-token
# sequences: one optimizer step takes well under a second on one core.
TINY = [
    "model.num_layers=2",
    "model.hidden_size=64",
    "model.num_heads=2",
    "model.num_kv_heads=2",
    "model.head_dim=32",
    "model.intermediate_size=128",
    "model.max_seq_len=64",
    "model.moe.n_routed_experts=4",
    "model.moe.top_k=2",
    "model.moe.moe_intermediate_size=32",
    "model.moe.n_groups=2",
    "model.moe.topk_groups=1",
    "trainer.seq_len=64",
    "trainer.global_batch_size=8",
    "trainer.micro_batch_size=4",
    "trainer.eval_batches=1",
    "trainer.log_every=1",
    "optim.lr=3e-3",
    "optim.warmup_steps=2",
]


def compose_config(overrides: list[str]):
    """conf/config.yaml with `overrides`, as train.py composes it (a DictConfig)."""
    from deepseek_moe.config.compose import compose
    from deepseek_moe.train.cli import register_schema

    register_schema()
    return compose("config", overrides)


def tiny_data_overrides(out_dir: Path) -> list[str]:
    """A small python_stdlib preparation (the same overrides make ensure_prepared a no-op)."""
    return [
        f"data.out_dir={out_dir}",
        "data.max_documents=40",
        "data.vocab_size=512",
        "data.val_fraction=0.1",
        "data.tokenizer_sentences=20000",
        "data.num_proc=1",
    ]


def train_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        WANDB_MODE="offline",
        WANDB_SILENT="true",
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
        HYDRA_FULL_ERROR="1",
        CI="true",
    )
    env.pop("WANDB_API_KEY", None)
    return env


def command(nproc: int, launcher: str = "deepspeed") -> list[str]:
    if nproc == 1 and launcher == "python":
        return [sys.executable, "train.py"]
    if launcher == "deepspeed":
        return [
            sys.executable,
            "-m",
            "deepspeed.launcher.runner",
            "--num_gpus",
            str(nproc),
            "--master_port",
            str(free_port()),
            "train.py",
        ]
    if launcher == "torchrun":
        return [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(nproc),
            "--master_port",
            str(free_port()),
            "train.py",
        ]
    raise ValueError(launcher)


def run_train(
    overrides: list[str],
    *,
    nproc: int = 1,
    launcher: str = "python",
    timeout: float = 240,
    check: bool = True,
) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        command(nproc, launcher) + overrides,
        cwd=REPO,
        env=train_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"train.py exited {proc.returncode}\n--- stdout\n{proc.stdout[-6000:]}"
            f"\n--- stderr\n{proc.stderr[-6000:]}"
        )
    return proc


def wandb_offline_records(path: Path):
    """Records of an offline `run-<id>.wandb` file (wandb 0.31 has no public reader).

    The file is ":W&B" + magic + version (7 bytes), then LevelDB-log records (4-byte CRC,
    2-byte little-endian length, 1-byte type: 1 full, 2 first, 3 middle, 4 last) in 32 KiB
    blocks, each payload a `wandb_internal_pb2.Record` protobuf."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a wandb run file"
    pos, block, buf = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # block trailer padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 0:
            continue
        buf += chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buf)
            buf = b""
            yield record
