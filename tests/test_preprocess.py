"""Preprocessing version 2 (crop, box-reduce, resize): bounded for any shape, bit-equal between the
toolkit (files), the in-memory datasets (tensors) and the handler; version 1 kept for older models;
EXIF orientation honoured everywhere; a bad training file reported by its path."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

import fuzz_corpus
from test_handler import encode, handler_module, make_handler, make_model_dir
from toolkit.config import DataConfig
from toolkit.data import FileImages, _conform, build_data, build_loaders
from toolkit.errors import ToolkitError
from toolkit.preprocess import Preprocess, load_uint8, pil_to_uint8, preprocess_image, resize_uint8

SHAPES = [(1, 5000), (5000, 1), (3000, 40), (40, 3000), (1200, 900), (300, 300), (150, 60), (63, 64), (65, 200)]


def picture(width: int, height: int, mode: str, seed: int = 0) -> Image.Image:
    """Smooth content with edges (a gradient plus blocks of noise), in `mode`."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 // max(1, width - 1), y * 255 // max(1, height - 1), (x + y) % 256], -1).astype(np.uint8)
    rgb[: height // 3, : width // 3] = rng.integers(0, 256, (height // 3, width // 3, 3), dtype=np.uint8)
    img = Image.fromarray(rgb)
    if mode == "RGBA":
        img.putalpha(Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint8)))
        return img
    if mode == "I;16":
        return Image.fromarray((rgb[..., 0].astype(np.uint16) * 257))
    return img.quantize(32) if mode == "P" else img.convert(mode)


@pytest.mark.parametrize("resize", ["resize", "resize_center_crop"])
@pytest.mark.parametrize("channels", [1, 3])
def test_handler_equals_toolkit_for_every_shape(tmp_path, channels, resize):
    model_dir = make_model_dir(tmp_path, channels=channels, image_size=16, resize=resize)  # reduced from 64 up
    handler = make_handler(model_dir)
    pre = Preprocess(channels=channels, image_size=16, resize=resize, mean=[0.5] * channels, std=[0.25] * channels,
                     preprocess_version=2)
    for width, height in SHAPES:
        for mode in ("RGB", "RGBA", "L", "P", "I;16"):
            raw = encode(picture(width, height, mode), "PNG")
            ours = handler.image_to_tensor(handler.decode(raw))
            assert ours.shape == (channels, 16, 16)
            assert torch.equal(ours, preprocess_image(raw, pre)), (width, height, mode)


@pytest.mark.parametrize("resize", ["resize", "resize_center_crop"])
@pytest.mark.parametrize("channels", [1, 3])
def test_in_memory_tensors_equal_the_files(channels, resize):
    """What training holds for a tensor dataset (_conform: channels, crop, reduce, resize in batches)
    is what predict and the handler compute from the same pixels in a PNG."""
    for width, height in [(200, 130), (130, 200), (64, 64), (40, 33), (700, 20)]:
        images = [picture(width, height, "RGB", seed) for seed in range(3)]
        batch = torch.stack([torch.from_numpy(np.array(img)).permute(2, 0, 1) for img in images])
        conformed = _conform(batch, channels, 16, resize)
        for img, tensor in zip(images, conformed):
            assert torch.equal(tensor, pil_to_uint8(img, channels, 16, resize)), (width, height)
        if channels == 3:
            assert torch.equal(resize_uint8(batch, 16, resize), conformed)


def test_version_2_is_version_1_where_nothing_is_cropped_or_reduced():
    square = encode(picture(50, 50, "RGB"), "PNG")
    wide = encode(picture(300, 200, "RGB"), "PNG")
    for resize in ("resize", "resize_center_crop"):
        pre = Preprocess(channels=3, image_size=32, resize=resize, mean=[0.5] * 3, std=[0.25] * 3)
        v1, v2 = ({**pre, "preprocess_version": v} for v in (1, 2))
        assert torch.equal(preprocess_image(square, v1), preprocess_image(square, v2))
        # elsewhere the central square moves by under a pixel of the output: close, not equal
        # (measured 0.011 squashed, 0.019 centre-cropped; the left square instead of the central: 0.62)
        assert (preprocess_image(wide, v1) - preprocess_image(wide, v2)).abs().mean() < 0.05


