"""Validation measures the model that is evaluated and served: a run trained under bf16 autocast (forced,
whatever this CPU's `auto` would pick) records the accuracy that `toolkit evaluate`, `toolkit predict`
and the TorchServe handler reproduce, in one process and in two.

bf16 is emulated (slow) on CPUs without AVX512-BF16/AMX, so these runs are tiny: digits at 8x8."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from torch import nn

from conftest import accelerate_launch, read_jsonl, train_run
from test_evaluate import served_handler, validation_images
from toolkit.evaluate import evaluate_run
from toolkit.predict import predict_files

TINY_BF16 = ["data.image_size=8", "model.name=small_convnet", "train.epochs=2", "train.mixed_precision=bf16"]


@pytest.fixture(scope="module")
def bf16_run(tmp_path_factory):
    run_dir, summary = train_run(tmp_path_factory.mktemp("bf16"), *TINY_BF16, config="digits.yaml", name="bf16")
    assert summary["status"] == "complete" and summary["mixed_precision"] == "bf16"
    return run_dir, summary


def test_bf16_run_validates_in_fp32_and_says_so(bf16_run):
    run_dir, summary = bf16_run
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    assert summary["eval_precision"] == "fp32" and [m["eval_precision"] for m in metrics] == ["fp32", "fp32"]
    assert summary["best_val_acc"] == max(m["val_acc"] for m in metrics) > 0.3  # 10 classes: chance is 0.1


def test_evaluate_reproduces_best_val_acc_of_a_bf16_run(bf16_run):
    run_dir, summary = bf16_run
    report = evaluate_run(run_dir)
    assert report["samples"] == summary["val_samples"] == 359
    assert report["accuracy"] == summary["best_val_acc"]  # exactly: same images, same precision


def test_predict_and_served_answers_reproduce_best_val_acc_of_a_bf16_run(bf16_run, tmp_path):
    """Every validation image as a PNG file, through `toolkit predict` and through the exported model in
    the TorchServe handler: the same top-1 classes, whose accuracy is the run's recorded one."""
    from toolkit.export import export_torchscript

    run_dir, summary = bf16_run
    images, labels, classes = validation_images(run_dir)
    paths = []
    for i, image in enumerate(images):
        paths.append(tmp_path / f"{i:03d}.png")
        Image.fromarray(image[0].numpy(), mode="L").save(paths[-1])
    local = [next(iter(answer)) for answer in predict_files(run_dir, paths, topk=1)]
    served = served_handler(export_torchscript(run_dir))([{"body": bytearray(p.read_bytes())} for p in paths])
    assert [next(iter(answer)) for answer in served] == local
    right = sum(name == classes[label] for name, label in zip(local, labels.tolist()))
    assert right / len(paths) == summary["best_val_acc"]


def test_eval_precision_train_validates_under_the_training_autocast(tmp_path):
    run_dir, summary = train_run(tmp_path, "data.image_size=8", "model.name=small_convnet", "train.epochs=1",
                                 "train.mixed_precision=bf16", "train.eval_precision=train", config="digits.yaml")
    assert summary["eval_precision"] == "bf16"
    assert read_jsonl(run_dir / "metrics.jsonl")[0]["eval_precision"] == "bf16"


def test_eval_precision_train_of_an_fp32_run_is_fp32(tmp_path):
    _, fp32 = train_run(tmp_path, "data.image_size=8", "model.name=small_convnet", "train.epochs=1", "train.mixed_precision=no",
                        "train.eval_precision=train", config="digits.yaml", name="fp32")
    assert fp32["eval_precision"] == "fp32"  # nothing to choose: training ran fp32


