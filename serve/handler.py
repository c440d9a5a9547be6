"""TorchServe handler for the toolkit's image classifiers (TorchServe 0.11/0.12).

The archive holds `model.pt` (TorchScript), `index_to_name.json` and `preprocess.json`, flattened
into the model directory. This module runs inside TorchServe's Python worker, where only torch,
torchvision, PIL, numpy and `ts` can be relied on, so it must not import `toolkit`: it carries its
own copy of `toolkit/preprocess.py`, and tests/test_handler.py holds the two equal bit for bit.

Per request: raw image bytes (`curl -T img`, `row["body"]`), a multipart field `data`
(`curl -F data=@img`), or JSON `{"data": "<base64>"}`. A good request gets
`{"class": probability, ...}`, top-k highest first (the convention of TorchServe's
image_classifier). A bad request gets, for that request only, an HTTP status and
`{"error": "...", "code": N}`:
  400  empty body, malformed or too deeply nested JSON, JSON that is not {"data": "<base64>"},
       bad base64, truncated or corrupt image
  413  width x height above `max_pixels`, or a side above `max_side` (from the header, before
       any pixel is decoded)
  415  bytes that are not a JPEG, PNG, BMP, GIF or WebP image
Work and memory per image are bounded by `max_pixels`, `max_side` and the model's input size,
whatever the image's shape: preprocess_version 2 crops the region that reaches the output before
resizing (see toolkit/preprocess.py, of which this is a copy).
The other requests of the batch are answered normally: bad input never raises out of `handle`,
because TorchServe would turn any exception into one error status for the whole batch.
"""

from __future__ import annotations

import base64
import binascii
import functools
import io
import json
import logging
import os
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from http import HTTPStatus

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision.transforms.v2 import functional as F
from ts.utils.util import PredictionException  # defined in ts, so this module keeps one class

logger = logging.getLogger(__name__)

# Only these decoders are reachable from the network: fewer PIL plugins, less attack surface.
FORMATS = ("JPEG", "PNG", "BMP", "GIF", "WEBP")
NOT_AN_IMAGE = "not a decodable image (JPEG, PNG, BMP, GIF, WebP)"
HEADER_LOCK = threading.Lock()
PREPROCESS_VERSION = 2  # the newest toolkit/preprocess.py this copy implements (1 is still served)
REDUCING_GAP = 2
V1_MAX_ASPECT = 20
# A body starting with one of these is JSON, not an image: no image format's magic begins so.
JSON_START = tuple(b'{["-0123456789tfn"')


def draft(img: Image.Image, size: int) -> None:
    """JPEG only: decode at 1/2, 1/4 or 1/8 scale (in the DCT, several times faster) where the image
    stays at least 2 x size on each side at that scale, as PIL's thumbnail() does (reducing_gap 2);
    the antialiased resize to `size` follows from there. Copy of toolkit/preprocess.py."""
    if img.format == "JPEG" and min(img.size) >= 4 * size:
        img.draft(None, (2 * size, 2 * size))


def upright(img: Image.Image) -> Image.Image:
    """The EXIF orientation applied, as viewers do; unreadable EXIF is ignored. Copy of toolkit/preprocess.py."""
    try:
        ImageOps.exif_transpose(img, in_place=True)
    except Exception:  # PIL raises several types for malformed EXIF; the pixels themselves are fine
        pass
    return img


