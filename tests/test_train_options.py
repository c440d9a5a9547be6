"""Training options that change numbers, checked by the numbers they change: label smoothing in the
loss, gradient clipping in the step, the evaluation batch size in validation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import read_jsonl, train_run
from test_precision import AutocastProbe
from toolkit.checkpoint import load_best

# smoke.yaml without augmentation; cifar_cnn has no dropout and no BatchNorm: a training-mode forward
# is the evaluation one
FROZEN = ["optim.name=sgd", "optim.lr=1e-12", "optim.momentum=0.0", "train.epochs=1"]


def train_images(run_dir):
    from toolkit.config_io import load_config
    from toolkit.data import build_data
    from toolkit.preprocess import normalize

    bundle = build_data(load_config(run_dir / "config.yaml").data)
    images, labels = bundle.train[:]
    return normalize(images, bundle.preprocess["mean"], bundle.preprocess["std"]), labels


def test_label_smoothing_is_in_the_training_loss(tmp_path):
    """lr 1e-12: the weights never move, so epoch 1's train loss is checkpoints/best's loss over the
    384 training images, smoothed as asked (and different from the plain cross-entropy)."""
    run_dir, _ = train_run(tmp_path, *FROZEN, "train.label_smoothing=0.2")
    model, _ = load_best(run_dir)
    images, labels = train_images(run_dir)
    with torch.no_grad():
        logits = model(images)
    smoothed = F.cross_entropy(logits, labels, label_smoothing=0.2).item()
    logged = read_jsonl(run_dir / "metrics.jsonl")[0]["train_loss"]
    assert logged == pytest.approx(smoothed, rel=1e-4)
    assert abs(F.cross_entropy(logits, labels).item() - smoothed) > 100 * abs(logged - smoothed)


def last_weights(run_dir) -> torch.Tensor:
    from safetensors.torch import load_file

    state = load_file(run_dir / "checkpoints" / "last" / "model.safetensors")
    return torch.cat([state[k].flatten() for k in sorted(state)])


def test_clip_grad_norm_bounds_the_step(tmp_path):
    """One SGD step of lr 1 (40 images, 30 train: one batch): with clipping at 1e-3 the weights move by
    exactly 1e-3 in norm; without, by the full gradient's norm, far more."""
    one_step = ["data.synthetic_samples=40", "optim.name=sgd", "optim.momentum=0.0", "train.epochs=1"]
    start, _ = train_run(tmp_path, *one_step, "optim.lr=1e-12", name="start")
    clipped, _ = train_run(tmp_path, *one_step, "optim.lr=1.0", "train.clip_grad_norm=0.001", name="clipped")
    free, _ = train_run(tmp_path, *one_step, "optim.lr=1.0", name="free")
    w0 = last_weights(start)
    assert (last_weights(clipped) - w0).norm().item() == pytest.approx(1e-3, rel=1e-3)
    assert (last_weights(free) - w0).norm().item() > 0.01


def test_eval_batch_size_sets_the_validation_batches(tmp_path, monkeypatch):
    """smoke.yaml holds out 128 images: 8 validation forwards of 16, 2 of 64 by default (2 x batch 32)."""
    from toolkit import models

    monkeypatch.setitem(models.BUILDERS, "autocast_probe", AutocastProbe)
    for eval_batch, forwards in ((16, 8), (None, 2)):
        monkeypatch.setattr(AutocastProbe, "seen", [])
        setting = [] if eval_batch is None else [f"data.eval_batch_size={eval_batch}"]
        run_dir, summary = train_run(tmp_path, "model.name=autocast_probe", "train.epochs=1", *setting,
                                     name=f"eval{eval_batch}")
        assert AutocastProbe.seen.pop(0)[0] is False  # models.check_model's one forward, before training
        assert [training for training, _ in AutocastProbe.seen].count(False) == forwards
        assert summary["val_samples"] == 128

