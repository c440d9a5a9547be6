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
