"""The training engine: train() sets a run up (toolkit/training.py) and fit() runs the epoch loop,
prepare -> accumulate -> backward -> gather_for_metrics, with the run directory written by the main
process only (save_state excepted, which every process must call). Optional features are hooks
(toolkit/hooks.py), never flags read inside the loop."""

from __future__ import annotations

import math
import time
from typing import Sequence

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from rich.console import Console

from toolkit.config import RunConfig
from toolkit.errors import ToolkitError, report
from toolkit.features import feature_hooks
from toolkit.hooks import STOPS, Hook, Requests, default_hooks
from toolkit.models import check_model, train_mode
from toolkit.optim import replan
from toolkit.preempt import peer_lost, preempt_hooks
from toolkit.progress import Reporter, data_line, epoch_line, upsampling_note
from toolkit.resume import finished
from toolkit.rundir import RunDir
from toolkit.runtime import check_launch, device_report, keep_freed_memory, make_accelerator
from toolkit.summary import trainer_state, write_summary
from toolkit.data import num_steps, skip_batches
from toolkit.data.shard_loader import skipped_samples
from toolkit.training import Training, build_training, prepare_run_dir
from toolkit.validation import served, validate


class NonFiniteLoss(ToolkitError):
    """The loss became NaN or infinite; the last good checkpoints are kept."""


def train(cfg: RunConfig, console: Console | None = None, hooks: Sequence[Hook] = (),
          accelerator: Accelerator | None = None, notes: Sequence[str] = ()) -> dict:
    """Run (or resume) the configured training; returns the summary written to summary.json.
    `hooks` come after the config's own (trackers); `accelerator` replaces the one the config makes;
    `notes` are printed with the start-up lines (what loading the config found worth saying)."""
    keep_freed_memory()
    accelerator = accelerator or make_accelerator(cfg)
    try:
        check_launch(cfg, accelerator)
        hooks = [*default_hooks(cfg), *feature_hooks(cfg), *preempt_hooks(cfg), *hooks]
        run = start(cfg, accelerator, console or Console(soft_wrap=True), notes, hooks)
        if run is None:  # a finished run, resumed as it is: said so, nothing trained
            accelerator.end_training()
            return RunDir(cfg.run_dir).read_summary() or {"status": "complete"}
        return fit(run, hooks)
    except ToolkitError as exc:
        if accelerator.num_processes > 1:
            # Every process raises it (same checks, same data; NonFiniteLoss is agreed by a reduce). The
            # launcher stops all processes as soon as one exits with an error, which could cut the main
            # process's message off: the main process reports it first, then all leave together.
            if accelerator.is_main_process:
                report(exc)
            accelerator.wait_for_everyone()
            exc.quiet = True  # reported once, here
        accelerator.end_training()
        raise
    except RuntimeError as exc:  # torch.distributed's errors are RuntimeErrors
        lost = peer_lost(cfg, exc) if accelerator.num_processes > 1 else None
        if lost is None:
            raise
        report(lost)  # by every survivor (the main process may be the one that died); no barrier now
        lost.quiet = True
        raise lost from None


def start(cfg: RunConfig, accelerator: Accelerator, console: Console, notes: Sequence[str] = (),
          hooks: Sequence[Hook] = ()) -> Training | None:
    """The run directory decided, set-up built at the configured batch size, the hooks' state registered
    and the resume state loaded; None for a finished run resumed with nothing left to train (the reason printed)."""
    t0 = time.perf_counter()
    reporter = Reporter(console, accelerator.is_main_process, cfg.train.log_every, cfg.train.log_every_s)
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    data = cfg.data.resolved()
    check_model(cfg.model.name, cfg.model.args, data.channels, data.image_size)  # before the run dir or the data
    for note in notes:
        reporter.print(note, highlight=False)
    state, changes = prepare_run_dir(cfg, accelerator, reporter.print)
    if state is not None and (done := finished(state, cfg)):
        reporter.print(done, highlight=False)
        return None
    reporter.print(device_report(accelerator, cfg), highlight=False)
    run = build_training(cfg, accelerator, cfg.data.batch_size, reporter)
    run.t0 = t0
    for hook in hooks:
        hook.on_setup(run)
    set_seed(cfg.train.seed, device_specific=True)  # each process its own augmentation stream
    if state is not None:
        accelerator.load_state(str(run.keeper.dir / "last"))
        where = f", batch {state.batches_done} of {len(run.train_loader)} of epoch {state.epoch + 1}" if state.batches_done else ""
        reporter.print(f"resumed {cfg.run_dir} after epoch {state.epoch}{where}")
        if any(c.key == "train.epochs" for c in changes):
            rate = replan(run.scheduler, run.steps_per_epoch, cfg.train.epochs)
            reporter.print(f"learning-rate schedule ({cfg.schedule.name}) re-planned over {cfg.train.epochs} "
                           f"epochs: the next step uses lr {rate:.6g}", highlight=False)
        run.state = state
    reporter.print(data_line(run), highlight=False)
    if (upsampled := upsampling_note(run.bundle.preprocess["image_size"], run.bundle.source_side)) is not None:
        reporter.print(f"[yellow]warning: {upsampled}[/]")
    return run


