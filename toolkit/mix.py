"""mixup and cutmix (data.augment.mixup_alpha, cutmix_alpha, mix_prob) on whole training batches on the
device, with torchvision.transforms.v2's MixUp and CutMix: each batch blended with itself reversed in order,
one weight per batch drawn on the host (no device value read), targets blended alike into class
probabilities, which run.criterion (cross-entropy with label smoothing) takes as soft targets."""

from __future__ import annotations

import torch

from toolkit.config import AugmentConfig
from toolkit.hooks import Hook


def mixes(cfg: AugmentConfig) -> bool:
    return bool(cfg.mixup_alpha or cfg.cutmix_alpha) and cfg.mix_prob > 0


class Mix:
    """(images N x C x H x W, labels N) -> mixed images, targets N x num_classes; with probability 1 - prob
    the batch is left as it is (labels stay class indices). Random draws come from the host's torch RNG,
    which Accelerate's resume state holds."""

    def __init__(self, num_classes: int, mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0, prob: float = 1.0):
        from torchvision.transforms import v2  # seconds to import: only for runs that mix

        choices = ([v2.MixUp(alpha=mixup_alpha, num_classes=num_classes)] if mixup_alpha else []) + \
                  ([v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes)] if cutmix_alpha else [])
        if not choices:
            raise ValueError("Mix needs mixup_alpha or cutmix_alpha above 0")
        self.transform = choices[0] if len(choices) == 1 else v2.RandomChoice(choices)
        self.prob = prob

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.prob < 1 and torch.rand(()).item() >= self.prob:  # a CPU tensor: no device sync
            return images, labels
        channels_last = images.is_contiguous(memory_format=torch.channels_last)
        images, targets = self.transform(images, labels)
        return (images.contiguous(memory_format=torch.channels_last) if channels_last else images), targets


class MixHook(Hook):
    """data.augment mixup/cutmix on: each training batch mixed after augmentation."""

    def __init__(self, cfg: AugmentConfig):
        self.cfg, self.mix = cfg, None

    def on_setup(self, run) -> None:
        self.mix = Mix(len(run.bundle.classes), self.cfg.mixup_alpha, self.cfg.cutmix_alpha, self.cfg.mix_prob)

    def transform_batch(self, run, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.mix(images, targets)
