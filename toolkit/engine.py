"""The training engine: the only module that imports accelerate.

prepare -> accumulate -> backward -> gather_for_metrics, with the run directory written by the
main process only (save_state excepted, which every process must call)."""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import broadcast, set_seed
from rich.console import Console

from toolkit import checkpoint
from toolkit.config import RunConfig
from toolkit.data import BatchAugment, build_data, build_loaders, num_steps
from toolkit.errors import ToolkitError
from toolkit.models import build_model, freeze_backbone, load_pretrained, train_mode
from toolkit.optim import build_optimizer, build_scheduler, scaled_lr
from toolkit.progress import Reporter, epoch_line
from toolkit.rundir import RunDir
from toolkit.runtime import check_launch, device_report, keep_freed_memory, make_accelerator


class NonFiniteLoss(ToolkitError):
    """The loss became NaN or infinite; the last good checkpoints are kept."""


@dataclass
class RunState:
    """What trainer_state.json carries between invocations."""
    epoch: int = 0  # epochs completed
    best_val_acc: float = -1.0
    best_epoch: int = 0
    bad_epochs: int = 0  # epochs since the best, for early stopping
    stopped_early: bool = False
    wall_s: float = 0.0
    history: list = field(default_factory=list)


def prepare_run_dir(cfg: RunConfig, accelerator: Accelerator, say) -> RunState | None:
    """Decide fresh start / resume / refuse (same decision on every process), then set the dir up."""
    run_dir, layout = cfg.run_dir, RunDir(cfg.run_dir)
    occupied = layout.is_occupied()
    state = checkpoint.read_trainer_state(run_dir) if cfg.train.resume else None
    if occupied and not cfg.train.resume and not cfg.train.overwrite:
        what = "a finished run" if layout.is_finished() else "a partial run"
        raise ToolkitError(f"{run_dir} already holds {what}. Resume it with --resume, choose another "
                           f"train.run_name, or set train.overwrite: true to delete it.")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if occupied and cfg.train.overwrite:
            shutil.rmtree(run_dir)
        elif cfg.train.resume and state is None and occupied:
            say(f"[yellow]{run_dir} has no complete checkpoint to resume: starting from the beginning[/]")
            layout.forget_progress()
        checkpoint.clean_stale(run_dir)
        layout.checkpoints.mkdir(parents=True, exist_ok=True)
        layout.write_config(cfg)
        if state is not None:  # epochs after the last checkpoint were lost: drop their lines
            layout.rewrite_metrics(state["history"])
    accelerator.wait_for_everyone()
    if cfg.train.resume and state is None and not occupied:
        say(f"[yellow]nothing to resume in {run_dir}: starting a new run[/]")
    return RunState(**state) if state is not None else None


def train(cfg: RunConfig, console: Console | None = None) -> dict:
    """Run (or resume) the configured training; returns the summary written to summary.json."""
    keep_freed_memory()
    accelerator = make_accelerator(cfg)
    try:
        check_launch(cfg, accelerator)
        return _train(cfg, accelerator, console or Console(soft_wrap=True))
    except ToolkitError as exc:
        if accelerator.num_processes > 1:
            # Every process raises it (same checks, same data; NonFiniteLoss is agreed by a reduce). The
            # launcher stops all processes as soon as one exits with an error, which could cut the main
            # process's message off: the main process reports it first, then all leave together.
            if accelerator.is_main_process:
                print(f"error: {exc}", file=sys.stderr, flush=True)
            accelerator.wait_for_everyone()
            exc.quiet = True  # reported once, here
        accelerator.end_training()
        raise


