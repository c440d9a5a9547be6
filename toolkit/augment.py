"""Batch-level augmentation and normalisation on the training device: whole uint8 batches in, float
batches out, per-image random draws from the process's torch RNG."""

from __future__ import annotations

import torch
from torch import nn

from toolkit.preprocess import Preprocess, normalize


class BatchAugment(nn.Module):
    """uint8 batch on the device -> augmented (training only), normalised float batch.

    Padded random crop and flip are drawn per image with whole-batch tensor ops, from the
    global torch RNG (seeded per process, saved in the resume state)."""

    def __init__(self, pre: Preprocess, crop_padding: int = 0, hflip: bool = False, channels_last: bool = False):
        super().__init__()
        self.mean, self.std = pre["mean"], pre["std"]
        self.crop_padding, self.hflip, self.channels_last = crop_padding, hflip, channels_last

    def forward(self, images: torch.Tensor, train: bool) -> torch.Tensor:
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
