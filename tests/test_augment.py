"""The ImageNet-style augmentations: whole batches on the device (memory pipeline) against
torchvision.transforms.v2 per sample (loader pipeline), op by op and in distribution; real training."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import train_run
from toolkit import batch_ops
from toolkit.augment import imagenet_batch, loader_transform
from toolkit.config import AugmentConfig

PRE = {"channels": 3, "image_size": 24, "resize": "resize", "mean": [0.5, 0.4, 0.3], "std": [0.25, 0.25, 0.25]}


def card(size: int = 24) -> torch.Tensor:
    """One 3 x size x size uint8 test card: a colour per quadrant, ramps and a bright corner mark."""
    ramp = torch.linspace(30, 220, size)
    image = torch.stack([ramp.view(1, -1).expand(size, size), ramp.view(-1, 1).expand(size, size),
                         torch.full((size, size), 90.0)])
    half = size // 2
    image[:, :half, :half] *= torch.tensor([1.0, 0.3, 0.5]).view(3, 1, 1)
    image[:, half:, half:] *= torch.tensor([0.4, 1.0, 1.1]).view(3, 1, 1)
    image[:, :3, -3:] = 255
    return image.clamp(0, 255).round().to(torch.uint8)


def features(images: torch.Tensor) -> torch.Tensor:
    """Per image: the mean of each channel in each quadrant (where the content went, and its colour),
    and the overall spread: N x 13."""
    x = images.float()
    h = x.shape[-1] // 2
    quads = [x[:, :, :h, :h], x[:, :, :h, h:], x[:, :, h:, :h], x[:, :, h:, h:]]
    return torch.cat([q.mean((-2, -1)) for q in quads] + [x.flatten(1).std(1, keepdim=True)], 1)


def ks(a: torch.Tensor, b: torch.Tensor) -> float:
    """Two-sample Kolmogorov-Smirnov statistic of 1-D samples."""
    grid = torch.cat([a, b]).sort().values
    cdf = lambda s: torch.searchsorted(s.sort().values, grid, right=True).float() / len(s)  # noqa: E731
    return (cdf(a) - cdf(b)).abs().max().item()


def worst_ks(aug: AugmentConfig, reference: AugmentConfig | None = None, n: int = 600) -> float:
    """The largest KS statistic over the features, batched (`aug`) against v2 per sample (`reference`)."""
    torch.manual_seed(0)
    copies = card().expand(n, -1, -1, -1).contiguous()
    batched = imagenet_batch(copies, aug, PRE["mean"])
    transform = loader_transform(reference or aug, PRE)
    per_sample = torch.stack([transform(image) for image in copies])
    fa, fb = features(batched), features(per_sample)
    return max(ks(fa[:, k], fb[:, k]) for k in range(fa.shape[1]))


def same(n: int = 600) -> float:
    """The KS statistic two samples of n from one distribution exceed with probability 0.001 (0.11 for
    600); the draws are seeded, so the test is deterministic. A real difference gives far more."""
    return 1.95 * (2 / n) ** 0.5


@pytest.mark.parametrize("aug", [
    AugmentConfig(resized_crop_scale=(0.08, 1.0)),
    AugmentConfig(resized_crop_scale=(0.35, 1.0), resized_crop_ratio=(0.5, 2.0)),
    AugmentConfig(trivial_augment=True),
    AugmentConfig(color_jitter=0.4),
    AugmentConfig(random_erasing=0.5),
    AugmentConfig(resized_crop_scale=(0.08, 1.0), trivial_augment=True, color_jitter=0.3, random_erasing=0.25),
], ids=["crop", "crop-ratio", "trivial", "jitter", "erasing", "all"])
def test_batched_augmentation_has_the_distribution_of_torchvision_v2_per_sample(aug):
    # every image of the batch is the same card: one draw for the whole batch would give N equal
    # feature rows, far from v2's spread
    n = 300 if aug.trivial_augment else 600  # v2's TrivialAugment costs ~10 ms per image on a busy CPU
    assert worst_ks(aug, n=n) < same(n)


@pytest.mark.parametrize("ours, theirs", [
    (AugmentConfig(resized_crop_scale=(0.5, 1.0)), AugmentConfig(resized_crop_scale=(0.08, 1.0))),
    (AugmentConfig(color_jitter=0.1), AugmentConfig(color_jitter=0.5)),
    (AugmentConfig(random_erasing=0.1), AugmentConfig(random_erasing=0.7)),
], ids=["crop", "jitter", "erasing"])
def test_the_distribution_check_tells_a_different_setting_apart(ours, theirs):
    assert worst_ks(ours, theirs) > 2 * same()


def test_trivial_augment_ops_equal_torchvision_at_a_given_magnitude():
    from torchvision.transforms.v2 import TrivialAugmentWide

    ta = TrivialAugmentWide()
    torch.manual_seed(0)
    images = torch.randint(0, 256, (4, 3, 20, 20), dtype=torch.uint8)
    for op, (magnitudes, signed) in batch_ops.SPACE.items():
        chosen = [0.0] if magnitudes is None else [float(magnitudes[7]), float(magnitudes[30])]
        for magnitude in chosen + ([-chosen[-1]] if signed else []):
            ours = batch_ops._apply(op, images, torch.full((4,), magnitude))
            theirs = torch.stack([ta._apply_image_or_video_transform(i, op, magnitude, ta.interpolation, ta._fill)
                                  for i in images])
            diff = (ours.int() - theirs.int()).abs()
            # Color and Sharpness round their blurred/grey image once more than torchvision: off by 1 at most
            assert diff.max() <= (1 if op in ("Color", "Sharpness") else 0), (op, magnitude)
            assert (diff > 0).float().mean() < 0.05, (op, magnitude)


def test_augmentations_are_off_by_default_and_never_in_evaluation():
    assert not AugmentConfig().imagenet_style and loader_transform(AugmentConfig(), PRE) is None
    from toolkit.augment import BatchAugment

    images = card().expand(8, -1, -1, -1).contiguous()
    aug = AugmentConfig(resized_crop_scale=(0.08, 1.0), trivial_augment=True, random_erasing=1.0)
    plain = BatchAugment(PRE)(images, train=False)
    assert torch.equal(BatchAugment(PRE, imagenet=aug)(images, train=False), plain)
    assert not torch.equal(BatchAugment(PRE, imagenet=aug)(images, train=True), plain)


@pytest.mark.parametrize("key, value", [("resized_crop_scale", [0.5, 0.2]), ("resized_crop_scale", [0.1, 1.5]),
                                        ("resized_crop_ratio", [0, 1]), ("color_jitter", 1.5)])
def test_bad_augmentation_settings_are_refused_naming_the_key(key, value):
    from toolkit.config_io import load_config
    from toolkit.errors import ToolkitError

    setting = f"[{value[0]}, {value[1]}]" if isinstance(value, list) else str(value)
    with pytest.raises(ToolkitError, match=key):
        load_config(None, [f"data.augment.{key}={setting}"])


def _folder(root, per_class=8):
    rng = np.random.default_rng(0)
    for name, colour in {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (20, 40, 230)}.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = np.clip(np.array(colour) + rng.integers(-40, 40, (20, 20, 3)), 0, 255)
            Image.fromarray(pixels.astype(np.uint8), "RGB").save(root / name / f"{i}.png")
    return root


@pytest.mark.parametrize("pipeline", ["memory", "loader"])
def test_training_with_every_augmentation_in_both_pipelines(tmp_path, pipeline):
    root = _folder(tmp_path / "photos")
    keys = ["data.augment.resized_crop_scale=[0.3, 1.0]", "data.augment.trivial_augment=true",
            "data.augment.color_jitter=0.3", "data.augment.random_erasing=0.25"]
    _, summary = train_run(tmp_path, "data.name=imagefolder", f"data.root={root}", "data.image_size=16",
                           "data.channels=3", f"data.pipeline={pipeline}", "data.num_workers=1", "data.batch_size=8",
                           "train.epochs=3", "optim.lr=0.01", *keys)
    assert summary["status"] == "complete" and summary["best_val_acc"] > 0.34  # 3 colours: chance is 1/3


def test_loader_augmentation_of_a_sample_depends_on_seed_epoch_and_index_only(tmp_path):
    """The loader pipeline's per-sample augmentation: the same sample key gives the same draws with 0 or 2
    workers and in any order (a resumed run redraws what the uninterrupted one drew), another epoch or
    seed gives other draws, and samples drawn one after another differ. Two processes see different keys
    in an epoch, so their augmentations differ as their samples do (DataLoader worker seeds, identical on
    every process, no longer decide them)."""
    from torch.utils.data import DataLoader

    from toolkit.data import EpochShuffle, FileImages, SliceBatches
    from toolkit.preprocess import PREPROCESS_VERSION, Preprocess

    root = _folder(tmp_path / "photos", per_class=4)
    samples = [(str(p), 0) for p in sorted(root.rglob("*.png"))]
    pre = Preprocess(channels=3, image_size=16, resize="resize", mean=[0.5] * 3, std=[0.5] * 3,
                     preprocess_version=PREPROCESS_VERSION)
    aug = AugmentConfig(resized_crop_scale=[0.2, 1.0], color_jitter=0.4, random_erasing=0.5)

    def dataset(seed: int) -> FileImages:
        files = FileImages(samples, pre)
        files.augment(loader_transform(aug, pre), seed)
        return files

    def epoch_images(files: FileImages, workers: int, epoch: int) -> dict[int, torch.Tensor]:
        sampler = EpochShuffle(len(files), seed=5, keyed=True)
        sampler.set_epoch(epoch)
        loader = DataLoader(files, batch_sampler=SliceBatches(sampler, 4, False), num_workers=workers)
        keys = [k for batch in SliceBatches(sampler, 4, False) for k in batch]
        images = torch.cat([b for b, _ in loader])
        return {k % len(files): image for k, image in zip(keys, images)}

    files = dataset(seed=1)
    one, two = epoch_images(files, 0, epoch=1), epoch_images(files, 2, epoch=1)
    assert one.keys() == two.keys() == set(range(len(samples)))
    assert all(torch.equal(one[i], two[i]) for i in one)  # workers and order do not matter
    assert torch.equal(files[len(samples) + 3][0], one[3])  # epoch 1's sample 3, fetched alone
    other_epoch, other_seed = epoch_images(files, 0, epoch=2), epoch_images(dataset(seed=2), 0, epoch=1)
    assert sum(torch.equal(one[i], other_epoch[i]) for i in one) == 0
    assert sum(torch.equal(one[i], other_seed[i]) for i in one) == 0
    plain = FileImages(samples, pre)[3][0]
    assert not torch.equal(one[3], plain)  # augmented at all
