"""Export of a run's best checkpoint to a serving format, checked against the eager model. RUN/export/
holds the format's model file, index_to_name.json, preprocess.json and preprocess.py (a copy of
toolkit/preprocess.py, which the handler imports: all the TorchServe handler reads) and parity.json. What every format shares (staging, the parity check, the handler's files) is
here; each format is one module (torchscript.py, onnx.py, aoti.py) and one line of FORMATS."""

from __future__ import annotations

import copy
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from toolkit import preprocess
from toolkit.checkpoint import WEIGHTS, checkpoints_dir, load_best
from toolkit.config import RunConfig
from toolkit.errors import ToolkitError
from toolkit.export import aoti, onnx, precision as reduced, torchscript
from toolkit.export.torchscript import load_torchscript
from toolkit.rundir import Meta, RunDir, load_run_config

INDEX_FILE = "index_to_name.json"
PREPROCESS_FILE = "preprocess.json"
PARITY_FILE = "parity.json"  # how the file was made and checked; not part of the archive
PREPROCESS_MODULE = "preprocess.py"  # toolkit/preprocess.py: imports only numpy, torch, PIL and torchvision
HANDLER_FILES = (INDEX_FILE, PREPROCESS_FILE, PREPROCESS_MODULE)  # beside the model file in every archive
PARITY_BATCH = 4  # the example the file is made from; the check also runs one image
PARITY_BATCHES = (1, PARITY_BATCH)


@dataclass(frozen=True)
class Format:
    """A serving format: the file it writes, how to write it and how to load it back for the check."""
    model_file: str  # its suffix tells serve/handler.py how to load it
    save: Callable[[nn.Module, torch.Tensor, Path], "str | dict"]  # (eager model, example, path) -> method or facts
    load: Callable[[Path], Callable[[torch.Tensor], torch.Tensor]]
    tolerance: float = 1e-4  # largest max |logit difference| to the eager model accepted (README: per format)
    require: Callable[[], None] | None = None  # raises ToolkitError naming what is missing, before any work


FORMATS: dict[str, Format] = {
    "torchscript": Format(torchscript.MODEL_FILE, torchscript.save, torchscript.load_torchscript, 1e-4),
    "onnx": Format(onnx.MODEL_FILE, onnx.save, onnx.load_onnx, 1e-4, onnx.require),
    "aoti": Format(aoti.MODEL_FILE, aoti.save, aoti.load_aoti, 1e-4, aoti.require),
}
DEFAULT_FORMAT = "torchscript"
TOLERANCE = FORMATS[DEFAULT_FORMAT].tolerance  # kept for callers of the single global of before


def parity_inputs(channels: int, image_size: int) -> dict[int, torch.Tensor]:
    """{batch size: random images}: a fixed generator, the same check on every export."""
    generator = torch.Generator().manual_seed(0)
    return {n: torch.randn((n, channels, image_size, image_size), generator=generator) for n in PARITY_BATCHES}


def check_parity(eager: nn.Module, path: Path, inputs: dict[int, torch.Tensor], fmt: Format,
                 tolerance: float | None = None) -> dict[str, float]:
    """Reload the saved file and compare its logits with the eager model's on each batch;
    returns {batch size: max |diff|}, refusing a wrong shape or a difference above the tolerance."""
    exported = fmt.load(path)
    tolerance = fmt.tolerance if tolerance is None else tolerance
    diffs = {}
    for n, images in inputs.items():
        with torch.no_grad():
            expected = eager(images)
            got = exported(images)
        if got.shape != expected.shape:
            raise ToolkitError(f"{path}: exported model returns shape {tuple(got.shape)}, "
                               f"the checkpoint's model {tuple(expected.shape)}")
        diff = (got.float() - expected).abs().max().item()
        if not diff <= tolerance:  # also catches NaN
            raise ToolkitError(f"{path}: exported model differs from the checkpoint's model: max abs "
                               f"difference of the logits {diff:.3g} > {tolerance:g} on a random batch "
                               f"of shape {tuple(images.shape)}")
        diffs[str(n)] = diff
    return diffs


