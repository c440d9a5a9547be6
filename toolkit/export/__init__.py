"""Export of a run's best checkpoint, checked against the eager model: RUN/export/ holds model.pt,
index_to_name.json and preprocess.json (all the TorchServe handler reads) and parity.json. The
TorchScript conversion itself is in torchscript.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from torch import nn

from toolkit.checkpoint import WEIGHTS, checkpoints_dir, load_best
from toolkit.config import RunConfig
from toolkit.errors import ToolkitError
from toolkit.export.torchscript import MODEL_FILE, load_torchscript, quiet_jit, to_torchscript
from toolkit.rundir import Meta, RunDir, load_run_config

INDEX_FILE = "index_to_name.json"
PREPROCESS_FILE = "preprocess.json"
PARITY_FILE = "parity.json"  # how the file was made and checked; not part of the archive
TOLERANCE = 1e-4
PARITY_BATCH = 4


def check_parity(eager: nn.Module, path: Path, example: torch.Tensor) -> float:
    """Reload the saved file and compare its logits with the eager model's; returns max |diff|."""
    scripted = load_torchscript(path)
    with torch.no_grad():
        expected = eager(example)
        got = scripted(example)
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
            "max_pixels": cfg.serve.max_pixels}


def export_torchscript(run_dir: str | Path, topk: int | None = None) -> Path:
    """Write RUN/export/ from checkpoints/best; returns the export directory.

    The files are written to a staging directory and swapped in only after the parity check,
    so RUN/export never holds a model that failed it.
    """
    run_dir = Path(run_dir)
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
        scripted, method = to_torchscript(model, example)
        with quiet_jit():
            scripted.save(str(staging / MODEL_FILE))
        diff = check_parity(model, staging / MODEL_FILE, example)
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


def export_is_current(run_dir: str | Path) -> bool:
    """True when RUN/export holds a complete export at least as new as checkpoints/best."""
    run_dir = Path(run_dir)
    export_dir = RunDir(run_dir).export
    files = [export_dir / name for name in (MODEL_FILE, INDEX_FILE, PREPROCESS_FILE)]
    if not all(f.is_file() for f in files):
        return False
    weights = checkpoints_dir(run_dir) / "best" / WEIGHTS
    return not weights.is_file() or weights.stat().st_mtime <= (export_dir / MODEL_FILE).stat().st_mtime
