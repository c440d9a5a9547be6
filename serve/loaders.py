"""Loaders of the serialized model file of an archive, chosen by the file's suffix as TorchServe's
base_handler chooses between .pt, .onnx and .so/.pt2: TorchScript (frozen), ONNX (onnxruntime,
imported only for an ONNX archive) and AOTInductor packages. Shipped beside serve/handler.py in
every archive and loaded by it; imports torch only (and onnxruntime when asked to)."""

from __future__ import annotations

import logging
import os
import warnings

import torch

logger = logging.getLogger("handler")


def _load_torchscript(path: str, device: torch.device):
    # TorchScript still works but warns that it is deprecated; the warning says nothing
    # actionable to whoever reads the model log, so it is silenced here only.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        model = torch.jit.load(path, map_location=device).eval()
        try:
            # Weights become constants, BatchNorm folds into the convolutions: a faster forward
            # with the same outputs (to float rounding). A model that cannot be frozen runs as is.
            return torch.jit.freeze(model)
        except Exception as e:
            logger.warning("%s cannot be frozen (%s): running it unfrozen", os.path.basename(path), e)
            return model


def _load_onnx(path: str, device: torch.device):
    """An onnxruntime session (CUDA's provider where the worker has a GPU and onnxruntime has it, else
    the CPU's) as images -> logits; it takes CPU tensors and copies to the GPU itself."""
    import onnxruntime  # only an ONNX archive needs it

    providers = ["CPUExecutionProvider"]
    if device.type == "cuda" and "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        providers.insert(0, ("CUDAExecutionProvider", {"device_id": device.index or 0}))
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()  # the worker's share of the cores, set before
    options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(path, options, providers=providers)
    name = session.get_inputs()[0].name

    def run(images: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {name: images.contiguous().numpy()})[0])

    return run


def _load_aoti(path: str, device: torch.device):
    """The AOTInductor package, compiled for the CPU it was exported on, as images -> logits."""
    from torch._inductor import aoti_load_package

    compiled = aoti_load_package(path)
    return lambda images: compiled(images.contiguous())


# suffix of the serialized file -> (its loader, whether it is a torch module that runs on the worker's
# device in the memory format measured at load; the others take contiguous CPU tensors)
LOADERS = {".pt": (_load_torchscript, True), ".onnx": (_load_onnx, False), ".pt2": (_load_aoti, False)}


def load_model(path: str, device: torch.device):
    """The model in the archive's serialized file, loaded by the file's suffix (as TorchServe's
    base_handler chooses between .pt, .onnx and .so/.pt2); the rest of the handler is format-blind."""
    suffix = os.path.splitext(path)[1]
    if suffix not in LOADERS:
        raise ValueError(f"{os.path.basename(path)}: no loader for {suffix or 'files without a suffix'} "
                         f"(known: {', '.join(LOADERS)})")
    return LOADERS[suffix][0](path, device)