def preprocess_settings(meta: Meta, cfg: RunConfig, topk: int | None) -> dict:
    """What the handler needs to turn image bytes into the model's input, and how to answer."""
    if topk is not None and topk < 1:
        raise ToolkitError(f"topk: {topk} must be at least 1")
    topk = cfg.serve.topk if topk is None else topk
    return {**meta.preprocess,
            "topk": min(topk, meta.num_classes),  # serve.topk: "never more than the model has"
            "max_pixels": cfg.serve.max_pixels, "max_side": cfg.serve.max_side}


# export.format auto: a model's format where another one served it faster than TorchScript in two runs of
# bench/serve_load.py (docs/benchmarks.md, "Serving per format"); TorchScript for every other model
FASTEST = {"efficientnet_b0": "onnx"}


def auto_format(model_name: str) -> tuple[str, str]:
    """(the format export.format auto means for this model, why, in words)."""
    fastest = FASTEST.get(model_name)
    if fastest is None:
        return "torchscript", "export.format auto: torchscript"
    if FORMATS[fastest].require is not None:
        try:
            FORMATS[fastest].require()
        except ToolkitError as e:
            return "torchscript", (f"export.format auto: torchscript ({fastest} serves {model_name} faster, "
                                   f"but {e})")
    return fastest, f"export.format auto: {fastest}, measured the fastest for {model_name} (docs/benchmarks.md)"


def format_of(name: str) -> Format:
    if name not in FORMATS:
        raise ToolkitError(f"export format {name!r}: use one of {', '.join(FORMATS)}")
    return FORMATS[name]


def root_cause(exc: BaseException) -> str:
    """The innermost exception of a chain, as one line: type and first line of its message, no colours."""
    while exc.__cause__ is not None or (exc.__context__ is not None and not exc.__suppress_context__):
        exc = exc.__cause__ or exc.__context__
    lines = [line.strip() for line in re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0][:300] if lines else ''}"


def save_checked(model: nn.Module, meta: Meta, fmt_name: str, path: Path, tolerance: float | None = None) -> dict:
    """Write the model file and check it; returns parity.json's content. A model the format cannot
    take is refused with its name, the format and the cause."""
    fmt = format_of(fmt_name)
    tolerance = fmt.tolerance if tolerance is None else tolerance
    inputs = parity_inputs(meta.channels, meta.image_size)
    try:
        made = fmt.save(model, inputs[PARITY_BATCH], path)
    except ToolkitError as exc:
        raise ToolkitError(f"model {meta.model.name!r} cannot be exported to {fmt_name}: {exc}") from None
    except Exception as exc:  # the exporters raise many kinds, often wrapping the cause
        raise ToolkitError(f"model {meta.model.name!r} cannot be exported to {fmt_name}: {root_cause(exc)}") from None
    made = {"method": made} if isinstance(made, str) else dict(made)
    diffs = check_parity(model, path, inputs, fmt, tolerance)
    return {"format": fmt_name, "model_file": fmt.model_file, **made, "max_abs_diff": max(diffs.values()),
            "max_abs_diff_by_batch": diffs, "tolerance": tolerance,
            "input_shape": list(inputs[PARITY_BATCH].shape), "epoch": meta.epoch, "torch": torch.__version__}


def save_at_precision(model: nn.Module, meta: Meta, fmt_name: str, path: Path, precision: str, run_dir: Path,
                      settings: dict) -> dict:
    """save_checked at fp32; at bf16 or int8 the reduced file is also measured against the fp32 model on
    the run's validation set (precision.py), and refused under its threshold."""
    if precision == "fp32":
        return save_checked(model, meta, fmt_name, path)
    if precision == "bf16":  # the file is the bf16 model, checked against the same model run eagerly
        parity = save_checked(reduced.BF16(copy.deepcopy(model)), meta, fmt_name, path, reduced.BF16_TOLERANCE)
        warning = reduced.bf16_warning()
    else:  # int8: the fp32 file, parity-checked as always, then quantized
        fp32_path = path.with_name(f"fp32-{path.name}")
        parity = save_checked(model, meta, fmt_name, fp32_path)
        parity["int8"] = reduced.quantize_int8(fp32_path, path, reduced.calibration_batches(run_dir, settings))
        fp32_path.unlink()
        warning = None
    parity.update(reduced.measure(precision, model, format_of(fmt_name).load(path),
                                  reduced.validation_batches(run_dir, meta, settings), meta.model.name, fmt_name))
    return {**parity, "precision_warning": warning} if warning else parity


