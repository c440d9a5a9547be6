"""Optional features of the epoch loop, as objects with small hooks (timm's `model_ema=None`,
`mixup_fn=None`, made into one protocol): the loop calls each hook at fixed points and reads no
feature's flags itself. `Tracker` (Accelerate's experiment trackers) is the first; EMA (toolkit/ema.py),
mixup/cutmix (toolkit/mix.py), top-k checkpoints (toolkit/topk.py) and preemption (toolkit/preempt.py)
plug in the same way. The seams a hook steers through: `transform_batch` (the training batch and its
targets), `validated` and `serves` (which modules are validated, which one checkpoints/best holds),
`on_setup` (state registered with Accelerate's resume state) and `Requests` (save checkpoints/last now,
or save and stop, at a point every process agrees on)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import torch

    from toolkit.rundir import Meta
    from toolkit.training import Training


# Why a run stopped before its last epoch, as summary.json's status says it; the order is the precedence
# when processes were asked different things (an interrupt outranks a preemption).
STOPS = ("", "requested", "preempted", "interrupted")
Stop = Literal["", "requested", "preempted", "interrupted"]


@dataclass
class Requests:
    """The stop seam: what hooks ask of the loop (`run.requests`). `save_now` must be set alike on every
    process at the same step (a step count decides it); `save_soon` and `stop` may come from one process
    alone (a clock, a signal) and take effect on every process at the next agreed point: the loop's next
    reduce (at most 10 steps on), or the end of the epoch. A stop saves checkpoints/last first."""
    save_now: bool = False
    save_soon: bool = False
    stop: Stop = ""

    def ask_stop(self, why: Stop = "requested") -> None:
        if STOPS.index(why) > STOPS.index(self.stop):
            self.stop = why


class Hook:
    """Every method does nothing; a feature overrides the points it needs. Each is called on every
    process, in the order the hooks were given."""

    def on_setup(self, run: Training) -> None:
        """Set-up is built, the resume state not yet loaded: make the objects whose state must survive a
        resume and `run.accelerator.register_for_checkpointing` them (same order on every process)."""

    def on_start(self, run: Training) -> None:
        """Set-up is complete (and resumed): before the first epoch of this invocation."""

    def transform_batch(self, run: Training, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each training batch, augmented and normalised on the device: return it or a replacement, with
        targets as class indices (N,) or class probabilities (N x classes), which `run.criterion` takes
        alike (soft-target cross-entropy, label smoothing included). Training accuracy counts each image
        against its dominant target. No device value may be read here."""
        return images, targets

    def after_optimizer_step(self, run: Training, global_step: int) -> None:
        """After each optimizer step (not each micro-batch), e.g. to update an EMA of the weights.
        Nothing here may read a value off the device: that is a sync per step."""

    def at_reduce(self, run: Training, global_step: int, loss: float, lr: float) -> None:
        """Every few steps, when the loop has just summed its on-device totals over all processes:
        `loss` is the mean training loss (all processes) of the steps since the previous reduce,
        `lr` the rate the last step used. The only place per-step values reach the host."""

    def validated(self, run: Training) -> dict[str, torch.nn.Module]:
        """Modules validated after each epoch besides the trained one, by name: the metrics line gains
        `val_loss_<name>` and `val_acc_<name>` (an EMA of the weights: `ema`)."""
        return {}

    def serves(self, run: Training) -> str | None:
        """The name (from `validated`) of the module checkpoints/best holds, ranked by its val accuracy,
        hence what export, evaluate and serving use; None leaves it to the trained one."""
        return None

    def on_validated(self, run: Training, metrics: dict, module: torch.nn.Module, meta: Meta, step: int) -> None:
        """The epoch is validated and checkpoints/best updated; checkpoints/last not yet written, so a kill
        now redoes this epoch on resume (where a save that must match the resume state belongs). `module`
        is what checkpoints/best holds, `meta` its meta.json for this epoch."""

    def after_epoch(self, run: Training, metrics: dict) -> None:
        """The epoch is validated, recorded and checkpointed; `metrics` is its metrics.jsonl line."""

    def on_end(self, run: Training, summary: dict) -> None:
        """The invocation stops normally or on a stop request (not on an error); summary.json is written."""

    def close(self, run: Training) -> None:
        """The loop is left, however (an error too): give back what on_start took (signal handlers)."""


class Tracker(Hook):
    """train.log_with: scalars to Accelerate's trackers, only at the reduce cadence (never a device
    sync per step): `Loss/train` and `lr` every reduce, `epoch/*` every epoch, the config as hparams."""

    def on_start(self, run: Training) -> None:
        from toolkit.trackers import init_kwargs, project_name

        run.accelerator.init_trackers(project_name(run.cfg), config=flat_hparams(run.cfg.resolved()), init_kwargs=init_kwargs(run.cfg))

    def at_reduce(self, run: Training, global_step: int, loss: float, lr: float) -> None:
        run.accelerator.log({"Loss/train": loss, "lr": lr}, step=global_step)

    def after_epoch(self, run: Training, metrics: dict) -> None:
        run.accelerator.log({f"epoch/{k}": v for k, v in metrics.items() if k != "epoch" and not isinstance(v, str)},
                            step=metrics["epoch"] * run.steps_per_epoch)


def default_hooks(cfg) -> list[Hook]:
    """The hooks the config asks for."""
    return [Tracker()] if cfg.train.log_with else []


def flat_hparams(cfg) -> dict:
    """TensorBoard's hparams take scalars only."""
    flat = {}
    for section, values in cfg.to_dict().items():
        for key, value in values.items():
            flat[f"{section}.{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat
