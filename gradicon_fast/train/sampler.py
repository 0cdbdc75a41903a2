"""A resumable, rank-sharded stream of micro-batches over a dataset.

The stream is the concatenation of seeded permutations of the dataset (epoch e uses
``randperm(N, seed + e)``); it is cut into global micro-batches of ``batch_size`` indices, and
global micro-batch ``j`` goes to rank ``j % world_size``. An optimiser step with ``accumulate``
micro-batches per rank consumes ``accumulate · world_size`` global micro-batches, rank r's k-th
being number ``k · world_size + r`` of the step: so data-parallel training on W ranks sees exactly
the micro-batches, in the same grouping, that one process does with ``accumulate · W``. The
position is a count of samples, saved in checkpoints, and :meth:`PairStreamSampler.__iter__`
starts there without touching the skipped data.
"""

from __future__ import annotations

import torch
from torch.utils.data import Sampler


class PairStreamSampler(Sampler):
    """Infinite batch sampler: yields lists of dataset indices (this rank's micro-batches)."""

    def __init__(self, length: int, batch_size: int, *, rank: int = 0, world_size: int = 1, seed: int = 0,
                 start_sample: int = 0, shuffle: bool = True):
        if length < 1:
            raise ValueError("the dataset is empty")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        self.length = int(length)
        self.batch_size = int(batch_size)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.seed = int(seed)
        self.shuffle = shuffle
        if start_sample % (self.batch_size * self.world_size):
            raise ValueError(f"start_sample {start_sample} is not a whole number of global micro-batch rounds "
                             f"({self.batch_size} x {self.world_size})")
        self.start_sample = int(start_sample)
        self._perms: dict[int, torch.Tensor] = {}

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed + epoch)
                self._perms = {epoch: torch.randperm(self.length, generator=g)}
            else:
                self._perms = {epoch: torch.arange(self.length)}
        return self._perms[epoch]

    def index(self, position: int) -> int:
        """The dataset index at stream position ``position``."""
        epoch, offset = divmod(position, self.length)
        return int(self._permutation(epoch)[offset])

    def __iter__(self):
        micro = self.start_sample // self.batch_size + self.rank
        while True:
            first = micro * self.batch_size
            yield [self.index(p) for p in range(first, first + self.batch_size)]
            micro += self.world_size

    def __len__(self):  # an infinite stream; DataLoader only needs this for len(loader)
        raise TypeError("PairStreamSampler is infinite")
