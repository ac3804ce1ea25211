"""Loader behaviour on hand-written data where token i == i, so every window is identifiable."""

from __future__ import annotations

import itertools

import pytest
import torch

from deepseek_moe.config.data import DataConfig
from deepseek_moe.data.loader import build_eval_loader, build_train_loader
from deepseek_moe.errors import DataError

S = 8  # seq_len


def window_id(batch) -> list[int]:
    """Window index of each row, checked against the hand-computed window contents."""
    ids = []
    for inp, lab in zip(batch["input_ids"], batch["labels"]):
        start = int(inp[0])
        assert start % S == 0
        assert torch.equal(inp, torch.arange(start, start + S))  # window i = tokens [iS, iS+S]
        assert torch.equal(lab, torch.arange(start + 1, start + S + 1))  # shifted by one
        ids.append(start // S)
    return ids


def run_global_batches(meta, world: int, micro: int, G: int, steps: int, seed: int = 7):
    """Global batches as seen by `world` ranks: per step, rank 0's windows, then rank 1's, ..."""
    loaders = [
        build_train_loader(
            meta, seq_len=S, global_batch_size=G, micro_batch_size=micro, dp_rank=r, dp_world=world, seed=seed
        )
        for r in range(world)
    ]
    out = []
    for _ in range(steps):
        step = []
        for ld in loaders:
            for _ in range(ld.accum_steps):
                b = next(ld)
                assert b["input_ids"].shape == (micro, S) and b["input_ids"].dtype == torch.long
                step += window_id(b)
        out.append(step)
    return out


def test_global_batches_do_not_depend_on_world_size_and_cover_the_epoch(make_prepared):
    num_windows = 96
    meta = make_prepared(num_windows * S + 1, 100)
    G = 16
    steps = num_windows // G
    ref = run_global_batches(meta, world=1, micro=16, G=G, steps=steps)
    for world, micro in ((1, 4), (2, 2), (2, 8), (4, 1), (4, 4)):
        assert run_global_batches(meta, world, micro, G, steps) == ref, (world, micro)
    # One epoch = every window exactly once.
    assert sorted(itertools.chain(*ref)) == list(range(num_windows))
    # The epoch is shuffled, and the next epoch uses another order.
    assert list(itertools.chain(*ref)) != list(range(num_windows))
    two = run_global_batches(meta, world=2, micro=4, G=G, steps=2 * steps)
    assert two[:steps] == ref and two[steps:] != ref
    assert sorted(itertools.chain(*two[steps:])) == list(range(num_windows))


def test_ranks_take_disjoint_slices(make_prepared):
    meta = make_prepared(64 * S + 1, 100)
    per_rank = []
    for r in range(4):
        ld = build_train_loader(
            meta, seq_len=S, global_batch_size=16, micro_batch_size=2, dp_rank=r, dp_world=4, seed=0
        )
        per_rank.append({w for _ in range(ld.accum_steps * 4) for w in window_id(next(ld))})
    for a, b in itertools.combinations(per_rank, 2):
        assert not a & b
    assert set().union(*per_rank) == set(range(64))


def test_incomplete_last_global_batch_is_dropped(make_prepared):
    meta = make_prepared(21 * S + 5, 100)  # 21 windows, G=4 -> 5 steps, 1 window unused
    ld = build_train_loader(meta, seq_len=S, global_batch_size=4, micro_batch_size=4, seed=1)
    assert ld.num_windows == 21 and ld.steps_per_epoch == 5
    epoch0 = [w for _ in range(5) for w in window_id(next(ld))]
    assert len(set(epoch0)) == 20 and ld.epoch == 1


@pytest.mark.parametrize("stop_after", [0, 3, 5, 13, 24])
def test_resume_mid_epoch_matches_uninterrupted(make_prepared, stop_after):
    meta = make_prepared(40 * S + 1, 100)  # 40 windows, G=8: 5 steps/epoch, 2 micro per step
    kw = dict(seq_len=S, global_batch_size=8, micro_batch_size=2, dp_rank=1, dp_world=2, seed=3)
    straight = build_train_loader(meta, **kw)
    expected = [window_id(next(straight)) for _ in range(stop_after + 12)]

    first = build_train_loader(meta, **kw)
    got = [window_id(next(first)) for _ in range(stop_after)]
    state = first.state_dict()
    resumed = build_train_loader(meta, **kw)
    resumed.load_state_dict(state)
    got += [window_id(next(resumed)) for _ in range(12)]
    assert got == expected


def test_resume_at_step_boundary_with_other_dp_world(make_prepared):
    meta = make_prepared(48 * S + 1, 100)
    G = 8
    ref = run_global_batches(meta, world=1, micro=8, G=G, steps=9)
    one = build_train_loader(meta, seq_len=S, global_batch_size=G, micro_batch_size=4, seed=7)
    for _ in range(4 * one.accum_steps):
        next(one)
    state = one.state_dict()
    assert state["samples_consumed"] == 4 * G
    loaders = []
    for r in range(2):
        ld = build_train_loader(
            meta, seq_len=S, global_batch_size=G, micro_batch_size=2, dp_rank=r, dp_world=2, seed=7
        )
        ld.load_state_dict(state)
        loaders.append(ld)
    for step in range(4, 9):
        got = [w for ld in loaders for _ in range(ld.accum_steps) for w in window_id(next(ld))]
        assert got == ref[step]


def test_resume_rejects_other_data_or_order(make_prepared):
    meta = make_prepared(40 * S + 1, 100, name="a")
    other = make_prepared(41 * S + 1, 100, name="b")
    kw = dict(seq_len=S, global_batch_size=8, micro_batch_size=2)
    ld = build_train_loader(meta, **kw, seed=3)
    next(ld)
    state = ld.state_dict()
    with pytest.raises(ValueError, match="fingerprint"):
        build_train_loader(other, **kw, seed=3).load_state_dict(state)
    with pytest.raises(ValueError, match="seed=3"):
        build_train_loader(meta, **kw, seed=4).load_state_dict(state)
    with pytest.raises(ValueError, match="middle of a gradient accumulation"):
        build_train_loader(meta, seq_len=S, global_batch_size=8, micro_batch_size=4, seed=3).load_state_dict(
            state
        )
    # a state from the code whose order was a shuffled arange: another order, refused
    with pytest.raises(ValueError, match="version 1"):
        build_train_loader(meta, **kw, seed=3).load_state_dict({**state, "version": 1})


def test_eval_loader_is_fixed_and_split_over_ranks(make_prepared):
    meta = make_prepared(100, 30 * S + 1)  # 30 val windows
    ref = [window_id(b) for b in build_eval_loader(meta, seq_len=S, micro_batch_size=6)]
    assert ref == [list(range(i, i + 6)) for i in range(0, 30, 6)]  # file order, all windows
    ev = build_eval_loader(meta, seq_len=S, micro_batch_size=2, dp_rank=1, dp_world=3, num_batches=4)
    assert len(ev) == 4
    assert [window_id(b) for b in ev] == [window_id(b) for b in ev]  # re-iterable, same batches
    # Capped to what the split holds, the same count on every rank (no collective hang).
    lens = {
        len(build_eval_loader(meta, seq_len=S, micro_batch_size=2, dp_rank=r, dp_world=3, num_batches=100))
        for r in range(3)
    }
    assert lens == {5}
    parts = [
        window_id(b)
        for r in range(3)
        for b in build_eval_loader(meta, seq_len=S, micro_batch_size=2, dp_rank=r, dp_world=3)
    ]
    assert sorted(itertools.chain(*parts)) == list(range(30))


def test_eval_sample_is_spread_over_the_whole_split(make_prepared):
    meta = make_prepared(100, 1000 * S + 1)  # 1000 val windows
    got = [
        window_id(b)
        for r in range(2)
        for b in build_eval_loader(meta, seq_len=S, micro_batch_size=5, dp_rank=r, dp_world=2, num_batches=2)
    ]
    # 20 slots over 1000 windows: every 50th; step 0 is slots 0-9 (rank 0: 0-4, rank 1: 5-9)
    assert got == [
        [0, 50, 100, 150, 200],
        [500, 550, 600, 650, 700],
        [250, 300, 350, 400, 450],
        [750, 800, 850, 900, 950],
    ]


def test_bad_batch_shapes_and_tiny_corpus_fail_clearly(make_prepared):
    meta = make_prepared(10 * S + 1, 2 * S)
    with pytest.raises(ValueError, match="multiple of micro_batch_size"):
        build_train_loader(meta, seq_len=S, global_batch_size=6, micro_batch_size=4)
    with pytest.raises(ValueError, match=r"/train has 81 tokens.*fewer than global_batch_size=16"):
        build_train_loader(meta, seq_len=S, global_batch_size=16, micro_batch_size=4)
    with pytest.raises(ValueError, match="dp_rank=2"):
        build_train_loader(meta, seq_len=S, global_batch_size=4, micro_batch_size=1, dp_rank=2, dp_world=2)
    with pytest.raises(DataError, match=r"/val has 8 tokens.*data.val_fraction"):
        build_eval_loader(make_prepared(10 * S + 1, S, name="noval"), seq_len=S, micro_batch_size=2)


@pytest.mark.parametrize(
    "world, micro, expected",
    [
        (2, 4, [[[0, 1]], [[2, 3]]]),  # B shrinks to the 2 windows per rank
        (3, 2, [[[0]], [[1]], [[3]]]),  # one window per rank, spread: j*5//3
        (8, 2, [[[r % 5]] for r in range(8)]),  # more ranks than windows: they share
    ],
)
def test_small_val_split_is_evaluated_with_what_it_has(make_prepared, world, micro, expected):
    meta = make_prepared(10 * S + 1, 5 * S + 1)  # 5 val windows
    loaders = [
        build_eval_loader(meta, seq_len=S, micro_batch_size=micro, dp_rank=r, dp_world=world, num_batches=3)
        for r in range(world)
    ]
    assert [[window_id(b) for b in ld] for ld in loaders] == expected
    assert {len(ld) for ld in loaders} == {1}
    assert all("5 eval sequences" in ld.shortfall and "data.val_fraction" in ld.shortfall for ld in loaders)
    assert build_eval_loader(meta, seq_len=S, micro_batch_size=1, num_batches=5).shortfall is None


def test_loader_accepts_a_data_config(make_prepared, tmp_path):
    meta = make_prepared(40 * S + 1, 100, name="cfgdir")
    cfg = DataConfig(name="cfgdir", source="local_text", path="unused", out_dir=str(tmp_path / "cfgdir"))
    ld = build_train_loader(cfg, seq_len=S, global_batch_size=4, micro_batch_size=4)
    assert ld.meta.fingerprint == meta.fingerprint
    other = build_train_loader(meta, seq_len=S, global_batch_size=4, micro_batch_size=4)
    assert window_id(next(ld)) == window_id(next(other))


def test_uint32_tokens_above_uint16_range(tmp_path):
    from tests.data.conftest import write_prepared

    meta = write_prepared(tmp_path / "u32", 5 * S + 1, 100, dtype="uint32", offset=70_000)
    batch = next(build_train_loader(meta, seq_len=S, global_batch_size=5, micro_batch_size=5))
    starts = sorted(int(x) for x in batch["input_ids"][:, 0])
    assert starts == [70_000 + i * S for i in range(5)]
    assert int(batch["labels"].max()) == 70_000 + 5 * S
