"""Reduced-precision exports (`serve.precision`): bf16 (TorchScript, AOTInductor) and int8 (ONNX, by
onnxruntime's static quantization), each kept only when its top-1 agreement with the fp32 model on the
run's validation set is measured at or above THRESHOLDS; fp32 is the default and needs no measure.

bf16 is fast only where the hardware computes it (AVX512-BF16 or AMX CPUs, GPUs): elsewhere (an AVX2
CPU such as this project's 2-vCPU EPYC) oneDNN emulates it, slower than fp32, and the export says so
in words (printed, and in parity.json) rather than leaving a slow server to be discovered."""

from __future__ import annotations

import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from toolkit.errors import ToolkitError

PRECISIONS = ("fp32", "bf16", "int8")
THRESHOLDS = {"bf16": 0.995, "int8": 0.99}  # least share of validation images given fp32's class
SUPPORTED = {"bf16": ("torchscript", "aoti"), "int8": ("onnx",)}
WHY_NOT = {("bf16", "onnx"): "onnxruntime's CPU provider has no bf16 convolutions; use torchscript or aoti",
           ("int8", "torchscript"): "int8 is made by onnxruntime's quantization; use export.format onnx",
           ("int8", "aoti"): "int8 is made by onnxruntime's quantization; use export.format onnx"}
CALIBRATION_IMAGES = 64  # training images that set the int8 activation ranges
BF16_TOLERANCE = 0.1  # max |logit diff| of the bf16 file to the eager bf16 model (rounding in another order)


def check_supported(precision: str, fmt: str, model_name: str) -> None:
    if precision not in PRECISIONS:
        raise ToolkitError(f"serve.precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    if precision != "fp32" and fmt not in SUPPORTED[precision]:
        raise ToolkitError(f"model {model_name!r} cannot be exported to {fmt} at serve.precision {precision}: "
                           f"{WHY_NOT[(precision, fmt)]} (supported: {', '.join(SUPPORTED[precision])})")


def native_bf16() -> tuple[bool, str]:
    """(whether this machine computes bf16 natively, what it is, in words)."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported(), f"GPU {torch.cuda.get_device_name()}"
    capability = torch.backends.cpu.get_cpu_capability()
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return native, f"CPU with {capability}{' and AVX512-BF16/AMX' if native else ', no AVX512-BF16 or AMX'}"


def bf16_warning() -> str | None:
    native, machine = native_bf16()
    if native:
        return None
    return (f"this machine ({machine}) has no native bf16: bf16 runs emulated here, slower than fp32; "
            "serve this export on a CPU with AVX512-BF16 or AMX, or a GPU, or export at serve.precision fp32")


class BF16(nn.Module):
    """The model in bf16, taking and giving float32 tensors: the file the handler loads as any other."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model.to(torch.bfloat16)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images.to(torch.bfloat16)).float()


def uint8_batches(dataset, count: int | None, batch: int = 64):
    """uint8 N x C x S x S batches of a TensorImages or FileImages dataset (the first `count` images)."""
    n = len(dataset) if count is None else min(count, len(dataset))
    for start in range(0, n, batch):
        indices = list(range(start, min(n, start + batch)))
        if hasattr(dataset, "__getitems__"):
            yield dataset.__getitems__(indices)[0]
        else:
            yield torch.stack([dataset[i][0] for i in indices])


def quantize_int8(fp32_path: Path, out_path: Path, calibration: list[torch.Tensor]) -> dict:
    """onnxruntime static quantization (QDQ, per-channel int8 weights, uint8 activations calibrated on
    `calibration`, normalised float batches) of the ONNX file at fp32_path into out_path."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(calibration)

        def get_next(self):
            images = next(self.batches, None)
            return None if images is None else {"images": images.contiguous().numpy()}

    with tempfile.TemporaryDirectory(prefix="toolkit-int8-") as scratch:
        prepared = Path(scratch) / "prepared.onnx"
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        quantize_static(str(prepared), str(out_path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return {"method": "onnxruntime.quantization.quantize_static (QDQ, per-channel)",
            "calibration_images": sum(len(b) for b in calibration)}


@torch.inference_mode()
def agreement(reference: nn.Module, candidate: Callable[[torch.Tensor], torch.Tensor],
              batches) -> tuple[float, int, float]:
    """(share of images whose top-1 class is the same, images, candidate's speed-up over the reference
    on those batches): batches are normalised float."""
    same = total = 0
    seconds = [0.0, 0.0]
    batches = list(batches)
    if batches:  # warm-up: first calls allocate and pick kernels
        reference(batches[0]), candidate(batches[0])
    for images in batches:
        started = time.perf_counter()
        expected = reference(images).argmax(1)
        middle = time.perf_counter()
        got = candidate(images).argmax(1)
        seconds[0] += middle - started
        seconds[1] += time.perf_counter() - middle
        same += int((expected == got).sum())
        total += len(images)
    return (same / total if total else float("nan")), total, seconds[0] / max(seconds[1], 1e-9)


def measure(precision: str, model: nn.Module, candidate: Callable, val_batches, model_name: str,
            fmt: str) -> dict:
    """The agreement facts for parity.json, refusing an agreement under the threshold."""
    share, images, speedup = agreement(model, candidate, val_batches)
    threshold = THRESHOLDS[precision]
    if images == 0:
        raise ToolkitError(f"model {model_name!r} at serve.precision {precision}: the run's validation set is empty, "
                           "so the agreement with fp32 cannot be measured; export at fp32")
    if not share >= threshold:
        raise ToolkitError(f"model {model_name!r} exported to {fmt} at serve.precision {precision} gives fp32's class "
                           f"for {share:.2%} of the {images} validation images, under the {threshold:.1%} required: "
                           "refused (export at fp32)")
    return {"precision": precision, "top1_agreement": share, "agreement_images": images,
            "agreement_threshold": threshold, "speedup_over_eager_fp32": round(speedup, 3)}


def normalised(batches, pre: dict):
    from toolkit.preprocess import normalize

    for images in batches:
        yield normalize(images, pre["mean"], pre["std"])


def validation_batches(run_dir: Path, meta, pre: dict) -> list[torch.Tensor]:
    """The run's validation set as normalised float batches (the images `toolkit evaluate` reads)."""
    from toolkit.evaluate import run_validation_set
    from toolkit.preprocess import preprocess_from

    data, batch = run_validation_set(run_dir, meta)
    pre_obj = preprocess_from(meta.preprocess)
    with ThreadPoolExecutor(max_workers=2) as pool:
        raw = [data.fetch(index, pre_obj, pool) for index in torch.arange(len(data)).split(min(batch, 128))]
    return list(normalised(raw, pre))


def calibration_batches(run_dir: Path, pre: dict) -> list[torch.Tensor]:
    """The first CALIBRATION_IMAGES training images, normalised: int8's ranges come from training data,
    its agreement from the validation set."""
    from toolkit.data import build_data
    from toolkit.rundir import load_run_config

    train = build_data(load_run_config(run_dir).data).train
    return list(normalised(uint8_batches(train, CALIBRATION_IMAGES, batch=16), pre))