def fit(run: Training, hooks: Sequence[Hook] = ()) -> dict:
    """The epoch loop: train, validate, record, checkpoint, report; returns the summary."""
    cfg, state, main = run.cfg, run.state, run.accelerator.is_main_process
    for hook in hooks:
        hook.on_start(run)
    status = None
    try:
        for epoch in range(state.epoch + 1, run.last_epoch + 1):
            if state.stopped_early:
                break
            metrics = run_epoch(run, epoch, hooks)
            module, ranked_by = served(run, hooks)  # what checkpoints/best holds, and its val accuracy
            improved = state.record(metrics, cfg.train.patience, ranked_by)
            step = epoch * run.steps_per_epoch
            meta = run.meta.model_copy(update={"epoch": epoch, "val_acc": metrics[ranked_by], "ranked_by": ranked_by})
            if improved and main:
                run.keeper.save_best(module, meta, step)
            for hook in hooks:
                hook.on_validated(run, metrics, module, meta, step)
            if main:
                run.layout.append_metrics(metrics)
            run.keeper.save_last(run.accelerator, trainer_state(run), step)
            run.reporter.print(epoch_line(epoch, cfg.train.epochs, metrics, improved), highlight=False)
            for hook in hooks:
                hook.after_epoch(run, metrics)
            if state.stopped_early:
                run.reporter.print(f"early stopping: no better val accuracy for {cfg.train.patience} epochs "
                                   f"(best {state.best_val_acc:.2%} at epoch {state.best_epoch})")
            if epoch < run.last_epoch and agree(run.accelerator, None, run.requests)[2]:
                raise Stopped(run.requests.stop)  # asked during validation or the save: saved just now
            run.requests.save_now = run.requests.save_soon = False  # the epoch's checkpoint answered them
    except NonFiniteLoss:
        if main:
            write_summary(run, status="non_finite_loss")
        raise
    except Stopped as stop:
        status = stop.why
    except KeyboardInterrupt:  # a second Ctrl-C: at once, nothing saved since checkpoints/last
        if main:
            write_summary(run, status="aborted")
        raise
    finally:
        for hook in hooks:
            hook.close(run)
    status = status or ("complete" if state.epoch >= cfg.train.epochs or state.stopped_early else "stopped")
    summary = write_summary(run, status=status)
    for hook in hooks:
        hook.on_end(run, summary)
    # after a stop every process exits with a failure status (75), and a launcher (torchrun, srun) stops the
    # others as soon as one exits: none leaves before the main process has written and said everything
    run.accelerator.wait_for_everyone()
    run.accelerator.end_training()
    return summary


class Stopped(Exception):
    """Every process agreed to stop (a hook's request: a signal, Ctrl-C); checkpoints/last is saved."""

    def __init__(self, why: str):
        super().__init__(why)
        self.why = why


def run_epoch(run: Training, epoch: int, hooks: Sequence[Hook] = ()) -> dict:
    """Train one epoch, then validate the model every process now holds; returns its metrics line."""
    run.train_loader.set_epoch(epoch)
    t_epoch = time.perf_counter()
    train_loss, train_acc, seen, train_s = train_epoch(run, epoch, hooks)
    scores = validate(run, hooks)  # val_loss, val_acc, those of the modules hooks add, val_samples
    if not math.isfinite(scores["val_loss"]):  # the epoch's last step broke the weights: do not checkpoint them
        raise non_finite(f"in validation after epoch {epoch}")
    return dict(epoch=epoch, train_loss=train_loss, train_acc=train_acc, **scores,
                eval_precision=run.eval_precision, lr=run.scheduler.get_last_lr()[0],
                images_per_s=seen / train_s, num_processes=run.accelerator.num_processes,
                epoch_s=time.perf_counter() - t_epoch, **skipped_samples(run))


def reduce_due(step: int, steps: int, log_every: int) -> bool:
    """The steps (1-based) where the totals are summed over processes: the same on every process."""
    return step % 10 == 0 or step % log_every == 0 or step == steps


