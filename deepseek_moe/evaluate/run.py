"""`evaluate`: validation loss (and optionally routing statistics) of a checkpoint or an HF
model directory, in one process or several (any EP size); see the package docstring."""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from deepseek_moe.errors import ConfigError, EvaluateError
from deepseek_moe.evaluate.routing import RoutingCounts
from deepseek_moe.evaluate.sample import rank_batches, sample_windows, trainer_sample
from deepseek_moe.evaluate.source import EvalSource, open_source
from deepseek_moe.model.chunked_lm_loss import IGNORE_INDEX
from deepseek_moe.train.distributed import DistInfo, reduce_sum_, to_device
from deepseek_moe.train.rank_errors import on_all_ranks

PRECISIONS = ("auto", "fp32", "bf16")
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(kw_only=True)
class _Part:
    """One evaluated data set: the corpus, or one mixture source."""

    name: str
    weight: float
    tokens: Any  # PackedTokens of the split
    data_dir: Path
    sample: np.ndarray


def evaluate(
    source: str | os.PathLike,
    overrides: Sequence[str] = (),
    *,
    sequences: Optional[int] = None,
    all_windows: Optional[bool] = None,
    micro_batch_size: Optional[int] = None,
    split: str = "val",
    disable_top_experts: int = 0,
    routing_stats: bool = False,
    ep_size: int = 1,
    precision: str = "auto",
) -> dict[str, Any]:
    """Evaluate SOURCE and return the result dict (the same on every rank; the CLI prints it).

    `sequences` N: N windows spread over the split; `all_windows`: every window. Neither: a
    checkpoint's own validation sample (the trainer's val_loss at that step), an HF directory's
    whole split. `micro_batch_size`: sequences per forward and rank (default: the run's
    trainer.micro_batch_size). Under a multi-process launch every rank calls it."""
    start = time.perf_counter()
    if precision not in PRECISIONS:
        raise EvaluateError(f"precision={precision!r} must be one of {PRECISIONS}")
    if sequences is not None and all_windows:
        raise EvaluateError("pass either --sequences N or --all, not both")
    if sequences is not None and sequences < 1:
        raise EvaluateError(f"--sequences {sequences} must be >= 1")
    if micro_batch_size is not None and micro_batch_size < 1:
        raise EvaluateError(f"--micro-batch {micro_batch_size} must be >= 1")
    src = open_source(source, overrides)
    if all_windows is None:
        all_windows = sequences is None and src.kind == "hf"
    dist, owned = _distributed(src)
    try:
        result = _evaluate(
            src,
            dist,
            sequences=sequences,
            all_windows=all_windows,
            micro_batch_size=micro_batch_size or src.run_cfg.trainer.micro_batch_size,
            split=split,
            skip_top=disable_top_experts,
            routing_stats=routing_stats,
            ep_size=ep_size,
            precision=precision,
        )
    finally:
        if owned:
            from deepseek_moe.train.distributed import shutdown_distributed

            shutdown_distributed()
    result["seconds"] = round(time.perf_counter() - start, 3)
    return result


def _distributed(src: EvalSource) -> tuple[DistInfo, bool]:
    """(where this process sits, whether this call initialised the process group). A launcher's
    WORLD_SIZE > 1 initialises it (gloo on CPU, NCCL on GPUs); an existing group is used."""
    cuda = torch.cuda.is_available()
    if torch.distributed.is_initialized():
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        local = int(os.environ.get("LOCAL_RANK", rank))
        device = torch.device("cuda", local % torch.cuda.device_count()) if cuda else torch.device("cpu")
        return DistInfo(rank=rank, world_size=world, local_rank=local, device=device), False
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from deepseek_moe.train.distributed import init_distributed

        return init_distributed(src.run_cfg.parallel.process_group_timeout_min), True
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    return DistInfo(rank=0, world_size=1, local_rank=0, device=device), False


