"""Optimizers and schedules as the README and launch/README.md promise them: lr scaling with their own
numbers, every optimizer option reaching torch, and schedules counted in optimizer steps (not
micro-batches, not processes), checked in unit tests and in real runs with accumulation and two processes."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import accelerate_launch, read_jsonl, train_run
from toolkit.config_io import load_config
from toolkit.optim import build_optimizer, build_scheduler, scaled_lr


def optim_cfg(*overrides: str):
    return load_config("smoke.yaml", list(overrides)).optim


def test_lr_scaling_with_the_readme_numbers():
    """launch/README.md: lr 0.1 tuned at batch 128 on one GPU, now 8 GPUs x 128: linear 0.8, sqrt 0.283."""
    tuned = ["optim.lr=0.1", "optim.lr_base_batch_size=128"]
    assert scaled_lr(optim_cfg(*tuned, "optim.lr_scaling=linear"), 1024, 128) == pytest.approx(0.8)
    assert scaled_lr(optim_cfg(*tuned, "optim.lr_scaling=sqrt"), 1024, 128) == pytest.approx(0.2828, abs=1e-4)
    assert scaled_lr(optim_cfg(*tuned, "optim.lr_scaling=none"), 1024, 128) == 0.1  # never rewritten unasked
    # no base given: data.batch_size (one process, no accumulation) is the base
    assert scaled_lr(optim_cfg("optim.lr=0.1", "optim.lr_scaling=linear"), 4 * 32, 32) == pytest.approx(0.4)


def test_optimizer_options_reach_torch():
    params = [torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2), requires_grad=False)]
    sgd = build_optimizer(optim_cfg("optim.name=sgd", "optim.momentum=0.8", "optim.nesterov=true",
                                    "optim.weight_decay=1e-4"), params, 0.05)
    group = sgd.param_groups[0]
    assert isinstance(sgd, torch.optim.SGD) and len(group["params"]) == 1  # frozen parameters left out
    assert (group["lr"], group["momentum"], group["nesterov"], group["weight_decay"]) == (0.05, 0.8, True, 1e-4)
    adamw = build_optimizer(optim_cfg("optim.name=adamw", "optim.weight_decay=0.01"), params, 1e-3)
    assert type(adamw) is torch.optim.AdamW and adamw.param_groups[0]["weight_decay"] == 0.01
    adam = build_optimizer(optim_cfg("optim.name=adam", "optim.weight_decay=1e-4"), params, 1e-3)
    assert type(adam) is torch.optim.Adam and adam.param_groups[0]["weight_decay"] == 1e-4


def lrs(schedule: list[str], steps_per_epoch: int, epochs: int, lr: float = 1.0) -> list[float]:
    """The lr of every optimizer step of a run, as the engine steps the scheduler."""
    cfg = load_config("smoke.yaml", schedule).schedule
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    scheduler = build_scheduler(cfg, optimizer, steps_per_epoch, epochs)
    seen = []
    for _ in range(steps_per_epoch * epochs):
        seen.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    return seen


def test_warmup_then_step_counts_optimizer_steps():
    seen = lrs(["schedule.name=step", "schedule.step_epochs=1", "schedule.gamma=0.5", "schedule.warmup_epochs=1"], 4, 3)
    assert seen[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])  # linear warm-up over the first epoch's 4 steps
    assert seen[4:] == pytest.approx([0.5 ** (s // 4) for s in range(4, 12)])


def test_cosine_ends_at_min_lr_and_onecycle_peaks_at_lr():
    cosine = lrs(["schedule.name=cosine", "schedule.min_lr=0.1"], 5, 2)
    assert cosine[0] == pytest.approx(1.0) and cosine[-1] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 9 / 10)))
    assert all(a >= b for a, b in zip(cosine, cosine[1:]))
    onecycle = lrs(["schedule.name=onecycle", "schedule.pct_start=0.25"], 4, 2)
    peak = max(range(8), key=onecycle.__getitem__)
    assert onecycle[peak] == pytest.approx(1.0) and peak == 1  # 25% of 8 steps, counted from 0
    assert onecycle[0] < 0.1 and onecycle[-1] < 1e-3


STEP_SCHEDULE = ["schedule.name=step", "schedule.step_epochs=1", "schedule.gamma=0.5", "optim.lr=0.01",
                 "train.epochs=3", "data.synthetic_samples=256"]


def test_schedule_under_accumulation_counts_optimizer_steps(tmp_path):
    """256 images, 25% held out: 192 train = 12 micro-batches of 16 = 6 optimizer steps per epoch with
    accumulation 2. A step schedule of 1 epoch halves the lr at each epoch's end exactly: counted in
    micro-batches it would halve twice per epoch."""
    run_dir, _ = train_run(tmp_path, *STEP_SCHEDULE, "data.batch_size=16", "train.grad_accum_steps=2")
    assert [m["lr"] for m in read_jsonl(run_dir / "metrics.jsonl")] == pytest.approx([0.005, 0.0025, 0.00125])


@pytest.mark.distributed
def test_schedule_with_two_processes_and_accumulation_counts_optimizer_steps(tmp_path):
    """The same schedule, two processes of 8 images a micro-batch, accumulation 2: 192 / (2 x 8 x 2)
    = 6 optimizer steps per epoch, and the same lr per epoch as one process."""
    run_dir, result = accelerate_launch(tmp_path, *STEP_SCHEDULE, "data.batch_size=8", "train.grad_accum_steps=2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert [m["lr"] for m in read_jsonl(run_dir / "metrics.jsonl")] == pytest.approx([0.005, 0.0025, 0.00125])
