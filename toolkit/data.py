"""Datasets -> DataBundle: uint8 images at the model's size (in memory or per sample), class names and
the evaluation preprocessing; the loaders that feed them (augmentation is toolkit/augment.py)."""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, Dataset, Sampler, SequentialSampler

from toolkit.config import DataConfig
from toolkit.errors import ImageFileError, ToolkitError
from toolkit.names import DATASETS
from toolkit.preprocess import PREPROCESS_VERSION, READ_ERRORS, Limits, Preprocess, is_image_file, load_uint8, resize_uint8



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
    A file that cannot be read, or is above `limits`, stops the run with a ToolkitError naming it."""

    def __init__(self, samples: list[tuple[str, int]], pre: Preprocess, limits: Limits | None = None):
        self.samples, self.pre, self.limits = samples, pre, limits

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        try:
            return load_uint8(path, self.pre, self.limits), label
        except READ_ERRORS as exc:
            raise ImageFileError(f"{path}: cannot use this image: {exc}") from None


def _pass_through(batch):
    return batch


class EpochShuffle(Sampler[int]):
    """A permutation drawn from (seed, epoch): identical on every process, reproducible on resume."""

    def __init__(self, size: int, seed: int):
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def order(self) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return torch.randperm(self.size, generator=generator)

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


@dataclass
class DataBundle:
    train: Dataset
    val: Dataset
    classes: list[str]
    preprocess: Preprocess
    pipeline: str  # "memory" or "loader"
    source_side: int | None = None  # the source images' typical short side, before resizing

    @property
    def in_memory(self) -> bool:
        return self.pipeline == "memory"


def build_data(cfg: DataConfig) -> DataBundle:
    """Read the configured source into uint8 images at the model's size and channels."""
    cfg = cfg.resolved()
    channels, size = cfg.channels, cfg.image_size
    pre = Preprocess(channels=channels, image_size=size, resize=cfg.resize, mean=cfg.mean, std=cfg.std,
                     preprocess_version=PREPROCESS_VERSION)
    if cfg.name == "imagefolder":
        return _imagefolder(cfg, pre)
    if cfg.name == "synthetic":
        images, labels, classes = _synthetic(cfg, channels)
        val_images = val_labels = None
    elif cfg.name == "digits":
        images, labels, classes = _digits()
        val_images = val_labels = None
    else:
        (images, labels), (val_images, val_labels), classes = _torchvision(cfg)
    if val_images is None:
        train_idx, val_idx = split_indices(len(labels), cfg.val_fraction, cfg.split_seed)
        images, labels, val_images, val_labels = images[train_idx], labels[train_idx], images[val_idx], labels[val_idx]
    fits = _choose_pipeline(cfg, (len(labels) + len(val_labels)) * channels * size * size) == "memory"
    native = images.shape[-1]
    if fits or images.shape[-2] != native or native >= size:
        train = TensorImages(_conform(images, channels, size, cfg.resize), labels)
        val = TensorImages(_conform(val_images, channels, size, cfg.resize), val_labels)
    else:  # too big at the model's size: keep the source size (uint8) and resize batch by batch
        lazy = (size, cfg.resize)
        train = TensorImages(_conform(images, channels, native, "resize"), labels, resize=lazy)
        val = TensorImages(_conform(val_images, channels, native, "resize"), val_labels, resize=lazy)
    return DataBundle(train, val, classes, pre, "memory", source_side=min(images.shape[-2:]))


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed random split of range(n): (train indices, val indices), both sorted."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = max(1, round(n * val_fraction))
    return perm[n_val:].sort().values, perm[:n_val].sort().values


def _choose_pipeline(cfg: DataConfig, nbytes: int) -> str:
    if cfg.pipeline != "auto":
        return cfg.pipeline
    return "memory" if nbytes <= cfg.memory_limit_mb * 2**20 else "loader"


def _conform(images: torch.Tensor, channels: int, size: int, policy: str) -> torch.Tensor:
    """uint8 N x C x H x W -> N x channels x size x size, converting channels as PIL would.

    Works through chunks into one preallocated uint8 tensor: the only other copy alive is the
    input, and none when nothing changes (never a float or int32 copy of the whole set)."""
    if images.shape[1:] == (channels, size, size):
        return images.contiguous()
    out = torch.empty((len(images), channels, size, size), dtype=torch.uint8)
    for start in range(0, len(images), 4096):
        chunk = images[start:start + 4096]
        if chunk.shape[1] == 3 and channels == 1:
            # PIL's "RGB" -> "L": L = (R*19595 + G*38470 + B*7471 + 0x8000) >> 16, bit-exact
            weights = torch.tensor([19595, 38470, 7471], dtype=torch.int32).view(1, 3, 1, 1)
            chunk = ((chunk.int() * weights).sum(1, keepdim=True) + 0x8000).bitwise_right_shift(16).to(torch.uint8)
        elif chunk.shape[1] == 1 and channels == 3:
            chunk = chunk.expand(-1, 3, -1, -1)
        out[start:start + len(chunk)] = resize_uint8(chunk, size, policy)
    return out


