"""The BatchNorm broadcast before validation (engine.sync_buffers), where it matters. After an epoch's last
step each process holds BatchNorm statistics updated by its own batch. In an fp32 run DDP's forward
broadcasts process 0's buffers again, and hides a missing broadcast; in a bf16 run validation (fp32 by
default) calls the network's own forward, bypassing DDP, so without the broadcast process 1 would validate
its share of the images with statistics that are not the ones saved (2.3e-3 relative in val_loss)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from conftest import read_jsonl
from launching import command, run
from toolkit.checkpoint import load_best
from toolkit.config_io import load_config
from toolkit.data import build_data
from toolkit.preprocess import normalize

pytestmark = pytest.mark.distributed


def test_bf16_two_process_validation_measures_the_saved_batchnorm_statistics(tmp_path):
    result = run(command(tmp_path, "run", ["data.synthetic_samples=256", "model.name=bn_cnn", "train.epochs=1",
                                           "train.mixed_precision=bf16", "data.augment.crop_padding=2"]))
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "run"
    summary, (metrics,) = json.loads((run_dir / "summary.json").read_text()), read_jsonl(run_dir / "metrics.jsonl")
    assert summary["mixed_precision"] == "bf16" and metrics["eval_precision"] == "fp32" and metrics["val_samples"] == 64
    model, meta = load_best(run_dir)  # process 0's weights and buffers after epoch 1, evaluated here in fp32
    images, labels = build_data(load_config(run_dir / "config.yaml").data).val[:]
    with torch.no_grad():
        logits = model(normalize(images, meta.mean, meta.std))
    assert F.cross_entropy(logits, labels).item() == pytest.approx(metrics["val_loss"], rel=1e-5)
    assert (logits.argmax(1) == labels).sum().item() / 64 == pytest.approx(metrics["val_acc"], abs=1e-12)
