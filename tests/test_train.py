"""Training end to end on the CPU: learning, the run directory, resume, accumulation, refusal."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import read_jsonl, run_main, train_run
from toolkit.checkpoint import load_best
from toolkit.errors import ToolkitError


def _last_weights(run_dir):
    return load_file(run_dir / "checkpoints" / "last" / "model.safetensors")


def test_synthetic_run_beats_chance_and_writes_run_dir(tmp_path):
    run_dir, summary = train_run(tmp_path, "train.epochs=2")
    assert summary["best_val_acc"] > 0.5  # 4 classes: chance is 0.25
    assert summary["val_samples"] == 128  # 512 images, val_fraction 0.25
    assert summary["epochs_completed"] == 2 and summary["num_processes"] == 1
    on_disk = json.loads((run_dir / "summary.json").read_text())
    for key in ("best_val_acc", "best_epoch", "epochs_completed", "val_samples", "num_processes",
                "mixed_precision", "train_images_per_s", "wall_s"):
        assert key in on_disk
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    assert [m["epoch"] for m in metrics] == [1, 2]
    for key in ("train_loss", "train_acc", "val_loss", "val_acc", "lr", "images_per_s", "epoch_s"):
        assert all(key in m for m in metrics)
    assert max(m["val_acc"] for m in metrics) == on_disk["best_val_acc"]
    assert (run_dir / "config.yaml").is_file() and (run_dir / "plots" / "curves.png").is_file()

    # checkpoints/best rebuilds from meta.json alone and reproduces the best validation accuracy
    state = torch.load(run_dir / "checkpoints" / "best" / "weights.pt", weights_only=True)
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in state)
    model, meta = load_best(run_dir)
    assert meta.classes == [f"class_{i}" for i in range(4)] and meta.image_size == 16
    from toolkit.data import build_data
    from toolkit.config_io import load_config
    from toolkit.preprocess import normalize

    bundle = build_data(load_config(run_dir / "config.yaml").data)
    images, labels = bundle.val[:]
    with torch.no_grad():
        acc = (model(normalize(images, meta.mean, meta.std)).argmax(1) == labels).float().mean().item()
    assert acc == pytest.approx(on_disk["best_val_acc"])


def test_resume_gives_same_weights_as_uninterrupted(tmp_path):
    common = ["train.epochs=3", "model.name=mnist_cnn", "data.channels=1", "data.augment.crop_padding=2",
              "data.augment.hflip=true", "schedule.name=cosine", "optim.name=sgd", "optim.lr=0.05"]
    straight, _ = train_run(tmp_path, *common, name="straight")
    part, first = train_run(tmp_path, *common, "train.stop_after=1", name="parts")
    assert first["epochs_completed"] == 1 and first["status"] == "stopped"
    _, resumed = train_run(tmp_path, *common, "train.resume=true", name="parts")
    assert resumed["epochs_completed"] == 3 and resumed["status"] == "complete"
    a, b = _last_weights(straight), _last_weights(part)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert [m["epoch"] for m in read_jsonl(part / "metrics.jsonl")] == [1, 2, 3]
    assert read_jsonl(part / "metrics.jsonl")[-1]["val_acc"] == read_jsonl(straight / "metrics.jsonl")[-1]["val_acc"]


def test_gradient_accumulation_matches_larger_batch(tmp_path):
    # 160 images, val 0.2 -> 128 train: 4 steps of 32, or 4 x (2 micro-batches of 16). No dropout, no BN.
    common = ["train.epochs=1", "data.synthetic_samples=160", "data.val_fraction=0.2", "optim.name=sgd",
              "optim.lr=0.1", "optim.momentum=0.0", "model.name=cifar_cnn",
              # fp32 and contiguous: bf16 (auto where native) and channels_last kernels round differently
              # at batch 16 and 32, and the comparison is at 1e-5
              "train.mixed_precision=no", "train.channels_last=false"]
    big, _ = train_run(tmp_path, *common, "data.batch_size=32", name="big")
    accum, _ = train_run(tmp_path, *common, "data.batch_size=16", "train.grad_accum_steps=2", name="accum")
    single, _ = train_run(tmp_path, *common, "data.batch_size=16", name="small")
    a, b, c = _last_weights(big), _last_weights(accum), _last_weights(single)
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4)
    assert any(not torch.allclose(a[k], c[k], atol=1e-5) for k in a)  # the comparison can fail


def test_existing_run_is_refused_not_overwritten(tmp_path, capsys):
    run_dir, _ = train_run(tmp_path, "train.epochs=1")
    before = (run_dir / "summary.json").read_text()
    with pytest.raises(ToolkitError, match="already holds a finished run.*--resume.*train.run_name.*overwrite"):
        train_run(tmp_path, "train.epochs=1")
    assert (run_dir / "summary.json").read_text() == before
    code, _, err = run_main(capsys, "train", "--config", "smoke.yaml", "--set", f"train.output_dir={tmp_path}",
                            "--set", "train.run_name=run", "--set", "train.mixed_precision=no")
    assert code == 2 and err.count("already holds a finished run") == 1
    _, summary = train_run(tmp_path, "train.epochs=1", "train.overwrite=true")
    assert summary["epochs_completed"] == 1


def test_a_start_that_failed_before_training_does_not_take_the_run_directory(tmp_path):
    """A missing dataset stops the start after config.yaml is written; fixing the config and starting
    again needs no --resume or overwrite (there is nothing to lose), a run with results still does."""
    with pytest.raises(ToolkitError, match="MNIST|mnist"):
        train_run(tmp_path, "data.name=mnist", f"data.root={tmp_path / 'no-mnist-here'}")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["checkpoints", "config.yaml"]
    _, summary = train_run(tmp_path, "train.epochs=1")
    assert summary["status"] == "complete"
    with pytest.raises(ToolkitError, match="already holds a finished run"):
        train_run(tmp_path, "train.epochs=1")


def test_a_best_checkpoint_cut_off_mid_write_is_discarded_and_the_run_resumes(tmp_path):
    """What SIGKILL leaves while checkpoints/.best-*.tmp is being written (a directory with a truncated
    weights.pt, a half-swapped link): `best` still loads the last complete one, and --resume finishes
    with nothing half-written left behind. (The two-process kill test stops runs at other moments.)"""
    run_dir, _ = train_run(tmp_path, "train.epochs=2", "train.stop_after=1")
    ckpt = run_dir / "checkpoints"
    before = load_best(run_dir)[0].state_dict()
    half = ckpt / ".best-e0002-s0000024.tmp"
    half.mkdir()
    (half / "weights.pt").write_bytes((ckpt / "best" / "weights.pt").read_bytes()[:100])
    (ckpt / ".best.link.tmp").symlink_to(half.name)
    after = load_best(run_dir)[0].state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    _, summary = train_run(tmp_path, "train.epochs=2", "train.resume=true")
    assert summary["status"] == "complete" and summary["epochs_completed"] == 2
    assert not [p.name for p in ckpt.iterdir() if p.name.startswith(".")]
    load_best(run_dir)


def test_resume_without_checkpoint_starts_over_with_notice(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"epoch": 1}\n')  # killed before its first checkpoint
    _, summary = train_run(tmp_path, "train.epochs=1", "train.resume=true")
    assert summary["epochs_completed"] == 1
    assert "no complete checkpoint to resume" in capsys.readouterr().out
    assert [m["epoch"] for m in read_jsonl(run_dir / "metrics.jsonl")] == [1]


def test_early_stopping_keeps_best(tmp_path):
    # lr 0 never improves after epoch 1: patience 2 stops after epoch 3 of 10.
    run_dir, summary = train_run(tmp_path, "train.epochs=10", "train.patience=2", "optim.lr=1e-12")
    assert summary["stopped_early"] and summary["epochs_completed"] == 3 and summary["best_epoch"] == 1
    assert json.loads((run_dir / "checkpoints" / "best" / "meta.json").read_text())["epoch"] == 1


def test_fp16_on_cpu_is_refused(tmp_path):
    with pytest.raises(ToolkitError, match="fp16.*needs a CUDA GPU.*bf16"):
        train_run(tmp_path, "train.epochs=1", "train.mixed_precision=fp16")


def test_allocator_keeps_freed_memory_unless_the_user_tunes_it(monkeypatch):
    from toolkit.runtime import MALLOC_OVERRIDES, keep_freed_memory

    for key in MALLOC_OVERRIDES:
        monkeypatch.delenv(key, raising=False)
    assert keep_freed_memory() is True  # glibc Linux (this project's machines and CI)
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")
    assert keep_freed_memory() is False
