"""Export of a run's best checkpoint to a serving format, checked against the eager model. RUN/export/
holds the format's model file, index_to_name.json and preprocess.json (all the TorchServe handler
reads) and parity.json. What every format shares (staging, the parity check, the handler's files) is
here; each format is one module (torchscript.py) and one line of FORMATS."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from toolkit.checkpoint import WEIGHTS, checkpoints_dir, load_best
from toolkit.config import RunConfig
from toolkit.errors import ToolkitError
from toolkit.export import torchscript
from toolkit.export.torchscript import load_torchscript
from toolkit.rundir import Meta, RunDir, load_run_config

INDEX_FILE = "index_to_name.json"
PREPROCESS_FILE = "preprocess.json"
PARITY_FILE = "parity.json"  # how the file was made and checked; not part of the archive
HANDLER_FILES = (INDEX_FILE, PREPROCESS_FILE)  # beside the model file in every archive
TOLERANCE = 1e-4
PARITY_BATCH = 4


@dataclass(frozen=True)
class Format:
    """A serving format: the file it writes, how to write it and how to load it back for the check."""
    model_file: str  # its suffix tells serve/handler.py how to load it
    save: Callable[[nn.Module, torch.Tensor, Path], str]  # (eager model, example, path) -> method
    load: Callable[[Path], Callable[[torch.Tensor], torch.Tensor]]


FORMATS: dict[str, Format] = {
    "torchscript": Format(torchscript.MODEL_FILE, torchscript.save, torchscript.load_torchscript),
}
DEFAULT_FORMAT = "torchscript"


def check_parity(eager: nn.Module, path: Path, example: torch.Tensor, load: Callable) -> float:
    """Reload the saved file and compare its logits with the eager model's; returns max |diff|."""
    exported = load(path)
    with torch.no_grad():
        expected = eager(example)
        got = exported(example)
    if got.shape != expected.shape:
        raise ToolkitError(f"{path}: exported model returns shape {tuple(got.shape)}, "
                           f"the checkpoint's model {tuple(expected.shape)}")
    diff = (got - expected).abs().max().item()
    if not diff <= TOLERANCE:  # also catches NaN
        raise ToolkitError(f"{path}: exported model differs from the checkpoint's model: max abs "
                           f"difference of the logits {diff:.3g} > {TOLERANCE:g} on a random batch "
                           f"of shape {tuple(example.shape)}")
    return diff


def preprocess_settings(meta: Meta, cfg: RunConfig, topk: int | None) -> dict:
    """What the handler needs to turn image bytes into the model's input, and how to answer."""
    if topk is not None and topk < 1:
        raise ToolkitError(f"topk: {topk} must be at least 1")
    topk = cfg.serve.topk if topk is None else topk
    return {**meta.preprocess,
            "topk": min(topk, meta.num_classes),  # serve.topk: "never more than the model has"
            "max_pixels": cfg.serve.max_pixels, "max_side": cfg.serve.max_side}


def export_model(run_dir: str | Path, topk: int | None = None, format: str = DEFAULT_FORMAT) -> Path:
    """Write RUN/export/ from checkpoints/best in `format`; returns the export directory.

    The files are written to a staging directory and swapped in only after the parity check,
    so RUN/export never holds a model that failed it.
    """
    run_dir = Path(run_dir)
    fmt = FORMATS[format]
    cfg = load_run_config(run_dir)
    model, meta = load_best(run_dir)  # a fresh model: contiguous, not compiled, eval mode
    model = model.float().eval()
    settings = preprocess_settings(meta, cfg, topk)
    # A fixed generator: the same check on every export, independent of the global seed.
    generator = torch.Generator().manual_seed(0)
    shape = (PARITY_BATCH, meta.channels, meta.image_size, meta.image_size)
    example = torch.randn(shape, generator=generator)

    export_dir, staging = RunDir(run_dir).export, RunDir(run_dir).export_staging
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        method = fmt.save(model, example, staging / fmt.model_file)
        diff = check_parity(model, staging / fmt.model_file, example, fmt.load)
        parity = {"method": method, "max_abs_diff": diff, "tolerance": TOLERANCE, "input_shape": list(shape),
                  "epoch": meta.epoch, "torch": torch.__version__}
        (staging / PARITY_FILE).write_text(json.dumps(parity, indent=2))
        (staging / INDEX_FILE).write_text(json.dumps({str(i): name for i, name in enumerate(meta.classes)}, indent=2))
        (staging / PREPROCESS_FILE).write_text(json.dumps(settings, indent=2))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(export_dir, ignore_errors=True)
    staging.rename(export_dir)
    return export_dir


def export_torchscript(run_dir: str | Path, topk: int | None = None) -> Path:
    return export_model(run_dir, topk, "torchscript")


def model_file(export_dir: Path) -> Path | None:
    """The model file an export directory holds, whichever format wrote it."""
    found = [export_dir / f.model_file for f in FORMATS.values() if (export_dir / f.model_file).is_file()]
    return found[0] if found else None


def export_is_current(run_dir: str | Path) -> bool:
    """True when RUN/export holds a complete export at least as new as checkpoints/best."""
    run_dir = Path(run_dir)
    export_dir = RunDir(run_dir).export
    model = model_file(export_dir)
    if model is None or not all((export_dir / name).is_file() for name in HANDLER_FILES):
        return False
    weights = checkpoints_dir(run_dir) / "best" / WEIGHTS
    return not weights.is_file() or weights.stat().st_mtime <= model.stat().st_mtime


__all__ = ["FORMATS", "Format", "export_model", "export_torchscript", "export_is_current", "load_torchscript",
           "model_file"]