def train_epoch(run: Training, epoch: int, hooks: Sequence[Hook] = ()) -> tuple[float, float, float, float]:
    """One pass over this process's shard (from the batch a mid-epoch checkpoint reached); returns global
    (all processes) loss, accuracy, images of this invocation and its seconds."""
    accelerator, forward, reporter, requests = run.accelerator, run.forward, run.reporter, run.requests
    train_mode(forward)
    start, steps = run.state.batches_done, len(run.train_loader)
    loader = skip_batches(accelerator, run.train_loader, start)
    # sum of loss * n, correct, n, non-finite losses: kept on the device, read every few steps only. A resumed
    # epoch carries on from each process's own totals at the checkpoint (summed in the same order as unbroken).
    rows = partial_rows(run.state.partial, accelerator.num_processes) if start else []
    reduced = [sum(column) for column in zip(*rows)] if rows else [0.0] * 4  # the totals at the previous reduce
    totals = torch.tensor(rows[accelerator.process_index] if rows else [0.0] * 4, device=accelerator.device)
    before = reduced[2]  # images of this epoch trained before this invocation
    global_step = (epoch - 1) * run.steps_per_epoch + num_steps(start, run.cfg.train.grad_accum_steps)
    reporter.start_epoch(epoch, run.cfg.train.epochs, steps)
    t0 = time.perf_counter()
    for step, (images, labels) in enumerate(loader, start=start + 1):
        images, targets = run.augment(images, train=True), labels
        for hook in hooks:  # mixup/cutmix: images and soft targets
            images, targets = hook.transform_batch(run, images, targets)
        with accelerator.accumulate(forward):
            logits = forward(images)
            loss = run.criterion(logits.float(), targets)
            accelerator.backward(loss)
            if accelerator.sync_gradients and run.clip_grad_norm:
                accelerator.clip_grad_norm_(run.net.parameters(), run.clip_grad_norm)
            lr = run.scheduler.get_last_lr()[0]  # the rate this step uses
            run.optimizer.step()
            if accelerator.sync_gradients:
                run.scheduler.step()
                global_step += 1
            run.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            loss = loss.detach()
            labels = targets if targets.ndim == 1 else targets.argmax(1)  # mixed: each image's dominant label
            totals += torch.stack([loss * len(labels), (logits.argmax(1) == labels).sum(),
                                   torch.tensor(len(labels), device=totals.device), (~torch.isfinite(loss)).float()])
        if accelerator.sync_gradients:
            for hook in hooks:
                hook.after_optimizer_step(run, global_step)
        shown = (0,)
        if reduce_due(step, steps, reporter.log_every) or requests.save_now:  # collective: same steps everywhere
            now, save, stop, rows = agree(accelerator, totals, requests)
            loss_sum, correct, seen, bad = now
            if bad:  # every process sees the same sum, so all stop together; no checkpoint is written
                raise non_finite(f"at epoch {epoch}, by step {step}")
            for hook in hooks:  # the mean loss since the previous reduce
                hook.at_reduce(run, global_step, (loss_sum - reduced[0]) / (seen - reduced[2]), lr)
            reduced = now
            if (save or stop) and accelerator.sync_gradients and step < steps:  # else: at the epoch's end
                save_mid_epoch(run, epoch, step, rows, global_step)
                if stop:
                    raise Stopped(stop)
            if reporter.wants_stats(step):  # progress of all processes, not process 0's
                shown = (int(seen), loss_sum / seen, correct / seen)
        reporter.step(step, *shown)
    reporter.end_epoch()
    elapsed = time.perf_counter() - t0
    loss_sum, correct, seen, _ = accelerator.reduce(totals, reduction="sum").tolist()
    return loss_sum / seen, correct / seen, seen - before, elapsed


def agree(accelerator: Accelerator, totals: torch.Tensor | None, requests: Requests) -> tuple[list, bool, str, list]:
    """A collective point: `totals` summed over processes, and what every process now does: save if any
    process was asked to, stop for the strongest reason any was given (kept in `requests` on every process);
    last, every process's own totals (a mid-epoch checkpoint keeps them)."""
    flags = [float(requests.save_now or requests.save_soon), float(STOPS.index(requests.stop))]
    local = torch.tensor([0.0] * 4 + flags, device=accelerator.device)
    if totals is not None:
        local[:4] = totals
    everyone = accelerator.gather(local).view(-1, 6)
    requests.save_soon, requests.stop = bool(everyone[:, 4].max()), STOPS[int(everyone[:, 5].max())]
    return (everyone[:, :4].sum(0).tolist(), requests.save_soon or requests.save_now, requests.stop,
            everyone[:, :4].tolist())


def partial_rows(partial: list, num_processes: int) -> list[list[float]]:
    """The per-process totals of a mid-epoch checkpoint (one row per process; a checkpoint of version 0.x
    kept one summed row, which the main process carries)."""
    if partial and not isinstance(partial[0], list):
        return [list(partial)] + [[0.0] * 4] * (num_processes - 1)
    if len(partial) != num_processes:
        raise ToolkitError(f"checkpoints/last was saved inside an epoch by {len(partial)} processes: resume it with "
                           f"{len(partial)} processes (the epoch's remaining batches are theirs), or from an "
                           f"epoch's end")
    return partial


def save_mid_epoch(run: Training, epoch: int, step: int, rows: list, global_step: int) -> None:
    """checkpoints/last inside `epoch`, after its batch `step`: --resume continues at the next batch."""
    run.state.batches_done, run.state.partial = step, rows
    t0 = time.perf_counter()
    run.keeper.save_last(run.accelerator, trainer_state(run), global_step)
    run.save_s = time.perf_counter() - t0
    run.requests.save_now = run.requests.save_soon = False
    run.reporter.print(f"checkpoints/last: epoch {epoch}, batch {step} of {len(run.train_loader)} "
                       f"(step {global_step}) saved in {run.save_s:.2f} s", highlight=False)


def non_finite(where: str) -> NonFiniteLoss:
    return NonFiniteLoss(f"non-finite loss {where}: training stopped on every process. checkpoints/best and "
                         "checkpoints/last keep the last good epoch (if one finished). Lower optim.lr, set "
                         "train.clip_grad_norm, or check the data.")
