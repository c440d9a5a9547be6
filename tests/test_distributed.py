"""Two real processes through `accelerate launch toolkit/train.py` on the CPU (gloo): the guarantees of
launch/README.md, each observed from outside (run directory, output, checkpoints, or what
tests/rank_probe.py reports for each process). Guarantee 7 (SIGKILL) is in test_kill_resume.py."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from accelerate.utils import set_seed
from safetensors.torch import load_file, save_file

from conftest import ROOT, read_jsonl
from launching import (EXPLICIT, REFERENCE, command, load_best_weights, load_resume_weights, processes_of,
                       reference_run, run)
from toolkit.checkpoint import load_best
from toolkit.config_io import load_config
from toolkit.augment import BatchAugment
from toolkit.data import EpochShuffle, build_data
from toolkit.models import build_model
from toolkit.preprocess import normalize

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return reference_run(tmp_path_factory)


@pytest.fixture(scope="module")
def after_epoch_1(tmp_path_factory):
    """The reference config stopped after epoch 1 (train.stop_after): a run to resume, copied per test.
    Launched with launch/multi_gpu.yaml (on the CPU: ACCELERATE_USE_CPU=1), the others with launch/cpu.sh."""
    out = tmp_path_factory.mktemp("after_epoch_1")
    launcher = ["--config_file", str(ROOT / "launch" / "multi_gpu.yaml"), "--num_processes", "2",
                "--main_process_port", "0"]
    result = run(command(out, "run", [*REFERENCE, "train.stop_after=1"], launcher=launcher))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "stopped after epoch 1 of 3; continue with --resume" in result.stdout
    return out / "run"


def _copy(run_dir, tmp_path):
    return shutil.copytree(run_dir, tmp_path / "run", symlinks=True)  # checkpoints/* are relative links


def _summary(run_dir):
    return json.loads((run_dir / "summary.json").read_text())


def _equal_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# ---------------------------------------------------------------- 1, 3: validation, output, run files


def test_validation_counts_each_image_once_and_equals_one_process(reference):
    run_dir, _ = reference
    summary, metrics = _summary(run_dir), read_jsonl(run_dir / "metrics.jsonl")
    assert summary["val_samples"] == 171 and [m["val_samples"] for m in metrics] == [171, 171, 171]
    # checkpoints/best evaluated here, in one process, on the same 171 images
    model, meta = load_best(run_dir)
    best = metrics[summary["best_epoch"] - 1]
    assert meta.epoch == summary["best_epoch"] and summary["best_val_acc"] == best["val_acc"] > 0.5
    images, labels = build_data(load_config(run_dir / "config.yaml").data).val[:]
    with torch.no_grad():
        logits = model(normalize(images, meta.mean, meta.std))
    assert (logits.argmax(1) == labels).sum().item() / 171 == pytest.approx(best["val_acc"], abs=1e-12)
    assert F.cross_entropy(logits, labels).item() == pytest.approx(best["val_loss"], rel=1e-5)


def test_only_the_main_process_prints_and_writes(reference):
    run_dir, result = reference
    for line in ("2 processes (DDP over gloo)", "synthetic: 512 train / 171 val images", "effective batch 64",
                 "epoch 1/3 step 5/8 loss", "epoch 3/3 step 8/8 loss", "Epoch [1/3]", "Epoch [3/3]"):
        assert result.stdout.count(line) == 1, line
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoints", "config.yaml", "metrics.csv", "metrics.jsonl",
                                                        "plots", "summary.json"]
    summary, metrics = _summary(run_dir), read_jsonl(run_dir / "metrics.jsonl")
    assert [m["epoch"] for m in metrics] == [1, 2, 3]  # one line per epoch, not one per process
    assert summary["num_processes"] == 2 and summary["effective_batch_size"] == 64  # 32 x 2 processes x 1
    assert all(m["num_processes"] == 2 and m["images_per_s"] > 0 for m in metrics)
    best = f"best-e{summary['best_epoch']:04d}-s{8 * summary['best_epoch']:07d}"  # named by epoch and optimizer step
    assert {p.name for p in (run_dir / "checkpoints").iterdir()} == {"best", "last", best, "last-e0003-s0000024"}
    load_resume_weights(run_dir)  # random_states_0.pkl and _1.pkl: save_state ran on both processes


# ---------------------------------------------------------------- 2, 5: global train metrics, early stopping


def test_train_metrics_are_means_over_all_processes_and_early_stopping_stops_both(tmp_path):
    # lr 1e-12: the weights never move, so epoch 1's train loss must be the loss of checkpoints/best
    # over all 512 training images; val accuracy never improves, so patience 2 ends after epoch 3.
    result = run(command(tmp_path, "run", ["data.synthetic_samples=683", "optim.lr=1e-12", "train.epochs=10",
                                           "train.patience=2"]))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("early stopping: no better val accuracy for 2 epochs (best") == 1
    assert processes_of(tmp_path) == []
    run_dir = tmp_path / "run"
    summary, metrics = _summary(run_dir), read_jsonl(run_dir / "metrics.jsonl")
    assert summary["stopped_early"] and summary["epochs_completed"] == 3 and summary["status"] == "complete"
    assert [m["epoch"] for m in metrics] == [1, 2, 3]

    model, meta = load_best(run_dir)
    bundle = build_data(load_config(run_dir / "config.yaml").data)
    order = EpochShuffle(512, seed=42)
    order.set_epoch(1)
    batches = torch.tensor(list(order)).view(16, 32)  # the epoch's batches; process r trains on r, r+2, ...
    images, labels = bundle.train[batches.flatten()]
    with torch.no_grad():
        logits = model(normalize(images, meta.mean, meta.std))
    losses = F.cross_entropy(logits, labels, reduction="none").view(16, 32)
    correct = (logits.argmax(1) == labels).float().view(16, 32)
    epoch1, loss, acc = metrics[0], losses.mean().item(), correct.mean().item()
    assert epoch1["train_loss"] == pytest.approx(loss, rel=1e-5) and epoch1["train_acc"] == pytest.approx(acc, abs=1e-9)
    for rank in (0, 1):  # far closer to all processes' means than to what either process alone saw
        assert abs(epoch1["train_loss"] - loss) < abs(losses[rank::2].mean().item() - loss) / 10
        assert correct[rank::2].mean().item() != pytest.approx(acc, abs=1e-9)
    # the progress line at the epoch's last step shows the same all-process numbers
    assert f"epoch 1/10 step 8/8 loss {epoch1['train_loss']:.4f} acc {epoch1['train_acc']:.2%}" in result.stdout


# ---------------------------------------------------------------- 5: non-finite loss


def test_non_finite_loss_stops_both_processes_and_keeps_the_last_good_epoch(after_epoch_1, tmp_path):
    run_dir = _copy(after_epoch_1, tmp_path)
    best_before, last_before = load_best_weights(run_dir), load_resume_weights(run_dir)
    # Resumed from a checkpoints/last whose first convolution was broken (weights ~1e37 overflow float32):
    # the loss of epoch 2's first step is not finite. (A resume refuses changes that could do it, such as
    # data.std or optim.lr: checkpoints/last holds what the old values made.)
    resume_weights = run_dir / "checkpoints" / "last" / "model.safetensors"
    broken = load_file(resume_weights)
    broken["features.0.weight"] = torch.full_like(broken["features.0.weight"], 1e37)
    save_file(broken, resume_weights)
    last_before = load_resume_weights(run_dir)
    result = run(command(tmp_path, "run", [*REFERENCE, "train.resume=true"]), timeout=120)
    assert result.returncode == 2  # launch/cpu.sh's status for a user error the main process reported
    message = "error: non-finite loss at epoch 2, by step"
    assert result.stderr.count(message) == 1, result.stderr[-3000:]  # one message, not one per process
    assert result.stderr.rstrip().splitlines()[-1].startswith(message)  # printed last, after the launcher's report
    assert "toolkit/engine.py" not in result.stderr  # a user error: no traceback through our code
    assert processes_of(tmp_path) == []
    summary = _summary(run_dir)
    assert summary["status"] == "non_finite_loss" and summary["epochs_completed"] == 1
    assert [m["epoch"] for m in read_jsonl(run_dir / "metrics.jsonl")] == [1]
    _equal_weights(load_best_weights(run_dir), best_before)
    _equal_weights(load_resume_weights(run_dir), last_before)
    assert all(torch.isfinite(t).all() for t in best_before.values() if t.is_floating_point())


def test_weights_broken_by_the_last_step_of_an_epoch_are_not_checkpointed(tmp_path):
    # 85 images -> 64 train: ONE step per process and epoch. Its loss is finite, but lr 1e30 leaves
    # weights that give a non-finite validation loss; they must not become checkpoints/best or last.
    result = run(command(tmp_path, "run", ["data.synthetic_samples=85", "optim.lr=1e30"]), timeout=120)
    assert result.returncode == 2
    assert result.stderr.count("error: non-finite loss in validation after epoch 1") == 1, result.stderr[-3000:]
    assert processes_of(tmp_path) == []
    run_dir = tmp_path / "run"
    assert _summary(run_dir)["status"] == "non_finite_loss" and _summary(run_dir)["epochs_completed"] == 0
    assert list((run_dir / "checkpoints").iterdir()) == []


# ---------------------------------------------------------------- 6: resume


def test_resumed_two_process_run_ends_with_the_reference_weights(reference, after_epoch_1, tmp_path):
    run_dir = _copy(after_epoch_1, tmp_path)
    result = run(command(tmp_path, "run", [*REFERENCE, "train.resume=true"]))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count(f"resumed {run_dir} after epoch 1") == 1 and "Epoch [1/3]" not in result.stdout
    reference_dir, _ = reference
    _equal_weights(load_resume_weights(run_dir), load_resume_weights(reference_dir))
    _equal_weights(load_best_weights(run_dir), load_best_weights(reference_dir))
    keys = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "val_samples", "lr")
    resumed, straight = read_jsonl(run_dir / "metrics.jsonl"), read_jsonl(reference_dir / "metrics.jsonl")
    assert [{k: m[k] for k in keys} for m in resumed] == [{k: m[k] for k in keys} for m in straight]


# ---------------------------------------------------------------- 4, 9, 10: what each process holds


def test_processes_share_weights_and_split_but_not_augmentation(tmp_path):
    """rank_probe.py trains with the engine and saves what each process holds. bn_cnn with its backbone
    frozen (every BatchNorm is in it; a frozen backbone needs weights: its initial ones, saved), bf16 autocast."""
    set_seed(42)
    torch.save(build_model("bn_cnn", 4, 3, 16).state_dict(), tmp_path / "initial.pt")
    overrides = ["data.synthetic_samples=683", "model.name=bn_cnn", "model.freeze_backbone=true",
                 f"model.pretrained_weights={tmp_path / 'initial.pt'}",
                 "train.mixed_precision=bf16", "data.augment.crop_padding=2", "data.augment.hflip=true"]
    result = run(command(tmp_path / "runs", "run", overrides, script=ROOT / "tests" / "rank_probe.py",
                         script_args=[str(tmp_path / "ranks")]))
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [torch.load(tmp_path / "ranks" / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert [(r["rank"], r["num_processes"]) for r in ranks] == [(0, 2), (1, 2)]

    # 4: identical weights and BatchNorm buffers on both processes, and checkpoints/last holds them
    _equal_weights(ranks[0]["state_dict"], ranks[1]["state_dict"])
    _equal_weights(load_resume_weights(tmp_path / "runs" / "run"), ranks[0]["state_dict"])
    # 4: the same train/val split everywhere
    assert ranks[0]["train_split"] == ranks[1]["train_split"] and ranks[0]["val_split"] == ranks[1]["val_split"]
    # 4: each process its own augmentation stream: the same batch, augmented from each process's RNG state
    bundle = build_data(load_config(tmp_path / "runs" / "run" / "config.yaml").data)
    images = bundle.train[list(range(64))][0]
    augment = BatchAugment(bundle.preprocess, crop_padding=2, hflip=True)
    augmented = []
    for r in ranks:
        torch.set_rng_state(r["rng_at_first_augment"])
        augmented.append(augment(images, train=True))
    assert not torch.equal(augmented[0], augmented[1])

    # 9: frozen BatchNorm layers trained in eval mode: their statistics are still the initial ones
    # (the engine's seed rebuilds them), as are the frozen weights, while the head learned
    state, training = ranks[0]["state_dict"], ranks[0]["bn_training"]
    assert len(training) == 5 and not any(training.values())
    set_seed(42)
    initial = build_model("bn_cnn", 4, 3, 16).state_dict()
    for name in training:
        for buffer in ("running_mean", "running_var", "num_batches_tracked"):
            assert torch.equal(state[f"{name}.{buffer}"], initial[f"{name}.{buffer}"]), f"{name}.{buffer}"
    assert torch.equal(state["features.0.weight"], initial["features.0.weight"])
    assert not torch.equal(state["head.8.weight"], initial["head.8.weight"])
    # 9: with model.sync_batchnorm the engine's network has SyncBatchNorm only (frozen ones in eval mode)
    for r in ranks:
        assert r["synced_bn"] and all(kind == "SyncBatchNorm" and not mode for kind, mode in r["synced_bn"].values())
        assert set(r["bn_types"].values()) == {"BatchNorm2d", "BatchNorm1d"}  # model.sync_batchnorm was off

    # 10: bf16 autocast trains on the CPU in both processes
    assert "precision bf16 autocast" in result.stdout
    assert _summary(tmp_path / "runs" / "run")["mixed_precision"] == "bf16"
    assert all(m["train_loss"] == m["train_loss"] for m in read_jsonl(tmp_path / "runs" / "run" / "metrics.jsonl"))


# ---------------------------------------------------------------- 8, 9, 10: launches refused at start-up


def test_fp16_and_sync_batchnorm_on_cpu_are_refused_with_one_message(tmp_path):
    result = run(command(tmp_path, "run", ["train.mixed_precision=fp16", "model.name=bn_cnn",
                                           "model.sync_batchnorm=true"]), timeout=120)
    assert result.returncode == 2  # launch/cpu.sh's status for a user error the main process reported
    assert result.stderr.count("error: train.mixed_precision: 'fp16' needs a CUDA GPU") == 1
    assert result.stderr.count("model.sync_batchnorm: torch's SyncBatchNorm runs on GPUs only") == 1
    assert not (tmp_path / "run").exists() and processes_of(tmp_path) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without GPUs")
def test_independent_copies_are_refused(tmp_path):
    # --multi_gpu without ACCELERATE_USE_CPU on a machine without GPUs: torchrun starts two processes
    # with WORLD_SIZE=2, but each runs alone.
    # Accelerate 1.16 runs each as a process of its own (refused); 1.7 (the oldest supported) forms one
    # two-process run on the CPU by itself, which is right. Never: two copies training side by side.
    result = run(command(tmp_path, "run", [], launcher=EXPLICIT), env={"OMP_NUM_THREADS": "1"}, timeout=120)
    assert processes_of(tmp_path) == []
    if result.returncode == 0:
        assert _summary(tmp_path / "run")["num_processes"] == 2
        return
    # each copy is a main process of its own: one or both report before the launcher stops the other
    assert "error: WORLD_SIZE is 2 but Accelerate runs 1 process(es)" in result.stderr
    assert not (tmp_path / "run").exists()


def test_cpu_flag_starting_one_process_is_refused(tmp_path):
    # `accelerate launch --cpu --num_processes 2` starts ONE process (it expects mpirun), through Accelerate's
    # single-process launcher; -q, as the README's commands have it: from Accelerate 1.16 that launcher
    # otherwise repeats a failed script's stderr inside a traceback of its own.
    result = run(command(tmp_path, "run", [], launcher=("-q", "--cpu", *EXPLICIT[1:])), timeout=120)
    assert result.returncode != 0
    message = "error: accelerate launch --cpu with several processes starts only one"
    assert result.stderr.count(message) == 1, result.stderr[-3000:]
    assert result.stderr.rstrip().splitlines()[-1].startswith(message)
    assert not (tmp_path / "run").exists() and processes_of(tmp_path) == []


# ---------------------------------------------------------------- 10: the fp16 gradient scaler (CUDA)


def test_gradient_scaler_state_is_part_of_the_resume_state(tmp_path):
    """On CUDA, fp16 gives the Accelerator a GradScaler. No GPU here: one process in this process, with a
    CPU GradScaler put where Accelerate puts the CUDA one. Proves the engine's loop goes through it
    (scaled backward, scaler.step/update) and that checkpoints/last carries its state into a resume."""
    from conftest import train_run
    from toolkit.runtime import make_accelerator

    def with_scaler(cfg):
        accelerator = make_accelerator(cfg)
        accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=3)
        return accelerator

    common = ["train.epochs=2", "data.augment.crop_padding=2"]
    straight, _ = train_run(tmp_path, *common, name="straight", accelerator=with_scaler)
    parts, _ = train_run(tmp_path, *common, "train.stop_after=1", name="parts", accelerator=with_scaler)
    def scaler_state(run_dir):
        return torch.load(run_dir / "checkpoints" / "last" / "scaler.pt", weights_only=True)

    assert scaler_state(parts)["scale"] == 2.0**14  # 12 steps without overflow: doubled every 3rd step
    train_run(tmp_path, *common, "train.resume=true", name="parts", accelerator=with_scaler)
    assert scaler_state(parts) == scaler_state(straight) and scaler_state(parts)["scale"] == 2.0**18
    _equal_weights(load_file(parts / "checkpoints" / "last" / "model.safetensors"),
                   load_file(straight / "checkpoints" / "last" / "model.safetensors"))
