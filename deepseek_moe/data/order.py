"""The window order of an epoch as a seeded bijection on [0, n), computed per position.

A shuffled `arange(n)` costs 4-8 bytes per window on every rank and seconds per epoch to build
(2T tokens / 4096 = 488M windows: ~2 GB per rank). `WindowOrder` instead maps a position p of
epoch e to the window at that position, `order(e, p)`, in O(1) memory per position: a keyed
Feistel network on 2h-bit integers (4^h >= n) whose round keys come from (seed, epoch), and
cycle-walking (apply the network again until the value falls below n) to restrict it to [0, n).
A Feistel network is a bijection whatever its round function; with a good mixing function and
6 rounds the result looks like a uniform random permutation (Luby-Rackoff: 4 rounds of a
pseudo-random function already give a pseudo-random permutation). Since 4^h < 4n, cycle-walking
applies the network fewer than 4 times per position on average.

A global batch of G windows therefore costs O(G) time and memory, whatever the corpus size.
"""

from __future__ import annotations

import numpy as np

ROUNDS = 6

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def _mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijective avalanche of a uint64 array (wrapping arithmetic)."""
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


class WindowOrder:
    """`order(epoch, positions)`: the window ids at `positions` of `epoch`'s permutation of
    [0, n). Every epoch is another permutation; the same (n, seed, epoch) give the same one on
    every machine (keys from numpy's SeedSequence, integer arithmetic only)."""

    def __init__(self, n: int, seed: int):
        if n < 1:
            raise ValueError(f"WindowOrder needs n >= 1, got {n}")
        self.n, self.seed = int(n), int(seed)
        self.half_bits = max(1, -(-(self.n - 1).bit_length() // 2))  # 4^h >= n
        self._mask = np.uint64((1 << self.half_bits) - 1)
        self._keys_epoch: int | None = None
        self._keys: np.ndarray | None = None

    def _round_keys(self, epoch: int) -> np.ndarray:
        if self._keys_epoch != epoch:
            seq = np.random.SeedSequence([self.seed, int(epoch), 0x0DE5])
            self._keys = seq.generate_state(ROUNDS, dtype=np.uint64)
            self._keys_epoch = epoch
        return self._keys

    def _encrypt(self, x: np.ndarray, keys: np.ndarray) -> np.ndarray:
        h = np.uint64(self.half_bits)
        left, right = x >> h, x & self._mask
        for key in keys:
            left, right = right, left ^ (_mix64(right ^ key) & self._mask)
        return (left << h) | right

    def __call__(self, epoch: int, positions: np.ndarray) -> np.ndarray:
        """Window ids (int64) at `positions` (each in [0, n)) of epoch `epoch`'s order."""
        pos = np.asarray(positions, dtype=np.int64)
        if pos.size and (pos.min() < 0 or pos.max() >= self.n):
            raise IndexError(f"positions must be in [0, {self.n})")
        keys = self._round_keys(epoch)
        out = self._encrypt(pos.astype(np.uint64), keys)
        # Cycle-walking: outside [0, n), encrypt again. x maps to the next value in [0, n) on
        # its cycle of the network's permutation, which is a bijection on [0, n).
        todo = np.flatnonzero(out >= self.n)
        while todo.size:
            out[todo] = self._encrypt(out[todo], keys)
            todo = todo[out[todo] >= self.n]
        return out.astype(np.int64)
