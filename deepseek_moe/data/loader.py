"""Deterministic, resumable micro-batch loaders over a prepared data directory.

Trainer API:

    meta = ensure_prepared(cfg.data)                 # data_prep.prepare; rank 0 first
    train = build_train_loader(meta, seq_len=S, global_batch_size=G, micro_batch_size=B,
                               dp_rank=r, dp_world=W, seed=cfg.seed)
    for step in range(max_steps):
        for _ in range(train.accum_steps):           # = G // (B * W)
            batch = next(train)                      # {"input_ids": [B,S], "labels": [B,S]}
        ...
    ckpt["data"] = train.state_dict()                # after the step; load_state_dict resumes
    for batch in build_eval_loader(meta, seq_len=S, micro_batch_size=B, dp_rank=r,
                                   dp_world=W, num_batches=n):   # same n batches every time
        ...

Order: epoch e is a seeded pseudo-random permutation `order(e, .)` of the train windows (see
`packed.py`), computed per position (`order.py`: no per-rank array of every window); global
batch j of the epoch is order(e, [j*G, (j+1)*G)) (the incomplete last batch is dropped). Rank r takes the contiguous slice [r*G/W, (r+1)*G/W) of it and yields it as
accum_steps micro-batches of B windows, in order. So the set of windows in every global batch
depends only on (data, seed, S, G), never on W, B or the EP layout. `labels` are the inputs
shifted by one (never -100: packing has no padding).
"""

from __future__ import annotations

import os
from typing import Any, Iterator, Optional, Union

import numpy as np
import torch

from deepseek_moe.data.meta import DataMeta, load_meta, resolve_out_dir
from deepseek_moe.data.order import WindowOrder
from deepseek_moe.data.packed import PackedTokens
from deepseek_moe.errors import DataError

STATE_VERSION = 2
# 1: the order was a shuffled arange of every window (np.random), 2: `WindowOrder`.


def _as_meta(data: Union[DataMeta, str, os.PathLike, Any]) -> DataMeta:
    """Accept a DataMeta, a prepared directory, or a DataConfig (reads its out_dir)."""
    if isinstance(data, DataMeta):
        return data
    if isinstance(data, (str, os.PathLike)):
        return load_meta(data)
    return load_meta(resolve_out_dir(data))


def _to_batch(windows_BW: np.ndarray) -> dict[str, torch.Tensor]:
    w = torch.from_numpy(windows_BW)
    return {"input_ids": w[:, :-1].contiguous(), "labels": w[:, 1:].contiguous()}


def _check_rank(dp_rank: int, dp_world: int) -> None:
    if dp_world < 1 or not 0 <= dp_rank < dp_world:
        raise ValueError(f"dp_rank={dp_rank} must be in [0, dp_world={dp_world})")


def accum_steps_of(
    *, seq_len: int, global_batch_size: int, micro_batch_size: int, dp_rank: int, dp_world: int
) -> int:
    """Micro-batches per optimizer step of a training loader, after checking the layout."""
    _check_rank(dp_rank, dp_world)
    if seq_len < 1 or micro_batch_size < 1 or global_batch_size < 1:
        raise ValueError(
            f"seq_len={seq_len}, micro_batch_size={micro_batch_size} and "
            f"global_batch_size={global_batch_size} must all be >= 1"
        )
    if global_batch_size % (micro_batch_size * dp_world):
        raise ValueError(
            f"global_batch_size={global_batch_size} must be a multiple of "
            f"micro_batch_size * dp_world = {micro_batch_size} * {dp_world}; "
            "change one of them"
        )
    return global_batch_size // (micro_batch_size * dp_world)


def check_same_order(state: dict[str, Any], loader: Any) -> None:
    """A saved loader position resumes `loader` only with the same seed, sequence length and
    global batch (else the data order changes), and a position saved in the middle of a
    gradient accumulation only with the same micro batch and world (DataError otherwise)."""
    for key in ("seed", "seq_len", "global_batch_size"):
        if state[key] != getattr(loader, key):
            raise DataError(
                f"loader state has {key}={state[key]} but this run uses {getattr(loader, key)}; "
                f"resuming would change the data order. Use {key}={state[key]} or start a new run"
            )
    if state["micro_step"] and (state["micro_batch_size"], state["dp_world"]) != (
        loader.micro_batch_size,
        loader.dp_world,
    ):
        raise DataError(
            "loader state was saved in the middle of a gradient accumulation with "
            f"micro_batch_size={state['micro_batch_size']}, dp_world={state['dp_world']}; "
            "resume with that layout"
        )


