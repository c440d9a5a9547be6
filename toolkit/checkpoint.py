"""Checkpoints in a run directory, each written atomically so a kill at any moment leaves a
loadable one: `checkpoints/best` (weights + meta.json, enough to rebuild the model without the
YAML) and `checkpoints/last` (Accelerate's full resume state + trainer_state.json); `checkpoints/average`
(toolkit/average.py) is of best's kind, and checkpoints/top/ (toolkit/topk.py) holds several.

Each is a symlink to a complete directory named by kind, epoch and optimizer step
(`last-e0003-s000024`); a new one is written beside it, then the link is swapped with os.replace
(atomic on POSIX). The Keeper owns these links: a directory some link points at is never removed."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from torch import nn

from toolkit.rundir import META, Meta, RunDir, read_meta

WEIGHTS = "weights.pt"
TRAINER_STATE = "trainer_state.json"
# A checkpoint directory this module wrote: <kind>-e<epoch>-s<step>, or the epoch-only names of before.
WRITTEN = re.compile(r"^[a-z][a-z0-9_]*-e\d{4,}(-s\d+)?(-\d+)?$")


def checkpoints_dir(run_dir: Path) -> Path:
    return RunDir(run_dir).checkpoints


class Keeper:
    """The checkpoints of one run: which directories are live (the targets of the links `best`,
    `last`, and any other link a feature adds, such as top-k), staging and publishing new ones."""

    def __init__(self, run_dir: Path):
        self.dir = checkpoints_dir(run_dir)

    def links(self) -> dict[str, Path]:
        """Every published link -> the directory it points at."""
        if not self.dir.is_dir():
            return {}
        return {p.name: p.resolve() for p in self.dir.iterdir() if p.is_symlink() and not p.name.startswith(".")}

    def live(self) -> set[Path]:
        return set(self.links().values())

    def staging(self, kind: str, epoch: int, step: int) -> Path:
        """Where a new checkpoint of `kind` is written before it is published."""
        return self.dir / f".{kind}-e{epoch:04d}-s{step:07d}.tmp"

    def publish(self, kind: str, staged: Path) -> Path:
        """Rename the finished staging dir, then atomically point `checkpoints/<kind>` at it; the
        directory the link left is removed unless another link still points at it."""
        live = self.live()
        final = self._free_name(self.dir / staged.name.removeprefix(".").removesuffix(".tmp"), live)
        os.replace(staged, final)
        link, tmp_link = self.dir / kind, self.dir / f".{kind}.link.tmp"
        old = link.resolve() if link.is_symlink() else None
        if tmp_link.is_symlink() or tmp_link.exists():
            tmp_link.unlink()
        tmp_link.symlink_to(final.name)
        os.replace(tmp_link, link)
        if old is not None and old != final.resolve() and old.exists() and old not in self.live():
            shutil.rmtree(old, ignore_errors=True)
        return final

    @staticmethod
    def _free_name(final: Path, live: set[Path]) -> Path:
        """`final`, or `final-2`, `-3`... when a live checkpoint holds that name (the same step saved
        twice: a preemption save, then the epoch's own). A dead directory of that name is a leftover."""
        candidate, n = final, 1
        while candidate.exists() and candidate.resolve() in live:
            n += 1
            candidate = final.with_name(f"{final.name}-{n}")
        if candidate.exists():
            shutil.rmtree(candidate)
        return candidate

    def clean_stale(self) -> None:
        """Remove what a killed run left half-written (staging directories, temporary links) and
        checkpoint directories no link points at; never a live one, nor anything this module did not write."""
        if not self.dir.is_dir():
            return
        live = self.live()
        for entry in self.dir.iterdir():
            if entry.is_symlink():
                if entry.name.startswith("."):
                    entry.unlink()
            elif entry.name.startswith(".") and entry.name.endswith(".tmp"):
                shutil.rmtree(entry, ignore_errors=True)
            elif WRITTEN.match(entry.name) and entry.resolve() not in live:
                shutil.rmtree(entry, ignore_errors=True)

    def save_best(self, model: nn.Module, meta: Meta, step: int) -> None:
        """Weights of the unwrapped model (plain keys, loadable with weights_only=True) + meta.json."""
        self.save_weights("best", model.state_dict(), meta, step)

    def save_weights(self, kind: str, state: dict, meta: Meta, step: int) -> Path:
        """A checkpoint like checkpoints/best (weights + meta.json) published as checkpoints/<kind>."""
        staged = self.staging(kind, meta.epoch or 0, step)
        write_weights(staged, state, meta)
        return self.publish(kind, staged)

    def save_last(self, accelerator, trainer_state: dict, step: int) -> None:
        """Full resume state (Accelerate's save_state + trainer_state.json), staged then published
        atomically. Every process calls it: save_state is collective."""
        staged = self.staging("last", trainer_state["epoch"], step)
        if accelerator.is_main_process:
            shutil.rmtree(staged, ignore_errors=True)
            staged.mkdir(parents=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(staged))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            (staged / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=1))
            self.publish("last", staged)
        accelerator.wait_for_everyone()

    def read_trainer_state(self) -> dict | None:
        """trainer_state.json of checkpoints/last, or None when there is no complete resume state."""
        last = self.dir / "last"
        if not (last / TRAINER_STATE).is_file():
            return None
        return json.loads((last / TRAINER_STATE).read_text())


def write_weights(directory: Path, state: dict, meta: Meta) -> None:
    """weights.pt (plain keys, on the CPU, loadable with weights_only=True) + meta.json in a new `directory`."""
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    torch.save({k: v.detach().cpu().clone() for k, v in state.items()}, directory / WEIGHTS)
    meta.write(directory / META)


def save_best(run_dir: Path, model: nn.Module, meta: Meta, step: int = 0) -> None:
    Keeper(run_dir).save_best(model, meta, step)


def load_best(path: Path, device: str = "cpu") -> tuple[nn.Module, Meta]:
    """Rebuild the model from meta.json and load its weights; eval mode."""
    from toolkit.models import build_model

    ckpt, meta = read_meta(path)
    model = build_model(meta.model.name, meta.num_classes, meta.channels, meta.image_size, meta.model.args)
    state = torch.load(ckpt / WEIGHTS, map_location=device, weights_only=True)
    model.load_state_dict(state)
    return model.to(device).eval(), meta


def read_trainer_state(run_dir: Path) -> dict | None:
    return Keeper(run_dir).read_trainer_state()

