"""What a run says about itself when an invocation ends: summary.json (and the curves), and the
trainer_state.json that checkpoints/last carries."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from toolkit.training import Training


def trainer_state(run: Training) -> dict:
    """trainer_state.json: the run state, with the wall time of every invocation so far."""
    return {**run.state.__dict__, "wall_s": run.state.wall_s + time.perf_counter() - run.t0}


def write_summary(run: Training, status: str) -> dict:
    cfg, accelerator, state = run.cfg, run.accelerator, run.state
    history = state.history
    rates = [m["images_per_s"] for m in history]
    summary = {
        "status": status, "best_val_acc": max(state.best_val_acc, 0.0), "best_epoch": state.best_epoch,
        "epochs_completed": state.epoch, "epochs": cfg.train.epochs, "stopped_early": state.stopped_early,
        "val_samples": history[-1]["val_samples"] if history else 0,
        "final_val_acc": history[-1]["val_acc"] if history else None,
        "num_processes": accelerator.num_processes, "mixed_precision": accelerator.mixed_precision,
        "eval_precision": history[-1]["eval_precision"] if history else None,
        "channels_last": cfg.train.channels_last, "batch_size": run.batch_size,
        "effective_batch_size": run.effective_batch_size,
        "train_images_per_s": sum(rates) / len(rates) if rates else 0.0,
        "wall_s": state.wall_s + time.perf_counter() - run.t0, "device": accelerator.device.type,
        "batches_done": state.batches_done, "last_save_s": run.save_s,  # where a mid-epoch stop saved, how fast
    }
    if accelerator.is_main_process:
        run.layout.write_summary(summary)
        if history:
            from toolkit.report import plot_curves

            plot_curves(history, run.layout.curves)
    return summary

