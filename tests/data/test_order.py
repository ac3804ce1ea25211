"""`WindowOrder`: a bijection on [0, n) per epoch, computed per position, that looks shuffled."""

from __future__ import annotations

import numpy as np
import pytest

from deepseek_moe.data.order import ROUNDS, WindowOrder

MASK64 = (1 << 64) - 1


def reference_order(n: int, seed: int, epoch: int, p: int) -> int:
    """The same network in plain Python integers, one position at a time (no numpy wrapping)."""
    h = max(1, -(-(n - 1).bit_length() // 2))
    mask = (1 << h) - 1
    keys = [int(k) for k in np.random.SeedSequence([seed, epoch, 0x0DE5]).generate_state(ROUNDS, np.uint64)]

    def mix(z: int) -> int:
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
        return z ^ (z >> 31)

    x = p
    while True:
        left, right = x >> h, x & mask
        for key in keys:
            left, right = right, left ^ (mix(right ^ key) & mask)
        x = (left << h) | right
        if x < n:
            return x


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 7, 8, 16, 31, 64, 97, 127, 128, 1000, 1024, 4099, 65536, 65537])
def test_every_epoch_is_a_permutation_of_all_windows(n):
    for seed, epoch in ((0, 0), (1234, 3)):
        out = WindowOrder(n, seed)(epoch, np.arange(n))
        assert out.dtype == np.int64
        assert np.array_equal(np.sort(out), np.arange(n)), (n, seed, epoch)


def test_matches_a_plain_python_network():
    n, seed = 1000, 99
    order = WindowOrder(n, seed)
    got = order(2, np.arange(n))
    assert [reference_order(n, seed, 2, p) for p in range(n)] == got.tolist()


def test_positions_are_independent_and_deterministic():
    n = 4099
    full = WindowOrder(n, 7)(1, np.arange(n))
    pos = np.array([4098, 0, 17, 2048, 17])
    # a fresh object, another call order, a subset of positions: the same values
    assert np.array_equal(WindowOrder(n, 7)(1, pos), full[pos])
    assert not np.array_equal(WindowOrder(n, 7)(2, np.arange(n)), full)  # next epoch differs
    assert not np.array_equal(WindowOrder(n, 8)(1, np.arange(n)), full)  # another seed differs


def test_looks_like_a_uniform_shuffle():
    # Over many seeds, every (position, window) pair of n=6 is about equally likely: each of the
    # 36 cells expects trials/6 hits. A plain rotation or a weak mix fails this badly.
    n, trials = 6, 6000
    counts = np.zeros((n, n))
    for seed in range(trials):
        counts[np.arange(n), WindowOrder(n, seed)(0, np.arange(n))] += 1
    expected = trials / n
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < 80, chi2  # 25 degrees of freedom: p(chi2 > 80) ~ 1e-7
    # A large order is not near the identity: adjacent positions land far apart.
    big = WindowOrder(1_000_003, 5)(0, np.arange(100_000))
    assert abs(np.corrcoef(np.arange(100_000), big)[0, 1]) < 0.02
    assert np.median(np.abs(np.diff(big))) > 100_000


def test_out_of_range_positions_are_refused():
    with pytest.raises(IndexError):
        WindowOrder(10, 0)(0, np.array([10]))
    with pytest.raises(ValueError):
        WindowOrder(0, 0)
