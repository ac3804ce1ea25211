"""A Hugging Face model directory on disk: sharded safetensors with an index, JSON configs.

with staged_dir(out, force=False) as tmp:     # written into a temp dir next to `out`,
    write_safetensors(tmp, tensors)            # renamed to `out` only if all succeeded
    write_json(tmp / "config.json", {...})
tensors = read_safetensors(out)                # every tensor, from the index or one file
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch

from deepseek_moe.atomic import replace_dir
from deepseek_moe.errors import ExportError

INDEX_FILE = "model.safetensors.index.json"
MAX_SHARD_BYTES = 5 * 2**30
"""Shard size limit (the transformers default for `save_pretrained`)."""


@contextlib.contextmanager
def staged_dir(out: Path, *, force: bool) -> Iterator[Path]:
    """Yield a fresh temp directory beside `out`; on success it replaces `out`.

    An existing non-empty `out` is an error unless `force`; then it is moved aside, the new
    directory renamed in, and the old one deleted, so `out` is never half written."""
    out = Path(out).absolute()
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise ExportError(
            f"--out {out} exists and is not empty; choose another directory or pass --force to replace it"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: Path, obj: dict[str, Any]) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_safetensors(
    out: Path, tensors: dict[str, torch.Tensor], max_shard_bytes: int = MAX_SHARD_BYTES
) -> list[str]:
    """`model-0000i-of-0000n.safetensors` shards (in key order) and their index; returns the
    shard names. Tied or sliced tensors are written as independent contiguous copies."""
    from safetensors.torch import save_file

    shards: list[list[str]] = [[]]
    size = 0
    for key in sorted(tensors):
        nbytes = tensors[key].numel() * tensors[key].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, keys in zip(names, shards):
        # copies one shard at a time: safetensors refuses tensors that share storage
        shard = {k: tensors[k].detach().cpu().contiguous().clone() for k in keys}
        save_file(shard, str(out / name), metadata={"format": "pt"})
        os.chmod(out / name, 0o666 & ~_umask())  # safetensors creates files owner-only
        weight_map.update({k: name for k in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    write_json(out / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": weight_map})
    return names


def read_safetensors(
    model_dir: Path, keep: Optional[Callable[[str], bool]] = None
) -> dict[str, torch.Tensor]:
    """The tensors of a model directory (sharded with an index, or one model.safetensors) whose
    names pass `keep` (default all); the others are never read from disk."""
    from safetensors import safe_open

    index = model_dir / INDEX_FILE
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (model_dir / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise ExportError(
            f"{model_dir} has neither {INDEX_FILE} nor model.safetensors; point "
            "model.init_from at a Hugging Face model directory with safetensors "
            "weights"
        )
    out: dict[str, torch.Tensor] = {}
    for name in files:
        with safe_open(str(model_dir / name), framework="pt") as f:
            for key in f.keys():
                if keep is None or keep(key):
                    out[key] = f.get_tensor(key)
    return out


def read_config(model_dir: Path) -> dict[str, Any]:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise ExportError(
            f"{path} not found: model.init_from must be a Hugging Face model "
            "directory (config.json + safetensors)"
        )
    return json.loads(path.read_text())
