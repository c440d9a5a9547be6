"""Two real processes through `accelerate launch toolkit/train.py` on the CPU (gloo)."""

from __future__ import annotations

import json

import pytest

from conftest import accelerate_launch, read_jsonl

pytestmark = pytest.mark.distributed


def test_two_process_run_counts_every_validation_image_once(tmp_path):
    # 1001 images, val 0.25 -> 250 val: not divisible by 2 processes x eval batch 64.
    run_dir, result = accelerate_launch(tmp_path, "data.synthetic_samples=1001", "train.epochs=2")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["num_processes"] == 2
    assert summary["val_samples"] == 250
    assert summary["effective_batch_size"] == 64
    assert summary["best_val_acc"] > 0.5
    assert [m["num_processes"] for m in read_jsonl(run_dir / "metrics.jsonl")] == [2, 2]
    # only the main process prints: one summary line per epoch, not two
    assert result.stdout.count("Epoch [1/2]") == 1
    assert "processes 2 (MULTI_CPU)" in result.stdout