def square_box(width: int, height: int) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the central square. Copy of toolkit/preprocess.py."""
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side


def crop_region(img: Image.Image, policy: str) -> Image.Image:
    """All of the image ("resize") or its central square. Copy of toolkit/preprocess.py."""
    box = square_box(*img.size)
    if policy == "resize" or box == (0, 0, *img.size):
        return img
    return img.crop(box)


def box_reduce(img: Image.Image, size: int) -> Image.Image:
    """Box-average by whole factors until each side is under 4 x size. Copy of toolkit/preprocess.py."""
    factors = (max(1, img.size[0] // (REDUCING_GAP * size)), max(1, img.size[1] // (REDUCING_GAP * size)))
    return img if factors == (1, 1) else img.reduce(factors)


def over_white(img: Image.Image) -> Image.Image:
    """An image with transparency -> "RGB" over white, a strip of about 1 M pixels at a time (all
    per pixel: the whole-image result, without three full-size RGBA copies). Copy of toolkit/preprocess.py."""
    out = Image.new("RGB", img.size)
    rows = max(1, 2**20 // max(1, img.width))
    for top in range(0, img.height, rows):
        box = (0, top, img.width, min(img.height, top + rows))
        strip = img.crop(box).convert("RGBA")
        white = Image.new("RGBA", strip.size, (255, 255, 255, 255))
        out.paste(Image.alpha_composite(white, strip).convert("RGB"), box[:2])
    return out


def short(text: object, limit: int = 40) -> str:
    """A client's string as it may appear in an error: escaped (ASCII repr) and cut to `limit` characters."""
    shown = ascii(str(text))
    return shown if len(shown) <= limit else shown[: limit - 3] + "..."

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


LOADERS = {".pt": _load_torchscript}  # suffix of the serialized file -> its loader, one per export format


def _load_model(path: str, device: torch.device):
    """The model in the archive's serialized file, loaded by the file's suffix (as TorchServe's
    base_handler chooses between .pt, .onnx and .so/.pt2); the rest of the handler is format-blind."""
    suffix = os.path.splitext(path)[1]
    if suffix not in LOADERS:
        raise ValueError(f"{os.path.basename(path)}: no loader for {suffix or 'files without a suffix'} "
                         f"(known: {', '.join(LOADERS)})")
    return LOADERS[suffix](path, device)


