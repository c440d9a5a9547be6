"""Preemption and mid-epoch checkpoints, as hooks on the stop seam (hooks.Requests): a signal
(train.preempt_signals: Slurm's SIGUSR1 warning, SIGTERM at the time limit or on scancel) or Ctrl-C asks
every process to save checkpoints/last and stop at the next point they agree on; train.checkpoint_every
asks for a mid-epoch save every N optimizer steps or minutes. The run then exits with EXIT_RESUME.

Modelled on Lightning's signal_connector.py, but the handler only records the request: saving is
collective, so it happens in the loop, on every process at the same step, never inside a handler."""

from __future__ import annotations

import re
import signal
import threading
import time

from toolkit.errors import ToolkitError, report_stop
from toolkit.hooks import Hook

# "Saved, resume me": checkpoints/last holds the point the run stopped at; `--resume` continues there.
# 75 is EX_TEMPFAIL of sysexits.h: a temporary failure, the caller is invited to try again.
EXIT_RESUME = 75
RESUMABLE = ("preempted", "interrupted", "requested")  # summary.json statuses of a run stopped this way


class StopOnSignal(Hook):
    """Turn the configured signals (and SIGINT) into a stop request. A second Ctrl-C stops at once
    (KeyboardInterrupt, as Python's default), without saving. Handlers are given back in close()."""

    def __init__(self, signals: list[str]):
        self.signals = [getattr(signal, name) for name in signals]
        self.previous: dict = {}
        self.received: str = ""

    def on_start(self, run) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # Python runs signal handlers in the main thread only (an in-process launcher's thread)
        self.run = run
        for signum in (*self.signals, signal.SIGINT):
            self.previous[signum] = signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if signum == signal.SIGINT:
            if self.run.requests.stop == "interrupted":  # the second Ctrl-C
                signal.signal(signal.SIGINT, signal.default_int_handler)
                raise KeyboardInterrupt
            self.run.requests.ask_stop("interrupted")
            self.run.reporter.print("Ctrl-C: saving checkpoints/last at the next step all processes agree on, "
                                    "then stopping (Ctrl-C again to stop at once, unsaved)")
        else:
            self.run.requests.ask_stop("preempted")
        self.received = self.received or name

    def on_end(self, run, summary: dict) -> None:
        if summary["status"] in RESUMABLE and run.accelerator.is_main_process:
            report_stop(stop_line(summary, run.cfg.run_dir, self.received))

    def close(self, run) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous = {}


class CheckpointEvery(Hook):
    """train.checkpoint_every: `N steps` asks every process alike at each N-th optimizer step (save_now,
    the same step everywhere); `N min` asks on each process's own clock (save_soon), agreed at the next reduce."""

    def __init__(self, every: str):
        count, unit = re.fullmatch(r"(\d+) ?(steps|min)", every).groups()
        self.count, self.by_steps = int(count), unit == "steps"
        self.last = time.monotonic()

    def on_start(self, run) -> None:
        self.last = time.monotonic()

    def after_optimizer_step(self, run, global_step: int) -> None:
        if self.by_steps:
            run.requests.save_now = run.requests.save_now or global_step % self.count == 0
        elif time.monotonic() - self.last >= 60 * self.count:
            run.requests.save_soon, self.last = True, time.monotonic()


def preempt_hooks(cfg) -> list[Hook]:
    hooks: list[Hook] = [StopOnSignal(cfg.train.preempt_signals)]
    if cfg.train.checkpoint_every:
        hooks.append(CheckpointEvery(cfg.train.checkpoint_every))
    return hooks


def stop_line(summary: dict, run_dir, received: str = "") -> str:
    """What a stopped run says last: why, where checkpoints/last is, how long the save took, how to resume."""
    why = {"preempted": f"preempted{f' ({received})' if received else ''}", "interrupted": "interrupted (Ctrl-C)",
           "requested": "stopped on request"}[summary["status"]]
    where = (f"epoch {summary['epochs_completed'] + 1}, batch {summary['batches_done']}"
             if summary.get("batches_done") else f"the end of epoch {summary['epochs_completed']}")
    took = f" in {summary['last_save_s']:.2f} s" if summary.get("last_save_s") is not None else ""
    return (f"{why}: checkpoints/last of {run_dir} saved at {where}{took}; continue with --resume "
            f"(exit status {EXIT_RESUME})")


class PeerLost(ToolkitError):
    """Another process of the run died or stopped answering (a dead node): reported by every survivor,
    which exits at once, without the barrier a user error waits at."""


# what torch's process groups say when a peer is gone: its socket closed (a killed process), or a wait past
# train.collective_timeout_s (a hung or unreachable machine)
_LOST = ("Connection closed", "Connection reset", "Broken pipe", "Timed out", "timed out", "timeout",
         "Socket Timeout", "NCCL communicator was aborted", "failed to recv", "failed to send")


def peer_lost(cfg, exc: BaseException) -> PeerLost | None:
    """The error a lost peer caused in a collective, as one line saying what happened and how to resume."""
    import torch.distributed as dist

    text = str(exc)
    if not (isinstance(exc, getattr(dist, "DistError", ())) or any(marker in text for marker in _LOST)):
        return None
    from toolkit.checkpoint import read_trainer_state

    state = read_trainer_state(cfg.run_dir)
    held = ("no checkpoint yet: --resume starts over" if state is None else
            f"checkpoints/last holds epoch {state['epoch']}" +
            (f" and batch {state['batches_done']} of epoch {state['epoch'] + 1}" if state.get("batches_done") else ""))
    first = next((line.strip() for line in text.splitlines() if line.strip()), type(exc).__name__)
    return PeerLost(f"lost contact with another process of the run (a node died, or did not answer within "
                    f"train.collective_timeout_s = {cfg.train.collective_timeout_s:g} s): {first[:200]}. {held}; "
                    f"start the run again with --resume")
