"""ImageNet-style augmentations of whole uint8 batches on the device, each image with its own random
draw, in the distribution of the torchvision.transforms.v2 transform named (which the loader pipeline
runs per sample): RandomResizedCrop, ColorJitter (no hue), TrivialAugmentWide, RandomErasing."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as nnf
import torchvision.transforms.v2.functional as TF
from torchvision.ops import roi_align

TRIES = 10  # RandomResizedCrop and RandomErasing draw up to 10 boxes and keep the first that fits


def _uniform(n: int, low: float, high: float, device) -> torch.Tensor:
    return torch.empty(n, device=device).uniform_(low, high)


def _first_fit(fits: torch.Tensor, *values: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """fits: N x TRIES bool; per image the values of its first fitting try, and whether any fitted."""
    first = fits.int().argmax(1, keepdim=True)
    return fits.any(1), [v.gather(1, first).squeeze(1) for v in values]


def random_resized_crop(images: torch.Tensor, scale: tuple[float, float], ratio: tuple[float, float]) -> torch.Tensor:
    """v2.RandomResizedCrop(size, scale, ratio) per image, back to the batch's size (bilinear)."""
    n, _, height, width = images.shape
    device, area = images.device, height * width
    target = area * torch.empty(n, TRIES, device=device).uniform_(*scale)
    aspect = torch.exp(torch.empty(n, TRIES, device=device).uniform_(math.log(ratio[0]), math.log(ratio[1])))
    w, h = torch.sqrt(target * aspect).round(), torch.sqrt(target / aspect).round()
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    found, (w, h) = _first_fit(fits, w, h)
    # the fallback: the central crop of the whole image, its ratio clamped into `ratio`
    in_ratio = width / height
    fw, fh = (width, round(width / ratio[0])) if in_ratio < ratio[0] else (
        (round(height * ratio[1]), height) if in_ratio > ratio[1] else (width, height))
    w, h = torch.where(found, w, float(fw)), torch.where(found, h, float(fh))
    top = torch.where(found, (torch.rand(n, device=device) * (height - h + 1)).floor(), ((height - h) // 2))
    left = torch.where(found, (torch.rand(n, device=device) * (width - w + 1)).floor(), ((width - w) // 2))
    # roi_align samples each output pixel's bin bilinearly (several samples when it shrinks): a resize
    boxes = torch.stack([torch.arange(n, device=device, dtype=torch.float), left, top, left + w, top + h], 1)
    out = roi_align(images.float(), boxes, (height, width), spatial_scale=1.0, sampling_ratio=-1, aligned=True)
    return out.round_().clamp_(0, 255).to(torch.uint8)


def _blend(images: torch.Tensor, degenerate: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """torchvision's _blend with one factor per image: truncated back to uint8 as it does."""
    f = factor.view(-1, 1, 1, 1)
    return (images.float() * f + degenerate.float() * (1 - f)).clamp_(0, 255).to(torch.uint8)


def _gray(images: torch.Tensor) -> torch.Tensor:
    return TF.rgb_to_grayscale(images) if images.shape[1] == 3 else images


def brightness(images, factor):
    return _blend(images, torch.zeros_like(images), factor)


def saturation(images, factor):
    return images if images.shape[1] == 1 else _blend(images, _gray(images), factor)


def contrast(images, factor):
    return _blend(images, _gray(images).float().mean((-3, -2, -1), keepdim=True), factor)


def sharpness(images, factor):
    return _blend(images, TF.adjust_sharpness(images, 0.0), factor)


def color_jitter(images: torch.Tensor, strength: float) -> torch.Tensor:
    """v2.ColorJitter(brightness=s, contrast=s, saturation=s) per image: three factors drawn from
    [max(0, 1 - s), 1 + s] and the three adjustments applied in a random order of the image's own."""
    n, device = images.shape[0], images.device
    ops = (brightness, contrast, saturation)
    factors = torch.stack([_uniform(n, max(0.0, 1 - strength), 1 + strength, device) for _ in ops], 1)
    order = torch.rand(n, len(ops), device=device).argsort(1)  # a random permutation per image
    images = images.clone()
    for position in range(len(ops)):
        for k, op in enumerate(ops):
            pick = (order[:, position] == k).nonzero().squeeze(1)
            if len(pick):
                images[pick] = op(images[pick], factors[pick, k])
    return images


def _affine(images: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """Nearest-neighbour warp with a per-image inverse map (N x 2 x 3, in pixel coordinates about the
    image centre, as torchvision's affine builds its grid), zeros outside: v2's affine with fill 0."""
    n, _, height, width = images.shape
    ys, xs = torch.meshgrid(torch.arange(height, device=images.device) - height / 2 + 0.5,
                            torch.arange(width, device=images.device) - width / 2 + 0.5, indexing="ij")
    base = torch.stack([xs, ys, torch.ones_like(xs)], -1).view(1, -1, 3)  # 1 x HW x 3
    grid = (base @ inverse.transpose(1, 2)) / torch.tensor([width / 2, height / 2], device=images.device)
    out = nnf.grid_sample(images.float(), grid.view(n, height, width, 2), mode="nearest", padding_mode="zeros",
                          align_corners=False)
    return out.to(torch.uint8)


def _inverse_maps(op: str, magnitude: torch.Tensor, height: int, width: int) -> torch.Tensor:
    n = len(magnitude)
    m = torch.zeros(n, 2, 3, device=magnitude.device)
    m[:, 0, 0] = m[:, 1, 1] = 1
    if op == "ShearX":  # about the top-left corner (center=[0, 0]): x_in = x + s (y + H/2)
        m[:, 0, 1], m[:, 0, 2] = magnitude, magnitude * height / 2
    elif op == "ShearY":
        m[:, 1, 0], m[:, 1, 2] = magnitude, magnitude * width / 2
    elif op == "TranslateX":
        m[:, 0, 2] = -magnitude.trunc()
    elif op == "TranslateY":
        m[:, 1, 2] = -magnitude.trunc()
    else:  # Rotate by `magnitude` degrees about the centre
        rad = torch.deg2rad(-magnitude)
        m[:, 0, 0], m[:, 0, 1], m[:, 1, 0], m[:, 1, 1] = rad.cos(), rad.sin(), -rad.sin(), rad.cos()
    return m


BINS = 31
# TrivialAugmentWide's space: op -> (magnitudes of its 31 bins, or None; signed)
SPACE = {
    "Identity": (None, False),
    "ShearX": (torch.linspace(0.0, 0.99, BINS), True),
    "ShearY": (torch.linspace(0.0, 0.99, BINS), True),
    "TranslateX": (torch.linspace(0.0, 32.0, BINS), True),
    "TranslateY": (torch.linspace(0.0, 32.0, BINS), True),
    "Rotate": (torch.linspace(0.0, 135.0, BINS), True),
    "Brightness": (torch.linspace(0.0, 0.99, BINS), True),
    "Color": (torch.linspace(0.0, 0.99, BINS), True),
    "Contrast": (torch.linspace(0.0, 0.99, BINS), True),
    "Sharpness": (torch.linspace(0.0, 0.99, BINS), True),
    "Posterize": ((8 - (torch.arange(BINS) / ((BINS - 1) / 6))).round(), False),
    "Solarize": (torch.linspace(1.0, 0.0, BINS), False),
    "AutoContrast": (None, False),
    "Equalize": (None, False),
}
FACTORS = {"Brightness": brightness, "Color": saturation, "Contrast": contrast, "Sharpness": sharpness}


def _apply(op: str, images: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    if op in FACTORS:
        return FACTORS[op](images, 1.0 + magnitude)
    if op == "Posterize":  # keep the top `bits` bits of every value
        bits = magnitude.to(torch.int32).view(-1, 1, 1, 1)
        return images & (((1 << bits) - 1) << (8 - bits)).to(torch.uint8)
    if op == "Solarize":
        threshold = (255 * magnitude).view(-1, 1, 1, 1)
        return torch.where(images >= threshold, 255 - images, images)
    if op == "AutoContrast":
        return TF.autocontrast(images)
    if op == "Equalize":
        return TF.equalize(images)
    if op == "Identity":
        return images
    return _affine(images, _inverse_maps(op, magnitude, *images.shape[-2:]))


def trivial_augment(images: torch.Tensor) -> torch.Tensor:
    """v2.TrivialAugmentWide per image: an op drawn uniformly, a magnitude bin uniformly, a sign with
    probability 0.5. Vectorised per op: the images that drew an op are transformed together."""
    n, device = images.shape[0], images.device
    names = list(SPACE)
    op = torch.randint(len(names), (n,), device=device)
    bins = torch.randint(BINS, (n,), device=device)
    negate = torch.rand(n, device=device) <= 0.5
    out = images.clone()
    for k, name in enumerate(names):
        pick = (op == k).nonzero().squeeze(1)
        if len(pick) == 0:
            continue
        magnitudes, signed = SPACE[name]
        magnitude = torch.zeros(len(pick), device=device) if magnitudes is None else magnitudes.to(device)[bins[pick]]
        if signed:
            magnitude = torch.where(negate[pick], -magnitude, magnitude)
        out[pick] = _apply(name, images[pick], magnitude)
    return out


def random_erasing(images: torch.Tensor, p: float, value: torch.Tensor, scale=(0.02, 0.33), ratio=(0.3, 3.3)) -> torch.Tensor:
    """v2.RandomErasing(p, scale, ratio, value) per image: with probability p a box of random area and
    aspect (the first of 10 draws that fits) filled with `value` (per channel, uint8)."""
    n, _, height, width = images.shape
    device = images.device
    target = height * width * torch.empty(n, TRIES, device=device).uniform_(*scale)
    aspect = torch.exp(torch.empty(n, TRIES, device=device).uniform_(math.log(ratio[0]), math.log(ratio[1])))
    h, w = torch.sqrt(target * aspect).round(), torch.sqrt(target / aspect).round()
    found, (h, w) = _first_fit((h < height) & (w < width), h, w)
    erase = found & (torch.rand(n, device=device) < p)
    top = (torch.rand(n, device=device) * (height - h + 1)).floor().view(n, 1, 1)
    left = (torch.rand(n, device=device) * (width - w + 1)).floor().view(n, 1, 1)
    rows = torch.arange(height, device=device).view(1, height, 1)
    cols = torch.arange(width, device=device).view(1, 1, width)
    inside = (rows >= top) & (rows < top + h.view(n, 1, 1)) & (cols >= left) & (cols < left + w.view(n, 1, 1))
    inside &= erase.view(n, 1, 1)
    return torch.where(inside.unsqueeze(1), value.to(device, torch.uint8).view(1, -1, 1, 1), images)
