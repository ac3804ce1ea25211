"""Weighted mixtures of prepared datasets: exact per-batch quotas, resumable, world-size free.

    sources = load_sources(cfg.data.sources)         # [Source(name, meta, weight, cap)]
    train = MixtureLoader(sources, seq_len=S, global_batch_size=G, micro_batch_size=B,
                          dp_rank=r, dp_world=W, seed=seed, max_steps=cfg.trainer.max_steps)

Quotas. With weights w_i (divided by their sum, kept as exact fractions), the first T global
batches hold A_i(T) windows of source i: the largest-remainder apportionment of T*G slots to
w_i*T*G (floors, then one more slot to the largest fractional parts, ties to the first
source). So |A_i(T) - w_i*T*G| < 1 for every T, and over ANY N consecutive global batches a
source's count is within 2 windows of w_i*N*G: its token share is within 2/(N*G) of w_i
(0.125% over 100 batches of 16). Global batch T takes A_i(T+1) - A_i(T) windows of source i,
which is >= 0 when every source has w_i*G >= 1 (checked: at least one window per global batch
on average). A_i(T) is computed directly from T, so nothing but the step is carried.

Within a source, its k-th window drawn by the run is window `order_i(k // n_i, k % n_i)` of its
n_i train windows: epoch after epoch of its own seeded permutation (`order.py`), continuing
across epochs with nothing dropped. The G windows of a global batch are interleaved by a
permutation seeded with (seed, T), so every rank's slice mixes the sources; rank r takes the
contiguous slice [r*G/W, (r+1)*G/W) as in `loader.py`. The set of windows of every global batch
therefore depends only on (data, weights, seed, S, G), never on W, B or the EP layout.

Checks before anything is written: the sources share one tokenizer (its sha256 in meta.json),
every source has enough windows, and no source would be read more than its `max_repetitions`
times within `max_steps`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch

from deepseek_moe.data.loader import EvalLoader, _to_batch, accum_steps_of, check_same_order
from deepseek_moe.data.meta import DataMeta, load_meta, resolve_path
from deepseek_moe.data.order import WindowOrder
from deepseek_moe.data.packed import PackedTokens
from deepseek_moe.errors import DataError

STATE_VERSION = 1


@dataclass(kw_only=True)
class Source:
    """A loaded mixture source."""

    name: str
    meta: DataMeta
    weight: float
    max_repetitions: Optional[float] = None


def load_sources(configs: Sequence[Any]) -> list[Source]:
    """`data.sources` (MixtureSource configs) -> Sources with their meta; a missing or
    unprepared directory is a DataError naming the prepare command."""
    out = []
    for src in configs:
        path = resolve_path(src.out_dir)
        if not (path / "meta.json").is_file():
            raise DataError(
                f"mixture source {src.label!r}: {path} is not a prepared directory (no meta.json); "
                f"prepare it first: `python -m data_prep.prepare data=<preset> data.out_dir={path} "
                "data.tokenizer_model=<the other sources' tokenizer.model>`"
            )
        out.append(
            Source(
                name=src.label, meta=load_meta(path), weight=src.weight, max_repetitions=src.max_repetitions
            )
        )
    check_same_tokenizer(out)
    return out


def check_same_tokenizer(sources: Sequence[Source]) -> None:
    """All sources must be tokenized by the same tokenizer (same file hash, vocab and dtype)."""
    first = sources[0]
    for src in sources[1:]:
        if (src.meta.tokenizer_sha256, src.meta.vocab_size, src.meta.dtype) != (
            first.meta.tokenizer_sha256,
            first.meta.vocab_size,
            first.meta.dtype,
        ):
            raise DataError(
                f"mixture sources {first.name!r} ({first.meta.dir}) and {src.name!r} ({src.meta.dir}) "
                f"were prepared with different tokenizers (sha256 {first.meta.tokenizer_sha256[:12]} vs "
                f"{src.meta.tokenizer_sha256[:12]}); re-prepare {src.name!r} with "
                f"data.tokenizer_model={first.meta.tokenizer_path} data.force=true"
            )


def normalized_weights(weights: Sequence[float]) -> list[Fraction]:
    """Exact fractions summing to 1 (from each float's shortest decimal form)."""
    fr = [Fraction(repr(float(w))) for w in weights]
    total = sum(fr)
    return [f / total for f in fr]


def cumulative_counts(weights: Sequence[Fraction], slots: int) -> list[int]:
    """Largest-remainder apportionment of `slots` to `weights` (exact; ties to the first)."""
    exact = [w * slots for w in weights]
    counts = [int(x) for x in exact]  # floor: x >= 0
    rest = slots - sum(counts)
    by_remainder = sorted(range(len(exact)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in by_remainder[:rest]:
        counts[i] += 1
    return counts


class MixtureLoader:
    """Infinite iterator of this rank's micro-batches of a weighted mixture (see module doc).

    Position: (global step, micro-step) of the NEXT micro-batch; `state_dict()` after an
    optimizer step resumes with exactly the next global batch, also under another dp_world /
    micro_batch_size."""

    def __init__(
        self,
        sources: Sequence[Source],
        *,
        seq_len: int,
        global_batch_size: int,
        micro_batch_size: int,
        dp_rank: int = 0,
        dp_world: int = 1,
        seed: int = 0,
        max_steps: Optional[int] = None,
    ):
        if not sources:
            raise ValueError("a mixture needs at least one source")
        self.accum_steps = accum_steps_of(
            seq_len=seq_len,
            global_batch_size=global_batch_size,
            micro_batch_size=micro_batch_size,
            dp_rank=dp_rank,
            dp_world=dp_world,
        )
        check_same_tokenizer(sources)
        self.sources = list(sources)
        self.names = [s.name for s in self.sources]
        self.seq_len, self.global_batch_size = seq_len, global_batch_size
        self.micro_batch_size, self.dp_rank, self.dp_world = micro_batch_size, dp_rank, dp_world
        self.seed = seed
        self.weights = normalized_weights([s.weight for s in self.sources])
        self.tokens = [PackedTokens(s.meta, "train") for s in self.sources]
        self.num_windows = [t.num_windows(seq_len) for t in self.tokens]
        for src, tok, n, w in zip(self.sources, self.tokens, self.num_windows, self.weights):
            if n == 0:
                raise DataError(
                    f"mixture source {src.name!r}: {tok.path} has {len(tok)} tokens, fewer than one "
                    f"window of seq_len+1={seq_len + 1}; prepare more data or lower trainer.seq_len"
                )
            if w * global_batch_size < 1:
                raise DataError(
                    f"mixture source {src.name!r} has share {float(w):.4g} of a global batch of "
                    f"{global_batch_size}: {float(w * global_batch_size):.3g} < 1 window per batch; "
                    "raise its weight or trainer.global_batch_size"
                )
        # Each source draws from its own stream of permutations.
        self.orders = [
            WindowOrder(n, int(np.random.SeedSequence([seed, i]).generate_state(1)[0]))
            for i, n in enumerate(self.num_windows)
        ]
        self.fingerprint = self._fingerprint()
        if max_steps is not None:
            self.check_repetitions(max_steps)
        self.step = self.micro_step = 0
        self._batch_step: Optional[int] = None
        self._batch: Optional[tuple[np.ndarray, np.ndarray]] = None

    def _fingerprint(self) -> str:
        payload = [[s.name, s.meta.fingerprint, str(w)] for s, w in zip(self.sources, self.weights)]
        return "mix-" + hashlib.sha256(json.dumps(payload).encode()).hexdigest()[:16]

    # -- quotas and order ----------------------------------------------------------------
    def counts_before(self, step: int) -> list[int]:
        """Windows of each source in global batches [0, step)."""
        return cumulative_counts(self.weights, step * self.global_batch_size)

    def repetitions(self, steps: int) -> list[float]:
        """How many times each source's train windows are read in `steps` global batches."""
        return [c / n for c, n in zip(self.counts_before(steps), self.num_windows)]

    def check_repetitions(self, steps: int) -> None:
        for src, reps in zip(self.sources, self.repetitions(steps)):
            if src.max_repetitions is not None and reps > src.max_repetitions:
                raise DataError(
                    f"mixture source {src.name!r} would be read {reps:.2f} times in "
                    f"trainer.max_steps={steps} steps, past its max_repetitions={src.max_repetitions}; "
                    "lower its weight or trainer.max_steps, raise its max_repetitions, or prepare more data"
                )

    def global_batch(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(source index, window id) of each of the G slots of global batch `step`."""
        if self._batch_step != step:
            before, after = self.counts_before(step), self.counts_before(step + 1)
            src_G = np.empty(self.global_batch_size, dtype=np.int64)
            win_G = np.empty(self.global_batch_size, dtype=np.int64)
            at = 0
            for i, (a, b) in enumerate(zip(before, after)):
                draws = np.arange(a, b, dtype=np.int64)  # the source's draws k, in order
                epochs, pos = np.divmod(draws, self.num_windows[i])
                for e in np.unique(epochs):
                    sel = epochs == e
                    win_G[at + np.flatnonzero(sel)] = self.orders[i](int(e), pos[sel])
                src_G[at : at + len(draws)] = i
                at += len(draws)
            mix = np.random.default_rng([self.seed, step, 0x5107]).permutation(self.global_batch_size)
            self._batch_step, self._batch = step, (src_G[mix], win_G[mix])
        return self._batch

    def tokens_by_source(self) -> dict[str, int]:
        """Training tokens (targets) of each source in the global batches consumed so far."""
        return {n: c * self.seq_len for n, c in zip(self.names, self.counts_before(self.step))}

    # -- iteration -----------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        src_G, win_G = self.global_batch(self.step)
        per_rank = self.global_batch_size // self.dp_world
        start = self.dp_rank * per_rank + self.micro_step * self.micro_batch_size
        src, win = src_G[start : start + self.micro_batch_size], win_G[start : start + self.micro_batch_size]
        out = np.empty((len(src), self.seq_len + 1), dtype=np.int64)
        for i in np.unique(src):
            rows = np.flatnonzero(src == i)
            out[rows] = self.tokens[i].windows(win[rows], self.seq_len)
        self.micro_step += 1
        if self.micro_step == self.accum_steps:
            self.micro_step = 0
            self.step += 1
        return _to_batch(out)

    @property
    def samples_consumed(self) -> int:
        return self.step * self.global_batch_size

    # -- checkpointing -------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "kind": "mixture",
            "step": self.step,
            "micro_step": self.micro_step,
            "samples_consumed": self.samples_consumed,
            "seed": self.seed,
            "fingerprint": self.fingerprint,
            "sources": [[s.name, s.meta.fingerprint, s.weight] for s in self.sources],
            "seq_len": self.seq_len,
            "global_batch_size": self.global_batch_size,
            "micro_batch_size": self.micro_batch_size,
            "dp_world": self.dp_world,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != "mixture" or state.get("version") != STATE_VERSION:
            raise DataError(
                "the checkpoint was not trained on a data mixture (or on one of another code "
                "version); resume it with its own data config, or start a new run (another run_dir)"
            )
        if state["fingerprint"] != self.fingerprint:
            raise DataError(
                f"the checkpoint was trained on the mixture {state['sources']} (name, data "
                f"fingerprint, weight) but this run mixes "
                f"{[[s.name, s.meta.fingerprint, s.weight] for s in self.sources]}; resuming would change "
                "the data order: restore data.sources, or start a new run (another run_dir)"
            )
        check_same_order(state, self)
        self.step, self.micro_step = state["step"], state["micro_step"]


class MixtureEvalLoaders:
    """One `EvalLoader` per source, each over its whole validation split (windows spread
    evenly, see `EvalLoader`); `overall` weighs the per-source losses by the mixture weights."""

    def __init__(self, sources: Sequence[Source], **eval_kw: Any):
        self.names = [s.name for s in sources]
        self.weights = [float(w) for w in normalized_weights([s.weight for s in sources])]
        self.loaders = {s.name: EvalLoader(s.meta, **eval_kw) for s in sources}

    def items(self):
        return self.loaders.items()

    def overall(self, losses: dict[str, float]) -> float:
        return sum(w * losses[n] for n, w in zip(self.names, self.weights))
