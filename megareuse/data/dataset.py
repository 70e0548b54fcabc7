"""Fixed-length GPT training samples over an indexed dataset, shuffled and resumable.

The token stream is every document of the indexed dataset concatenated in index order (each
document already ends with EOS). Sample ``i`` is the ``seq_len + 1`` tokens
``stream[i * seq_len : i * seq_len + seq_len + 1]`` (inputs are the first ``seq_len``, targets
the last ``seq_len``; consecutive samples overlap by one token, as in Megatron-LM), so there are
``(num_tokens - 1) // seq_len`` samples per epoch. Samples cross document boundaries.

Global sample index ``g`` (0, 1, 2, ... forever) reads sample ``perm(seed, e)[g % n]`` with
epoch ``e = g // n`` and ``perm(seed, e)`` a permutation from ``numpy.random.Generator(
PCG64([seed, e]))``: every epoch sees every sample exactly once, in a fresh order that depends
only on (seed, epoch). Resuming after ``k`` consumed samples is just continuing at ``g = k``.
"""
from __future__ import annotations

import numbers
from collections import OrderedDict

import numpy as np
import torch

from .indexed import IndexedDataset


class GPTDataset:
    """Seeded, epoch-shuffled fixed-length samples of ``indexed`` (see module docstring).

    ``shuffle=False`` keeps the natural order in every epoch (for evaluation).
    """

    def __init__(self, indexed: IndexedDataset, seq_len: int, seed: int = 1234,
                 shuffle: bool = True):
        if not isinstance(seq_len, numbers.Integral) or seq_len <= 0:
            raise ValueError(f"GPTDataset: seq_len = {seq_len!r}: accepted a positive integer")
        if not isinstance(seed, numbers.Integral) or seed < 0:
            raise ValueError(f"GPTDataset: seed = {seed!r}: accepted a non-negative integer")
        seq_len, seed = int(seq_len), int(seed)
        self.indexed = indexed
        self.seq_len = seq_len
        self.seed = seed
        self.shuffle = shuffle
        self.num_tokens = int(indexed.num_tokens)
        self.num_samples = (self.num_tokens - 1) // seq_len if self.num_tokens else 0
        if self.num_samples < 1:
            raise ValueError(f"GPTDataset: {indexed.prefix} has {self.num_tokens} tokens, fewer "
                             f"than one sample needs (seq_len + 1 = {seq_len + 1})")
        self._perms: OrderedDict[int, np.ndarray] = OrderedDict()

    def __len__(self) -> int:
        """Samples per epoch."""
        return self.num_samples

    # ------------------------------------------------------------------ order
    def permutation(self, epoch: int) -> np.ndarray:
        """The sample order of ``epoch`` (cached for the two most recent epochs)."""
        perm = self._perms.get(epoch)
        if perm is None:
            if self.shuffle:
                rng = np.random.Generator(np.random.PCG64([self.seed, epoch]))
                perm = rng.permutation(self.num_samples)
            else:
                perm = np.arange(self.num_samples)
            self._perms[epoch] = perm
            while len(self._perms) > 2:
                self._perms.popitem(last=False)
        else:
            self._perms.move_to_end(epoch)
        return perm

    def sample_indices(self, global_indices) -> np.ndarray:
        """Map global indices (any non-negative ints) to per-epoch sample indices."""
        g = np.asarray(global_indices, dtype=np.int64)
        if g.size and int(g.min()) < 0:
            raise IndexError(f"GPTDataset: negative global index {int(g.min())}")
        epochs, offsets = np.divmod(g, self.num_samples)
        out = np.empty_like(g)
        for epoch in np.unique(epochs):
            mask = epochs == epoch
            out[mask] = self.permutation(int(epoch))[offsets[mask]]
        return out

    # ------------------------------------------------------------------ reading
    def sample(self, index: int) -> np.ndarray:
        """Unshuffled sample ``index`` in [0, num_samples): int64 array of seq_len + 1 tokens."""
        if not 0 <= index < self.num_samples:
            raise IndexError(f"GPTDataset: sample {index} out of range [0, {self.num_samples})")
        start = index * self.seq_len
        return np.asarray(self.indexed.tokens[start:start + self.seq_len + 1], dtype=np.int64)

    def take(self, global_indices) -> np.ndarray:
        """Samples at ``global_indices`` as an int64 array [len, seq_len + 1]."""
        idx = self.sample_indices(global_indices).reshape(-1)
        out = np.empty((idx.size, self.seq_len + 1), dtype=np.int64)
        for row, i in enumerate(idx):
            start = int(i) * self.seq_len
            out[row] = self.indexed.tokens[start:start + self.seq_len + 1]
        return out

    def __getitem__(self, g: int) -> torch.Tensor:
        """Global sample ``g`` (shuffled order, any epoch) as a LongTensor [seq_len + 1]."""
        return torch.from_numpy(self.take([g])[0])

    def batch(self, start: int, batch_size: int) -> torch.Tensor:
        """Global samples ``start .. start + batch_size - 1`` as a LongTensor [B, seq_len + 1]."""
        return torch.from_numpy(self.take(np.arange(start, start + batch_size)))

    def __repr__(self) -> str:
        return (f"GPTDataset({str(self.indexed.prefix)!r}, seq_len={self.seq_len}, "
                f"seed={self.seed}, samples/epoch={self.num_samples})")
