"""Optimizers and learning-rate schedules from config. Schedules count optimizer steps, so they
are right whatever the number of processes and accumulation steps."""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR, LRScheduler, OneCycleLR

from toolkit.config import OptimConfig, ScheduleConfig


def scaled_lr(cfg: OptimConfig, effective_batch_size: int, batch_size: int) -> float:
    """optim.lr, scaled by effective / base batch size when optim.lr_scaling asks for it."""
    ratio = effective_batch_size / (cfg.lr_base_batch_size or batch_size)
    factor = {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[cfg.lr_scaling]
    return cfg.lr * factor


def build_optimizer(cfg: OptimConfig, params, lr: float) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                               weight_decay=cfg.weight_decay)
    if cfg.name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)


class _Factor:
    """lr multiplier as a function of the optimizer step: warm-up, then step or cosine decay."""

    def __init__(self, cfg: ScheduleConfig, steps_per_epoch: int, total_steps: int, base_lr: float):
        self.name = cfg.name
        self.warmup = round(cfg.warmup_epochs * steps_per_epoch)
        self.step_size = max(1, round(cfg.step_epochs * steps_per_epoch))
        self.gamma = cfg.gamma
        self.total = total_steps
        self.floor = cfg.min_lr / base_lr

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        if self.name == "step":
            return self.gamma ** (step // self.step_size)
        if self.name == "cosine":
            progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
            return self.floor + (1 - self.floor) * 0.5 * (1 + math.cos(math.pi * progress))
        return 1.0


def build_scheduler(cfg: ScheduleConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int,
                    epochs: int) -> LRScheduler:
    """Stepped once per optimizer step (not per micro-batch, not per process)."""
    total = steps_per_epoch * epochs
    base_lr = optimizer.param_groups[0]["lr"]
    if cfg.name == "onecycle":
        return OneCycleLR(optimizer, max_lr=base_lr, total_steps=total, pct_start=cfg.pct_start)
    return LambdaLR(optimizer, _Factor(cfg, steps_per_epoch, total, base_lr))


def replan(scheduler, steps_per_epoch: int, epochs: int) -> float:
    """After a resume changed train.epochs: the restored schedule goes on over the new total (its step
    count kept), so a cosine decay stretches to the new end. Returns the rate the next step uses."""
    inner = getattr(scheduler, "scheduler", scheduler)  # under Accelerate's AcceleratedScheduler
    if isinstance(inner, LambdaLR):
        for factor in inner.lr_lambdas:
            if isinstance(factor, _Factor):
                factor.total = steps_per_epoch * epochs
        rates = [base * factor(inner.last_epoch) for base, factor in zip(inner.base_lrs, inner.lr_lambdas)]
        for group, rate in zip(inner.optimizer.param_groups, rates):
            group["lr"] = rate
        inner._last_lr = rates
    return inner.get_last_lr()[0]
