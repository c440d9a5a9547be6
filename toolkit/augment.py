"""Batch-level augmentation and normalisation on the training device: whole uint8 batches in, float
batches out, per-image random draws from the process's torch RNG. The ImageNet-style augmentations
(data.augment.resized_crop_scale, trivial_augment, color_jitter, random_erasing) run here on whole
batches in the memory pipeline (toolkit/batch_ops.py), and as torchvision.transforms.v2 per sample in
the loader pipeline's workers (loader_transform): the same transforms in the same order either way."""

from __future__ import annotations

import torch
from torch import nn

from toolkit import batch_ops
from toolkit.config import AugmentConfig
from toolkit.preprocess import Preprocess, normalize


class BatchAugment(nn.Module):
    """uint8 batch on the device -> augmented (training only), normalised float batch.

    Padded random crop and flip are drawn per image with whole-batch tensor ops, from the
    global torch RNG (seeded per process, saved in the resume state)."""

    def __init__(self, pre: Preprocess, crop_padding: int = 0, hflip: bool = False, channels_last: bool = False,
                 imagenet: AugmentConfig | None = None):
        super().__init__()
        self.mean, self.std = pre["mean"], pre["std"]
        self.crop_padding, self.hflip, self.channels_last = crop_padding, hflip, channels_last
        self.imagenet = imagenet if imagenet is not None and imagenet.imagenet_style else None  # memory pipeline only

    def forward(self, images: torch.Tensor, train: bool) -> torch.Tensor:
        if train and self.imagenet is not None:
            images = imagenet_batch(images, self.imagenet, self.mean)
        if train and self.crop_padding:
            images = random_crop(images, self.crop_padding)
        if train and self.hflip:
            flip = torch.rand(images.shape[0], device=images.device) < 0.5
            images = torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)
        out = normalize(images, self.mean, self.std)
        return out.contiguous(memory_format=torch.channels_last) if self.channels_last else out


def random_crop(images: torch.Tensor, padding: int) -> torch.Tensor:
    """Per-image random crop of the original size from a zero-padded batch (N x C x H x W)."""
    n, _, h, w = images.shape
    padded = nn.functional.pad(images, (padding,) * 4)
    dy = torch.randint(0, 2 * padding + 1, (n, 1, 1), device=images.device)
    dx = torch.randint(0, 2 * padding + 1, (n, 1, 1), device=images.device)
    rows = (torch.arange(h, device=images.device).view(1, h, 1) + dy).expand(n, h, w)
    cols = (torch.arange(w, device=images.device).view(1, 1, w) + dx).expand(n, h, w)
    batch = torch.arange(n, device=images.device).view(n, 1, 1).expand(n, h, w)
    return padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)


def fill_value(mean: list[float]) -> list[int]:
    """Random erasing's fill: the normalisation mean as uint8, so the box is 0 after normalising (as
    RandomErasing(value=0) after Normalize is used in torchvision's recipes)."""
    return [round(m * 255) for m in mean]


def imagenet_batch(images: torch.Tensor, aug: AugmentConfig, mean: list[float]) -> torch.Tensor:
    """The ImageNet-style augmentations of a uint8 batch on its device, in loader_transform's order."""
    if aug.resized_crop_scale:
        images = batch_ops.random_resized_crop(images, aug.resized_crop_scale, aug.resized_crop_ratio)
    if aug.trivial_augment:
        images = batch_ops.trivial_augment(images)
    if aug.color_jitter:
        images = batch_ops.color_jitter(images, aug.color_jitter)
    if aug.random_erasing:
        images = batch_ops.random_erasing(images, aug.random_erasing, torch.tensor(fill_value(mean)))
    return images


def loader_transform(aug: AugmentConfig, pre: Preprocess):
    """The same augmentations as torchvision.transforms.v2, per uint8 C x S x S sample (None when off)."""
    if not aug.imagenet_style:
        return None
    from torchvision.transforms import v2

    size = pre["image_size"]
    steps = ([v2.RandomResizedCrop(size, scale=aug.resized_crop_scale, ratio=aug.resized_crop_ratio, antialias=True)]
             if aug.resized_crop_scale else [])
    steps += [v2.TrivialAugmentWide()] if aug.trivial_augment else []
    if aug.color_jitter:
        steps.append(v2.ColorJitter(brightness=aug.color_jitter, contrast=aug.color_jitter, saturation=aug.color_jitter))
    if aug.random_erasing:
        steps.append(v2.RandomErasing(p=aug.random_erasing, value=fill_value(pre["mean"])))
    return v2.Compose(steps)