def _train(cfg: RunConfig, accelerator: Accelerator, console: Console) -> dict:
    t0 = time.perf_counter()
    main = accelerator.is_main_process
    reporter = Reporter(console, main, cfg.train.log_every)
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    state = prepare_run_dir(cfg, accelerator, reporter.print)
    reporter.print(device_report(accelerator, cfg), highlight=False)

    bundle = build_data(cfg.data)
    pre, classes = bundle.preprocess, bundle.classes
    set_seed(cfg.train.seed)  # identical initial weights on every process
    net = build_network(cfg, len(classes), pre, accelerator.num_processes, reporter.print)

    effective_batch = cfg.data.batch_size * accelerator.num_processes * cfg.train.grad_accum_steps
    lr = scaled_lr(cfg.optim, effective_batch, cfg.data.batch_size)
    optimizer = build_optimizer(cfg.optim, net.parameters(), lr)
    train_loader, val_loader = build_loaders(bundle, cfg.data, cfg.train.seed, accelerator.device.type == "cuda")
    plain_forward = net.forward  # before prepare() wraps it in the training autocast
    model, optimizer, train_loader, val_loader = accelerator.prepare(net, optimizer, train_loader, val_loader)
    steps_per_epoch = num_steps(len(train_loader), cfg.train.grad_accum_steps)
    scheduler = accelerator.prepare(build_scheduler(cfg.schedule, optimizer, steps_per_epoch, cfg.train.epochs))
    forward = torch.compile(model) if cfg.train.compile else model
    eval_precision, eval_forward = validation_forward(cfg, accelerator, forward, plain_forward)
    augment = BatchAugment(pre, cfg.data.augment.crop_padding, cfg.data.augment.hflip, cfg.train.channels_last)
    meta = {"model": {"name": cfg.model.name, "args": cfg.model.args}, "num_classes": len(classes),
            "classes": classes, **{k: pre[k] for k in ("channels", "image_size", "resize", "mean", "std")}}

    set_seed(cfg.train.seed, device_specific=True)  # each process its own augmentation stream
    if state is not None:
        accelerator.load_state(str(checkpoint.checkpoints_dir(cfg.run_dir) / "last"))
        reporter.print(f"resumed {cfg.run_dir} after epoch {state.epoch}")
    state = state or RunState()
    if cfg.train.log_with != "none":
        accelerator.init_trackers(cfg.train.run_name or "run", config=_flat_hparams(cfg))
    reporter.print(f"{cfg.data.name}: {len(bundle.train)} train / {len(bundle.val)} val images, {len(classes)} classes, "
                   f"{pre['channels']}x{pre['image_size']}x{pre['image_size']}, {bundle.pipeline} pipeline | "
                   f"{cfg.model.name} | effective batch {effective_batch} | lr {lr:g}", highlight=False)

    last_epoch = cfg.train.epochs if cfg.train.stop_after is None else min(cfg.train.epochs, state.epoch + cfg.train.stop_after)
    epoch_metrics = None
    try:
        for epoch in range(state.epoch + 1, last_epoch + 1):
            if state.stopped_early:
                break
            train_loader.set_epoch(epoch)
            t_epoch = time.perf_counter()
            train_loss, train_acc, seen, train_s = train_epoch(
                cfg, accelerator, forward, net, train_loader, optimizer, scheduler, augment, reporter,
                epoch, steps_per_epoch, (epoch - 1) * steps_per_epoch)
            sync_buffers(accelerator, net)
            val_loss, val_acc, val_samples = evaluate(accelerator, model, eval_forward, val_loader, augment)
            if not math.isfinite(val_loss):  # the epoch's last step broke the weights: do not checkpoint them
                raise non_finite(f"in validation after epoch {epoch}")
            epoch_metrics = dict(epoch=epoch, train_loss=train_loss, train_acc=train_acc, val_loss=val_loss,
                                 val_acc=val_acc, val_samples=val_samples, eval_precision=eval_precision, lr=scheduler.get_last_lr()[0],
                                 images_per_s=seen / train_s, num_processes=accelerator.num_processes,
                                 epoch_s=time.perf_counter() - t_epoch)
            improved = val_acc > state.best_val_acc
            if improved:
                state.best_val_acc, state.best_epoch, state.bad_epochs = val_acc, epoch, 0
                if main:
                    checkpoint.save_best(cfg.run_dir, net, {**meta, "epoch": epoch, "val_acc": val_acc}, epoch)
            else:
                state.bad_epochs += 1
            state.stopped_early = cfg.train.patience is not None and state.bad_epochs >= cfg.train.patience
            state.epoch = epoch
            state.history.append(epoch_metrics)
            if main:
                RunDir(cfg.run_dir).append_metrics(epoch_metrics)
            save_last(cfg.run_dir, accelerator, state, t0)
            reporter.print(epoch_line(epoch, cfg.train.epochs, epoch_metrics, improved), highlight=False)
            if cfg.train.log_with != "none":
                accelerator.log({f"epoch/{k}": v for k, v in epoch_metrics.items() if k != "epoch"}, step=epoch * steps_per_epoch)
            if state.stopped_early:
                reporter.print(f"early stopping: no better val accuracy for {cfg.train.patience} epochs "
                               f"(best {state.best_val_acc:.2%} at epoch {state.best_epoch})")
    except NonFiniteLoss:
        if main:
            write_summary(cfg, accelerator, state, t0, status="non_finite_loss")
        raise
    summary = write_summary(cfg, accelerator, state, t0,
                            status="complete" if state.epoch >= cfg.train.epochs or state.stopped_early else "stopped")
    accelerator.end_training()
    return summary


