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
    return img.convert("L" if channels == 1 else "RGB")


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
    """uint8 (N)xCxHxW -> float32, scaled to 0..1, then (x - mean) / std per channel."""
    mean_t = torch.tensor(mean, dtype=torch.float32, device=images.device).view(-1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=images.device).view(-1, 1, 1)
    return (images.float() / 255.0 - mean_t) / std_t


def open_image(source: str | bytes | Image.Image) -> Image.Image:
    """Open a path or encoded bytes; the first frame of an animation."""
    if isinstance(source, Image.Image):
        return source
    img = Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source)
    img.seek(0)
    img.load()
    return img


def preprocess_image(source: str | bytes | Image.Image, pre: Preprocess) -> torch.Tensor:
    """One image -> the float tensor C x S x S the model sees at evaluation."""
    img = open_image(source)
    uint8 = pil_to_uint8(img, pre["channels"], pre["image_size"], pre["resize"])
    return normalize(uint8, pre["mean"], pre["std"])
