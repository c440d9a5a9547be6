"""The start-up half of serve/handler.py's ImageClassifierHandler (a mixin it inherits): the archive's
settings (preprocess.json, index_to_name.json), the worker's threads, the model file's path and the
memory formats the model is fed, measured at load. Shipped beside handler.py in every archive
(torch-model-archiver --extra-files) and loaded by it; imports torch only, nothing of toolkit."""

from __future__ import annotations

import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor

import torch

logger = logging.getLogger("handler")


class StartUp:
    """Read at load time, so that a problem fails there (the worker never becomes READY) rather than
    on every request. Expects `self.pp` (the archive's preprocess.py), `self.model` and `self.device`."""

    LOADERS: dict = {}  # suffix -> (loader, native): set by handler.py from loaders.py

    def read_settings(self, model_dir: str) -> None:
        """preprocess.json and index_to_name.json, checked against what the archive's preprocess.py knows."""
        with open(os.path.join(model_dir, "preprocess.json"), encoding="utf-8") as f:
            self.pre = json.load(f)
        with open(os.path.join(model_dir, "index_to_name.json"), encoding="utf-8") as f:
            self.names = {str(k): str(v) for k, v in json.load(f).items()}
        channels, mean, std = self.pre["channels"], self.pre["mean"], self.pre["std"]
        if channels not in (1, 3) or len(mean) != channels or len(std) != channels:
            raise ValueError(f"preprocess.json: bad channels/mean/std: {self.pre}")
        if self.pre["resize"] not in ("resize", "resize_center_crop"):
            raise ValueError(f"preprocess.json: unknown resize policy {self.pre['resize']!r}")
        # No version: an export from before version 2, whose model was trained with version 1.
        self.version = int(self.pre.get("preprocess_version", 1))
        if self.version not in (1, self.pp.PREPROCESS_VERSION):
            raise ValueError(f"preprocess.json: preprocess_version {self.version} is newer than this handler "
                             f"({self.pp.PREPROCESS_VERSION}): archive the export with the toolkit that made it")
        if self.version == 1:
            logger.warning("preprocess.json has preprocess_version 1 (resize before crop): images more elongated "
                           "than %d:1 are refused; a model trained with version 2 accepts any shape",
                           self.pp.V1_MAX_ASPECT)
        self.topk = int(self.pre.get("topk", 5))
        self.max_pixels = int(self.pre.get("max_pixels", 40_000_000))
        self.max_side = int(self.pre.get("max_side", 65_535))
        self.not_an_image = f"not a decodable image ({self.pp.FORMAT_NAMES})"

    def check_precision(self) -> str:
        """preprocess.json's precision (fp32 when absent); bf16 on a CPU that does not compute it natively
        is served, but slower than fp32 would be: the model log says so at load, in words."""
        precision = self.pre.get("precision", "fp32")
        if precision == "bf16" and self.device.type == "cpu" and not (
                torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()):
            logger.warning("this archive's model runs in bf16, which this CPU (%s, no AVX512-BF16 or AMX) emulates: "
                           "slower than fp32; serve it on a CPU with native bf16 or a GPU, or re-export at "
                           "serve.precision fp32", torch.backends.cpu.get_cpu_capability())
        return precision

    def start_threads(self, context) -> None:
        threads = self._torch_threads(context)
        torch.set_num_threads(threads)
        # A batch's images are decoded side by side (PIL and torch release the GIL while they work),
        # on as many threads as this worker's share of the cores.
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="decode") if threads > 1 else None

    @classmethod
    def model_path(cls, context, model_dir: str) -> str:
        """The archive's serialized file, as TorchServe's manifest names it (else the one model file there)."""
        serialized = ((getattr(context, "manifest", None) or {}).get("model") or {}).get("serializedFile")
        if serialized is None:
            found = sorted(f for f in os.listdir(model_dir) if f.startswith("model") and os.path.splitext(f)[1] in cls.LOADERS)
            serialized = found[0] if found else "model.pt"
        return os.path.join(model_dir, serialized)

    def choose_layouts(self, forced: bool | None, native: bool) -> str:
        """The memory formats the model is fed, for one image and for batches; says which and why."""
        if not native:  # an ONNX or AOTInductor file was made for contiguous inputs
            self.single_layout = self.batch_layout = torch.contiguous_format
            return "contiguous (the exported file's own)"
        if forced is not None:  # `handler: {channels_last: true|false}`: the operator decides
            self.single_layout = self.batch_layout = torch.channels_last if forced else torch.contiguous_format
            return f"{'channels_last' if forced else 'contiguous'} (set in model-config.yaml)"
        self.single_layout, timings = self.measure_single_layout()
        return f"channels_last for batches of 2+, {self.describe(self.single_layout)} for one image ({timings})"

    @staticmethod
    def describe(layout: torch.memory_format) -> str:
        return "channels_last" if layout == torch.channels_last else "contiguous"

    def measure_single_layout(self, runs: int = 3) -> tuple[torch.memory_format, str]:
        """The faster memory format for one-image batches, timed on this machine with this model.

        channels_last suits oneDNN's convolutions from a few images up, but for one image it varies:
        on a 2-core AVX2 CPU, ResNet-18 took 46 ms contiguous against 72 ms channels_last, while
        MobileNetV3 and EfficientNet ran faster channels_last. Each layout runs once to warm up (this
        also warms TorchScript's profiling executor before the first request), then `runs` times,
        interleaved; the smallest time of each decides. GPUs keep channels_last (tensor cores)."""
        if self.device.type != "cpu":
            return torch.channels_last, "not measured off the CPU"
        size, channels = self.pre["image_size"], self.pre["channels"]
        image = torch.rand(1, channels, size, size)
        layouts = (torch.channels_last, torch.contiguous_format)
        best = {layout: float("inf") for layout in layouts}
        with torch.inference_mode():
            for step in range(runs + 1):
                for layout in layouts:
                    x = image.contiguous(memory_format=layout)
                    started = time.perf_counter()
                    self.model(x)
                    if step:  # step 0 is the warm-up
                        best[layout] = min(best[layout], time.perf_counter() - started)
        choice = min(layouts, key=best.get)  # a tie keeps channels_last (first)
        return choice, ", ".join(f"{self.describe(k)} {v * 1000:.1f} ms" for k, v in best.items())

    def layout(self, n: int) -> torch.memory_format:
        return self.single_layout if n == 1 else self.batch_layout

    @staticmethod
    def _torch_threads(context) -> int:
        """Intra-op threads so that threads x workers does not oversubscribe the cores.

        `handler: {torch_threads: N}` in model-config.yaml wins; an OMP_NUM_THREADS set by the
        operator is kept (torch already read it); otherwise usable cores // workers.
        """
        cfg = getattr(context, "model_yaml_config", None) or {}
        explicit = (cfg.get("handler") or {}).get("torch_threads")
        if explicit:
            return max(1, int(explicit))
        if os.environ.get("OMP_NUM_THREADS"):
            return torch.get_num_threads()
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        workers = int(cfg.get("maxWorkers") or cfg.get("minWorkers") or 1)
        return max(1, cores // max(1, workers))
