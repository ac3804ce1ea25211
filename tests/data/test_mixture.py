"""Weighted mixtures on hand-written sources: source A's tokens are < 25000, source B's >= 25000,
so every row of a batch tells its source and its window without asking the loader."""

from __future__ import annotations

import dataclasses
import itertools
from collections import Counter

import numpy as np
import pytest

from deepseek_moe.data.mixture import MixtureLoader, Source
from deepseek_moe.errors import DataError
from tests.data.conftest import write_prepared

S = 8
SPLIT = 25000


def row_ids(batch) -> list[tuple[int, int]]:
    """(source, window) of each row, from the token values alone."""
    out = []
    for inp in batch["input_ids"]:
        first = int(inp[0])
        src = 1 if first >= SPLIT else 0
        start = first - src * SPLIT
        assert start % S == 0
        assert inp.tolist() == list(range(first, first + S))
        out.append((src, start // S))
    return out


@pytest.fixture
def two_sources(tmp_path):
    a = write_prepared(tmp_path / "a", 300 * S + 1, 40 * S + 1)  # 300 windows, tokens < 25000
    b = write_prepared(tmp_path / "b", 50 * S + 1, 30 * S + 1, vocab_size=SPLIT, offset=SPLIT)  # 50 windows
    return a, b


def sources(metas, weights, caps=(None, None)):
    return [
        Source(name=n, meta=m, weight=w, max_repetitions=c)
        for n, m, w, c in zip(("a", "b"), metas, weights, caps)
    ]


def run(srcs, *, G, world, micro, steps, seed=5, state=None, **kw):
    """Global batches as lists of (source, window), rank 0's rows first; and the loaders."""
    loaders = [
        MixtureLoader(
            srcs,
            seq_len=S,
            global_batch_size=G,
            micro_batch_size=micro,
            dp_rank=r,
            dp_world=world,
            seed=seed,
            **kw,
        )
        for r in range(world)
    ]
    if state is not None:
        for ld in loaders:
            ld.load_state_dict(state)
    out = [
        [rid for ld in loaders for _ in range(ld.accum_steps) for rid in row_ids(next(ld))]
        for _ in range(steps)
    ]
    return out, loaders


@pytest.mark.parametrize("weights", [(0.7, 0.3), (1, 2), (0.95, 0.05)])
def test_shares_within_one_percent_over_every_100_consecutive_batches(two_sources, weights):
    G, steps = 20, 260
    batches, _ = run(sources(two_sources, weights), G=G, world=1, micro=20, steps=steps)
    share_b = weights[1] / sum(weights)
    per_batch_b = np.array([sum(src for src, _ in b) for b in batches])
    assert all(len(b) == G for b in batches)
    for start in range(steps - 100 + 1):
        count = per_batch_b[start : start + 100].sum()
        # the documented bound: within 2 windows of the target, i.e. 0.1% here; 1% is the goal
        assert abs(count - share_b * 100 * G) < 2, (start, count)
        assert abs(count / (100 * G) - share_b) <= 0.01
    # each source walks through its own epochs: no window twice before all were drawn once
    for src, n in ((0, 300), (1, 50)):
        draws = [w for b in batches for s, w in b if s == src]
        counts = Counter(draws)
        assert set(counts) == set(range(n)) or len(draws) < n
        assert max(counts.values()) <= -(-len(draws) // n)


def test_global_batches_do_not_depend_on_world_or_micro_batch(two_sources):
    srcs = sources(two_sources, (0.6, 0.4))
    ref, _ = run(srcs, G=16, world=1, micro=16, steps=12)
    for world, micro in ((2, 2), (4, 4), (2, 8)):
        got, _ = run(srcs, G=16, world=world, micro=micro, steps=12)
        assert got == ref, (world, micro)
    # both sources appear inside one rank's slice: the batch is interleaved, not blocked
    assert {s for s, _ in ref[0][:8]} == {0, 1}
    # another seed, another order (same quotas)
    other, _ = run(srcs, G=16, world=1, micro=16, steps=12, seed=6)
    assert other != ref
    assert [sum(s for s, _ in b) for b in other] == [sum(s for s, _ in b) for b in ref]


def test_resume_at_another_world_size_continues_exactly(two_sources):
    srcs = sources(two_sources, (0.7, 0.3))
    ref, _ = run(srcs, G=16, world=1, micro=8, steps=20)
    _, (first, _) = run(srcs, G=16, world=2, micro=4, steps=7)
    state = first.state_dict()
    assert state["samples_consumed"] == 7 * 16
    got, loaders = run(srcs, G=16, world=1, micro=8, steps=13, state=state)
    assert got == ref[7:]
    # tokens per source: counted from the rows themselves
    seen = Counter(s for b in ref for s, _ in b)
    assert loaders[0].tokens_by_source() == {"a": seen[0] * S, "b": seen[1] * S}
    # mid-accumulation: the same layout resumes it
    one = MixtureLoader(srcs, seq_len=S, global_batch_size=16, micro_batch_size=4, seed=5)
    rows = [row_ids(next(one)) for _ in range(3)]
    again = MixtureLoader(srcs, seq_len=S, global_batch_size=16, micro_batch_size=4, seed=5)
    again.load_state_dict(one.state_dict())
    rows += [row_ids(next(again)) for _ in range(5)]
    assert list(itertools.chain(*rows)) == list(itertools.chain(*ref[:2]))
    with pytest.raises(DataError, match="middle of a gradient accumulation"):
        MixtureLoader(srcs, seq_len=S, global_batch_size=16, micro_batch_size=8, seed=5).load_state_dict(
            one.state_dict()
        )


def test_resume_refuses_other_weights_or_a_single_source_state(two_sources):
    state = MixtureLoader(
        sources(two_sources, (0.7, 0.3)), seq_len=S, global_batch_size=16, micro_batch_size=16
    ).state_dict()
    other = MixtureLoader(
        sources(two_sources, (0.6, 0.4)), seq_len=S, global_batch_size=16, micro_batch_size=16
    )
    with pytest.raises(DataError, match="restore data.sources"):
        other.load_state_dict(state)
    with pytest.raises(DataError, match="not trained on a data mixture"):
        other.load_state_dict({"version": 2, "fingerprint": "x"})


def test_repetition_cap_is_checked_against_max_steps(two_sources):
    # b: 50 windows at 1/4 of G=16 = 4 per step: 12 steps read 48, 13 steps read 52 > 50
    srcs = sources(two_sources, (3, 1), caps=(None, 1.0))
    MixtureLoader(srcs, seq_len=S, global_batch_size=16, micro_batch_size=16, max_steps=12)
    with pytest.raises(
        DataError, match=r"'b' would be read 1.04 times in trainer.max_steps=13 .*max_repetitions=1.0"
    ):
        MixtureLoader(srcs, seq_len=S, global_batch_size=16, micro_batch_size=16, max_steps=13)
    # a cap of 2 epochs: 25 steps read 100 = 2.0 epochs, fine; 26 read 104
    srcs = sources(two_sources, (3, 1), caps=(None, 2))
    MixtureLoader(srcs, seq_len=S, global_batch_size=16, micro_batch_size=16, max_steps=25)
    with pytest.raises(DataError, match="max_repetitions=2"):
        MixtureLoader(srcs, seq_len=S, global_batch_size=16, micro_batch_size=16, max_steps=26)


def test_different_tokenizers_and_tiny_weights_are_refused(two_sources):
    a, b = two_sources
    other = dataclasses.replace(b, tokenizer_sha256="another")
    with pytest.raises(DataError, match="different tokenizers.*data.tokenizer_model="):
        MixtureLoader(sources((a, other), (1, 1)), seq_len=S, global_batch_size=16, micro_batch_size=16)
    with pytest.raises(DataError, match="'b' has share 0.05.*0.8 < 1 window per batch"):
        MixtureLoader(sources((a, b), (0.95, 0.05)), seq_len=S, global_batch_size=16, micro_batch_size=16)