def _synthetic(cfg: DataConfig, channels: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Class prototypes (smooth random patterns) plus strong noise: learnable, not trivial."""
    generator = torch.Generator().manual_seed(1234 + cfg.split_seed)
    size = cfg.image_size or DATASETS["synthetic"].image_size
    prototypes = torch.rand(cfg.num_classes, channels, 4, 4, generator=generator)
    prototypes = nn.functional.interpolate(prototypes, size=(size, size), mode="bilinear", align_corners=False)
    labels = torch.arange(cfg.synthetic_samples) % cfg.num_classes
    labels = labels[torch.randperm(len(labels), generator=generator)]
    images = torch.empty((len(labels), channels, size, size), dtype=torch.uint8)
    # Chunks of about 1 M values (a multiple of 16 images keeps the random stream of one call):
    # the float temporaries stay a few MB, never a float copy of the whole set.
    step = max(16, 2**20 // (channels * size * size) // 16 * 16)
    for start in range(0, len(labels), step):
        chunk = labels[start:start + step]
        noisy = torch.randn(len(chunk), channels, size, size, generator=generator).mul_(0.6).add_(prototypes[chunk])
        images[start:start + len(chunk)] = noisy.clamp_(0, 1).mul_(255).round_()  # copy_ truncates to uint8
    return images, labels, [f"class_{i}" for i in range(cfg.num_classes)]


def _digits() -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """scikit-learn's 1,797 real 8x8 digits (values 0..16), scaled to uint8."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(digits.images * (255 / 16)).round().to(torch.uint8).unsqueeze(1)
    return images, torch.from_numpy(digits.target).long(), [str(d) for d in range(10)]


def _torchvision(cfg: DataConfig):
    import torchvision

    cls = getattr(torchvision.datasets, DATASETS[cfg.name].torchvision)
    splits = []
    for train in (True, False):
        try:
            ds = cls(root=cfg.root, train=train, download=cfg.download)
        except RuntimeError as exc:
            hint = "" if cfg.download else " Set data.download: true (needs internet) or point data.root at a copy."
            raise ToolkitError(f"data.root: {cfg.name} not found under {Path(cfg.root).resolve()} ({exc}).{hint}") from None
        images = torch.as_tensor(ds.data)
        images = images.unsqueeze(1) if images.ndim == 3 else images.permute(0, 3, 1, 2)  # CIFAR is NHWC
        splits.append((images.contiguous(), torch.as_tensor(ds.targets).long()))
    return splits[0], splits[1], list(ds.classes)


def _imagefolder(cfg: DataConfig, pre: Preprocess) -> DataBundle:
    from functools import partial

    from torchvision.datasets import ImageFolder as AnyFolder

    ImageFolder = partial(AnyFolder, is_valid_file=is_image_file)  # the suffixes of the formats every stage reads
    root = Path(cfg.root)
    try:
        if (root / "train").is_dir() and (root / "val").is_dir():
            train_ds, val_ds = ImageFolder(root / "train"), ImageFolder(root / "val")
            if val_ds.classes != train_ds.classes:
                raise ToolkitError(f"data.root: {root}/val has classes {val_ds.classes}, train/ has {train_ds.classes}")
            train_samples, val_samples = train_ds.samples, val_ds.samples
        else:
            train_ds = ImageFolder(root)
            train_idx, val_idx = split_indices(len(train_ds.samples), cfg.val_fraction, cfg.split_seed)
            train_samples = [train_ds.samples[i] for i in train_idx]
            val_samples = [train_ds.samples[i] for i in val_idx]
    except (FileNotFoundError, RuntimeError) as exc:
        raise ToolkitError(f"data.root: {root}: {exc}") from None
    nbytes = (len(train_samples) + len(val_samples)) * pre["channels"] * pre["image_size"] ** 2
    pipeline = _choose_pipeline(cfg, nbytes)
    limits = Limits(max_pixels=cfg.max_pixels, max_side=cfg.max_side)
    train, val = FileImages(train_samples, pre, limits), FileImages(val_samples, pre, limits)
    side = _typical_side([path for path, _ in train_samples])
    if pipeline == "memory":
        train, val = _decode_all(train), _decode_all(val)
    return DataBundle(train, val, list(train_ds.classes), pre, pipeline, source_side=side)


def _typical_side(paths: list[str], probes: int = 64) -> int | None:
    """The median short side of up to `probes` files over the set, from their headers (the loader names bad ones)."""
    from PIL import Image

    sides = []
    for path in paths[:: max(1, len(paths) // probes)][:probes]:
        with contextlib.suppress(OSError, ValueError), Image.open(path) as image:
            sides.append(min(image.size))
    return sorted(sides)[len(sides) // 2] if sides else None


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


def build_loaders(bundle: DataBundle, cfg: DataConfig, seed: int, pin_memory: bool) -> tuple[DataLoader, DataLoader]:
    """Train loader (reproducible shuffle per epoch) and val loader (in order)."""
    sampler = EpochShuffle(len(bundle.train), seed)  # one index tensor per batch: no per-sample Python
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


def num_steps(loader_len: int, grad_accum_steps: int) -> int:
    """Optimizer steps per epoch for a per-process loader of loader_len batches."""
    return math.ceil(loader_len / grad_accum_steps)
