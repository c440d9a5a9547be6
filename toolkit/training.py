"""Set-up of a training run: the run directory decided (fresh, resumed or refused) and a `Training`,
the typed object holding everything the epoch loop needs, built for a given per-device batch size."""

from __future__ import annotations

import functools
import shutil
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed

from toolkit.checkpoint import Keeper
from toolkit.config import RunConfig
from toolkit.augment import BatchAugment, loader_transform
from toolkit.batch_size import find_batch_size
from toolkit.data import DataBundle, build_data, build_loaders, num_steps
from toolkit.errors import ToolkitError
from toolkit.hooks import Requests
from toolkit.models import build_model, freeze_backbone, load_pretrained
from toolkit.optim import build_optimizer, build_scheduler, scaled_lr
from toolkit.progress import Reporter
from toolkit.resume import Change, check_resume, config_changes
from toolkit.rundir import Meta, RunDir


@dataclass
class RunState:
    """What trainer_state.json carries between invocations."""
    epoch: int = 0  # epochs completed
    # A checkpoint inside epoch `epoch + 1`: its batches already trained (per process), and each process's
    # on-device totals of those batches (a row per process), so its metrics line stays that of a whole epoch.
    batches_done: int = 0
    partial: list = field(default_factory=list)
    best_val_acc: float = -1.0
    best_epoch: int = 0
    bad_epochs: int = 0  # epochs since the best, for early stopping
    stopped_early: bool = False
    wall_s: float = 0.0
    history: list = field(default_factory=list)

    def record(self, metrics: dict, patience: int | None, key: str = "val_acc") -> bool:
        """Count a finished epoch; True when its validation accuracy (`key`: that of the module
        checkpoints/best holds) is the best so far."""
        improved = metrics[key] > self.best_val_acc
        if improved:
            self.best_val_acc, self.best_epoch, self.bad_epochs = metrics[key], metrics["epoch"], 0
        else:
            self.bad_epochs += 1
        self.stopped_early = patience is not None and self.bad_epochs >= patience
        self.epoch, self.batches_done, self.partial = metrics["epoch"], 0, []
        self.history.append(metrics)
        return improved


@dataclass
class Training:
    """Everything one invocation's epoch loop reads; built by build_training."""
    cfg: RunConfig
    accelerator: Accelerator
    reporter: Reporter
    layout: RunDir
    keeper: Keeper
    bundle: DataBundle
    # The unwrapped network (one name for it): what checkpoints/best saves, what clipping and the
    # BatchNorm broadcast see. `model` is the same network after prepare() (DDP, training autocast).
    net: torch.nn.Module
    model: torch.nn.Module
    forward: Callable  # the training forward: `model`, compiled when train.compile is on
    eval_forward: Callable  # validation's forward, in the precision `eval_precision` names
    eval_precision: str
    optimizer: torch.optim.Optimizer
    scheduler: object
    train_loader: object
    val_loader: object
    augment: Callable  # (uint8 images, train) -> normalised float images on the device
    criterion: Callable  # (float logits, labels) -> mean loss
    clip_grad_norm: float | None
    batch_size: int  # per device
    effective_batch_size: int
    lr: float
    steps_per_epoch: int  # optimizer steps
    meta: Meta  # checkpoints/best's meta.json but for epoch and val_acc
    state: RunState = field(default_factory=RunState)
    requests: Requests = field(default_factory=Requests)  # the stop seam: hooks ask, the loop acts
    save_s: float | None = None  # seconds the latest mid-epoch save of checkpoints/last took
    t0: float = field(default_factory=time.perf_counter)

    @property
    def last_epoch(self) -> int:
        """The last epoch this invocation trains (train.stop_after cuts a long run into jobs)."""
        epochs, stop_after = self.cfg.train.epochs, self.cfg.train.stop_after
        return epochs if stop_after is None else min(epochs, self.state.epoch + stop_after)


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


