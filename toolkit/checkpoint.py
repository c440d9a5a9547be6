"""Checkpoints in a run directory, each written atomically so a kill at any moment leaves a
loadable one: `checkpoints/best` (weights + meta.json, enough to rebuild the model without the
YAML) and `checkpoints/last` (Accelerate's full resume state + trainer_state.json).

Each is a symlink to a complete directory; a new one is written beside it, then the link is
swapped with os.replace (atomic on POSIX)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from toolkit.errors import ToolkitError
from toolkit.rundir import RunDir

WEIGHTS = "weights.pt"
META = "meta.json"
TRAINER_STATE = "trainer_state.json"


def checkpoints_dir(run_dir: Path) -> Path:
    return RunDir(run_dir).checkpoints


def staging_dir(run_dir: Path, kind: str, epoch: int) -> Path:
    """Where a new checkpoint of `kind` is written before it is published."""
    return checkpoints_dir(run_dir) / f".{kind}-e{epoch:04d}.tmp"


def publish(run_dir: Path, kind: str, staged: Path) -> Path:
    """Rename the finished staging dir, then atomically point `checkpoints/<kind>` at it."""
    ckpt = checkpoints_dir(run_dir)
    final = ckpt / staged.name.removeprefix(".").removesuffix(".tmp")
    if final.exists():
        shutil.rmtree(final)
    os.replace(staged, final)
    link, tmp_link = ckpt / kind, ckpt / f".{kind}.link.tmp"
    old = link.resolve() if link.is_symlink() else None
    if tmp_link.is_symlink() or tmp_link.exists():
        tmp_link.unlink()
    tmp_link.symlink_to(final.name)
    os.replace(tmp_link, link)
    if old is not None and old != final.resolve() and old.exists():
        shutil.rmtree(old, ignore_errors=True)
    return final


def clean_stale(run_dir: Path) -> None:
    """Remove what a killed run left half-written, and complete directories no link points at."""
    ckpt = checkpoints_dir(run_dir)
    if not ckpt.is_dir():
        return
    live = {(ckpt / k).resolve() for k in ("best", "last") if (ckpt / k).is_symlink()}
    for entry in ckpt.iterdir():
        if entry.is_symlink():
            if entry.name.startswith("."):
                entry.unlink()
            continue
        if entry.resolve() not in live:
            shutil.rmtree(entry, ignore_errors=True)


def save_best(run_dir: Path, model: nn.Module, meta: dict, epoch: int) -> None:
    """Weights of the unwrapped model (plain keys, loadable with weights_only=True) + meta.json."""
    staged = staging_dir(run_dir, "best", epoch)
    shutil.rmtree(staged, ignore_errors=True)
    staged.mkdir(parents=True)
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    torch.save(state, staged / WEIGHTS)
    (staged / META).write_text(json.dumps(meta, indent=2))
    publish(run_dir, "best", staged)


def save_last(run_dir: Path, accelerator, trainer_state: dict) -> None:
    """Full resume state (Accelerate's save_state + trainer_state.json), staged then published
    atomically. Every process calls it: save_state is collective."""
    staged = staging_dir(run_dir, "last", trainer_state["epoch"])
    if accelerator.is_main_process:
        shutil.rmtree(staged, ignore_errors=True)
        staged.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(staged))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (staged / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=1))
        publish(run_dir, "last", staged)
    accelerator.wait_for_everyone()


def read_meta(path: Path) -> tuple[Path, dict]:
    """A run dir or a checkpoint dir -> (checkpoint dir, meta dict)."""
    path = Path(path)
    ckpt = path if (path / META).is_file() else checkpoints_dir(path) / "best"
    if not (ckpt / META).is_file():
        raise ToolkitError(f"{path}: no checkpoint found (expected {ckpt / META}); train a run first")
    return ckpt, json.loads((ckpt / META).read_text())


def load_best(path: Path, device: str = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild the model from meta.json and load its weights; eval mode."""
    from toolkit.models import build_model

    ckpt, meta = read_meta(path)
    spec = meta["model"]
    model = build_model(spec["name"], meta["num_classes"], meta["channels"], meta["image_size"], spec.get("args"))
    state = torch.load(ckpt / WEIGHTS, map_location=device, weights_only=True)
    model.load_state_dict(state)
    return model.to(device).eval(), meta


def read_trainer_state(run_dir: Path) -> dict | None:
    """trainer_state.json of checkpoints/last, or None when there is no complete resume state."""
    last = checkpoints_dir(run_dir) / "last"
    if not (last / TRAINER_STATE).is_file():
        return None
    return json.loads((last / TRAINER_STATE).read_text())