class TrainLoader:
    """Infinite iterator of this rank's training micro-batches, with a resumable position.

    The position is (epoch, step in epoch, micro-step in step) of the NEXT micro-batch;
    `state_dict()` taken after an optimizer step resumes with exactly the next global batch,
    also under a different dp_world / micro_batch_size (the global batch does not depend on
    them). A position in the middle of an accumulation only resumes with the same layout.
    """

    def __init__(
        self,
        meta: DataMeta,
        *,
        seq_len: int,
        global_batch_size: int,
        micro_batch_size: int,
        dp_rank: int = 0,
        dp_world: int = 1,
        seed: int = 0,
        split: str = "train",
    ):
        self.accum_steps = accum_steps_of(
            seq_len=seq_len,
            global_batch_size=global_batch_size,
            micro_batch_size=micro_batch_size,
            dp_rank=dp_rank,
            dp_world=dp_world,
        )
        self.meta = meta
        self.tokens = PackedTokens(meta, split)
        self.seq_len, self.global_batch_size = seq_len, global_batch_size
        self.micro_batch_size, self.dp_rank, self.dp_world = micro_batch_size, dp_rank, dp_world
        self.seed = seed
        self.num_windows = self.tokens.num_windows(seq_len)
        self.steps_per_epoch = self.num_windows // global_batch_size
        if self.steps_per_epoch == 0:
            raise DataError(
                f"{self.tokens.path} has {len(self.tokens)} tokens = {self.num_windows} windows "
                f"of seq_len+1={seq_len + 1}, fewer than global_batch_size={global_batch_size}; "
                "lower the batch size or seq_len, or prepare a larger corpus"
            )
        self.epoch = self.step_in_epoch = self.micro_step = 0
        self.order = WindowOrder(self.num_windows, seed)

    # -- order ---------------------------------------------------------------------------
    def global_batch_windows(self, epoch: int, step: int) -> np.ndarray:
        """All G window ids of global batch `step` of `epoch` (identical on every rank)."""
        g = self.global_batch_size
        return self.order(epoch, np.arange(step * g, (step + 1) * g))

    def _micro_windows(self, epoch: int, step: int, micro: int) -> np.ndarray:
        per_rank = self.global_batch_size // self.dp_world
        start = step * self.global_batch_size + self.dp_rank * per_rank + micro * self.micro_batch_size
        return self.order(epoch, np.arange(start, start + self.micro_batch_size))

    # -- iteration -----------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        idx = self._micro_windows(self.epoch, self.step_in_epoch, self.micro_step)
        # Advance before returning so state_dict() names the next micro-batch.
        self.micro_step += 1
        if self.micro_step == self.accum_steps:
            self.micro_step = 0
            self.step_in_epoch += 1
            if self.step_in_epoch == self.steps_per_epoch:
                self.step_in_epoch = 0
                self.epoch += 1
        return _to_batch(self.tokens.windows(idx, self.seq_len))

    @property
    def samples_consumed(self) -> int:
        """Windows consumed by all ranks together, counting whole global batches."""
        return (self.epoch * self.steps_per_epoch + self.step_in_epoch) * self.global_batch_size

    # -- checkpointing -------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "micro_step": self.micro_step,
            "samples_consumed": self.samples_consumed,
            "seed": self.seed,
            "fingerprint": self.meta.fingerprint,
            "seq_len": self.seq_len,
            "global_batch_size": self.global_batch_size,
            "micro_batch_size": self.micro_batch_size,
            "dp_world": self.dp_world,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise DataError(
                f"loader state version {state.get('version')} comes from another version of the "
                f"code, whose window order differs from this one's (version {STATE_VERSION}); "
                "resume with the code that wrote it, or start a new run (another run_dir)"
            )
        if state.get("fingerprint") != self.meta.fingerprint:
            raise DataError(
                f"the checkpoint was trained on data with fingerprint {state.get('fingerprint')!r}"
                f" but {self.meta.dir} has {self.meta.fingerprint!r} (re-prepared or different "
                "data); point data.out_dir at the original data, or start a new run (another run_dir)"
            )
        check_same_order(state, self)
        if state["step_in_epoch"] >= self.steps_per_epoch:
            raise DataError(
                f"loader state step_in_epoch={state['step_in_epoch']} is past the "
                f"epoch length {self.steps_per_epoch}; the data does not match"
            )
        self.epoch, self.step_in_epoch = state["epoch"], state["step_in_epoch"]
        self.micro_step = state["micro_step"]