def export_model(run_dir: str | Path, topk: int | None = None, format: str | None = None,
                 precision: str | None = None) -> Path:
    """Write RUN/export/ from checkpoints/best in `format` (None: the run config's export.format) at
    `precision` (None: the run config's serve.precision); returns the export directory.

    The files are written to a staging directory and swapped in only after the parity check,
    so RUN/export never holds a model that failed it.
    """
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    format = cfg.export.format if format is None else format
    chosen = None
    if format == "auto":
        format, chosen = auto_format(cfg.model.name)
    fmt = format_of(format)
    precision = cfg.serve.precision if precision is None else precision
    reduced.check_supported(precision, format, cfg.model.name)
    if fmt.require is not None:
        fmt.require()  # a missing package or compiler, said before the checkpoint is read
    model, meta = load_best(run_dir)  # a fresh model: contiguous, not compiled, eval mode
    model = model.float().eval()
    settings = preprocess_settings(meta, cfg, topk)
    if precision != "fp32":  # the handler warns where bf16 is not native
        settings["precision"] = precision

    export_dir, staging = RunDir(run_dir).export, RunDir(run_dir).export_staging
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        parity = save_at_precision(model, meta, format, staging / fmt.model_file, precision, run_dir, settings)
        if chosen:
            parity["format_choice"] = chosen  # why this format: export.format auto
        (staging / PARITY_FILE).write_text(json.dumps(parity, indent=2))
        (staging / INDEX_FILE).write_text(json.dumps({str(i): name for i, name in enumerate(meta.classes)}, indent=2))
        (staging / PREPROCESS_FILE).write_text(json.dumps(settings, indent=2))
        shutil.copyfile(Path(preprocess.__file__), staging / PREPROCESS_MODULE)
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


def format_of_file(path: Path) -> str:
    """The name of the format that writes files named like `path`."""
    return next(name for name, f in FORMATS.items() if f.model_file == Path(path).name)


def export_is_current(run_dir: str | Path) -> bool:
    """True when RUN/export holds a complete export at least as new as checkpoints/best."""
    run_dir = Path(run_dir)
    export_dir = RunDir(run_dir).export
    model = model_file(export_dir)
    if model is None or not all((export_dir / name).is_file() for name in HANDLER_FILES):
        return False
    weights = checkpoints_dir(run_dir) / "best" / WEIGHTS
    return not weights.is_file() or weights.stat().st_mtime <= model.stat().st_mtime


def describe_export(export_dir: Path) -> str:
    """One line for a user: the file, its format, the parity figure and the size."""
    path = model_file(export_dir)
    if path is None:
        raise ToolkitError(f"{export_dir}: holds no exported model ({', '.join(f.model_file for f in FORMATS.values())})")
    parity = json.loads((export_dir / PARITY_FILE).read_text()) if (export_dir / PARITY_FILE).is_file() else {}
    facts = [parity.get("format") or format_of_file(path)]
    facts += [f"opset {parity['opset']}"] if "opset" in parity else []
    facts += [f"compiled in {parity['compile_seconds']:.1f} s"] if "compile_seconds" in parity else []
    size = path.stat().st_size
    line = f"exported {path} ({', '.join(facts)}; {size / 1e6:.2f} MB)"
    if "max_abs_diff" in parity:
        batches = " and ".join(parity.get("max_abs_diff_by_batch", {}).keys()) or "?"
        line += (f"\n  parity with the checkpoint: max |logit difference| {parity['max_abs_diff']:.2g} "
                 f"(tolerance {parity['tolerance']:g}) on random batches of {batches}")
    if "top1_agreement" in parity:
        line += (f"\n  precision {parity['precision']}: fp32's class for {parity['top1_agreement']:.2%} of the "
                 f"{parity['agreement_images']} validation images (at least {parity['agreement_threshold']:.1%} "
                 f"required); {parity['speedup_over_eager_fp32']:.2f}x the eager fp32 model's speed there")
    if "precision_warning" in parity:
        line += f"\n  warning: {parity['precision_warning']}"
    return line


__all__ = ["FORMATS", "Format", "describe_export", "export_model", "export_torchscript", "export_is_current",
           "load_torchscript", "model_file"]
