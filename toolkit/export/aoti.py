"""AOTInductor: torch.export.export with a dynamic batch dimension, compiled ahead of time by
torch._inductor.aoti_compile_and_package into a .pt2 package (a shared library of C++ kernels
for this kind of CPU, and the weights) and loaded by torch._inductor.aoti_load_package.
The compile needs a C++ compiler (g++ or clang++) and takes tens of seconds per model.
serve/handler.py loads it by its .pt2 suffix."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import nn

from toolkit.errors import ToolkitError

MODEL_FILE = "model.pt2"
MAX_BATCH = 4096


def compiler() -> str:
    """The C++ compiler Inductor would use, or a ToolkitError naming what is missing."""
    from torch._inductor import cpp_builder, exc

    try:
        return cpp_builder.get_cpp_compiler()
    except (exc.InvalidCxxCompiler, RuntimeError, OSError) as error:
        raise ToolkitError("export format aoti compiles C++ and found no C++ compiler (searched: g++/clang++ "
                           "on PATH, or the one named by the CXX environment variable): install one "
                           f"(apt-get install g++) or choose another format ({type(error).__name__})") from None


def require() -> None:
    compiler()


def capture(model: nn.Module, example: torch.Tensor) -> torch.export.ExportedProgram:
    """The torch.export capture that the compile lowers, batch dimension dynamic: where a model that
    AOTInductor cannot take is refused (data-dependent control flow, unsupported ops)."""
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    with torch.no_grad():
        return torch.export.export(model, (example,), dynamic_shapes=({0: batch},))


def save(model: nn.Module, example: torch.Tensor, path: Path) -> dict:
    """Export and compile `model` into the package `path`; returns the facts for parity.json."""
    from torch._inductor import aoti_compile_and_package

    cxx = compiler()
    program = capture(model, example)
    started = time.perf_counter()
    aoti_compile_and_package(program, package_path=str(path))
    seconds = time.perf_counter() - started
    return {"method": "torch.export + aoti_compile_and_package", "compile_seconds": round(seconds, 2),
            "compiler": cxx, "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def load_aoti(path: Path):
    """The compiled package as a function images -> logits (contiguous inputs, as it was compiled for)."""
    from torch._inductor import aoti_load_package

    compiled = aoti_load_package(str(path))

    def run(images: torch.Tensor) -> torch.Tensor:
        return compiled(images.contiguous())

    return run
