"""The evaluation preprocessing: image file -> uint8 CxHxW -> normalised float tensor.

This is the one definition that training, `toolkit predict`, evaluation and (by a copy that the
tests hold equal) the TorchServe handler share. Its settings travel with the model in
`meta.json` / `preprocess.json` as a `Preprocess` dict.
"""

from __future__ import annotations

import io
from typing import Literal, TypedDict

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as F

ResizePolicy = Literal["resize", "resize_center_crop"]


class Preprocess(TypedDict):
    channels: int  # 1 (grayscale) or 3 (RGB)
    image_size: int  # square side in pixels
    resize: ResizePolicy  # "resize": squash to SxS; "resize_center_crop": short side S, centre crop
    mean: list[float]  # one per channel, on the 0..1 scale
    std: list[float]


def to_mode(img: Image.Image, channels: int) -> Image.Image:
    """Convert any PIL mode to "L" (channels=1) or "RGB" (channels=3).

    16-bit and 32-bit grayscale are scaled to 8 bits (PIL's own convert would clip them);
    transparent pixels are composited over white, so an RGBA logo looks as it does in a viewer.
    """
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        values = np.asarray(img, dtype=np.int64)
        img = Image.fromarray(np.clip(values >> 8, 0, 255).astype(np.uint8), mode="L")
    elif img.mode == "F":
        values = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.clip(values, 0, 255).astype(np.uint8), mode="L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img).convert("RGB")
    target = "L" if channels == 1 else "RGB"
    return img if img.mode == target else img.convert(target)


def resize_uint8(images: torch.Tensor, size: int, policy: ResizePolicy) -> torch.Tensor:
    """Resize uint8 images (CxHxW or NxCxHxW) to size x size with antialiased bilinear."""
    if policy == "resize":
        if images.shape[-2:] != (size, size):
            images = F.resize(images, [size, size], antialias=True)
        return images
    if min(images.shape[-2:]) != size:
        images = F.resize(images, size, antialias=True)
    return F.center_crop(images, [size, size])


def pil_to_uint8(img: Image.Image, channels: int, size: int, policy: ResizePolicy) -> torch.Tensor:
    """PIL image of any mode -> uint8 tensor channels x size x size."""
    return resize_uint8(F.pil_to_tensor(to_mode(img, channels)), size, policy)


def normalize(images: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    """uint8 (N)xCxHxW -> float32 (x / 255 - mean) / std per channel, as x * scale + shift in one
    float copy (the memory format of `images` is kept)."""
    scale = torch.tensor([1 / (255 * s) for s in std], dtype=torch.float32, device=images.device).view(-1, 1, 1)
    shift = torch.tensor([-m / s for m, s in zip(mean, std)], dtype=torch.float32, device=images.device).view(-1, 1, 1)
    return images.to(torch.float32).mul_(scale).add_(shift)


def draft(img: Image.Image, size: int) -> None:
    """JPEG only: decode at 1/2, 1/4 or 1/8 scale (in the DCT, several times faster) where the image
    stays at least 2 x size on each side at that scale, as PIL's thumbnail() does (reducing_gap 2);
    the antialiased resize to `size` follows from there. Call before load()."""
    if img.format == "JPEG" and min(img.size) >= 4 * size:
        img.draft(None, (2 * size, 2 * size))


def open_image(source: str | bytes | Image.Image, size: int | None = None) -> Image.Image:
    """Open a path or encoded bytes; the first frame of an animation. With `size` (the model's input
    side), large JPEGs are decoded at a reduced scale that still covers it (see `draft`)."""
    if isinstance(source, Image.Image):
        return source
    img = Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source)
    img.seek(0)
    if size is not None:
        draft(img, size)
    img.load()
    return img


def load_uint8(source: str | bytes | Image.Image, pre: Preprocess) -> torch.Tensor:
    """One image (path, bytes or PIL) -> uint8 C x S x S: what training holds in memory."""
    img = open_image(source, pre["image_size"])
    return pil_to_uint8(img, pre["channels"], pre["image_size"], pre["resize"])


def preprocess_image(source: str | bytes | Image.Image, pre: Preprocess) -> torch.Tensor:
    """One image -> the float tensor C x S x S the model sees at evaluation."""
    return normalize(load_uint8(source, pre), pre["mean"], pre["std"])
