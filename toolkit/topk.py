"""train.save_top_k: the k best epochs by val accuracy (of the module checkpoints/best holds) under
checkpoints/top/, one directory each (`e0005-s0000040`: weights.pt + meta.json, loadable like
checkpoints/best). Written beside as `.NAME.tmp`, then renamed (atomic); removed by renaming away first, so a
kill at any moment leaves only complete entries. Saved before checkpoints/last: an epoch a kill loses is
dropped on resume and saved again when it is trained again."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from torch import nn

from toolkit.checkpoint import write_weights
from toolkit.hooks import Hook
from toolkit.rundir import META, Meta, RunDir, read_meta

TOP = "top"
ENTRY = re.compile(r"^e(\d{4,})-s(\d+)$")


def rank(meta: Meta) -> tuple:
    """Sort key, best first: the higher val accuracy, then the earlier epoch (as checkpoints/best keeps it)."""
    return -(meta.val_acc or 0.0), meta.epoch or 0


class TopDir:
    """checkpoints/top/ of one run."""

    def __init__(self, run_dir: str | Path):
        self.dir = RunDir(run_dir).checkpoints / TOP

    def entries(self) -> list[tuple[Path, Meta]]:
        """Complete entries, best first (higher val accuracy, then the earlier epoch)."""
        if not self.dir.is_dir():
            return []
        found = [read_meta(p) for p in self.dir.iterdir() if ENTRY.match(p.name) and (p / META).is_file()]
        return sorted(found, key=lambda entry: rank(entry[1]))

    def save(self, module: nn.Module, meta: Meta, step: int, k: int) -> Path | None:
        """Keep `module` if it ranks among the k best (written only then); returns its directory."""
        entries = [e for e in self.entries() if e[1].epoch != meta.epoch]  # an epoch trained again replaces itself
        if len(entries) >= k and rank(meta) >= rank(entries[k - 1][1]):
            return None
        name = f"e{meta.epoch or 0:04d}-s{step:07d}"
        staged, final = self.dir / f".{name}.tmp", self.dir / name
        write_weights(staged, module.state_dict(), meta)
        for path, old in self.entries():
            if old.epoch == meta.epoch:
                self._remove(path)
        os.replace(staged, final)
        for path, _ in self.entries()[k:]:
            self._remove(path)
        return final

    def clean(self, after_epoch: int) -> None:
        """Drop what a kill left half-written and the entries of epochs after `after_epoch` (the resume state)."""
        if not self.dir.is_dir():
            return
        for path in self.dir.iterdir():
            if path.name.startswith(".") and path.name.endswith(".tmp"):
                shutil.rmtree(path, ignore_errors=True)
        for path, meta in self.entries():
            if (meta.epoch or 0) > after_epoch:
                self._remove(path)

    def _remove(self, path: Path) -> None:
        doomed = path.with_name(f".{path.name}.gone.tmp")
        os.replace(path, doomed)
        shutil.rmtree(doomed)


class TopK(Hook):
    """The hook: after each validation, on the main process, before checkpoints/last is written."""

    def __init__(self, k: int):
        self.k = k

    def on_start(self, run) -> None:
        if run.accelerator.is_main_process:
            TopDir(run.cfg.run_dir).clean(after_epoch=run.state.epoch)

    def on_validated(self, run, metrics: dict, module: nn.Module, meta: Meta, step: int) -> None:
        if run.accelerator.is_main_process:
            TopDir(run.cfg.run_dir).save(module, meta, step, self.k)
