"""The layout of a run directory, owned here only: every path in it, and reading and writing its
config, metrics and summary; and `Meta`, the typed, versioned meta.json that travels with a checkpoint,
with the one reader that export, evaluate, predict and the archive use. Checkpoints (checkpoint.py),
exports (export/) and archives (archive.py) are written under the directories this module names."""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from toolkit.config import RunConfig
from toolkit.config_io import dump_yaml
from toolkit.errors import ToolkitError

CONFIG = "config.yaml"  # the resolved config the run was trained with
METRICS = "metrics.jsonl"  # one JSON object per finished epoch
METRICS_CSV = "metrics.csv"  # the same as a table (spreadsheets, pandas), rewritten with it
SUMMARY = "summary.json"  # written when a run stops, whatever the reason
RESUMES = "resumes.jsonl"  # one JSON object per resume that changed the config: what changed, when
CHECKPOINTS = "checkpoints"
PLOTS = "plots"
EXPORT = "export"
MODEL_STORE = "model-store"
EVAL = "eval"
TENSORBOARD = "tensorboard"
META = "meta.json"  # in each checkpoints/best-* directory, beside the weights
META_VERSION = 1


class RunDir:
    """One run directory: RUN/config.yaml, metrics.jsonl (and .csv), summary.json, checkpoints/, plots/,
    export/, model-store/, eval/, tensorboard/."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    config_file = property(lambda self: self.path / CONFIG)
    metrics_file = property(lambda self: self.path / METRICS)
    metrics_csv = property(lambda self: self.path / METRICS_CSV)
    summary_file = property(lambda self: self.path / SUMMARY)
    resumes_file = property(lambda self: self.path / RESUMES)
    checkpoints = property(lambda self: self.path / CHECKPOINTS)
    curves = property(lambda self: self.path / PLOTS / "curves.png")
    export = property(lambda self: self.path / EXPORT)
    export_staging = property(lambda self: self.path / f".{EXPORT}.tmp")  # swapped in after the parity check
    model_store = property(lambda self: self.path / MODEL_STORE)
    eval = property(lambda self: self.path / EVAL)
    tensorboard = property(lambda self: self.path / TENSORBOARD)

    def is_occupied(self) -> bool:
        """Holds something a user could lose: more than the config.yaml and empty checkpoints/ that a start
        writes before its data is read (a start that failed there, on a missing dataset say, leaves only those)."""
        if not self.path.is_dir():
            return False
        for entry in self.path.iterdir():
            if entry == self.config_file or (entry == self.checkpoints and entry.is_dir() and not any(entry.iterdir())):
                continue
            return True
        return False

    def is_finished(self) -> bool:
        """Ended by itself: summary.json is there, and not that of a stop to resume (preempted, Ctrl-C)."""
        if not self.summary_file.is_file():
            return False
        try:
            status = json.loads(self.summary_file.read_text()).get("status")
        except (json.JSONDecodeError, AttributeError):
            return True
        return status not in ("preempted", "interrupted", "requested", "aborted")

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
        """config.yaml: the config as the run uses it, null data values resolved (image size, channels, mean, std)."""
        self.config_file.write_text(dump_yaml(cfg.resolved()))

    def append_metrics(self, row: dict) -> None:
        with open(self.metrics_file, "a") as f:
            f.write(json.dumps(row) + "\n")
        self._write_csv()

    def rewrite_metrics(self, history: list[dict]) -> None:
        self.metrics_file.write_text("".join(json.dumps(m) + "\n" for m in history))
        self._write_csv()

    def _write_csv(self) -> None:
        """metrics.csv from metrics.jsonl, a column per key any epoch has (a few rows: rewritten whole)."""
        rows = [json.loads(line) for line in self.metrics_file.read_text().splitlines() if line.strip()]
        with open(self.metrics_csv, "w", newline="") as f:
            writer = csv.DictWriter(f, list(dict.fromkeys(key for row in rows for key in row)))
            writer.writeheader()
            writer.writerows(rows)

    def write_summary(self, summary: dict) -> None:
        """Written beside and swapped in: `toolkit sweep --status`, `compare` and a scheduler's poll read it
        while the run goes on, and must never see it half written (a test's poll once read it empty)."""
        staged = self.summary_file.with_name(f".{self.summary_file.name}.tmp")
        staged.write_text(json.dumps(summary, indent=2))
        os.replace(staged, self.summary_file)

    def read_summary(self) -> dict | None:
        try:
            return json.loads(self.summary_file.read_text())
        except (OSError, json.JSONDecodeError):
            return None

    def append_resume(self, record: dict) -> None:
        with open(self.resumes_file, "a") as f:
            f.write(json.dumps(record) + "\n")

    def forget_progress(self) -> None:
        """Remove metrics, summary and checkpoints (a run restarted from the beginning)."""
        for target in (self.metrics_file, self.metrics_csv, self.summary_file, self.resumes_file, self.checkpoints):
            shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)