class ImageClassifierHandler:
    """Decode each request, classify all good ones in one forward pass, answer each on its own."""

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
        props = context.system_properties
        model_dir = props["model_dir"]
        with open(os.path.join(model_dir, "preprocess.json"), encoding="utf-8") as f:
            self.pre = json.load(f)
        with open(os.path.join(model_dir, "index_to_name.json"), encoding="utf-8") as f:
            self.names = {str(k): str(v) for k, v in json.load(f).items()}
        channels, mean, std = self.pre["channels"], self.pre["mean"], self.pre["std"]
        # Fail at load time (the worker never becomes READY) rather than on every request.
        if channels not in (1, 3) or len(mean) != channels or len(std) != channels:
            raise ValueError(f"preprocess.json: bad channels/mean/std: {self.pre}")
        if self.pre["resize"] not in ("resize", "resize_center_crop"):
            raise ValueError(f"preprocess.json: unknown resize policy {self.pre['resize']!r}")
        # No version: an export from before version 2, whose model was trained with version 1.
        self.version = int(self.pre.get("preprocess_version", 1))
        if self.version not in (1, PREPROCESS_VERSION):
            raise ValueError(f"preprocess.json: preprocess_version {self.version} is newer than this handler "
                             f"({PREPROCESS_VERSION}): archive the export with the toolkit that made it")
        if self.version == 1:
            logger.warning("preprocess.json has preprocess_version 1 (resize before crop): images more elongated "
                           "than %d:1 are refused; a model trained with version 2 accepts any shape", V1_MAX_ASPECT)
        self.scale = torch.tensor([1 / (255 * s) for s in std], dtype=torch.float32).view(-1, 1, 1)
        self.shift = torch.tensor([-m / s for m, s in zip(mean, std)], dtype=torch.float32).view(-1, 1, 1)
        self.topk = int(self.pre.get("topk", 5))
        self.max_pixels = int(self.pre.get("max_pixels", 40_000_000))
        self.max_side = int(self.pre.get("max_side", 65_535))
        handler_cfg = (getattr(context, "model_yaml_config", None) or {}).get("handler") or {}
        # TorchServe's switch for handler timing (model-config.yaml `handler: {profile: true}`).
        self.profile = bool(handler_cfg.get("profile"))
        forced = handler_cfg.get("channels_last")

        gpu_id = props.get("gpu_id")
        if gpu_id is not None and torch.cuda.is_available():
            self.device = torch.device(f"cuda:{gpu_id}")
        threads = self._torch_threads(context)
        torch.set_num_threads(threads)
        # A batch's images are decoded side by side (PIL and torch release the GIL while they work),
        # on as many threads as this worker's share of the cores.
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="decode") if threads > 1 else None

        # The archive's serialized file (TorchServe's manifest names it), loaded by its suffix.
        serialized = ((getattr(context, "manifest", None) or {}).get("model") or {}).get("serializedFile", "model.pt")
        self.model = _load_model(os.path.join(model_dir, serialized), self.device)
        if forced is not None:  # `handler: {channels_last: true|false}`: the operator decides
            self.single_layout = self.batch_layout = torch.channels_last if forced else torch.contiguous_format
            layouts = f"{'channels_last' if forced else 'contiguous'} (set in model-config.yaml)"
        else:
            self.single_layout, timings = self.measure_single_layout()
            layouts = f"channels_last for batches of 2+, {self.describe(self.single_layout)} for one image ({timings})"
        self.initialized = True
        logger.info(
            "loaded %s on %s, %d torch threads, layout %s, %s",
            model_dir, self.device, torch.get_num_threads(), layouts, self.pre,
        )

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

    # ---------------------------------------------------------------- one request
    @staticmethod
    def fields(row) -> str:
        """The field names of a request, for an error message: a few, each escaped and cut short
        (a client chooses them: one 100 kB name must not come back whole)."""
        if not isinstance(row, dict):
            return type(row).__name__
        names = sorted(map(str, row))
        listed = ", ".join(short(name) for name in names[:5])
        return f"[{listed}{f', ... {len(names) - 5} more' if len(names) > 5 else ''}]"

    @staticmethod
    def parse_json(value: bytes) -> object:
        """A body that starts like JSON -> the parsed value. A body opening an object or array that
        does not parse is a 400; one that merely starts like a scalar ("nonsense") stays bytes."""
        try:
            return json.loads(value)
        except RecursionError:  # json's C parser recurses once per level: ~1,000 levels of [[[...
            raise PredictionException("malformed JSON: nested too deeply", 400) from None
        except ValueError as e:  # also UnicodeDecodeError
            if value.lstrip()[:1] in (b"{", b"["):
                raise PredictionException(f"malformed JSON: {short(e, 120)}", 400) from None
            return bytes(value)

    @classmethod
    def request_bytes(cls, row) -> bytes:
        """The encoded image of one request, whichever way it was sent."""
        if not isinstance(row, dict) or ("data" not in row and "body" not in row):
            raise PredictionException(f"no 'data' or 'body' field in the request (got {cls.fields(row)})", 400)
        value = row["data"] if "data" in row else row["body"]
        if isinstance(value, str):  # a text/* body: TorchServe decoded it to str
            value = value.encode("utf-8")
        if isinstance(value, (bytes, bytearray)):
            if not value.strip():
                raise PredictionException("body is empty", 400)
            # JSON that TorchServe did not parse (no application/json content type) or could not
            # (then it passes the bytes on): no image format starts like JSON does.
            if value.lstrip()[0] not in JSON_START:
                return bytes(value)
            value = cls.parse_json(value)
            if isinstance(value, bytes):  # started like a JSON scalar, but is not JSON
                return value
        if not isinstance(value, dict):
            kind = "null" if value is None else type(value).__name__
            raise PredictionException(f'unsupported body (JSON {kind}): send image bytes or JSON {{"data": "<base64>"}}', 400)
        data = value.get("data")
        if not isinstance(data, str) or not data.strip():
            raise PredictionException('JSON body must be {"data": "<base64 image>"}', 400)
        if data.startswith("data:") and "," in data:  # a data: URL, as browsers produce
            data = data.split(",", 1)[1]
        try:
            # Line breaks (`base64` wraps at 76 columns) are dropped; anything else outside the
            # alphabet is an error rather than silently skipped.
            raw = base64.b64decode("".join(data.split()), validate=True)
        except (binascii.Error, ValueError) as e:
            raise PredictionException(f"bad base64 in 'data': {e}", 400) from None
        if not raw:
            raise PredictionException("'data' decodes to zero bytes", 400)
        return raw

    def decode(self, raw: bytes) -> Image.Image:
        """Encoded bytes -> PIL image (first frame), refusing too many pixels before decoding."""
        # Image.open reads only the header. PIL's own bomb guard (a warning above 89 M pixels, an
        # error above 179 M) is lifted for this call so that our limit decides, with a clear message;
        # it is restored at once. The lock keeps the decoding threads from restoring each other's.
        with HEADER_LOCK:
            saved = Image.MAX_IMAGE_PIXELS
            Image.MAX_IMAGE_PIXELS = None
            try:
                img = Image.open(io.BytesIO(raw), formats=FORMATS)
            except Image.UnidentifiedImageError:
                raise PredictionException(NOT_AN_IMAGE, 415) from None
            except Exception as e:  # a recognised format whose header is damaged
                raise PredictionException(f"{NOT_AN_IMAGE}: {short(e, 120)}", 400) from None
            finally:
                Image.MAX_IMAGE_PIXELS = saved
        self.check_shape(*img.size)
        try:
            img.seek(0)
            draft(img, self.pre["image_size"])
            img.load()
        except Exception as e:
            raise PredictionException(f"{img.format} image is truncated or corrupt: {short(e, 120)}", 400) from None
        return upright(img)

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
        if self.version == 1 and max(width, height) > V1_MAX_ASPECT * min(width, height):
            raise PredictionException(f"image is {width}x{height}, more elongated than {V1_MAX_ASPECT}:1, the limit "
                                      "for models made with preprocess_version 1 (resize before crop); "
                                      "retrain to accept any shape", 413)

    # Copy of toolkit/preprocess.py: draft -> upright -> crop_region -> to_mode -> box_reduce ->
    # pil_to_tensor -> resize_uint8 -> normalize.
    @staticmethod
    def to_mode(img: Image.Image, channels: int) -> Image.Image:
        """Any PIL mode -> "L" or "RGB": 16/32-bit scaled to 8 bits, transparency over white."""
        if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
            values = np.asarray(img) >> 8  # at the native width (uint16/int32): no int64 copy of 40 M pixels
            img = Image.fromarray(np.clip(values, 0, 255, out=values).astype(np.uint8), mode="L")
        elif img.mode == "F":
            values = np.asarray(img, dtype=np.float64)
            img = Image.fromarray(np.clip(values, 0, 255).astype(np.uint8), mode="L")
        if img.mode == "P" and "transparency" not in img.info:
            img = img.convert("RGB")
        if img.mode in ("RGBA", "LA", "PA", "La", "RGBa", "P"):
            img = over_white(img)
        target = "L" if channels == 1 else "RGB"
        return img if img.mode == target else img.convert(target)

    def bounded(self, img: Image.Image) -> torch.Tensor:
        """Decoded image -> uint8 C x H x W of the region that reaches the output, box-reduced so that
        each side is under 4 x S (toolkit.preprocess.pil_to_uint8 before its resize)."""
        channels, size = self.pre["channels"], self.pre["image_size"]
        if self.version == 1:
            return F.pil_to_tensor(self.to_mode(img, channels))
        return F.pil_to_tensor(box_reduce(self.to_mode(crop_region(img, self.pre["resize"]), channels), size))

    def resize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 C x H x W (from `bounded`) -> C x S x S, antialiased bilinear (toolkit.preprocess.resize_uint8)."""
        size, policy = self.pre["image_size"], self.pre["resize"]
        if self.version == 2:  # already cropped: a square, or the whole image for "resize"
            policy = "resize"
        if policy == "resize":
            if images.shape[-2:] != (size, size):
                images = F.resize(images, [size, size], antialias=True)
            return images
        if min(images.shape[-2:]) != size:
            images = F.resize(images, size, antialias=True)
        return F.center_crop(images, [size, size])

    def normalize(self, images: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """uint8 (N)xCxSxS -> float32 (x / 255 - mean) / std as x * scale + shift (toolkit.preprocess.normalize);
        written into `out` (a float tensor of any memory format) when given."""
        floats = images.to(torch.float32) if out is None else out.copy_(images)
        return floats.mul_(self.scale).add_(self.shift)

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
