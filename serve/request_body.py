"""The body of one TorchServe request -> the encoded image's bytes, or a PredictionException with the
4xx status and a short message for that request alone. Shipped beside serve/handler.py in every
archive (torch-model-archiver --extra-files) and loaded by it; imports nothing but the standard
library and ts."""

from __future__ import annotations

import base64
import binascii
import json

from ts.utils.util import PredictionException

# A body starting with one of these is JSON, not an image: no image format's magic begins so.
JSON_START = tuple(b'{["-0123456789tfn"')


def short(text: object, limit: int = 40) -> str:
    """A client's string as it may appear in an error: escaped (ASCII repr) and cut to `limit` characters."""
    shown = ascii(str(text))
    return shown if len(shown) <= limit else shown[: limit - 3] + "..."


def fields(row) -> str:
    """The field names of a request, for an error message: a few, each escaped and cut short
    (a client chooses them: one 100 kB name must not come back whole)."""
    if not isinstance(row, dict):
        return type(row).__name__
    names = sorted(map(str, row))
    listed = ", ".join(short(name) for name in names[:5])
    return f"[{listed}{f', ... {len(names) - 5} more' if len(names) > 5 else ''}]"

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

def request_bytes(row) -> bytes:
    """The encoded image of one request, whichever way it was sent."""
    if not isinstance(row, dict) or ("data" not in row and "body" not in row):
        raise PredictionException(f"no 'data' or 'body' field in the request (got {fields(row)})", 400)
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
        value = parse_json(value)
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