@pytest.mark.distributed
def test_two_process_bf16_batchnorm_run_is_reproduced_by_evaluate(tmp_path):
    """Two processes, bf16 autocast, a BatchNorm model: each process ends the epoch with running statistics
    of its own batches; validation must use the main process's (the ones saved), in fp32."""
    run_dir, result = accelerate_launch(tmp_path, *TINY_BF16, "model.name=bn_cnn", "train.epochs=1",
                                        "data.batch_size=16", config="digits.yaml")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["num_processes"] == 2 and summary["mixed_precision"] == "bf16"
    assert summary["eval_precision"] == "fp32" and summary["val_samples"] == 359
    report = evaluate_run(run_dir)
    assert report["samples"] == 359 and report["accuracy"] == summary["best_val_acc"] > 0.3
    # The loss too, which the accuracy alone does not show: validation calls the network's own forward
    # (fp32), bypassing DDP's, which in an fp32 run would broadcast process 0's buffers by itself; without
    # engine.sync_buffers process 1 validates with its own statistics (5.7e-4 relative in val_loss).
    from toolkit.checkpoint import load_best
    from toolkit.config_io import load_config
    from toolkit.data import build_data
    from toolkit.preprocess import normalize

    model, meta = load_best(run_dir)
    images, labels = build_data(load_config(run_dir / "config.yaml").data).val[:]
    with torch.no_grad():
        loss = torch.nn.functional.cross_entropy(model(normalize(images, meta.mean, meta.std)), labels).item()
    (metrics,) = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert loss == pytest.approx(metrics["val_loss"], rel=1e-5)


@pytest.mark.parametrize("cpu_bf16, cuda, cuda_bf16, device, expected", [
    (True, False, False, "auto", ("bf16", "auto: the CPU has native bf16")),
    (False, False, False, "auto", ("no", "auto: the CPU would emulate bf16")),
    (False, True, True, "auto", ("bf16", "auto: the GPU has bf16")),
    (False, True, False, "auto", ("fp16", "auto: the GPU lacks bf16")),
    (True, True, False, "cpu", ("bf16", "auto: the CPU has native bf16")),  # train.device=cpu ignores the GPU
])
def test_auto_precision_follows_the_device_probes(monkeypatch, cpu_bf16, cuda, cuda_bf16, device, expected):
    """What `auto` resolves to on each kind of machine, whichever kind runs this test."""
    import torch

    from toolkit import runtime
    from toolkit.config_io import load_config

    monkeypatch.setattr(runtime, "native_bf16_cpu", lambda: cpu_bf16)
    monkeypatch.setattr(runtime, "native_bf16_cuda", lambda: cuda_bf16)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    cfg = load_config("smoke.yaml", ["train.mixed_precision=auto", f"train.device={device}"])
    assert runtime.resolve_precision(cfg) == expected
    assert runtime.resolve_precision(load_config("smoke.yaml", ["train.mixed_precision=bf16"])) == ("bf16", "")


class AutocastProbe(nn.Module):
    """A small convnet that notes, at every forward, whether it trains and the dtype its convolution
    computed in: bf16 under autocast, fp32 outside it."""

    seen: list[tuple[bool, torch.dtype]] = []

    def __init__(self, channels: int, image_size: int, num_classes: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, 8, 3, padding=1)
        self.head = nn.Linear(8, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.conv(images)
        AutocastProbe.seen.append((self.training, features.dtype))
        return self.head(features.relu().mean(dim=(2, 3)))


@pytest.mark.parametrize("eval_precision, val_dtype", [("fp32", torch.float32), ("train", torch.bfloat16)])
def test_bf16_trains_under_autocast_and_validates_as_asked(tmp_path, monkeypatch, eval_precision, val_dtype):
    """Not what the config says but what ran: every training forward computed in bf16, every validation
    forward in fp32 (the default) or under the training autocast (eval_precision: train)."""
    from toolkit import models

    monkeypatch.setitem(models.BUILDERS, "autocast_probe", AutocastProbe)
    monkeypatch.setattr(AutocastProbe, "seen", [])
    _, summary = train_run(tmp_path, "model.name=autocast_probe", "train.mixed_precision=bf16",
                           f"train.eval_precision={eval_precision}", "train.epochs=1")
    # first, models.check_model's one fp32 forward of a model of its own, before the run directory is taken
    assert AutocastProbe.seen.pop(0) == (False, torch.float32)
    train_dtypes = {dtype for training, dtype in AutocastProbe.seen if training}
    val_dtypes = {dtype for training, dtype in AutocastProbe.seen if not training}
    assert train_dtypes == {torch.bfloat16} and val_dtypes == {val_dtype}
    # smoke.yaml: 384 training images in batches of 32, 128 validation images in batches of 64
    assert [training for training, _ in AutocastProbe.seen] == [True] * 12 + [False] * 2
    assert summary["best_val_acc"] > 0.25  # 4 classes