def test_thin_image_costs_little_in_the_toolkit():
    """1 x 100,000 pixels asked version 1 for a 15 GB tensor at 224, centre-cropped."""
    raw = fuzz_corpus.png_plain(1, 100_000)
    pre = Preprocess(channels=3, image_size=224, resize="resize_center_crop", mean=[0.5] * 3, std=[0.25] * 3,
                     preprocess_version=2)
    assert load_uint8(raw, pre).shape == (3, 224, 224)
    with pytest.raises(ValueError, match=r"1x100000, a side above the limit 65535 \(data.max_side\)"):
        load_uint8(raw, pre, {"max_pixels": 40_000_000, "max_side": 65_535})
    with pytest.raises(ValueError, match=r"more elongated than 20:1"):
        load_uint8(raw, {**pre, "preprocess_version": 1})


def test_an_export_without_a_version_is_served_as_version_1(tmp_path):
    model_dir = make_model_dir(tmp_path, channels=3, image_size=16, resize="resize_center_crop", version=None)
    handler = make_handler(model_dir)
    assert handler.version == 1
    pre = Preprocess(channels=3, image_size=16, resize="resize_center_crop", mean=[0.5] * 3, std=[0.25] * 3,
                     preprocess_version=1)
    for width, height in [(300, 200), (120, 64), (1200, 900)]:
        raw = encode(picture(width, height, "RGB"), "JPEG")
        assert torch.equal(handler.image_to_tensor(handler.decode(raw)), preprocess_image(raw, pre))
    from test_handler import handle

    answers, ctx = handle(handler, model_dir, [{"body": bytearray(fuzz_corpus.png_plain(30_000, 1))}])
    assert ctx.get_response_status(0)[0] == 413 and "20:1" in answers[0]["error"]


def test_an_export_from_a_newer_toolkit_is_refused_at_load(tmp_path):
    model_dir = make_model_dir(tmp_path, version=3)
    with pytest.raises(ValueError, match="preprocess_version 3 is newer than this handler"):
        make_handler(model_dir)


# ---------------------------------------------------------------- EXIF orientation
# What a camera stores for each tag: the upright picture turned the other way (PIL's exif_transpose
# applies ROTATE_180 for 3, ROTATE_270 for 6, ROTATE_90 for 8).
STORED = {3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}


def tagged_jpeg(upright: Image.Image, orientation: int | None) -> bytes:
    stored = upright.transpose(STORED[orientation]) if orientation else upright
    exif = Image.Exif()
    if orientation:
        exif[0x0112] = orientation
    return encode(stored, "JPEG", quality=95, exif=exif.tobytes())


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_orientation_is_applied_in_the_toolkit_and_the_handler(tmp_path, orientation):
    upright = picture(64, 40, "RGB", seed=orientation)  # not square: a turn changes the shape
    raw = tagged_jpeg(upright, orientation)
    untagged = encode(upright.transpose(STORED[orientation]), "JPEG", quality=95)  # the same pixels, no tag
    model_dir = make_model_dir(tmp_path, channels=3, image_size=24, resize="resize_center_crop")
    handler = make_handler(model_dir)
    pre = Preprocess(channels=3, image_size=24, resize="resize_center_crop", mean=[0.5] * 3, std=[0.25] * 3,
                     preprocess_version=2)
    assert handler.decode(raw).size == (64, 40)
    ours = handler.image_to_tensor(handler.decode(raw))
    assert torch.equal(ours, preprocess_image(raw, pre))
    reference = preprocess_image(encode(upright, "JPEG", quality=95), pre)
    sideways = preprocess_image(untagged, pre)
    assert (ours - reference).abs().mean() < 0.05  # JPEG noise only (normalised units, std 0.25)
    assert (sideways - reference).abs().mean() > 0.5  # what was answered before: the picture turned
    # training's file loader (FileImages: imagefolder, both pipelines) reads it the same way
    path = tmp_path / "tagged.jpg"
    path.write_bytes(raw)
    images, _ = FileImages([(str(path), 0)], pre)[0]
    assert torch.equal(images, load_uint8(raw, pre))


