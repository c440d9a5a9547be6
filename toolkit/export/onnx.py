"""ONNX: torch.onnx.export with the dynamo exporter (torch.export underneath), a dynamic batch
dimension, opset OPSET, checked by onnx.checker; run by onnxruntime. Needs the optional extra
`pip install 'toolkit[onnx]'` (onnx, onnxscript, onnxruntime). serve/handler.py loads it by its
.onnx suffix with onnxruntime (the CPU provider, or CUDA's where onnxruntime has it)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import nn

from toolkit.errors import ToolkitError

MODEL_FILE = "model.onnx"
OPSET = 18  # the opset torch's ONNX translation library (torchlib) is written for: no version conversion
PACKAGES = ("onnx", "onnxscript", "onnxruntime")
MAX_BATCH = 4096


def require() -> None:
    missing = [name for name in PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise ToolkitError(f"export format onnx needs the Python package(s) {', '.join(missing)}: "
                           f"pip install 'toolkit[onnx]' (or pip install {' '.join(missing)})")


def save(model: nn.Module, example: torch.Tensor, path: Path) -> dict:
    """Write `model` to `path` as ONNX, batch dimension dynamic; returns the facts for parity.json."""
    import onnx

    require()
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    # The file holds the weights itself (external_data=False): one file for the archive, and models
    # here are far below protobuf's 2 GB limit.
    program = torch.onnx.export(model, (example,), dynamo=True, opset_version=OPSET, input_names=["images"],
                                output_names=["logits"], dynamic_shapes=({0: batch},), external_data=False,
                                verbose=False)
    program.save(str(path), external_data=False)
    onnx.checker.check_model(str(path), full_check=True)
    import onnxruntime

    return {"method": "torch.onnx.export(dynamo=True)", "opset": OPSET, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__}


def load_onnx(path: Path, threads: int | None = None):
    """An onnxruntime session on the CPU as a function images (torch) -> logits (torch)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.log_severity_level = 3  # errors only
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def run(images: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {name: images.detach().float().contiguous().cpu().numpy()})[0])

    return run