def eval_layout(
    num_windows: int, *, micro_batch_size: int, dp_world: int, num_batches: Optional[int]
) -> tuple[int, int, int]:
    """(micro batch B, batches per rank, batches the split holds) of an `EvalLoader` over a
    split of `num_windows` windows: B shrinks to the windows per rank when the split is too
    small for B per rank, and `num_batches` (None = all) is capped at what the split holds.
    The sample has `batches * B * dp_world` slots (see `spread_windows`)."""
    b = max(1, min(micro_batch_size, num_windows // dp_world))
    available = max(1, num_windows // (b * dp_world))
    return b, available if num_batches is None else min(num_batches, available), available


def spread_windows(slots: np.ndarray, num_slots: int, num_windows: int) -> np.ndarray:
    """Window ids of sample `slots` when `num_slots` slots are spread evenly over a split of
    `num_windows` windows: slot j is window j * num_windows // num_slots, so the sample covers
    the whole split, not its head. More slots than windows: the index wraps (windows repeat).
    The one formula of the validation sample (`EvalLoader`, `deepseek_moe.evaluate`)."""
    if num_slots <= num_windows:
        return slots * num_windows // num_slots
    return slots % num_windows  # more slots than windows: they share windows


class EvalLoader:
    """A fixed, deterministic sequence of validation micro-batches; re-iterable.

    The sample is spread evenly over the whole split (not its head): with N windows and
    M = num_batches*B*W sample slots, slot j is window j*N // M (`spread_windows`). Step i uses slots
    [i*B*W, (i+1)*B*W); rank r takes the r-th run of B. `len()` is the same on every rank (so collective ops after each batch never
    hang): `num_batches`, capped at what the split holds. A split too small for one batch of
    B windows per rank (a small local corpus) is evaluated with what it has: B shrinks to the
    windows per rank, and when there are fewer windows than ranks, ranks share windows (the
    index wraps around). `shortfall` then says what was asked for and what is used.
    """

    def __init__(
        self,
        meta: DataMeta,
        *,
        seq_len: int,
        micro_batch_size: int,
        dp_rank: int = 0,
        dp_world: int = 1,
        num_batches: Optional[int] = None,
        split: str = "val",
    ):
        _check_rank(dp_rank, dp_world)
        self.tokens = PackedTokens(meta, split)
        self.seq_len, self.dp_rank, self.dp_world = seq_len, dp_rank, dp_world
        self.num_windows = self.tokens.num_windows(seq_len)
        if self.num_windows == 0:
            raise DataError(
                f"{self.tokens.path} has {len(self.tokens)} tokens, fewer than one eval sequence "
                f"of seq_len+1={seq_len + 1}; prepare with a larger data.val_fraction (or more "
                "documents), or lower trainer.seq_len"
            )
        self.micro_batch_size, self.num_batches, available = eval_layout(
            self.num_windows, micro_batch_size=micro_batch_size, dp_world=dp_world, num_batches=num_batches
        )
        self.shortfall: Optional[str] = None
        wanted = micro_batch_size * (available if num_batches is None else num_batches)
        if self.micro_batch_size * self.num_batches < wanted:
            self.shortfall = (
                f"{self.tokens.path} holds {self.num_windows} eval sequences of seq_len+1="
                f"{seq_len + 1} tokens for {dp_world} rank(s): evaluating {self.num_batches} "
                f"batch(es) of {self.micro_batch_size} per rank instead of "
                f"{wanted // micro_batch_size} of {micro_batch_size}; prepare with a larger "
                "data.val_fraction for a steadier val_loss"
            )

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        b, w = self.micro_batch_size, self.dp_world
        for i in range(self.num_batches):
            start = (i * w + self.dp_rank) * b
            idx = spread_windows(np.arange(start, start + b), self.num_batches * b * w, self.num_windows)
            yield _to_batch(self.tokens.windows(idx, self.seq_len))


def build_train_loader(
    data,
    *,
    seq_len: int,
    global_batch_size: int,
    micro_batch_size: int,
    dp_rank: int = 0,
    dp_world: int = 1,
    seed: int = 0,
) -> TrainLoader:
    """Training micro-batches of this rank. `data`: DataMeta, prepared dir or DataConfig."""
    return TrainLoader(
        _as_meta(data),
        seq_len=seq_len,
        global_batch_size=global_batch_size,
        micro_batch_size=micro_batch_size,
        dp_rank=dp_rank,
        dp_world=dp_world,
        seed=seed,
    )


def build_eval_loader(
    data,
    *,
    seq_len: int,
    micro_batch_size: int,
    dp_rank: int = 0,
    dp_world: int = 1,
    num_batches: Optional[int] = None,
) -> EvalLoader:
    """Validation micro-batches of this rank (the same ones every call)."""
    return EvalLoader(
        _as_meta(data),
        seq_len=seq_len,
        micro_batch_size=micro_batch_size,
        dp_rank=dp_rank,
        dp_world=dp_world,
        num_batches=num_batches,
    )
