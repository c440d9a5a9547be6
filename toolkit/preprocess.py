"""The evaluation preprocessing: image file -> uint8 CxHxW -> normalised float tensor.

This is the one definition that training, `toolkit predict`, evaluation and the TorchServe handler
share: `toolkit archive` ships this file inside the .mar and serve/handler.py imports it from there,
so it imports only numpy, torch, PIL and torchvision. Its settings travel with the model in
`meta.json` / `preprocess.json` as a `Preprocess` dict, with the `preprocess_version` that made it:

  1  resize the short side to S, then centre-crop: the resize's tensor grew with the aspect ratio
     (a 1 x 100,000 image asked for 15 GB). Kept for models trained with it, for aspect ratios up to
     V1_MAX_ASPECT only.
  2  (current) crop the region that maps to the output first (the central square for
     "resize_center_crop"), box-average it down by whole factors until each side is under
     4 x S (PIL's Image.reduce), then the same antialiased resize: work and memory are bounded
     by the decoded pixels and S, whatever the shape.
"""

from __future__ import annotations

import io
import warnings
from typing import Literal, NotRequired, TypedDict

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision.transforms.v2 import functional as F

ResizePolicy = Literal["resize", "resize_center_crop"]
PREPROCESS_VERSION = 2
REDUCING_GAP = 2  # box-reduce only while at least 2 x S stays on that side (as PIL's thumbnail does)
V1_MAX_ASPECT = 20  # version 1's resize tensor is S x (S * aspect): refused above this
KEYS = ("channels", "image_size", "resize", "mean", "std")
# The image formats read anywhere, by PIL's names: training and evaluate (file suffixes below),
# `toolkit predict` and the handler (PIL is asked for these decoders only: less attack surface).
IMAGE_FORMATS = ("JPEG", "PNG", "BMP", "GIF", "WEBP", "TIFF", "PPM")
FORMAT_NAMES = "JPEG, PNG, BMP, GIF, WebP, TIFF, PPM/PGM"
EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


def is_image_file(path: str) -> bool:
    """A file whose suffix is one of the formats read (torchvision's ImageFolder would leave out GIF)."""
    return str(path).lower().endswith(EXTENSIONS)
# What PIL raises for a file that is not a readable image (DecompressionBombError is none of the others).
READ_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


class Preprocess(TypedDict):
    channels: int  # 1 (grayscale) or 3 (RGB)
    image_size: int  # square side in pixels
    resize: ResizePolicy  # "resize": squash to SxS; "resize_center_crop": central square, then SxS
    mean: list[float]  # one per channel, on the 0..1 scale
    std: list[float]
    preprocess_version: NotRequired[int]  # absent = 1 (meta.json and preprocess.json before version 2)


def preprocess_from(meta: dict) -> Preprocess:
    """The Preprocess recorded in meta.json or preprocess.json; files without a version are version 1."""
    pre = Preprocess(**{k: meta[k] for k in KEYS})
    pre["preprocess_version"] = int(meta.get("preprocess_version", 1))
    if pre["preprocess_version"] not in (1, PREPROCESS_VERSION):
        raise ValueError(f"preprocess_version {pre['preprocess_version']} is not 1 or {PREPROCESS_VERSION} "
                         "(made by a newer toolkit?)")
    return pre


def to_mode(img: Image.Image, channels: int) -> Image.Image:
    """Convert any PIL mode to "L" (channels=1) or "RGB" (channels=3).

    16-bit and 32-bit grayscale are scaled to 8 bits (PIL's own convert would clip them);
    transparent pixels are composited over white, so an RGBA logo looks as it does in a viewer.
    """
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        values = np.asarray(img) >> 8  # at the native width (uint16/int32): no int64 copy of 40 M pixels
        img = Image.fromarray(np.clip(values, 0, 255, out=values).astype(np.uint8), mode="L")
    elif img.mode == "F":
        values = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.clip(values, 0, 255).astype(np.uint8), mode="L")
    if img.mode == "P" and "transparency" not in img.info:
        img = img.convert("RGB")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa", "P"):
        img = over_white(img)
    target = "L" if channels == 1 else "RGB"
    return img if img.mode == target else img.convert(target)