def _evaluate(
    src: EvalSource,
    dist: DistInfo,
    *,
    sequences: Optional[int],
    all_windows: bool,
    micro_batch_size: int,
    split: str,
    skip_top: int,
    routing_stats: bool,
    ep_size: int,
    precision: str,
) -> dict[str, Any]:
    cfg = src.run_cfg
    resolved = on_all_ranks(dist, _precision, precision, src, dist.device.type)
    parts = on_all_ranks(dist, _parts, src, split, sequences, all_windows)
    model = on_all_ranks(dist, _build_model, src, dist, ep_size, _DTYPES[resolved], skip_top)
    counts = RoutingCounts(model) if routing_stats and cfg.model.moe is not None else None
    losses, tokens = {}, {}
    for part in parts:
        losses[part.name], tokens[part.name] = _mean_loss(
            model, part, dist, micro_batch_size, cfg.seq_len, counts
        )
    mixture = len(parts) > 1 or bool(cfg.data.sources)
    val_loss = sum(p.weight * losses[p.name] for p in parts)
    result: dict[str, Any] = {
        "source": str(src.path),
        "kind": src.kind,
        "step": src.step,
        "split": split,
        "data": [str(p.data_dir) for p in parts],
        "sample": "all" if all_windows else "sequences" if sequences is not None else "trainer",
        "sequences": sum(len(p.sample) for p in parts),
        "tokens": sum(tokens.values()),
        "seq_len": cfg.seq_len,
        "val_loss": val_loss,
        "perplexity": math.exp(val_loss) if val_loss < 700 else math.inf,
    }
    if mixture:
        for p in parts:
            result[f"val_loss/{p.name}"] = losses[p.name]
        result["sources"] = [
            {
                "name": p.name,
                "data": str(p.data_dir),
                "weight": p.weight,
                "sequences": len(p.sample),
                "tokens": tokens[p.name],
                "val_loss": losses[p.name],
            }
            for p in parts
        ]
    result.update(
        disable_top_experts=skip_top,
        precision=resolved,
        world_size=dist.world_size,
        ep_size=ep_size,
        micro_batch_size=micro_batch_size,
        train_world_size=src.train_world_size,
    )
    if routing_stats:  # a dense model has no MoE layer: an empty list
        result["routing"] = counts.metrics(dist.device) if counts is not None else []
        if counts is not None:
            counts.remove()
    return result


def _precision(precision: str, src: EvalSource, device_type: str) -> str:
    """auto: the run's trainer.precision on this device (an HF directory: bf16 on CUDA, fp32
    elsewhere), like the trainer would resolve it here."""
    from deepseek_moe.train.precision import resolve_precision

    wanted = src.run_cfg.trainer.precision if precision == "auto" and src.kind == "checkpoint" else precision
    return resolve_precision(wanted, device_type)


def _parts(src: EvalSource, split: str, sequences: Optional[int], all_windows: bool) -> list[_Part]:
    """The data sets to evaluate (one, or a mixture's sources) and each one's window sample."""
    from deepseek_moe.data import check_model_vocab, load_meta
    from deepseek_moe.data.meta import resolve_out_dir
    from deepseek_moe.data.mixture import load_sources, normalized_weights
    from deepseek_moe.data.packed import PackedTokens

    cfg = src.run_cfg
    if cfg.data.sources:
        sources = load_sources(cfg.data.sources)
        weights = [float(w) for w in normalized_weights([s.weight for s in sources])]
        metas = [(s.name, w, s.meta) for s, w in zip(sources, weights)]
    else:
        metas = [("", 1.0, load_meta(resolve_out_dir(cfg.data)))]
    check_model_vocab(metas[0][2], cfg.model.vocab_size)
    parts = []
    for name, weight, meta in metas:
        if split not in ("train", "val"):
            raise EvaluateError(f"--split {split!r} must be 'train' or 'val'")
        tokens = PackedTokens(meta, split)
        n = tokens.num_windows(cfg.seq_len)
        where = f"{meta.dir} ({split}, {len(tokens)} tokens)"
        if n == 0:
            raise EvaluateError(
                f"{where} holds no window of seq_len+1={cfg.seq_len + 1} tokens; lower trainer.seq_len"
            )
        if all_windows:
            sample = np.arange(n, dtype=np.int64)
        elif sequences is not None:
            if sequences > n:
                raise EvaluateError(
                    f"--sequences {sequences} exceeds the {n} windows of seq_len+1={cfg.seq_len + 1} "
                    f"tokens in {where}; pass --all, or fewer"
                )
            sample = sample_windows(n, sequences)
        else:
            if src.train_world_size is None:
                raise EvaluateError(
                    f"{src.path}: the checkpoint does not record the world size of its run, so the "
                    "trainer's validation sample is unknown; pass --sequences N or --all"
                )
            sample = trainer_sample(
                n,
                micro_batch_size=cfg.trainer.micro_batch_size,
                world_size=src.train_world_size,
                eval_batches=cfg.trainer.eval_batches,
            )
        parts.append(_Part(name=name, weight=weight, tokens=tokens, data_dir=meta.dir, sample=sample))
    return parts