def load_run_config(run_dir: str | Path) -> RunConfig:
    """RUN/config.yaml -> RunConfig."""
    return RunDir(run_dir).load_config()


class ModelSpec(BaseModel):
    name: str
    args: dict[str, Any] = {}


class Meta(BaseModel):
    """meta.json: what the weights are (model, classes) and how an image reaches them (preprocessing),
    enough to rebuild the model without the YAML; `epoch` and `val_acc` say which epoch it is."""
    model_config = ConfigDict(extra="allow")  # keys of a later minor addition survive a read
    format_version: int = META_VERSION
    model: ModelSpec
    num_classes: int
    classes: list[str]
    channels: Literal[1, 3]
    image_size: int
    resize: Literal["resize", "resize_center_crop"]
    mean: list[float]
    std: list[float]
    # toolkit/preprocess.py's arithmetic the model was trained with; absent = 1 (before version 2)
    preprocess_version: Literal[1, 2] = 1
    epoch: Optional[int] = None
    val_acc: Optional[float] = None

    @property
    def preprocess(self) -> dict:
        """The Preprocess dict of toolkit/preprocess.py."""
        return {"channels": self.channels, "image_size": self.image_size, "resize": self.resize,
                "mean": list(self.mean), "std": list(self.std), "preprocess_version": self.preprocess_version}

    def write(self, path: Path) -> None:
        Path(path).write_text(self.model_dump_json(indent=2))

    @classmethod
    def parse(cls, raw: dict, where: Path) -> "Meta":
        """A meta.json's content, of any format version this toolkit knows, as a Meta."""
        version = raw.get("format_version", 0)
        if not isinstance(version, int) or version > META_VERSION:
            raise ToolkitError(f"{where}: format_version {version!r} is newer than this toolkit reads "
                               f"({META_VERSION}); upgrade the toolkit")
        if version == 0:
            raw = _from_version_0(raw)
        try:
            meta = cls.model_validate(raw)
        except ValidationError as exc:
            raise ToolkitError(f"{where}: not a valid {META}: {exc}") from None
        if len(meta.classes) != meta.num_classes:
            raise ToolkitError(f"{where}: lists {len(meta.classes)} classes for num_classes={meta.num_classes}")
        return meta


def _from_version_0(raw: dict) -> dict:
    """meta.json as written before it had a format_version: the same keys, except that `classes` may be
    missing or empty (the classes are then "0".."N-1", as the exports of the time named them), and
    `resize` missing in checkpoints from before data.resize existed, when every image was squashed to
    image_size: "resize"."""
    upgraded = {**raw, "format_version": META_VERSION}
    if not upgraded.get("classes") and isinstance(raw.get("num_classes"), int):
        upgraded["classes"] = [str(i) for i in range(raw["num_classes"])]
    upgraded.setdefault("resize", "resize")
    return upgraded


def read_meta(path: str | Path) -> tuple[Path, Meta]:
    """A run directory or a checkpoint directory -> (checkpoint directory, its Meta)."""
    path = Path(path)
    ckpt = path if (path / META).is_file() else RunDir(path).checkpoints / "best"
    if not (ckpt / META).is_file():
        raise ToolkitError(f"{path}: no checkpoint found (expected {ckpt / META}); train a run first")
    try:
        raw = json.loads((ckpt / META).read_text())
    except json.JSONDecodeError as exc:
        raise ToolkitError(f"{ckpt / META}: not valid JSON: {exc}") from None
    return ckpt, Meta.parse(raw, ckpt / META)
