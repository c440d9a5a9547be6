"""The epoch plan of a shard set (the streaming counterpart of samplers.py), the same on every process and worker
from (seed, epoch, process count) alone: a seeded order of the training shards, their samples concatenated and cut
into one contiguous span per process, each span into the same number of batches on every process (every sample
exactly once: no padding, a short last batch as the loader pipeline has with one process), and the batches
grouped into blocks, the unit a worker reads and shuffles (a seeded permutation inside the block: the bounded
shuffle buffer). Blocks go to workers round-robin, so the batches come out in plan order with any number of
workers, and a mid-epoch resume starts at the block holding its next batch."""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

import torch

from toolkit.errors import ToolkitError

PAD_LABEL = -100  # validation batches are padded to the same shape on every process (gather); cross_entropy ignores it


def _seeded(*parts: int) -> torch.Generator:
    value = 0
    for part in parts:
        value = (value * 1_000_003 + part) % 2**63
    return torch.Generator().manual_seed(value)


def spans(total: int, parts: int) -> list[tuple[int, int]]:
    """[lo, hi) of `parts` contiguous pieces of range(total), the first total % parts one longer."""
    size, extra = divmod(total, parts)
    bounds = [0]
    for part in range(parts):
        bounds.append(bounds[-1] + size + (part < extra))
    return list(zip(bounds, bounds[1:]))


def train_batches(span: int, steps: int, batch: int) -> list[int]:
    """Sizes of `steps` batches covering `span` samples, none empty: full batches, then what is left (the one
    case two batches are short: a span one sample too small to fill steps - 1 batches and a last one)."""
    sizes, left = [], span
    for step in range(steps):
        size = min(batch, left - (steps - step - 1))
        sizes.append(size)
        left -= size
    return sizes


@dataclass(frozen=True)
class Piece:
    shard: int  # index into the split's shards (manifest order)
    lo: int  # samples [lo, hi) of that shard
    hi: int


@dataclass
class Plan:
    """One process's epoch of one split: its batches and how they group into blocks."""
    order: list[int]  # the split's shards in the order of this epoch
    counts: list[int]  # samples per shard (manifest order)
    span: tuple[int, int]  # this process's samples in the concatenated order
    sizes: list[int]  # batch sizes, planned (before bad samples are skipped)
    pad_to: list[int] | None  # validation: each batch's size on the fullest process
    per_block: int  # batches per block

    @property
    def num_blocks(self) -> int:
        return math.ceil(len(self.sizes) / self.per_block)

    def block_batches(self, block: int) -> list[int]:
        return self.sizes[block * self.per_block:(block + 1) * self.per_block]

    def block_samples(self, block: int) -> tuple[int, int]:
        """[a, b) of the block's samples in the concatenated order."""
        first = self.span[0] + sum(self.sizes[:block * self.per_block])
        return first, first + sum(self.block_batches(block))

    def pieces(self, a: int, b: int) -> list[Piece]:
        """Samples [a, b) of the concatenated order as runs of consecutive samples of one shard each."""
        ends = []
        for shard in self.order:
            ends.append((ends[-1] if ends else 0) + self.counts[shard])
        found, i = [], bisect.bisect_right(ends, a)
        while a < b:
            start = ends[i] - self.counts[self.order[i]]
            hi = min(b, ends[i])
            found.append(Piece(self.order[i], a - start, hi - start))
            a, i = hi, i + 1
        return found


def make_plan(counts: list[int], *, train: bool, seed: int, epoch: int, processes: int, process: int,
              batch: int, shuffle_buffer: int) -> Plan:
    total = sum(counts)
    if total < processes:
        raise ToolkitError(f"the shard set's {'training' if train else 'validation'} split has {total} samples, "
                           f"fewer than the {processes} processes")
    order = list(range(len(counts)))
    if train:  # the shard order of this epoch, the same on every process
        order = torch.randperm(len(counts), generator=_seeded(seed, epoch, 17)).tolist()
    parts = spans(total, processes)
    lo, hi = parts[process]
    widest = parts[0][1] - parts[0][0]
    steps = math.ceil(widest / batch)
    if train:
        if hi - lo < steps:
            raise ToolkitError(f"data.batch_size {batch}: {total} training samples over {processes} processes cannot "
                               f"give every process {steps} batches of at least one image; use a larger batch size")
        sizes, pad_to = train_batches(hi - lo, steps, batch), None
    else:
        sizes = [max(0, min(batch, hi - lo - k * batch)) for k in range(steps)]
        pad_to = [min(batch, widest - k * batch) for k in range(steps)]
    return Plan(order, list(counts), (lo, hi), sizes, pad_to, max(1, shuffle_buffer // batch) if train else 1)


def block_permutation(n: int, seed: int, epoch: int, process: int, block: int) -> torch.Tensor:
    """The order of a training block's n samples: the shuffle buffer, seeded, so a resume redraws it alike."""
    return torch.randperm(n, generator=_seeded(seed, epoch, process, block, 29))
