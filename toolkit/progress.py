"""What a run shows while it trains: a live rich bar on a terminal, plain lines every N steps in a
cluster log, and one summary line per epoch. Only the main process ever gets a live reporter."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Sequence

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

if TYPE_CHECKING:
    from toolkit.training import Training


def data_line(run: Training) -> str:
    """The start-up line of the data as resolved, the model and its trainable share, the batch and lr."""
    from toolkit.models import parameter_counts

    bundle, pre, cfg = run.bundle, run.bundle.preprocess, run.cfg
    return (f"{cfg.data.name}: {len(bundle.train)} train / {len(bundle.val)} val images, {len(bundle.classes)} classes, "
            f"{pre['channels']}x{pre['image_size']}x{pre['image_size']}, mean {_rounded(pre['mean'])} std "
            f"{_rounded(pre['std'])}, {bundle.pipeline} pipeline | {cfg.model.name}: {parameter_counts(run.net)} | "
            f"batch {run.batch_size} per process, "
            f"effective batch {run.effective_batch_size} | lr {run.lr:g}")


def upsampling_note(image_size: int, source_side: int | None) -> str | None:
    """A warning when the model sees images more than 2x larger per side than they are: slow, and no
    detail is gained (a folder of 32x32 images through imagefolder's default 224, say)."""
    if not source_side or image_size <= 2 * source_side:
        return None
    factor = image_size / source_side
    return (f"images of about {source_side} px a side are upsampled {factor:.1f}x per side to data.image_size "
            f"{image_size} ({factor * factor:.0f}x the pixels to compute); set data.image_size to their own "
            f"size unless the model needs {image_size} (ImageNet weights do)")


def _rounded(values: Sequence[float]) -> str:
    return "[" + ", ".join(f"{v:.4g}" for v in values) + "]"


def epoch_line(epoch: int, epochs: int, m: dict, best: bool) -> str:
    """The MNIST guide's line: `Epoch [ 3/15] Train Loss ... | LR 0.001000 *`."""
    width = len(str(epochs))
    return (f"Epoch [{epoch:>{width}}/{epochs}] Train Loss {m['train_loss']:.4f} | Train Acc {m['train_acc']:.2%} | "
            f"Val Loss {m['val_loss']:.4f} | Val Acc {m['val_acc']:.2%} | LR {m['lr']:.6f}"
            f" | {m['images_per_s']:,.0f} img/s"
            f"{' | skipped ' + format(m['skipped_samples'], ',') + ' bad samples' if m.get('skipped_samples') else ''}"
            f"{' *' if best else ''}")


class Reporter:
    """Step progress for one process. `enabled=False` (other processes) makes every call a no-op."""

    def __init__(self, console: Console, enabled: bool, log_every: int, log_every_s: float = 0):
        self.console, self.enabled, self.log_every, self.log_every_s = console, enabled, log_every, log_every_s
        self.live = enabled and console.is_terminal
        self._progress: Progress | None = None
        self._last_line = time.perf_counter()

    def print(self, *args, **kwargs) -> None:
        if self.enabled:
            self.console.print(*args, **kwargs)

    def start_epoch(self, epoch: int, epochs: int, steps: int) -> None:
        self.epoch, self.epochs, self.steps, self.t0 = epoch, epochs, steps, time.perf_counter()
        self._last_line = self.t0
        if self.live:
            self._progress = Progress(
                TextColumn(f"epoch {epoch}/{epochs}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[stats]}"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                console=self.console, transient=True)
            self._progress.start()
            self._task = self._progress.add_task("train", total=steps, stats="")

    def wants_stats(self, step: int) -> bool:
        """Whether step (1-based) shows numbers: pulling them off the device costs a sync."""
        if not self.enabled:
            return False
        every = min(self.log_every, 10) if self.live else self.log_every
        late = not self.live and self.log_every_s > 0 and time.perf_counter() - self._last_line >= self.log_every_s
        return late or step % every == 0 or step == self.steps

    def step(self, step: int, images_seen: int, loss: float | None = None, acc: float | None = None) -> None:
        if not self.enabled:
            return
        rate = images_seen / max(time.perf_counter() - self.t0, 1e-9)
        stats = "" if loss is None else f"loss {loss:.4f} acc {acc:.2%} {rate:,.0f} img/s"
        if self._progress is not None:
            self._progress.update(self._task, completed=step, **({"stats": stats} if stats else {}))
        elif stats:
            self.console.print(f"epoch {self.epoch}/{self.epochs} step {step}/{self.steps} {stats}", highlight=False)
            self._last_line = time.perf_counter()

    def end_epoch(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
