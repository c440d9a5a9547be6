"""bench/gpu_check.sh, the check a lent GPU machine runs, kept honest by its CPU dry run: every step runs
(set-up as the README does, training per precision, exact resume, a real SIGUSR1 mid-epoch and its exact
resume, EMA + mixup/cutmix + augmentations + top-k averaging, batch_size auto, a shard set from disk and HTTP, the three training paths, two
processes, every export format and TorchScript at bf16 served by a real TorchServe), its figures land in OUT/gpu_check.json, and a failed check
fails the script."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from conftest import ROOT
from toolkit.export import FORMATS

pytestmark = [pytest.mark.slow, pytest.mark.serve, pytest.mark.distributed]


def test_gpu_check_cpu_dry_run_runs_every_step_and_records_its_figures(tmp_path):
    done = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), str(tmp_path), "--cpu-dry-run"], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    checks = {c["check"]: c for c in report["checks"]}
    assert report["mode"] == "cpu dry run" and report["failed"] == 0
    assert [name for name, c in checks.items() if c["status"] == "skipped"] == ["train fp16"]
    for name in ("train digits auto", "train cifar_shape auto", "train cifar_shape bf16"):
        assert checks[name]["val_acc"] > 0.35 and checks[name]["images_per_s"] > 0, checks[name]
    assert checks["train cifar_shape bf16"]["precision"] == "bf16"
    assert checks["resume exact (fp32)"]["max_abs_diff"] == 0.0
    paths = checks["images/s: in memory, DataLoader, plain loop"]
    assert all(paths[k] > 0 for k in ("in_memory", "dataloader", "plain_loop"))
    assert checks["two processes (accelerate launch)"]["num_processes"] == 2
    preempted = checks["preempted mid-epoch (SIGUSR1), resumed exactly (fp32)"]
    assert preempted["exit_on_signal"] == 75 and preempted["max_abs_diff"] == 0.0, preempted
    features = checks["EMA + mixup/cutmix + ImageNet-style augmentations + top-k and averaging"]
    assert 0 <= features["val_acc_ema"] <= 1 and len(features["averaged_epochs"]) == 2, features
    assert checks["batch_size auto (the CPU's cap)"]["batch_size"] == 64
    sharded = checks["shard set: from disk and over HTTP"]
    assert sharded["disk_val_samples"] == sharded["http_val_samples"] == 180, sharded  # the digits' validation split
    assert sharded["disk_images_per_s"] > 0 and sharded["http_images_per_s"] > 0, sharded
    for fmt in FORMATS:
        assert checks[f"export {fmt} (fp32)"]["parity"]["max_abs_diff"] <= FORMATS[fmt].tolerance
    assert checks["export torchscript (bf16)"]["parity"]["top1_agreement"] >= 0.995
    for name in [*FORMATS, "torchscript_bf16"]:
        served = checks[f"serve {name}"]
        assert served["same_top1_as_cpu"] == "4/4" and served["errors"] == 0 and served["requests_per_s_c8"] > 0
    assert (tmp_path / "summary.txt").read_text().splitlines()[-1].startswith(f"0 failed of {len(checks)} checks")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible: the check would run")
def test_gpu_check_without_a_gpu_fails_at_once_naming_the_dry_run(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [(c["check"], c["status"]) for c in report["checks"]] == [("device", "failed")]
    assert "no CUDA device visible to torch (use --cpu-dry-run" in report["checks"][0]["why"]
