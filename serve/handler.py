"""TorchServe handler for the toolkit's image classifiers (TorchServe 0.11/0.12).

The archive holds the model file (`model.pt` TorchScript, `model.onnx` ONNX or `model.pt2`
AOTInductor: the manifest's serializedFile, loaded by its suffix), `index_to_name.json`,
`preprocess.json` and `preprocess.py`, flattened into the model directory. This module runs inside
TorchServe's Python worker, where only torch, torchvision, PIL, numpy and `ts` can be relied on
(and onnxruntime for an ONNX archive, imported only then), so it must not import `toolkit`: it
imports the archive's own copy of `toolkit/preprocess.py` from the model directory, the one
definition of the preprocessing that training, evaluation and `toolkit predict` use, and the three
serve/ modules shipped beside it: loaders.py (the model file by its suffix), request_body.py
(a request's body -> the image's bytes) and startup.py (settings, threads and layouts at load).

Per request: raw image bytes (`curl -T img`, `row["body"]`), a multipart field `data`
(`curl -F data=@img`), or JSON `{"data": "<base64>"}`. A good request gets
`{"class": probability, ...}`, top-k highest first (the convention of TorchServe's
image_classifier). A bad request gets, for that request only, an HTTP status and
`{"error": "...", "code": N}`:
  400  empty body, malformed or too deeply nested JSON, JSON that is not {"data": "<base64>"},
       bad base64, truncated or corrupt image
  413  width x height above `max_pixels`, or a side above `max_side` (from the header, before
       any pixel is decoded)
  415  bytes that are not an image in one of preprocess.IMAGE_FORMATS (JPEG, PNG, BMP, GIF, WebP,
       TIFF, PPM/PGM), or an image mode that cannot be converted
Work and memory per image are bounded by `max_pixels`, `max_side` and the model's input size,
whatever the image's shape: preprocess_version 2 crops the region that reaches the output before
resizing (see preprocess.py).
The other requests of the batch are answered normally: bad input never raises out of `handle`,
because TorchServe would turn any exception into one error status for the whole batch.
"""

from __future__ import annotations

import functools
import importlib.util
import io
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http import HTTPStatus

import torch
from PIL import Image
from ts.utils.util import PredictionException  # defined in ts, so this module keeps one class

logger = logging.getLogger(__name__)

HEADER_LOCK = threading.Lock()
PREPROCESS_MODULE = "preprocess.py"  # toolkit/preprocess.py, shipped in the archive


def _module_beside(filename: str, name: str, folder: str | None = None):
    """A module file of the model directory (or of the folder given) loaded under its own name: the
    archive's copy, whatever else the worker could import (TorchServe puts the model directory on
    sys.path, where a generic name could find another module first)."""
    path = os.path.join(folder or os.path.dirname(os.path.abspath(__file__)), filename)
    if not os.path.isfile(path):
        raise ValueError(f"{filename} is missing from the archive: rebuild it with `toolkit archive`")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# Reading a request's body (bytes, multipart, JSON, base64) into the image's bytes: beside this file,
# in serve/ and in every archive.
request_body = _module_beside("request_body.py", "toolkit_serve_request_body")
short = request_body.short


def load_preprocess(model_dir: str):
    """The archive's preprocess.py (not the toolkit's, which a TorchServe host need not have)."""
    return _module_beside(PREPROCESS_MODULE, "toolkit_archive_preprocess", model_dir)


# The model file's loaders by suffix (.pt, .onnx, .pt2): beside this file, in serve/ and in every archive.
loaders = _module_beside("loaders.py", "toolkit_serve_loaders")
LOADERS, _load_model = loaders.LOADERS, loaders.load_model
# The start-up half of the handler (settings, threads, layouts), a mixin: beside this file, in serve/
# and in every archive.
startup = _module_beside("startup.py", "toolkit_serve_startup")