def test_unreadable_exif_is_ignored(tmp_path):
    raw = bytearray(tagged_jpeg(picture(30, 20, "RGB"), 6))
    start = raw.index(b"Exif\0\0") + 6
    raw[start:start + 8] = b"XX\0\x2a\xff\xff\xff\xff"  # neither byte order: PIL cannot read the block
    model_dir = make_model_dir(tmp_path, channels=3, image_size=16)
    handler = make_handler(model_dir)
    assert handler.decode(bytes(raw)).size == (20, 30)  # taken as stored


# ---------------------------------------------------------------- training
def test_a_training_file_above_the_limits_is_reported_by_its_path(tmp_path):
    root = tmp_path / "photos"
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        for i in range(3):
            picture(20, 14, "RGB", seed=i).save(root / name / f"{i}.png")
    thin = root / "b" / "thin.png"
    thin.write_bytes(fuzz_corpus.png_plain(1, 70_000))
    for pipeline in ("memory", "loader"):
        cfg = DataConfig(name="imagefolder", root=str(root), image_size=16, pipeline=pipeline, val_fraction=0.5,
                         split_seed=0, num_workers=0)
        with pytest.raises(ToolkitError, match=rf"{thin}: cannot use this image: image is 1x70000, a side above the limit 65535 \(data.max_side\)"):
            bundle = build_data(cfg)
            for dataset in (bundle.train, bundle.val):
                for i in range(len(dataset)):
                    dataset[i]
    # Through a DataLoader worker process, as training reads it: the same one line, no worker traceback.
    cfg = DataConfig(name="imagefolder", root=str(root), image_size=16, pipeline="loader", val_fraction=0.5,
                     num_workers=1, batch_size=2)
    bundle = build_data(cfg)
    with pytest.raises(ToolkitError) as info:
        for loader in build_loaders(bundle, cfg, seed=0, pin_memory=False):
            list(loader)
    assert str(info.value) == f"{thin}: cannot use this image: image is 1x70000, a side above the limit 65535 (data.max_side)"
    cfg = DataConfig(name="imagefolder", root=str(root), image_size=16, pipeline="memory", max_side=100_000)
    bundle = build_data(cfg)  # within the raised limit: the thin file trains like any other
    assert len(bundle.train) + len(bundle.val) == 7


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("resize", ["resize", "resize_center_crop"])
@pytest.mark.parametrize("channels", [1, 3])
def test_jpegs_decoded_by_torchvision_equal_pils_pixels(channels, resize, version):
    """load_uint8 takes decode_jpeg for a JPEG that PIL would decode whole (faster): the same uint8 pixels as PIL's
    path, colour or gray, every chroma subsampling, sizes around the draft's threshold (4 x S) and a reduction."""
    from toolkit.preprocess import jpeg_uint8, open_image

    pre = Preprocess(channels=channels, image_size=32, resize=resize, mean=[0.5] * channels, std=[0.5] * channels,
                     preprocess_version=version)
    taken = 0
    for (width, height), mode, subsampling in [((127, 96), "RGB", 2), ((40, 30), "RGB", 0), ((300, 100), "L", 0),
                                               ((90, 127), "RGB", 1), ((129, 140), "RGB", 2), ((32, 32), "L", 0)]:
        out = io.BytesIO()
        picture(width, height, mode).save(out, format="JPEG", quality=90, subsampling=subsampling)
        data = out.getvalue()
        fast = jpeg_uint8(data, pre)
        pil = pil_to_uint8(open_image(data, 32), channels, 32, resize, version)
        assert torch.equal(load_uint8(data, pre), pil)
        if min(width, height) < 4 * 32:  # no draft: torchvision's decode, equal to PIL's
            assert fast is not None and torch.equal(fast, pil), (width, height, mode)
            taken += 1
        else:
            assert fast is None  # PIL's draft decodes it at a reduced scale, faster still
    assert taken == 5
