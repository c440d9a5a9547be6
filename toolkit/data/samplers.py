"""Samplers: the epoch's order (the same on every process, from seed and epoch) and its batches,
cut from one index tensor instead of collected index by index."""

from __future__ import annotations

import torch
from torch.utils.data import BatchSampler, Sampler


class EpochShuffle(Sampler[int]):
    """A permutation drawn from (seed, epoch): identical on every process, reproducible on resume."""

    def __init__(self, size: int, seed: int, keyed: bool = False):
        self.size, self.seed, self.epoch, self.keyed = size, seed, 0, keyed

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def order(self) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.size, generator=generator)
        # keyed: each index carries its epoch (epoch * size + index), so that a dataset in a worker, which
        # never sees set_epoch, can draw a sample's augmentation from (seed, epoch, index) alone
        return order + self.epoch * self.size if self.keyed else order

    def __iter__(self):
        return iter(self.order().tolist())

    def __len__(self) -> int:
        return self.size


class SliceBatches(BatchSampler):
    """The batches of BatchSampler(sampler, batch_size, drop_last), cut from one index tensor per
    epoch instead of collected index by index in Python. Yields lists (Accelerate's sharding pads
    a short last batch by list concatenation); `sampler.set_epoch` still reaches the sampler."""

    def __iter__(self):
        order = self.sampler.order() if hasattr(self.sampler, "order") else torch.arange(len(self.sampler))
        for batch in order.split(self.batch_size):
            if self.drop_last and len(batch) < self.batch_size:
                return
            yield batch.tolist()