class ImageClassifierHandler(startup.StartUp):
    """Decode each request, classify all good ones in one forward pass, answer each on its own."""

    LOADERS = LOADERS

    def __init__(self):
        self.initialized = False
        self.model = None
        self.device = torch.device("cpu")
        self.pre: dict = {}
        self.pool: ThreadPoolExecutor | None = None
        self.names: dict[str, str] = {}
        self.profile = False
        self.single_layout = torch.channels_last  # memory format of one-image batches (measured at load)
        self.batch_layout = torch.channels_last  # of batches of two or more

    # ---------------------------------------------------------------- start-up
    def initialize(self, context):
        """Settings, threads, the model and its memory formats. A problem fails here, at load time
        (the worker never becomes READY, the model log says why), rather than on every request."""
        model_dir = context.system_properties["model_dir"]
        self.pp = load_preprocess(model_dir)
        self.read_settings(model_dir)
        handler_cfg = (getattr(context, "model_yaml_config", None) or {}).get("handler") or {}
        # TorchServe's switch for handler timing (model-config.yaml `handler: {profile: true}`).
        self.profile = bool(handler_cfg.get("profile"))
        self.start_threads(context)
        path = self.model_path(context, model_dir)
        native = LOADERS.get(os.path.splitext(path)[1], (None, True))[1]
        gpu_id = context.system_properties.get("gpu_id")
        worker_device = torch.device(f"cuda:{gpu_id}") if gpu_id is not None and torch.cuda.is_available() else self.device
        if native:  # a torch module takes its inputs on its device; onnxruntime copies CPU inputs itself
            self.device = worker_device
        self.model = _load_model(path, worker_device)
        layouts = self.choose_layouts(handler_cfg.get("channels_last"), native)
        precision = self.check_precision()
        self.initialized = True
        logger.info("loaded %s (%s) from %s on %s, %d torch threads, layout %s, %s", os.path.basename(path), precision,
                    model_dir, self.device, torch.get_num_threads(), layouts, self.pre)

    # ---------------------------------------------------------------- one request
    @staticmethod
    def request_bytes(row) -> bytes:
        """The encoded image of one request, whichever way it was sent (request_body.py)."""
        return request_body.request_bytes(row)

    def decode(self, raw: bytes) -> Image.Image:
        """Encoded bytes -> PIL image (first frame), refusing too many pixels before decoding."""
        # Image.open reads only the header. PIL's own bomb guard (a warning above 89 M pixels, an
        # error above 179 M) is lifted for this call so that our limit decides, with a clear message;
        # it is restored at once. The lock keeps the decoding threads from restoring each other's.
        with HEADER_LOCK:
            saved = Image.MAX_IMAGE_PIXELS
            Image.MAX_IMAGE_PIXELS = None
            try:
                img = Image.open(io.BytesIO(raw), formats=self.pp.IMAGE_FORMATS)
            except Image.UnidentifiedImageError:
                raise PredictionException(self.not_an_image, 415) from None
            except Exception as e:  # a recognised format whose header is damaged
                raise PredictionException(f"{self.not_an_image}: {short(e, 120)}", 400) from None
            finally:
                Image.MAX_IMAGE_PIXELS = saved
        self.check_shape(*img.size)
        try:
            img.seek(0)
            self.pp.draft(img, self.pre["image_size"])
            img.load()
        except Exception as e:
            raise PredictionException(f"{img.format} image is truncated or corrupt: {short(e, 120)}", 400) from None
        return self.pp.upright(img)

    def check_shape(self, width: int, height: int) -> None:
        """The limits that bound a request's work, from the header: 413 naming the one exceeded."""
        if width * height > self.max_pixels:
            raise PredictionException(f"image is {width}x{height} = {width * height} pixels, above the limit "
                                      f"{self.max_pixels} (serve.max_pixels)", 413)
        if max(width, height) > self.max_side:
            # PIL keeps a pointer per row and converts row by row: 1 x 40,000,000 costs 1.5 s and
            # 0.3-0.8 GB at 40 M pixels, where 610 x 65,535 costs a fraction of that.
            raise PredictionException(f"image is {width}x{height}, a side above the limit {self.max_side} "
                                      "(serve.max_side)", 413)
        if self.version == 1 and max(width, height) > self.pp.V1_MAX_ASPECT * min(width, height):
            raise PredictionException(f"image is {width}x{height}, more elongated than {self.pp.V1_MAX_ASPECT}:1, the limit "
                                      "for models made with preprocess_version 1 (resize before crop); "
                                      "retrain to accept any shape", 413)

    # The arithmetic is preprocess.py's (the archive's copy of toolkit/preprocess.py): draft -> upright ->
    # pil_bounded (crop_region -> to_mode -> box_reduce, in the decoding threads) -> resize_uint8 ->
    # normalize (into the batch).
    def bounded(self, img: Image.Image) -> torch.Tensor:
        """Decoded image -> uint8 C x H x W of the region that reaches the output, each side under 4 x S.
        A mode PIL cannot convert (some TIFF layouts) is the file's problem: 415, not a server error."""
        try:
            return self.pp.pil_bounded(img, self.pre["channels"], self.pre["image_size"], self.pre["resize"],
                                       self.version)
        except (ValueError, OSError) as e:
            raise PredictionException(f"{img.format} image of mode {short(img.mode, 20)} cannot be converted: "
                                      f"{short(e, 120)}", 415) from None

    def resize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 C x H x W (from `bounded`) -> C x S x S, antialiased bilinear."""
        return self.pp.resize_uint8(images, self.pre["image_size"], self.pre["resize"], self.version)

    def normalize(self, images: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """uint8 (N)xCxSxS -> float32 (x / 255 - mean) / std, written into `out` when given."""
        return self.pp.normalize(images, self.pre["mean"], self.pre["std"], out=out)

    def image_to_tensor(self, img: Image.Image) -> torch.Tensor:
        """PIL image -> normalised float C x S x S, exactly as toolkit.preprocess_image."""
        return self.normalize(self.resize(self.bounded(img)))

    # ---------------------------------------------------------------- the batch
    @staticmethod
    def attempt(step, *args) -> tuple[torch.Tensor | None, tuple[int, str] | None]:
        """(step(*args), None), or (None, (HTTP status, message)) for this request alone."""
        try:
            return step(*args), None
        except PredictionException as e:
            return None, (e.error_code, e.message)
        except Exception as e:  # not the client's fault: a bug here; answer this request only
            logger.exception("unexpected error in preprocessing")
            return None, (500, f"internal error while preprocessing: {type(e).__name__}")

    def decode_row(self, row) -> torch.Tensor:
        """One request -> its decoded, cropped and box-reduced uint8 C x H x W (each side under 4 x S,
        so a batch holds little whatever was sent). Runs in the decoding threads: PIL and numpy only;
        torch ops stay on the worker's own thread, where they use its intra-op threads (from several
        threads at once they would oversubscribe the cores)."""
        return self.bounded(self.decode(self.request_bytes(row)))

    def preprocess(self, data):
        """-> (N_good x C x S x S float batch in the model's layout, or None; indices of the good
        requests; {idx: (code, msg)})."""
        parallel = self.pool is not None and len(data) > 1
        decode = functools.partial(self.attempt, self.decode_row)
        decoded = self.pool.map(decode, data) if parallel else map(decode, data)
        tensors, good, errors = [], [], {}
        for idx, (tensor, error) in enumerate(decoded):
            if error is None:
                tensor, error = self.attempt(self.resize, tensor)
            if error is None:
                tensors.append(tensor)
                good.append(idx)
            else:
                errors[idx] = error
        if not tensors:
            return None, good, errors
        # One float copy per image, straight into a batch in the layout the model is fed, then
        # normalised in place: no uint8 stack, no second copy to change the memory format.
        batch = torch.empty((len(tensors), *tensors[0].shape), dtype=torch.float32,
                            memory_format=self.layout(len(tensors)))
        for row, tensor in zip(batch, tensors):
            self.normalize(tensor, out=row)
        return batch, good, errors

    def inference(self, batch: torch.Tensor) -> torch.Tensor:
        """One forward pass for the whole batch -> probabilities N x num_classes (on the CPU)."""
        with torch.inference_mode():
            # the layout chosen at load (preprocess's batches already have it: then this copies nothing)
            logits = self.model(batch.to(self.device).contiguous(memory_format=self.layout(len(batch))))
            return torch.softmax(logits.float(), dim=1).cpu()

    def postprocess(self, probs: torch.Tensor) -> list[dict[str, float]]:
        k = min(self.topk, probs.shape[1])
        values, indices = probs.topk(k, dim=1)  # sorted, highest first
        # .tolist() gives plain Python floats/ints, which json.dumps accepts.
        return [
            {self.names.get(str(i), str(i)): p for p, i in zip(row_p, row_i)}
            for row_p, row_i in zip(values.tolist(), indices.tolist())
        ]

    def handle(self, data, context):
        """TorchServe's entry point: one answer per request, in order."""
        started = time.perf_counter()
        batch, good, errors = self.preprocess(data)
        answers: list = [None] * len(data)
        times = {"preprocess": time.perf_counter() - started}
        if batch is not None:
            # A failure here is the server's (model, memory), not one request's: it propagates
            # and TorchServe answers the whole batch (503, or 507 for out of memory).
            started = time.perf_counter()
            probs = self.inference(batch)
            times["inference"] = time.perf_counter() - started
            started = time.perf_counter()
            for idx, answer in zip(good, self.postprocess(probs)):
                answers[idx] = answer
            times["postprocess"] = time.perf_counter() - started
        if self.profile and getattr(context, "metrics", None) is not None:
            # The metric names of TorchServe's own @timed handlers, in ms per batch, so that the same
            # dashboards and log queries work for this handler.
            for phase, seconds in times.items():
                context.metrics.add_time(f"ts_handler_{phase}", seconds * 1000)
        for idx, (code, message) in errors.items():
            request_id = context.get_request_id(idx) if hasattr(context, "get_request_id") else None
            logger.warning("request %d (id %s): %d %s", idx, request_id, code, message)
            answers[idx] = {"error": message, "code": code}
        if getattr(context, "request_processor", None) is not None:
            for idx in range(len(data)):
                code = errors[idx][0] if idx in errors else 200
                # The phrase goes into the HTTP status line (without one, 0.12 sends "200 " with
                # an empty reason): always the standard phrase, never the message.
                context.set_response_status(code, HTTPStatus(code).phrase, idx)
                context.set_response_content_type(idx, "application/json")
        return answers