def build_network(cfg: RunConfig, num_classes: int, pre: dict, num_processes: int, say) -> torch.nn.Module:
    """The configured model: pretrained weights, frozen backbone, SyncBatchNorm, memory format."""
    net = build_model(cfg.model.name, num_classes, pre["channels"], pre["image_size"], cfg.model.args,
                      cfg.model.torchvision_weights)
    if cfg.model.pretrained_weights:
        say(load_pretrained(net, cfg.model.pretrained_weights))
    if cfg.model.freeze_backbone:
        freeze_backbone(net)
    if cfg.model.sync_batchnorm and num_processes > 1:
        net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)
    if cfg.train.channels_last:
        net = net.to(memory_format=torch.channels_last)
    return net


def train_epoch(cfg, accelerator, forward, net, loader, optimizer, scheduler, augment, reporter,
                epoch, steps, global_step):
    """One pass over this process's shard; returns global (all processes) loss, accuracy, images, seconds."""
    train_mode(forward)
    # sum of loss * n, correct, n, non-finite losses: kept on the device, read every few steps only
    totals = torch.zeros(4, device=accelerator.device)
    reporter.start_epoch(epoch, cfg.train.epochs, len(loader))
    t0 = time.perf_counter()
    for step, (images, labels) in enumerate(loader, start=1):
        with accelerator.accumulate(forward):
            logits = forward(augment(images, train=True))
            loss = F.cross_entropy(logits.float(), labels, label_smoothing=cfg.train.label_smoothing)
            accelerator.backward(loss)
            if accelerator.sync_gradients and cfg.train.clip_grad_norm:
                accelerator.clip_grad_norm_(net.parameters(), cfg.train.clip_grad_norm)
            lr = scheduler.get_last_lr()[0]  # the rate this step uses
            optimizer.step()
            if accelerator.sync_gradients:
                scheduler.step()
                global_step += 1
            optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            loss = loss.detach()
            totals += torch.stack([loss * len(labels), (logits.argmax(1) == labels).sum(),
                                   torch.tensor(len(labels), device=totals.device), (~torch.isfinite(loss)).float()])
        if cfg.train.log_with != "none" and accelerator.sync_gradients:
            accelerator.log({"Loss/train": loss.item(), "lr": lr}, step=global_step)
        shown = (0,)
        if step % 10 == 0 or step % cfg.train.log_every == 0 or step == len(loader):  # same steps on every process:
            loss_sum, correct, seen, bad = accelerator.reduce(totals, reduction="sum").tolist()  # reduce is collective
            if bad:  # every process sees the same sum, so all stop together; no checkpoint is written
                raise non_finite(f"at epoch {epoch}, by step {step}")
            if reporter.wants_stats(step):  # progress of all processes, not process 0's
                shown = (int(seen), loss_sum / seen, correct / seen)
        reporter.step(step, *shown)
    reporter.end_epoch()
    elapsed = time.perf_counter() - t0
    loss_sum, correct, seen, _ = accelerator.reduce(totals, reduction="sum").tolist()
    return loss_sum / seen, correct / seen, seen, elapsed


def non_finite(where: str) -> NonFiniteLoss:
    return NonFiniteLoss(f"non-finite loss {where}: training stopped on every process. checkpoints/best and "
                         "checkpoints/last keep the last good epoch (if one finished). Lower optim.lr, set "
                         "train.clip_grad_norm, or check the data.")


