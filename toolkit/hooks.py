"""Optional features of the epoch loop, as objects with small hooks (timm's `model_ema=None`,
`mixup_fn=None`, made into one protocol): the loop calls each hook at fixed points and reads no
feature's flags itself. `Tracker` (Accelerate's experiment trackers) is the first; EMA, top-k
checkpoints and preemption (toolkit/preempt.py) plug in the same way. `Requests` is how a hook steers:
it asks the loop to save checkpoints/last now, or to save and stop, at a point every process agrees on."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
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

    def on_start(self, run: Training) -> None:
        """Set-up is complete (and resumed): before the first epoch of this invocation."""

    def after_optimizer_step(self, run: Training, global_step: int) -> None:
        """After each optimizer step (not each micro-batch), e.g. to update an EMA of the weights.
        Nothing here may read a value off the device: that is a sync per step."""

    def at_reduce(self, run: Training, global_step: int, loss: float, lr: float) -> None:
        """Every few steps, when the loop has just summed its on-device totals over all processes:
        `loss` is the mean training loss (all processes) of the steps since the previous reduce,
        `lr` the rate the last step used. The only place per-step values reach the host."""

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