def build_training(cfg: RunConfig, accelerator: Accelerator, batch_size: int | str, reporter: Reporter) -> Training:
    """Data, network, optimizer, loaders, prepare, schedule, compile and augmentation for `batch_size`
    images per device. Seeds the global RNG: the same initial weights on every process."""
    bundle = build_data(cfg.data)  # read once, whatever the batch size
    pre, classes = bundle.preprocess, bundle.classes
    if batch_size == "auto":
        batch_size = auto_batch_size(cfg, accelerator, bundle, reporter)
        cfg = with_batch_size(cfg, batch_size)
    set_seed(cfg.train.seed)  # identical initial weights on every process
    net = build_network(cfg, len(classes), pre, accelerator.num_processes, reporter.print)

    effective_batch = batch_size * accelerator.num_processes * cfg.train.grad_accum_steps
    lr = scaled_lr(cfg.optim, effective_batch, cfg.data.batch_size)
    optimizer = build_optimizer(cfg.optim, net.parameters(), lr)
    data_cfg = cfg.data if batch_size == cfg.data.batch_size else cfg.data.model_copy(update={"batch_size": batch_size})
    train_loader, val_loader = build_loaders(bundle, data_cfg, cfg.train.seed, accelerator.device.type == "cuda", accelerator)
    plain_forward = net.forward  # before prepare() wraps it in the training autocast
    if bundle.pipeline == "shards":  # each process streams its own span: nothing for Accelerate to shard
        model, optimizer = accelerator.prepare(net, optimizer)
    else:
        model, optimizer, train_loader, val_loader = accelerator.prepare(net, optimizer, train_loader, val_loader)
    steps_per_epoch = num_steps(len(train_loader), cfg.train.grad_accum_steps)
    scheduler = accelerator.prepare(build_scheduler(cfg.schedule, optimizer, steps_per_epoch, cfg.train.epochs))
    forward = torch.compile(model) if cfg.train.compile else model
    eval_precision, eval_forward = validation_forward(cfg, accelerator, plain_forward)
    aug = cfg.data.augment
    if not bundle.in_memory:  # ImageNet-style augmentation per sample in the workers, else on whole batches
        bundle.train.augment(loader_transform(aug, pre), cfg.train.seed)
    augment = BatchAugment(pre, aug.crop_padding, aug.hflip, cfg.train.channels_last, aug if bundle.in_memory else None)
    meta = Meta(model={"name": cfg.model.name, "args": cfg.model.args}, num_classes=len(classes), classes=classes,
                **{k: pre[k] for k in ("channels", "image_size", "resize", "mean", "std", "preprocess_version")})
    return Training(
        cfg=cfg, accelerator=accelerator, reporter=reporter, layout=RunDir(cfg.run_dir), keeper=Keeper(cfg.run_dir),
        bundle=bundle, net=net, model=model, forward=forward, eval_forward=eval_forward, eval_precision=eval_precision, optimizer=optimizer,
        scheduler=scheduler, train_loader=train_loader, val_loader=val_loader, augment=augment,
        criterion=functools.partial(class_index_loss, len(classes), cfg.train.label_smoothing),
        clip_grad_norm=cfg.train.clip_grad_norm, batch_size=batch_size, effective_batch_size=effective_batch,
        lr=lr, steps_per_epoch=steps_per_epoch, meta=meta)


def class_index_loss(num_classes: int, label_smoothing: float, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy, with labels that are not class indices (floats, one-hot, out of range) a ToolkitError:
    the check costs nothing in a good step (torch raises; no value is read from the device)."""
    try:
        return F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
    except (IndexError, RuntimeError, ValueError) as exc:
        if labels.dtype == torch.long and labels.ndim == 1 and "out of bounds" not in str(exc):
            raise
        raise ToolkitError(f"labels must be class indices: integers 0..{num_classes - 1}, one per image (the dataset has "
                           f"{num_classes} classes); got a {labels.dtype} tensor of shape {list(labels.shape)} ({exc}). "
                           "Check the dataset's targets (e.g. data.num_classes, or the class folders).") from None


def with_batch_size(cfg: RunConfig, batch_size: int) -> RunConfig:
    return cfg.model_copy(update={"data": cfg.data.model_copy(update={"batch_size": batch_size})})


def auto_batch_size(cfg: RunConfig, accelerator: Accelerator, bundle: DataBundle, reporter: Reporter) -> int:
    """data.batch_size auto: the size config.yaml recorded (a resumed run), else the search's, recorded."""
    layout = RunDir(cfg.run_dir)
    if isinstance(recorded := layout.load_config().data.batch_size, int):
        reporter.print(f"data.batch_size auto: {recorded} per process, as this run found it before")
        return recorded
    pre = bundle.preprocess
    aug = cfg.data.augment
    augment = BatchAugment(pre, aug.crop_padding, aug.hflip, cfg.train.channels_last, aug if bundle.in_memory else None)
    network = functools.partial(build_network, cfg, len(bundle.classes), pre, 1, lambda *_, **__: None)
    found = find_batch_size(cfg, accelerator, bundle, network, augment)
    if found == 0:
        raise ToolkitError("data.batch_size auto: not even one image per step fits in the device's memory. "
                           "Choose a smaller model or data.image_size.")
    capped = " (the cap, data.auto_batch_size_max)" if found == cfg.data.auto_batch_size_max else ""
    reporter.print(f"data.batch_size auto: {found} per process{capped}, the largest a training step fits "
                   f"(halving from {cfg.data.auto_batch_size_max}; the smallest over {accelerator.num_processes} process(es))")
    if accelerator.is_main_process:
        layout.write_config(with_batch_size(cfg, found))  # a resume reuses it
    accelerator.wait_for_everyone()
    return found


def validation_forward(cfg: RunConfig, accelerator: Accelerator, plain_forward) -> tuple[str, object]:
    """The precision validation runs in and the callable that runs it. By default fp32, as evaluate,
    predict, the export and TorchServe run the checkpoint: Accelerate bakes the training autocast into
    the prepared model's forward, and an outer autocast(enabled=False) cannot undo an inner one, so
    validation calls the model's own forward, taken before prepare() wrapped it (in the training autocast
    for eval_precision train). Never DDP's forward either: after a training step it broadcasts the buffers
    once more, a collective of its own in the validation loop, where the main process's buffers are
    already given to every process (validation.sync_buffers)."""
    run = torch.compile(plain_forward) if cfg.train.compile else plain_forward
    if accelerator.mixed_precision == "no" or cfg.train.eval_precision != "train":
        return "fp32", run

    def autocast_forward(images: torch.Tensor) -> torch.Tensor:
        with accelerator.autocast():
            return run(images)
    return accelerator.mixed_precision, autocast_forward


def prepare_run_dir(cfg: RunConfig, accelerator: Accelerator, say) -> tuple[RunState | None, list[Change]]:
    """Decide fresh start / resume / refuse (same decision on every process), then set the dir up.
    Returns the resumed state (None for a fresh start) and what the resume changed in the config."""
    run_dir, layout, keeper = cfg.run_dir, RunDir(cfg.run_dir), Keeper(cfg.run_dir)
    occupied = layout.is_occupied()
    state = keeper.read_trainer_state() if cfg.train.resume else None
    if occupied and not cfg.train.resume and not cfg.train.overwrite:
        what = "a finished run" if layout.is_finished() else "a partial run"
        raise ToolkitError(f"{run_dir} already holds {what}. Resume it with --resume, choose another "
                           f"train.run_name, or set train.overwrite: true to delete it.")
    changes = config_changes(layout.load_config(), cfg) if state is not None and layout.config_file.is_file() else []
    if state is not None and cfg.data.batch_size == "auto" and changes:  # the size the run found, reused
        found = layout.load_config().data.batch_size
        cfg = with_batch_size(cfg, found) if isinstance(found, int) else cfg
        changes = [c for c in changes if c.key != "data.batch_size"]
    if state is not None:
        check_resume(changes, state["epoch"], cfg)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if occupied and cfg.train.overwrite:
            shutil.rmtree(run_dir)
        elif cfg.train.resume and state is None and occupied:
            say(f"[yellow]{run_dir} has no complete checkpoint to resume: starting from the beginning[/]")
            layout.forget_progress()
        keeper.clean_stale()
        layout.checkpoints.mkdir(parents=True, exist_ok=True)
        layout.write_config(cfg)
        if state is not None:  # epochs after the last checkpoint were lost: drop their lines
            layout.rewrite_metrics(state["history"])
        if changes:
            layout.append_resume({"at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "after_epoch": state["epoch"],
                                  "changed": {c.key: [c.old, c.new] for c in changes}})
    for change in changes:
        say(f"resume changes {change}", highlight=False)
    accelerator.wait_for_everyone()
    if cfg.train.resume and state is None and not occupied:
        say(f"[yellow]nothing to resume in {run_dir}: starting a new run[/]")
    if state is None:
        return None, []
    resumed = RunState(**state)
    resumed.stopped_early = cfg.train.patience is not None and resumed.bad_epochs >= cfg.train.patience
    return resumed, changes