def over_white(img: Image.Image) -> Image.Image:
    """An image with transparency -> "RGB", composited over white, a strip of about 1 M pixels at a
    time: every step is per pixel, so the result is the whole-image one's, without three full-size
    RGBA copies alive at once (760 MB at 40 M pixels)."""
    out = Image.new("RGB", img.size)
    rows = max(1, 2**20 // max(1, img.width))
    for top in range(0, img.height, rows):
        box = (0, top, img.width, min(img.height, top + rows))
        strip = img.crop(box).convert("RGBA")
        white = Image.new("RGBA", strip.size, (255, 255, 255, 255))
        out.paste(Image.alpha_composite(white, strip).convert("RGB"), box[:2])
    return out


# ---------------------------------------------------------------- version 2: bounded
def square_box(width: int, height: int) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the central min(width, height) square."""
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side


def crop_region(img: Image.Image, policy: ResizePolicy) -> Image.Image:
    """The part of the image that reaches the output: all of it ("resize") or its central square.
    Cropping commutes with to_mode (a per-pixel conversion), so it may run first, on fewer pixels."""
    box = square_box(*img.size)
    if policy == "resize" or box == (0, 0, *img.size):
        return img
    return img.crop(box)


def reduce_factors(width: int, height: int, size: int) -> tuple[int, int]:
    """Whole box-average factors that leave each side in [2S, 4S) (1 where it is under 4S already)."""
    return max(1, width // (REDUCING_GAP * size)), max(1, height // (REDUCING_GAP * size))


def box_reduce(img: Image.Image, size: int) -> Image.Image:
    """"L" or "RGB" image -> box-averaged by whole factors (Image.reduce: one pass, memory of the output)."""
    factors = reduce_factors(*img.size, size)
    return img if factors == (1, 1) else img.reduce(factors)


def tensor_bounded(images: torch.Tensor, size: int, policy: ResizePolicy) -> torch.Tensor:
    """The same crop and reduction as crop_region + box_reduce, on uint8 (N)xCxHxW tensors (the
    in-memory datasets): through PIL where a reduction is due, so both paths agree bit for bit."""
    if policy == "resize_center_crop":
        left, top, right, bottom = square_box(images.shape[-1], images.shape[-2])
        images = images[..., top:bottom, left:right]
    if reduce_factors(images.shape[-1], images.shape[-2], size) == (1, 1):
        return images
    flat = images.reshape(-1, *images.shape[-3:])
    reduced = [F.pil_to_tensor(box_reduce(F.to_pil_image(image), size)) for image in flat]
    return torch.stack(reduced).reshape(*images.shape[:-2], *reduced[0].shape[-2:])


def resize_uint8(images: torch.Tensor, size: int, policy: ResizePolicy, version: int = PREPROCESS_VERSION) -> torch.Tensor:
    """Resize uint8 images (CxHxW or NxCxHxW) to size x size with antialiased bilinear."""
    if version == 1:
        return resize_uint8_v1(images, size, policy)
    images = tensor_bounded(images, size, policy)
    if images.shape[-2:] != (size, size):
        images = F.resize(images, [size, size], antialias=True)
    return images


# ---------------------------------------------------------------- version 1: models trained before
def check_v1_shape(width: int, height: int) -> None:
    if max(width, height) > V1_MAX_ASPECT * min(width, height):
        raise ValueError(f"image is {width}x{height}, more elongated than {V1_MAX_ASPECT}:1, the limit for models "
                         "made with preprocess_version 1 (resize before crop); retrain to accept any shape")


def resize_uint8_v1(images: torch.Tensor, size: int, policy: ResizePolicy) -> torch.Tensor:
    check_v1_shape(images.shape[-1], images.shape[-2])
    if policy == "resize":
        if images.shape[-2:] != (size, size):
            images = F.resize(images, [size, size], antialias=True)
        return images
    if min(images.shape[-2:]) != size:
        images = F.resize(images, size, antialias=True)
    return F.center_crop(images, [size, size])


# ---------------------------------------------------------------- PIL -> tensors
def pil_bounded(img: Image.Image, channels: int, size: int, policy: ResizePolicy,
                version: int = PREPROCESS_VERSION) -> torch.Tensor:
    """PIL image of any mode -> uint8 C x H x W of the region that reaches the output, box-reduced so
    that each side is under 4 x size (version 2; version 1: the whole image). PIL and numpy only up to
    the tensor: the handler runs this in its decoding threads."""
    if version == 1:
        return F.pil_to_tensor(to_mode(img, channels))
    return F.pil_to_tensor(box_reduce(to_mode(crop_region(img, policy), channels), size))


def pil_to_uint8(img: Image.Image, channels: int, size: int, policy: ResizePolicy,
                 version: int = PREPROCESS_VERSION) -> torch.Tensor:
    """PIL image of any mode -> uint8 tensor channels x size x size."""
    return resize_uint8(pil_bounded(img, channels, size, policy, version), size, policy, version)


def normalize(images: torch.Tensor, mean: list[float], std: list[float], out: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 (N)xCxHxW -> float32 (x / 255 - mean) / std per channel, as x * scale + shift in one
    float copy (the memory format of `images` is kept), written into `out` (a float tensor of any
    memory format: the handler's batch) when given."""
    scale = torch.tensor([1 / (255 * s) for s in std], dtype=torch.float32, device=images.device).view(-1, 1, 1)
    shift = torch.tensor([-m / s for m, s in zip(mean, std)], dtype=torch.float32, device=images.device).view(-1, 1, 1)
    floats = images.to(torch.float32) if out is None else out.copy_(images)
    return floats.mul_(scale).add_(shift)


def draft(img: Image.Image, size: int) -> None:
    """JPEG only: decode at 1/2, 1/4 or 1/8 scale (in the DCT, several times faster) where the image
    stays at least 2 x size on each side at that scale, as PIL's thumbnail() does (reducing_gap 2);
    the antialiased resize to `size` follows from there. Call before load()."""
    if img.format == "JPEG" and min(img.size) >= 4 * size:
        img.draft(None, (2 * size, 2 * size))


def upright(img: Image.Image) -> Image.Image:
    """Apply the EXIF orientation tag (phones store photos sideways and tag them), as viewers do.
    An unreadable EXIF block is ignored: the pixels are then taken as stored."""
    try:
        ImageOps.exif_transpose(img, in_place=True)  # in place: no copy of an image that needs no turn
    except Exception:  # PIL raises several types for malformed EXIF; the pixels themselves are fine
        pass
    return img


class Limits(TypedDict):
    max_pixels: int  # width x height
    max_side: int  # PIL keeps a pointer per row: 1 x 40,000,000 costs 1.5 s and 0.3-0.8 GB


def check_limits(width: int, height: int, limits: Limits | None, section: str = "data") -> None:
    """ValueError naming the config key when the header's size is above a limit (the handler's rule)."""
    if limits is None:
        return
    if width * height > limits["max_pixels"]:
        raise ValueError(f"image is {width}x{height} = {width * height} pixels, above the limit "
                         f"{limits['max_pixels']} ({section}.max_pixels)")
    if max(width, height) > limits["max_side"]:
        raise ValueError(f"image is {width}x{height}, a side above the limit {limits['max_side']} ({section}.max_side)")


def open_image(source: str | bytes | Image.Image, size: int | None = None, limits: Limits | None = None) -> Image.Image:
    """Open a path or encoded bytes, upright; the first frame of an animation. With `size` (the
    model's input side), large JPEGs are decoded at a reduced scale that still covers it (see
    `draft`); with `limits`, larger images are refused from the header, before decoding."""
    if isinstance(source, Image.Image):
        return source
    img = Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source, formats=IMAGE_FORMATS)
    check_limits(*img.size, limits)
    img.seek(0)
    if size is not None:
        draft(img, size)
    img.load()
    return upright(img)


