"""Datasets -> DataBundle: the configured source (synthetic, digits, a torchvision dataset, an image
folder) read into uint8 images at the model's size and channels, split into train and validation."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn

from toolkit.config import DataConfig
from toolkit.data.pipelines import DataBundle, FileImages, TensorImages, _choose_pipeline, _decode_all
from toolkit.errors import ToolkitError
from toolkit.names import DATASETS
from toolkit.preprocess import PREPROCESS_VERSION, Limits, Preprocess, is_image_file, resize_uint8


def build_data(cfg: DataConfig) -> DataBundle:
    """Read the configured source into uint8 images at the model's size and channels."""
    cfg = cfg.resolved()
    channels, size = cfg.channels, cfg.image_size
    pre = Preprocess(channels=channels, image_size=size, resize=cfg.resize, mean=cfg.mean, std=cfg.std,
                     preprocess_version=PREPROCESS_VERSION)
    if cfg.name == "imagefolder":
        return _imagefolder(cfg, pre)
    if cfg.name == "shards":
        from toolkit.data.shard_loader import shard_bundle

        return shard_bundle(cfg, pre)
    images, labels, val_images, val_labels, classes = source_arrays(cfg)
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


def source_arrays(cfg: DataConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
    """An in-memory source (synthetic, digits, a torchvision dataset) at its own size, split: uint8 train images
    N x C x H x W, labels, validation images, labels, and the class names."""
    channels = cfg.channels or DATASETS[cfg.name].channels
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
    return images, labels, val_images, val_labels, classes


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed random split of range(n): (train indices, val indices), both sorted."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = max(1, round(n * val_fraction))
    return perm[n_val:].sort().values, perm[:n_val].sort().values


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
    train_samples, val_samples, classes = folder_samples(cfg)
    nbytes = (len(train_samples) + len(val_samples)) * pre["channels"] * pre["image_size"] ** 2
    pipeline = _choose_pipeline(cfg, nbytes)
    limits = Limits(max_pixels=cfg.max_pixels, max_side=cfg.max_side)
    train, val = FileImages(train_samples, pre, limits), FileImages(val_samples, pre, limits)
    side = _typical_side([path for path, _ in train_samples])
    if pipeline == "memory":
        train, val = _decode_all(train), _decode_all(val)
    return DataBundle(train, val, classes, pre, pipeline, source_side=side)


def folder_samples(cfg: DataConfig) -> tuple[list[tuple[str, int]], list[tuple[str, int]], list[str]]:
    """An image folder's (path, class index) pairs, split: train/ and val/ when it has both, else a fixed random
    split of its class folders; and the class names."""
    from functools import partial

    from torchvision.datasets import ImageFolder as AnyFolder

    ImageFolder = partial(AnyFolder, is_valid_file=is_image_file)  # the suffixes of the formats every stage reads
    root = Path(cfg.root)
    try:
        if (root / "train").is_dir() and (root / "val").is_dir():
            train_ds, val_ds = ImageFolder(root / "train"), ImageFolder(root / "val")
            if val_ds.classes != train_ds.classes:
                raise ToolkitError(f"data.root: {root}/val has classes {val_ds.classes}, train/ has {train_ds.classes}")
            return train_ds.samples, val_ds.samples, list(train_ds.classes)
        train_ds = ImageFolder(root)
    except (FileNotFoundError, RuntimeError) as exc:
        raise ToolkitError(f"data.root: {root}: {exc}") from None
    train_idx, val_idx = split_indices(len(train_ds.samples), cfg.val_fraction, cfg.split_seed)
    return [train_ds.samples[i] for i in train_idx], [train_ds.samples[i] for i in val_idx], list(train_ds.classes)


def _typical_side(paths: list[str], probes: int = 64) -> int | None:
    """The median short side of up to `probes` files over the set, from their headers (the loader names bad ones)."""
    from PIL import Image

    sides = []
    for path in paths[:: max(1, len(paths) // probes)][:probes]:
        with contextlib.suppress(OSError, ValueError), Image.open(path) as image:
            sides.append(min(image.size))
    return sorted(sides)[len(sides) // 2] if sides else None

