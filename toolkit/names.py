"""Torch-free registries read by config.py, models.py and data/: the seed models' names and the
datasets' specs. Adding a dataset is one entry in DATASETS (and its reader in data/sources.py if it is new)."""

from __future__ import annotations

from typing import NamedTuple, Optional

# Seed models built by toolkit/models.py (each registered there under one of these names).
SEED_MODELS = ("mlp", "mnist_cnn", "bn_cnn", "cifar_cnn", "lenet", "small_convnet")


class DatasetSpec(NamedTuple):
    """A data source's own format and where it is read from."""
    channels: int
    image_size: int
    mean: list[float]  # default normalisation, on the 0..1 scale
    std: list[float]
    needs_root: bool  # data.root is required
    torchvision: Optional[str] = None  # class name in torchvision.datasets


DATASETS: dict[str, DatasetSpec] = {
    "synthetic": DatasetSpec(3, 32, [0.5], [0.5], False),
    "digits": DatasetSpec(1, 8, [0.5], [0.5], False),
    "mnist": DatasetSpec(1, 28, [0.1307], [0.3081], True, "MNIST"),
    "fashion_mnist": DatasetSpec(1, 28, [0.2860], [0.3530], True, "FashionMNIST"),
    "cifar10": DatasetSpec(3, 32, [0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616], True, "CIFAR10"),
    "cifar100": DatasetSpec(3, 32, [0.5071, 0.4865, 0.4409], [0.2673, 0.2564, 0.2762], True, "CIFAR100"),
    "imagefolder": DatasetSpec(3, 224, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225], True),
    # the defaults of a shard set are its manifest's (DataConfig.resolved); these stand in until it is read
    "shards": DatasetSpec(3, 224, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225], True),
}
