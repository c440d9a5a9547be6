"""The layout of a run directory, owned here only: every path in it, and reading and writing its
config, metrics and summary. Checkpoints (checkpoint.py), exports (export/) and archives (archive.py)
are written under the directories this module names."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml

from toolkit.config import RunConfig
from toolkit.config_io import dump_yaml
from toolkit.errors import ToolkitError

CONFIG = "config.yaml"  # the resolved config the run was trained with
METRICS = "metrics.jsonl"  # one JSON object per finished epoch
SUMMARY = "summary.json"  # written when a run stops, whatever the reason
CHECKPOINTS = "checkpoints"
PLOTS = "plots"
EXPORT = "export"
MODEL_STORE = "model-store"
EVAL = "eval"
TENSORBOARD = "tensorboard"


class RunDir:
    """One run directory: RUN/config.yaml, metrics.jsonl, summary.json, checkpoints/, plots/,
    export/, model-store/, eval/, tensorboard/."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    config_file = property(lambda self: self.path / CONFIG)
    metrics_file = property(lambda self: self.path / METRICS)
    summary_file = property(lambda self: self.path / SUMMARY)
    checkpoints = property(lambda self: self.path / CHECKPOINTS)
    curves = property(lambda self: self.path / PLOTS / "curves.png")
    export = property(lambda self: self.path / EXPORT)
    export_staging = property(lambda self: self.path / f".{EXPORT}.tmp")  # swapped in after the parity check
    model_store = property(lambda self: self.path / MODEL_STORE)
    eval = property(lambda self: self.path / EVAL)
    tensorboard = property(lambda self: self.path / TENSORBOARD)

    def is_occupied(self) -> bool:
        return self.path.is_dir() and any(self.path.iterdir())

    def is_finished(self) -> bool:
        return self.summary_file.is_file()

    def load_config(self) -> RunConfig:
        """RUN/config.yaml (the resolved config the run was trained with) -> RunConfig."""
        path = self.config_file
        if not path.is_file():
            raise ToolkitError(f"{self.path}: no {CONFIG} (expected {path}); is this a run directory?")
        try:
            return RunConfig.model_validate(yaml.safe_load(path.read_text()) or {})
        except Exception as exc:  # yaml or pydantic: either way the file is not one we wrote
            raise ToolkitError(f"{path}: not a valid run config: {exc}") from None

    def write_config(self, cfg: RunConfig) -> None:
        self.config_file.write_text(dump_yaml(cfg))

    def append_metrics(self, row: dict) -> None:
        with open(self.metrics_file, "a") as f:
            f.write(json.dumps(row) + "\n")

    def rewrite_metrics(self, history: list[dict]) -> None:
        self.metrics_file.write_text("".join(json.dumps(m) + "\n" for m in history))

    def write_summary(self, summary: dict) -> None:
        self.summary_file.write_text(json.dumps(summary, indent=2))

    def forget_progress(self) -> None:
        """Remove metrics, summary and checkpoints (a run restarted from the beginning)."""
        for target in (self.metrics_file, self.summary_file, self.checkpoints):
            shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)


def load_run_config(run_dir: str | Path) -> RunConfig:
    """RUN/config.yaml -> RunConfig."""
    return RunDir(run_dir).load_config()