def validation_forward(cfg: RunConfig, accelerator: Accelerator, forward, plain_forward) -> tuple[str, object]:
    """The precision validation runs in and the callable that runs it. By default fp32, as evaluate,
    predict, the export and TorchServe run the checkpoint: Accelerate bakes the training autocast into
    the prepared model's forward, and an outer autocast(enabled=False) cannot undo an inner one, so fp32
    validation calls the model's own forward, taken before prepare() wrapped it."""
    if accelerator.mixed_precision == "no" or cfg.train.eval_precision == "train":
        return ("fp32" if accelerator.mixed_precision == "no" else accelerator.mixed_precision), forward
    return "fp32", torch.compile(plain_forward) if cfg.train.compile else plain_forward


def sync_buffers(accelerator: Accelerator, net: torch.nn.Module) -> None:
    """Give every process the main process's buffers (BatchNorm running statistics) before validating.
    DDP broadcasts them at the start of each training forward, so after the epoch's last step each
    process holds statistics updated by its own batch; validation must measure the model that is saved."""
    buffers = list(net.buffers())
    if accelerator.num_processes > 1 and buffers:
        broadcast(buffers, from_process=0)


@torch.no_grad()
def evaluate(accelerator: Accelerator, model: torch.nn.Module, forward, loader, augment) -> tuple[float, float, int]:
    """Loss, accuracy and sample count over exactly the validation set (no padded duplicates);
    `forward` runs `model` (put in eval mode here) in the validation precision."""
    model.eval()
    loss_sum, correct, seen = 0.0, 0, 0
    for images, labels in loader:
        logits = forward(augment(images, train=False))
        losses = F.cross_entropy(logits.float(), labels, reduction="none")
        losses, preds, labels = accelerator.gather_for_metrics((losses, logits.argmax(1), labels))
        loss_sum += losses.sum().item()
        correct += (preds == labels).sum().item()
        seen += len(labels)
    return loss_sum / seen, correct / seen, seen


def save_last(run_dir: Path, accelerator: Accelerator, state: RunState, t0: float) -> None:
    """Full resume state, staged then published atomically. Every process calls save_state."""
    staged = checkpoint.staging_dir(run_dir, "last", state.epoch)
    if accelerator.is_main_process:
        shutil.rmtree(staged, ignore_errors=True)
        staged.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(staged))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        payload = {**state.__dict__, "wall_s": state.wall_s + time.perf_counter() - t0}
        (staged / checkpoint.TRAINER_STATE).write_text(json.dumps(payload, indent=1))
        checkpoint.publish(run_dir, "last", staged)
    accelerator.wait_for_everyone()


def write_summary(cfg: RunConfig, accelerator: Accelerator, state: RunState, t0: float, status: str) -> dict:
    history = state.history
    rates = [m["images_per_s"] for m in history]
    summary = {
        "status": status, "best_val_acc": max(state.best_val_acc, 0.0), "best_epoch": state.best_epoch,
        "epochs_completed": state.epoch, "epochs": cfg.train.epochs, "stopped_early": state.stopped_early,
        "val_samples": history[-1]["val_samples"] if history else 0,
        "final_val_acc": history[-1]["val_acc"] if history else None,
        "num_processes": accelerator.num_processes, "mixed_precision": accelerator.mixed_precision,
        "eval_precision": history[-1]["eval_precision"] if history else None,
        "channels_last": cfg.train.channels_last,
        "effective_batch_size": cfg.data.batch_size * accelerator.num_processes * cfg.train.grad_accum_steps,
        "train_images_per_s": sum(rates) / len(rates) if rates else 0.0,
        "wall_s": state.wall_s + time.perf_counter() - t0, "device": accelerator.device.type,
    }
    if accelerator.is_main_process:
        RunDir(cfg.run_dir).write_summary(summary)
        _plot_curves(RunDir(cfg.run_dir), history)
    return summary


def _plot_curves(layout: RunDir, history: list[dict]) -> None:
    if not history:
        return
    from toolkit.report import plot_curves

    plot_curves(history, layout.curves)


def _flat_hparams(cfg: RunConfig) -> dict:
    """TensorBoard's hparams take scalars only."""
    flat = {}
    for section, values in cfg.to_dict().items():
        for key, value in values.items():
            flat[f"{section}.{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat
