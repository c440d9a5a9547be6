"""The two pipelines a DataBundle feeds: whole uint8 batches indexed from memory (TensorImages) or
files decoded per sample by DataLoader workers (FileImages), and the loaders built over them."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset, SequentialSampler

from toolkit.config import DataConfig
from toolkit.data.samplers import EpochShuffle, SliceBatches
from toolkit.errors import ImageFileError
from toolkit.preprocess import READ_ERRORS, Limits, Preprocess, load_uint8, resize_uint8


class TensorImages(Dataset):
    """uint8 images N x C x H x W and labels N, fetched a whole batch per index (no per-sample work).

    With `resize` (size, policy), images are kept at their own size and resized a batch at a time:
    for sets that would not fit in memory at the model's size (CIFAR at 224 would be 9 GB)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, resize: tuple[int, str] | None = None):
        self.images, self.labels, self.resize = images, labels, resize

    def __len__(self) -> int:
        return len(self.labels)

    def _sized(self, images: torch.Tensor) -> torch.Tensor:
        return images if self.resize is None else resize_uint8(images, *self.resize)

    def __getitem__(self, index: int):
        return self._sized(self.images[index]), self.labels[index]

    def __getitems__(self, indices: list[int]):
        index = torch.as_tensor(indices)
        return self._sized(self.images[index]), self.labels[index]


class FileImages(Dataset):
    """(path, label) pairs decoded per sample into uint8 C x S x S, for sets too big for memory.
    A file that cannot be read, or is above `limits`, stops the run with a ToolkitError naming it.

    `augment(transform, seed)` makes each sample augmented in the worker (uint8 C x S x S -> the same), its
    random draws seeded from (seed, epoch, index): the sampler's keys (EpochShuffle keyed: epoch * size +
    index) carry the epoch. A sample's augmentation is then the same whatever the number of workers or
    processes, and after a mid-epoch resume; processes differ as their samples do."""

    def __init__(self, samples: list[tuple[str, int]], pre: Preprocess, limits: Limits | None = None):
        self.samples, self.pre, self.limits = samples, pre, limits
        self.transform, self.seed = None, 0

    def augment(self, transform, seed: int) -> None:
        self.transform, self.seed = transform, seed

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: int):
        epoch, index = divmod(int(key), len(self.samples))
        path, label = self.samples[index]
        try:
            image = load_uint8(path, self.pre, self.limits)
        except READ_ERRORS as exc:
            raise ImageFileError(f"{path}: cannot use this image: {exc}") from None
        if self.transform is None:
            return image, label
        with torch.random.fork_rng(devices=[]):  # the worker's own stream is left as it was
            torch.manual_seed(((self.seed * 1_000_003 + epoch) * 10_000_019 + index) % 2**63)
            return self.transform(image), label


def _pass_through(batch):
    return batch


@dataclass
class DataBundle:
    train: Dataset
    val: Dataset
    classes: list[str]
    preprocess: Preprocess
    pipeline: str  # "memory", "loader" or "shards"
    source_side: int | None = None  # the source images' typical short side, before resizing

    @property
    def in_memory(self) -> bool:
        return self.pipeline == "memory"


def _choose_pipeline(cfg: DataConfig, nbytes: int) -> str:
    if cfg.pipeline != "auto":
        return cfg.pipeline
    return "memory" if nbytes <= cfg.memory_limit_mb * 2**20 else "loader"


def _decode_all(files: FileImages) -> TensorImages:
    """Decode every file once, with a worker per core, into one preallocated uint8 tensor."""
    pre = files.pre
    images = torch.empty((len(files), pre["channels"], pre["image_size"], pre["image_size"]), dtype=torch.uint8)
    labels = torch.empty(len(files), dtype=torch.long)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    loader = DataLoader(files, batch_size=256, num_workers=min(cores, len(files) // 256), shuffle=False)
    start = 0
    for batch_images, batch_labels in loader:
        images[start:start + len(batch_labels)] = batch_images
        labels[start:start + len(batch_labels)] = batch_labels
        start += len(batch_labels)
    return TensorImages(images, labels)


def build_loaders(bundle: DataBundle, cfg: DataConfig, seed: int, pin_memory: bool,
                  accelerator=None) -> tuple[DataLoader, DataLoader]:
    """Train loader (reproducible shuffle per epoch) and val loader (in order). A shard set's loaders are this
    process's own (`accelerator` tells which), never prepared."""
    if bundle.pipeline == "shards":
        from toolkit.data.shard_loader import shard_loaders

        return shard_loaders(bundle, cfg, seed, pin_memory, accelerator)
    # one index tensor per batch (no per-sample Python); files are keyed by epoch for their augmentation
    sampler = EpochShuffle(len(bundle.train), seed, keyed=not bundle.in_memory)
    eval_batch = cfg.eval_batch_size or 2 * cfg.batch_size
    # Iterators take their seeds from this generator, never from the global RNG (which drives the
    # augmentation): both pipelines, and a resumed run, then draw the same augmentation stream.
    generator = torch.Generator().manual_seed(seed)
    if bundle.in_memory:  # the batch is one tensor index: workers would only add copies
        common = dict(num_workers=0, collate_fn=_pass_through, generator=generator)
    else:
        common = dict(num_workers=cfg.num_workers, pin_memory=pin_memory,
                      persistent_workers=cfg.num_workers > 0,
                      prefetch_factor=4 if cfg.num_workers > 0 else None, generator=generator)
    train = DataLoader(bundle.train, batch_sampler=SliceBatches(sampler, cfg.batch_size, False), **common)
    val = DataLoader(bundle.val, batch_sampler=SliceBatches(SequentialSampler(bundle.val), eval_batch, False), **common)
    return train, val


def skip_batches(accelerator, loader, count: int):
    """The loader from its batch `count` on (a mid-epoch resume): a shard loader starts reading there, others
    skip through Accelerate."""
    if not count:
        return loader
    if hasattr(loader, "from_batch"):
        return loader.from_batch(count)
    return accelerator.skip_first_batches(loader, count)


def num_steps(loader_len: int, grad_accum_steps: int) -> int:
    """Optimizer steps per epoch for a per-process loader of loader_len batches."""
    return math.ceil(loader_len / grad_accum_steps)
