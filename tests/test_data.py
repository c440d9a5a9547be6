"""Data sources and batch transforms: real files, exact sizes, conversions as PIL does them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_main
from toolkit.config import DataConfig
from toolkit.augment import BatchAugment, random_crop
from toolkit.data import _conform, build_data, split_indices
from toolkit.errors import ToolkitError
from toolkit.preprocess import preprocess_image


def make_folder(root, classes=("red", "green", "blue"), per_class=6, mode="RGB", size=(20, 14), ext="png"):
    """Class folders of real image files; colour tells the class."""
    colours = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (20, 40, 230)}
    rng = np.random.default_rng(0)
    for name in classes:
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = np.clip(np.array(colours[name]) + rng.integers(-20, 20, (size[1], size[0], 3)), 0, 255)
            img = Image.fromarray(pixels.astype(np.uint8), "RGB").convert(mode)
            img.save(root / name / f"{i}.{ext}")
    return root


def test_digits_is_real_and_split_is_fixed():
    bundle = build_data(DataConfig(name="digits", val_fraction=0.2))
    assert len(bundle.train) + len(bundle.val) == 1797 and len(bundle.val) == 359
    assert bundle.classes == [str(d) for d in range(10)]
    assert bundle.train.images.dtype == torch.uint8 and bundle.train.images.shape[1:] == (1, 8, 8)
    again = build_data(DataConfig(name="digits", val_fraction=0.2))
    assert torch.equal(bundle.val.labels, again.val.labels) and torch.equal(bundle.val.images, again.val.images)
    other = build_data(DataConfig(name="digits", val_fraction=0.2, split_seed=1))
    assert not torch.equal(bundle.val.labels, other.val.labels)


def test_split_indices_partition():
    train, val = split_indices(101, 0.25, seed=3)
    assert len(val) == 25 and sorted(torch.cat([train, val]).tolist()) == list(range(101))


@pytest.mark.parametrize("name", ["mnist", "cifar10"])
def test_missing_torchvision_dataset_names_path_and_flag(tmp_path, name, capsys):
    with pytest.raises(ToolkitError) as info:
        build_data(DataConfig(name=name, root=str(tmp_path / "nothing")))
    assert str(tmp_path / "nothing") in str(info.value) and "data.download: true" in str(info.value)
    code, _, err = run_main(capsys, "train", "--config", "smoke.yaml", "--set", f"data.name={name}",
                            "--set", f"data.root={tmp_path}", "--set", f"train.output_dir={tmp_path / 'runs'}")
    assert code == 2 and err.count("data.download") == 1


def test_synthetic_shapes_and_counts():
    bundle = build_data(DataConfig(name="synthetic", channels=1, image_size=12, num_classes=3, synthetic_samples=90, val_fraction=0.2))
    assert len(bundle.train) == 72 and len(bundle.val) == 18
    assert bundle.train.images.shape[1:] == (1, 12, 12) and set(bundle.train.labels.tolist()) == {0, 1, 2}


@pytest.mark.parametrize("layout", ["split", "train_val"])
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("pipeline", ["memory", "loader"])
def test_imagefolder_layouts_channels_and_eval_parity(tmp_path, layout, channels, pipeline):
    if layout == "split":
        make_folder(tmp_path / "photos", mode="RGB")
    else:
        make_folder(tmp_path / "photos" / "train", mode="L" if channels == 3 else "RGB")  # gray trained as RGB too
        make_folder(tmp_path / "photos" / "val", per_class=2, mode="L" if channels == 3 else "RGB", ext="jpg")
    cfg = DataConfig(name="imagefolder", root=str(tmp_path / "photos"), channels=channels, image_size=16,
                     val_fraction=0.25, pipeline=pipeline)
    bundle = build_data(cfg)
    assert bundle.classes == ["blue", "green", "red"] and bundle.pipeline == pipeline
    assert len(bundle.val) == (6 if layout == "train_val" else round(18 * 0.25))
    image, label = bundle.val[0]
    assert image.dtype == torch.uint8 and image.shape == (channels, 16, 16)
    # what training evaluates equals what `toolkit predict` and the server compute from the file, for
    # every validation image of either pipeline (the memory one keeps no paths: the loader's list them,
    # in the same order)
    files = build_data(cfg.model_copy(update={"pipeline": "loader"})).val.samples
    augment = BatchAugment(bundle.preprocess)
    assert len(files) == len(bundle.val)
    for index, (path, file_label) in enumerate(files):
        image, label = bundle.val[index]
        assert int(label) == file_label
        assert torch.equal(augment(image.unsqueeze(0), train=False)[0], preprocess_image(path, bundle.preprocess)), path


def test_rgb_to_gray_is_bit_exact_with_pil():
    pixels = np.random.default_rng(1).integers(0, 256, (6, 6, 3), dtype=np.uint8)
    ours = _conform(torch.from_numpy(pixels).permute(2, 0, 1).unsqueeze(0), channels=1, size=6, policy="resize")
    theirs = np.array(Image.fromarray(pixels, "RGB").convert("L"))
    assert ours.dtype == torch.uint8 and torch.equal(ours[0, 0], torch.from_numpy(theirs))


def test_random_crop_is_a_shifted_window_of_the_padded_image():
    torch.manual_seed(0)
    images = torch.arange(2 * 1 * 6 * 6, dtype=torch.uint8).view(2, 1, 6, 6)
    out = random_crop(images, padding=2)
    assert out.shape == images.shape and out.dtype == torch.uint8
    padded = torch.nn.functional.pad(images, (2,) * 4)
    for i in range(2):
        windows = [padded[i, :, y:y + 6, x:x + 6] for y in range(5) for x in range(5)]
        assert any(torch.equal(out[i], w) for w in windows)


def test_crop_offsets_and_flips_are_drawn_per_image_and_uniformly_as_torchvision_does():
    # torchvision's RandomCrop(padding=p) + RandomHorizontalFlip, per image: every one of the
    # (2p+1)^2 windows equally likely, a flip with probability 0.5, each image on its own draw
    torch.manual_seed(0)
    n, p, size = 10_000, 2, 6
    images = torch.zeros(n, 1, size, size, dtype=torch.uint8)
    images[:, :, 0, 0] = 255  # a marker: where it lands tells the window
    marker = random_crop(images, p)[:, 0] == 255
    seen = marker.flatten(1).any(1)
    assert 0.32 < seen.float().mean() < 0.40  # visible in 9 of the 25 windows
    where = marker.flatten(1).float().argmax(1)[seen]
    counts = torch.bincount(where, minlength=size * size)[[r * size + c for r in range(3) for c in range(3)]]
    assert counts.min() > 0.85 * n / 25 and counts.max() < 1.15 * n / 25
    pre = {"channels": 1, "image_size": size, "resize": "resize", "mean": [0.0], "std": [1.0]}
    ramp = torch.arange(size, dtype=torch.uint8).view(1, 1, 1, size).expand(n, 1, size, size).contiguous()
    flipped = (BatchAugment(pre, hflip=True)(ramp, train=True)[:, 0, 0, 0] > 0).float()
    assert 0.47 < flipped.mean() < 0.53
    assert abs(torch.corrcoef(torch.stack([flipped[:-1], flipped[1:]]))[0, 1]) < 0.05


def test_batch_augment_flip_and_normalise():
    pre = {"channels": 1, "image_size": 4, "resize": "resize", "mean": [0.5], "std": [0.25]}
    images = torch.randint(0, 256, (64, 1, 4, 4), dtype=torch.uint8)
    plain = BatchAugment(pre)(images, train=True)
    assert torch.allclose(plain, (images.float() / 255 - 0.5) / 0.25, atol=1e-6)  # x * scale + shift: float rounding
    torch.manual_seed(0)
    flipped = BatchAugment(pre, hflip=True)(images, train=True)
    same = [torch.equal(flipped[i], plain[i]) for i in range(64)]
    mirrored = [torch.equal(flipped[i], plain[i].flip(-1)) for i in range(64)]
    assert all(s or m for s, m in zip(same, mirrored)) and 10 < sum(mirrored) < 54
    assert torch.equal(BatchAugment(pre, crop_padding=2, hflip=True)(images, train=False), plain)


def test_tensor_source_too_big_at_model_size_is_resized_per_batch():
    # digits at 224 would be 90 MB: over a 1 MB limit they stay 8x8 and are resized a batch at a time
    from toolkit.preprocess import resize_uint8

    native = build_data(DataConfig(name="digits"))
    big = build_data(DataConfig(name="digits", image_size=224, memory_limit_mb=1))
    assert big.train.images.shape[1:] == (1, 8, 8) and big.train.resize == (224, "resize")
    images, labels = big.train.__getitems__([0, 5, 9])
    assert images.shape == (3, 1, 224, 224) and images.dtype == torch.uint8
    assert torch.equal(images, resize_uint8(native.train.images[[0, 5, 9]], 224, "resize"))
    assert torch.equal(big.val[0][0], resize_uint8(native.val.images[0], 224, "resize"))
    assert build_data(DataConfig(name="digits", image_size=224)).train.resize is None  # fits: resized once
