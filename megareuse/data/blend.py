"""Deterministic weighted interleaving of several GPT datasets, resumable in O(1).

Megatron-LM's greedy rule: with weights ``w`` normalised to sum 1 and ``c_i(j)`` the samples
taken from dataset ``i`` before global sample ``j``, sample ``j`` comes from
``argmax_i (w_i * (j + 1) - c_i(j))`` (ties to the lowest index), and is that dataset's
``c_i(j)``-th sample (its own global index, so its own seeded epoch shuffle applies).

How resuming at k ~ 1e6 stays cheap: weights are made exact rationals ``w_i = p_i / Q`` with
integers ``p_i`` summing to ``Q`` (``Fraction.limit_denominator``; if that needs a period above
``max_period`` they are rounded to multiples of ``1 / max_period`` instead). In integers the
rule compares ``p_i * (j + 1) - Q * c_i(j)``; these errors sum to ``Q`` before each pick and
to 0 after it, and only the picked one (which was positive) drops by ``Q``, so after each pick
every error is > ``-Q``. After ``Q`` picks each error is ``Q * (p_i - c_i)``, a multiple of
``Q`` that is > ``-Q`` and sums to 0, hence all are 0: the state repeats and the choice
sequence is periodic with period ``Q``. We compute one period once (``Q`` steps) and map any
global index ``j`` in closed form: ``j = t * Q + r`` goes to dataset ``choice[r]`` at local
index ``t * p[choice[r]] + rank[r]``.
"""
from __future__ import annotations

import math
import numbers
from fractions import Fraction
from typing import Sequence

import numpy as np
import torch


def integer_weights(weights: Sequence[float], max_period: int = 100_000) -> list[int]:
    """Integers ``p`` with ``p_i / sum(p)`` equal (or within ``1 / max_period``) to the
    normalised weights, reduced by their gcd."""
    fracs = [Fraction(float(w)).limit_denominator(max_period) for w in weights]
    lcm = math.lcm(*(f.denominator for f in fracs))
    ints = [int(f * lcm) for f in fracs]
    if sum(ints) > max_period or min(ints) <= 0:
        total = float(sum(weights))
        ints = [max(1, round(w / total * max_period)) for w in weights]
    g = math.gcd(*ints)
    return [i // g for i in ints]


def greedy_period(p: Sequence[int]) -> np.ndarray:
    """One period (length ``sum(p)``) of the greedy choice sequence for integer weights."""
    q = sum(p)
    m = len(p)
    errors = [0] * m  # p_i * j - q * c_i before step j (scaled by q, exact)
    choice = np.empty(q, dtype=np.int64)
    for j in range(q):
        best, best_err = 0, errors[0] + p[0]
        for i in range(1, m):
            err = errors[i] + p[i]
            if err > best_err:
                best, best_err = i, err
        for i in range(m):
            errors[i] += p[i]
        errors[best] -= q
        choice[j] = best
    return choice


class BlendedDataset:
    """Interleave ``datasets`` (each with ``seq_len`` and ``take(global_indices)``, e.g.
    GPTDataset) by ``weights``; the global index ``j`` is samples consumed so far."""

    def __init__(self, datasets: Sequence, weights: Sequence[float], max_period: int = 100_000):
        if not datasets:
            raise ValueError("BlendedDataset: no datasets given")
        if len(weights) != len(datasets):
            raise ValueError(f"BlendedDataset: {len(weights)} weights for {len(datasets)} datasets")
        for i, w in enumerate(weights):
            if not isinstance(w, numbers.Real) or isinstance(w, bool) or not math.isfinite(w) \
                    or w <= 0:
                raise ValueError(f"BlendedDataset: weight {i} = {w!r}: accepted a positive number")
        seq_lens = {ds.seq_len for ds in datasets}
        if len(seq_lens) != 1:
            raise ValueError(f"BlendedDataset: datasets have different seq_len {sorted(seq_lens)}")
        self.datasets = list(datasets)
        self.seq_len = seq_lens.pop()
        self.period_weights = np.asarray(integer_weights(weights, max_period), dtype=np.int64)
        self.period = int(self.period_weights.sum())
        self.weights = self.period_weights / self.period  # effective normalised weights
        self._choice = greedy_period(self.period_weights.tolist())
        onehot = np.zeros((self.period + 1, len(datasets)), dtype=np.int64)
        onehot[np.arange(1, self.period + 1), self._choice] = 1
        self._before = np.cumsum(onehot, axis=0)  # [r, i]: picks of i among the first r
        self._rank = self._before[np.arange(self.period), self._choice]

    def locate(self, global_indices) -> tuple[np.ndarray, np.ndarray]:
        """(dataset index, that dataset's global index) for each global index."""
        j = np.asarray(global_indices, dtype=np.int64)
        if j.size and int(j.min()) < 0:
            raise IndexError(f"BlendedDataset: negative global index {int(j.min())}")
        t, r = np.divmod(j, self.period)
        ds = self._choice[r]
        return ds, t * self.period_weights[ds] + self._rank[r]

    def counts(self, k: int) -> np.ndarray:
        """Samples taken from each dataset among the first ``k`` global samples."""
        t, r = divmod(int(k), self.period)
        return t * self.period_weights + self._before[r]

    def take(self, global_indices) -> np.ndarray:
        """Samples at ``global_indices`` as an int64 array [len, seq_len + 1]."""
        ds, local = self.locate(np.asarray(global_indices).reshape(-1))
        out = np.empty((ds.size, self.seq_len + 1), dtype=np.int64)
        for i, dataset in enumerate(self.datasets):
            mask = ds == i
            if mask.any():
                out[mask] = dataset.take(local[mask])
        return out

    def __getitem__(self, j: int) -> torch.Tensor:
        """Global sample ``j`` as a LongTensor [seq_len + 1]."""
        return torch.from_numpy(self.take([j])[0])

    def batch(self, start: int, batch_size: int) -> torch.Tensor:
        """Global samples ``start .. start + batch_size - 1`` as a LongTensor [B, seq_len + 1]."""
        return torch.from_numpy(self.take(np.arange(start, start + batch_size)))

    def __repr__(self) -> str:
        w = ", ".join(f"{x:.4g}" for x in self.weights)
        return f"BlendedDataset({len(self.datasets)} datasets, weights=[{w}], period={self.period})"
