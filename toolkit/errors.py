"""Errors a user can fix. The CLI turns them into a message and exit status 2, no traceback; report()
says the message once, where the launcher around the process lets a user see it last."""

from __future__ import annotations

import difflib
import json
import os
import sys
import time


class ToolkitError(Exception):
    """A problem with the user's input (config, data, files): the message says what and where."""


class ConfigError(ToolkitError):
    """One or more problems in a config; each line names the file, the dotted key and what is allowed."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


def did_you_mean(word: object, choices: list[str]) -> str:
    """' (did you mean 'adam'?)' when a close choice exists, else ''."""
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


class ImageFileError(ToolkitError):
    """An image file that training cannot use, named by its path.

    Raised inside DataLoader workers, where torch re-raises it in the main process as
    ImageFileError("Caught ImageFileError in DataLoader worker process 0.\\nOriginal Traceback ...");
    the original one-line message is taken back from that text, so the user reads the file and the
    problem rather than a worker's traceback."""

    def __init__(self, message: str):
        if message.startswith(f"Caught {type(self).__name__}") and "Original Traceback" in message:
            message = message.rstrip().splitlines()[-1].split(f"{type(self).__name__}: ", 1)[-1]
        super().__init__(message)


ERROR_FILE_VAR = "TOOLKIT_ERROR_FILE"
WORLD_SIZE_VARS = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")  # torchrun, MPI


def launched_world_size() -> int | None:
    """The process count a launcher announced (torchrun, MPI), or None: read before Accelerate exists."""
    return next((int(os.environ[k]) for k in WORLD_SIZE_VARS if os.environ.get(k, "").isdigit()), None)


def report(exc: ToolkitError) -> None:
    """Say a user error once, as `error: ...`: on stderr, or appended to the file named by
    TOOLKIT_ERROR_FILE, which launch/cpu.sh and launch/slurm.sbatch set so that they can print it after
    the launcher's own failure report (the last line a user sees names the problem). Printed under
    torchrun, it also goes to the worker's error file, so the launcher's report that follows names it as
    the root cause instead of pointing at its documentation."""
    message = f"error: {exc}"
    path = os.environ.get(ERROR_FILE_VAR)
    if path and _write(path, message + "\n", "a"):
        return  # the script that set it prints it last (an unwritable file must not hide the message)
    sys.stderr.write(message + "\n")
    sys.stderr.flush()
    elastic = os.environ.get("TORCHELASTIC_ERROR_FILE")  # torchrun's per-worker file (torch.distributed.elastic)
    if elastic:
        _write(elastic, json.dumps({"message": message, "timestamp": int(time.time())}), "w")


def report_stop(line: str) -> None:
    """Say why a run stopped early but resumable (preempt.py), as `stopped: ...`: like report(), to the
    file the launch scripts read (whose first word tells them the exit status), or to stderr."""
    path = os.environ.get(ERROR_FILE_VAR)
    if not (path and _write(path, f"stopped: {line}\n", "a")):
        sys.stderr.write(f"stopped: {line}\n")
        sys.stderr.flush()


def _write(path: str, text: str, mode: str) -> bool:
    try:
        with open(path, mode) as f:
            f.write(text)
        return True
    except OSError:
        return False