def _build_model(src: EvalSource, dist: DistInfo, ep_size: int, dtype: torch.dtype, skip_top: int):
    """The model at EP `ep_size` with this rank's experts only, weights loaded, in eval mode
    (no token dropping, no router noise), on the device in `dtype`."""
    from deepseek_moe.config.parallel import validate_ep_size
    from deepseek_moe.model.transformer import DeepSeekMoEForCausalLM

    cfg = src.run_cfg
    try:
        validate_ep_size(ep_size, dist.world_size, cfg.model.moe)
    except ConfigError as err:
        raise ConfigError(f"--ep-size {ep_size}: {err}") from None
    ep = dict(ep_rank=dist.rank % ep_size, ep_size=ep_size) if ep_size > 1 else {}
    with torch.device("meta"):  # only this rank's experts are ever materialised
        model = DeepSeekMoEForCausalLM(cfg.model, loss_chunk_tokens=cfg.trainer.loss_chunk_tokens, **ep)
    model.to_empty(device="cpu")
    model.init_weights()  # the buffers the weights do not hold (RoPE tables, statistics)
    if ep_size > 1:
        from deepseek_moe.parallel.expert_parallel import parallelize_moe

        model = parallelize_moe(model, ep_size)
    try:
        model.disable_top_experts(skip_top)
    except ValueError as err:
        raise EvaluateError(f"--disable-top-experts: {err}") from None
    src.load_weights(model)
    return model.to(device=dist.device, dtype=dtype).eval()


@torch.no_grad()
def _mean_loss(
    model, part: _Part, dist: DistInfo, micro_batch_size: int, seq_len: int, counts: Optional[RoutingCounts]
) -> tuple[float, int]:
    """(token-weighted mean LM loss over the part's sample, tokens), over all ranks: each batch's
    mean loss times its counted tokens, summed, all-reduced with the token count, divided."""
    device = dist.device
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    tokens = 0
    for ids, valid in rank_batches(
        part.sample, micro_batch_size=micro_batch_size, rank=dist.rank, world_size=dist.world_size
    ):
        windows = torch.from_numpy(part.tokens.windows(ids, seq_len))
        inputs, labels = windows[:, :-1].contiguous(), windows[:, 1:].contiguous()
        labels[valid:] = IGNORE_INDEX  # padding rows (all rows of a dummy batch) do not count
        if counts is not None:
            counts.valid_tokens = valid * seq_len
        out = model(to_device(inputs, device), to_device(labels, device))
        loss_sum += out.lm_loss.double() * (valid * seq_len)
        tokens += valid * seq_len
    total = torch.stack([loss_sum, torch.full((), float(tokens), dtype=torch.float64, device=device)])
    reduce_sum_([total])
    loss, count = total.tolist()
    return loss / count, int(count)  # count > 0: every sample holds at least one window
