"""What the machine and the launch decide before training starts: the precision policy and the bf16
probes behind it, malloc tuning, the Accelerator, the launch checks and the device banner."""

from __future__ import annotations

import ctypes
import os
import sys
from datetime import timedelta

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration

from toolkit.config import RunConfig
from toolkit.errors import ToolkitError, launched_world_size, report
from toolkit.rundir import RunDir
from toolkit.trackers import tracker_names


MALLOC_OVERRIDES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "LD_PRELOAD")


def keep_freed_memory() -> bool:
    """glibc only: let freed blocks of up to 64 MiB stay in the process for the next step, instead of
    unmapping them and faulting fresh pages in at every step (measured: +12% images/s training
    mnist_cnn on a 2-core CPU). Left alone where the user tunes malloc or preloads another allocator.
    True when applied."""
    if not sys.platform.startswith("linux") or any(os.environ.get(k) for k in MALLOC_OVERRIDES):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # musl and others: no glibc mallopt
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    # both or neither: a trim threshold alone turns off glibc's adaptive mmap threshold (slower)
    return bool(mallopt(M_MMAP_THRESHOLD, 64 << 20) and mallopt(M_TRIM_THRESHOLD, 256 << 20))


def native_bf16_cpu() -> bool:
    """Whether this CPU computes bf16 in hardware (AVX512-BF16 or AMX); elsewhere autocast emulates it, slowly."""
    probes = (getattr(torch.cpu, "_is_avx512_bf16_supported", None), getattr(torch.cpu, "_is_amx_tile_supported", None))
    return any(probe() for probe in probes if probe)


def native_bf16_cuda() -> bool:
    """Whether the current GPU computes bf16 natively: NVIDIA from Ampere (compute capability 8.0) on,
    every ROCm GPU. Older NVIDIA GPUs emulate it, slowly, and cuDNN has no bf16 convolutions there."""
    if torch.version.hip:
        return torch.cuda.is_bf16_supported()
    return torch.cuda.get_device_capability()[0] >= 8


def resolve_precision(cfg: RunConfig) -> tuple[str, str]:
    """train.mixed_precision as this run uses it, and (for auto) why: the fastest precision the device
    computes natively. CUDA: bf16, or fp16 with a gradient scaler before Ampere; CPU: bf16 with
    AVX512-BF16/AMX, else fp32; MPS: fp32."""
    asked = cfg.train.mixed_precision
    if asked != "auto":
        return asked, ""
    if cfg.train.device != "cpu" and torch.cuda.is_available():
        if native_bf16_cuda():
            return "bf16", "auto: the GPU has bf16"
        return "fp16", "auto: the GPU lacks bf16"
    if cfg.train.device != "cpu" and torch.backends.mps.is_available():
        return "no", "auto: fp32 on MPS"
    if native_bf16_cpu():
        return "bf16", "auto: the CPU has native bf16"
    return "no", "auto: the CPU would emulate bf16"


def make_accelerator(cfg: RunConfig) -> Accelerator:
    t = cfg.train
    precision, _ = resolve_precision(cfg)
    return Accelerator(
        cpu=t.device == "cpu", mixed_precision=precision, gradient_accumulation_steps=t.grad_accum_steps,
        log_with=tracker_names(cfg),  # toolkit/trackers.py: each checked to be installed
        project_config=ProjectConfiguration(project_dir=str(cfg.run_dir), logging_dir=str(RunDir(cfg.run_dir).tensorboard)),
        step_scheduler_with_optimizer=False,  # we step it once per optimizer step ourselves
        # a dead peer stops a collective after this, not after the process group's 30-minute default
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=t.collective_timeout_s))])




def check_launch(cfg: RunConfig, accelerator: Accelerator) -> None:
    """Refuse, on every process alike, the launches that would otherwise run silently wrong."""
    problems = []
    if cfg.train.mixed_precision == "fp16" and accelerator.device.type != "cuda":
        problems.append("train.mixed_precision: 'fp16' needs a CUDA GPU (Accelerate would silently run fp32 on "
                        "this machine); use 'bf16' or 'no'")
    if cfg.model.sync_batchnorm and accelerator.num_processes > 1 and accelerator.device.type == "cpu":
        problems.append("model.sync_batchnorm: torch's SyncBatchNorm runs on GPUs only (DDP refuses it on the "
                        "CPU); set model.sync_batchnorm: false")
    asked = launched_world_size()
    if asked is not None and asked != accelerator.num_processes:
        problems.append(f"WORLD_SIZE is {asked} but Accelerate runs {accelerator.num_processes} process(es): the "
                        "launcher started independent copies. On CPUs use launch/cpu.sh (see launch/README.md).")
    # `accelerate launch --cpu --num_processes N` sets MASTER_ADDR but starts ONE process (it expects mpirun)
    if (asked is None and accelerator.num_processes == 1 and "MASTER_ADDR" in os.environ
            and os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")):
        problems.append("accelerate launch --cpu with several processes starts only one (it expects mpirun): use "
                        "launch/cpu.sh (see launch/README.md). For a single process, unset MASTER_ADDR.")
    if problems:
        raise ToolkitError("\n".join(problems))


def device_report(accelerator: Accelerator, cfg: RunConfig) -> str:
    """The start-up line, in words: processes, device, precision (and why), memory format."""
    device = accelerator.device
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        what = f"cuda ({props.name}, {props.total_memory / 2**30:.1f} GiB, bf16 {'native' if native_bf16_cuda() else 'emulated'})"
    elif device.type == "mps":
        what = "mps (Apple GPU)"
    else:
        native = getattr(torch.backends.cpu, "get_cpu_capability", lambda: "")()
        # bf16 autocast runs on every CPU; only AVX512-BF16/AMX make it fast rather than emulated
        what = (f"cpu ({os.cpu_count()} cores, {native or 'default'} kernels, "
                f"bf16 {'native' if native_bf16_cpu() else 'emulated: slow'})")
    _, why = resolve_precision(cfg)
    precision = {"no": "fp32", "bf16": "bf16 autocast", "fp16": "fp16 autocast with a gradient scaler"}[accelerator.mixed_precision]
    return (f"{processes_in_words(accelerator)} | device {what} | precision {precision}{f' ({why})' if why else ''} | "
            f"channels_last {'on' if cfg.train.channels_last else 'off'}")


def processes_in_words(accelerator: Accelerator) -> str:
    """'1 process' or '4 processes on 2 machines (DDP over nccl)'."""
    n = accelerator.num_processes
    if n == 1:
        return "1 process"
    backend = getattr(accelerator.state, "backend", None) or "?"
    per_machine = int(os.environ.get("LOCAL_WORLD_SIZE") or n)  # torchrun's processes on this machine (display only)
    where = f" on {n // per_machine} machines" if 0 < per_machine < n else ""
    return f"{n} processes{where} (DDP over {backend})"


def report_from_main_process(exc: ToolkitError) -> None:
    """A config error in a launch of several processes: every process has it (same file), so the main one
    reports it and the others wait for that before they all exit, as train() does for later errors."""
    from accelerate import PartialState

    state = PartialState(cpu=os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes"))  # as Accelerator reads it
    if state.is_main_process:
        report(exc)
    state.wait_for_everyone()
    exc.quiet = True