def load_uint8(source: str | bytes | Image.Image, pre: Preprocess, limits: Limits | None = None) -> torch.Tensor:
    """One image (path, bytes or PIL) -> uint8 C x S x S: what training holds in memory."""
    if not isinstance(source, Image.Image) and (fast := jpeg_uint8(source, pre, limits)) is not None:
        return fast
    img = open_image(source, pre["image_size"], limits)
    version = pre.get("preprocess_version", 1)  # as preprocess_from reads a file without one
    return pil_to_uint8(img, pre["channels"], pre["image_size"], pre["resize"], version)


def jpeg_uint8(source: str | bytes, pre: Preprocess, limits: Limits | None = None) -> torch.Tensor | None:
    """load_uint8 of a JPEG that PIL would decode whole (no draft applies, upright as stored, RGB or gray) by
    torchvision's decode_jpeg: libjpeg-turbo's pixels either way (tests hold them equal), 1.4x faster
    (docs/benchmarks.md); None for any other file, which PIL reads."""
    data = source if isinstance(source, (bytes, bytearray)) else open(source, "rb").read()
    if data[:3] != b"\xff\xd8\xff":
        return None
    try:
        with Image.open(io.BytesIO(data), formats=("JPEG",)) as img:  # the header only
            check_limits(*img.size, limits)
            if img.mode not in ("RGB", "L") or min(img.size) >= 4 * pre["image_size"] or img.getexif().get(0x0112, 1) != 1:
                return None
        from torchvision.io import ImageReadMode, decode_jpeg

        with warnings.catch_warnings():  # torchvision 0.29 deprecates its decoders for torchcodec: kept while they last
            warnings.simplefilter("ignore", DeprecationWarning)
            image = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.UNCHANGED)
    except (ImportError, RuntimeError, OSError, SyntaxError):
        return None  # PIL reads it (and says what is wrong with a bad one)
    if image.shape[0] == 3 and pre["channels"] == 1:  # PIL's "RGB" -> "L", bit-exact
        weights = torch.tensor([19595, 38470, 7471], dtype=torch.int32).view(3, 1, 1)
        image = ((image.int() * weights).sum(0, keepdim=True) + 0x8000).bitwise_right_shift(16).to(torch.uint8)
    elif image.shape[0] == 1 and pre["channels"] == 3:
        image = image.expand(3, -1, -1)
    return resize_uint8(image, pre["image_size"], pre["resize"], pre.get("preprocess_version", 1))


def preprocess_image(source: str | bytes | Image.Image, pre: Preprocess) -> torch.Tensor:
    """One image -> the float tensor C x S x S the model sees at evaluation."""
    return normalize(load_uint8(source, pre), pre["mean"], pre["std"])
