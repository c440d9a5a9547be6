"""Errors a user can fix. The CLI turns them into a message and exit status 2, no traceback."""

from __future__ import annotations

import difflib


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
