"""mixup/cutmix (data.augment.mixup_alpha, cutmix_alpha, mix_prob): whole batches on the device with soft
targets through the same cross-entropy as hard labels (label smoothing included); alpha 0 is no mixup."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from conftest import read_jsonl, train_run
from toolkit.config_io import load_config
from toolkit.errors import ToolkitError
from toolkit.hooks import Hook
from toolkit.mix import Mix

COMMON = ["train.epochs=1", "data.synthetic_samples=128", "data.batch_size=8", "train.label_smoothing=0.1"]


def _weights(run_dir):
    return load_file(run_dir / "checkpoints" / "last" / "model.safetensors")


class OneHot(Hook):
    """What mixup hands the loss at lam = 1: the labels as class probabilities."""

    def transform_batch(self, run, images, targets):
        return images, F.one_hot(targets, len(run.bundle.classes)).float()


def test_alpha_0_is_no_mixup_and_soft_targets_train_like_hard_labels(tmp_path):
    plain, _ = train_run(tmp_path, *COMMON, name="plain")
    off, _ = train_run(tmp_path, *COMMON, "data.augment.mixup_alpha=0", "data.augment.cutmix_alpha=0",
                       "data.augment.mix_prob=0.5", name="off")
    a, b = _weights(plain), _weights(off)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the soft-target path of the loop (probabilities, smoothed by the same criterion) trains as the hard one
    soft, _ = train_run(tmp_path, *COMMON, name="soft", hooks=[OneHot()])
    c = _weights(soft)
    for k in a:
        torch.testing.assert_close(c[k], a[k], rtol=1e-4, atol=1e-5)
    assert [m["train_acc"] for m in read_jsonl(soft / "metrics.jsonl")] == \
        pytest.approx([m["train_acc"] for m in read_jsonl(plain / "metrics.jsonl")])


def test_mixed_training_changes_the_weights_and_reports_accuracy_against_the_dominant_label(tmp_path):
    plain, _ = train_run(tmp_path, *COMMON, name="plain")
    mixed, summary = train_run(tmp_path, *COMMON, "data.augment.mixup_alpha=0.4", "data.augment.cutmix_alpha=1.0",
                               name="mixed")
    a, b = _weights(plain), _weights(mixed)
    assert any(not torch.equal(a[k], b[k]) for k in a)
    metrics = read_jsonl(mixed / "metrics.jsonl")[0]
    assert 0 <= metrics["train_acc"] <= 1 and summary["status"] == "complete"


def test_mix_blends_whole_batches_and_their_targets():
    torch.manual_seed(0)
    images = torch.rand(6, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    mixed, targets = Mix(3, mixup_alpha=0.4)(images, labels)
    assert targets.shape == (6, 3) and torch.allclose(targets.sum(1), torch.ones(6))
    lam = float(targets[0, 0])  # image 0 (class 0) blended with the last one (class 2)
    torch.testing.assert_close(mixed, lam * images + (1 - lam) * images.roll(1, 0))
    assert mixed.is_contiguous(memory_format=torch.channels_last)
    # cutmix: a box of the partner, targets weighted by its area
    mixed, targets = Mix(3, cutmix_alpha=1.0)(images, labels)
    from_partner = (mixed[0] == images[-1]).all(0).float().mean()  # pixels taken from image 5
    assert float(targets[0, 2]) == pytest.approx(float(from_partner))
    # mix_prob 0.5: some batches stay as they are, labels as class indices
    kept = [Mix(3, mixup_alpha=0.4, prob=0.5)(images, labels)[1].ndim == 1 for _ in range(40)]
    assert 5 < sum(kept) < 35


@pytest.mark.parametrize("override, message", [
    ("data.augment.mixup_alpha=-1", "data.augment.mixup_alpha"),
    ("data.augment.mix_prob=1.5", "data.augment.mix_prob"),
])
def test_bad_mix_values_are_config_errors(override, message):
    with pytest.raises(ToolkitError, match=message):
        load_config("smoke.yaml", [override])
