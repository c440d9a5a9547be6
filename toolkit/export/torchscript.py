"""TorchScript, the first export format: scripted (keeps control flow), traced when scripting fails.
serve/handler.py loads it with torch.jit.load (by the file's .pt suffix)."""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from toolkit.errors import ToolkitError

MODEL_FILE = "model.pt"


@contextmanager
def quiet_jit():
    """TorchScript works but warns that it is deprecated; the toolkit uses it knowingly."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        yield


def to_torchscript(model: nn.Module, example: torch.Tensor) -> tuple[torch.jit.ScriptModule, str]:
    """Script the model (keeps any control flow); trace it with `example` when scripting fails."""
    with quiet_jit():
        try:
            return torch.jit.script(model), "script"
        except Exception as script_error:  # torchvision models with Python-only code, custom layers
            try:
                with torch.no_grad():
                    return torch.jit.trace(model, example, check_trace=False), "trace"
            except Exception as trace_error:
                raise ToolkitError(f"cannot convert {type(model).__name__} to TorchScript: "
                                   f"script failed ({script_error}); trace failed ({trace_error})") from None


def save(model: nn.Module, example: torch.Tensor, path: Path) -> str:
    """Write `model` to `path`; returns how it was converted ("script" or "trace")."""
    scripted, method = to_torchscript(model, example)
    with quiet_jit():
        scripted.save(str(path))
    return method


def load_torchscript(path: Path) -> torch.jit.ScriptModule:
    with quiet_jit():
        return torch.jit.load(str(path), map_location="cpu").eval()
