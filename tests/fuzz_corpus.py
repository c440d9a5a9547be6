"""A seeded corpus of malformed and extreme requests for serve/handler.py, as TorchServe hands them
over (`{"body": bytearray}` for raw bytes, `{"body": str}` for text/*, `{"body": dict}` for parsed
JSON, `{"data": ...}` for a multipart field). Used by tests/test_fuzz.py and bench/request_budget.py.

Each item is (category, name, row). The categories follow the issue that asked for them: random
bytes, truncations, PIL modes, huge and thin dimensions, header bombs, deep JSON, wrong types, huge
keys, base64; mixed good/bad batches are built from these by the callers.
"""

from __future__ import annotations

import base64
import functools
import io
import json
import random
import struct
import zlib

import numpy as np
from PIL import Image

MAX_PIXELS = 40_000_000  # serve.max_pixels's default
MAX_SIDE = 65_535  # serve.max_side's default
MAGIC = [b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF89a", b"GIF87a", b"BM", b"RIFF\0\0\0\0WEBPVP8 "]


def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    if "transparency" in img.info and fmt in ("PNG", "GIF"):
        kwargs.setdefault("transparency", img.info["transparency"])
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def noise(width: int, height: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def good_image(seed: int = 0) -> bytes:
    """The image whose answer must not change after the corpus."""
    return encode(noise(64, 48, seed), "PNG")


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


@functools.lru_cache(maxsize=None)
def png_plain(width: int, height: int, color_type: int = 0) -> bytes:
    """A complete, decodable PNG of one grey value: a few kB even at 40 M pixels (rows are zlib'd
    in chunks, never held whole). color_type 0 = L, 2 = RGB, 6 = RGBA (the costliest to convert)."""
    channels = {0: 1, 2: 3, 6: 4}[color_type]
    row = b"\0" + bytes([128]) * (width * channels)
    compressor = zlib.compressobj(9)
    rows_per_chunk = max(1, 2**22 // len(row))
    chunk = row * rows_per_chunk
    parts, left = [], height
    while left:
        n = min(left, rows_per_chunk)
        parts.append(compressor.compress(chunk if n == rows_per_chunk else row * n))
        left -= n
    parts.append(compressor.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", b"".join(parts)) + png_chunk(b"IEND", b"")


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height but holds almost no data (a decompression bomb's header)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(b"\0" * 16)) + png_chunk(b"IEND", b"")


def header_bombs() -> list[tuple[str, bytes]]:
    """Small files whose headers claim huge sizes, in each accepted format."""
    gif = b"GIF89a" + struct.pack("<HH", 65535, 65535) + b"\x00\x00\x00" + b",\0\0\0\0" + struct.pack("<HH", 65535, 65535) + b"\x00\x02\x02D\x01\x00;"
    bmp_info = struct.pack("<IiiHHIIiiII", 40, 60000, 60000, 1, 24, 0, 0, 0, 0, 0, 0)
    bmp = b"BM" + struct.pack("<IHHI", 54 + 16, 0, 0, 54) + bmp_info + b"\0" * 16
    jpeg = bytearray(encode(noise(16, 16, 1), "JPEG"))
    sof = jpeg.index(b"\xff\xc0")
    jpeg[sof + 5:sof + 9] = struct.pack(">HH", 65000, 65000)  # height, width in the frame header
    webp = encode(noise(16, 16, 2), "WEBP", lossless=True)
    assert webp[12:16] == b"VP8L" and webp[20] == 0x2F  # lossless: 14-bit width-1 and height-1 follow
    webp_big = webp[:21] + struct.pack("<I", 16383 | 16383 << 14) + webp[25:]
    return [("png-20000x20000", png_header_only(20000, 20000)), ("png-65535x65535", png_header_only(65535, 65535)),
            ("png-1x4e9", png_header_only(1, 2**31 - 1)), ("gif-65535x65535", gif), ("bmp-60000x60000", bmp),
            ("jpeg-65000x65000", bytes(jpeg)), ("webp-16384x16384", webp_big)]


def thin_and_huge() -> list[tuple[str, bytes]]:
    """Real, decodable images at the edges of the limits: 1 x N and N x 1, the largest accepted
    square, the tallest and widest accepted at max_pixels, and just past each limit."""
    side = int(MAX_PIXELS ** 0.5)
    wide = MAX_PIXELS // MAX_SIDE
    cases = [(1, 1), (1, 2), (2, 1), (1, 100), (100, 1), (1, 20_000), (20_000, 1), (1, MAX_SIDE), (MAX_SIDE, 1),
             (side, side), (wide, MAX_SIDE), (MAX_SIDE, wide), (1, MAX_SIDE + 1), (1, 100_000), (100_000, 1),
             (1, MAX_PIXELS), (side + 1, side + 1)]
    items = [(f"png-L-{w}x{h}", png_plain(w, h)) for w, h in cases]
    items += [(f"png-RGBA-{w}x{h}", png_plain(w, h, 6)) for w, h in [(side, side), (wide, MAX_SIDE), (1, MAX_SIDE)]]
    items += [(f"jpeg-{w}x{h}", encode(Image.new("RGB", (w, h), (90, 140, 200)), "JPEG")) for w, h in [(1, 65_500), (65_500, 1), (4000, 3000)]]
    return items


def modes() -> list[tuple[str, bytes]]:
    """Every PIL mode the five formats carry."""
    rgb = noise(37, 23, 3)
    alpha = rgb.convert("RGBA")
    alpha.putalpha(Image.fromarray(np.random.default_rng(4).integers(0, 256, (23, 37), dtype=np.uint8)))
    palette_t = rgb.quantize(16)
    palette_t.info["transparency"] = 3
    sixteen = Image.fromarray(np.random.default_rng(5).integers(0, 65536, (23, 37), dtype=np.uint16))
    return [("jpeg-RGB", encode(rgb, "JPEG")), ("jpeg-L", encode(rgb.convert("L"), "JPEG")),
            ("jpeg-CMYK", encode(rgb.convert("CMYK"), "JPEG")), ("png-RGBA", encode(alpha, "PNG")),
            ("png-LA", encode(alpha.convert("LA"), "PNG")), ("png-P", encode(rgb.quantize(16), "PNG")),
            ("png-PT", encode(palette_t, "PNG")), ("png-I16", encode(sixteen, "PNG")),
            ("png-1", encode(rgb.convert("1"), "PNG")), ("bmp-RGB", encode(rgb, "BMP")), ("bmp-P", encode(rgb.quantize(16), "BMP")),
            ("gif-P", encode(rgb.quantize(16), "GIF")), ("gif-PT", encode(palette_t, "GIF")),
            ("webp-RGB", encode(rgb, "WEBP", lossless=True)), ("webp-RGBA", encode(alpha, "WEBP")),
            ("tiff-RGB", encode(rgb, "TIFF")), ("ico", encode(rgb, "ICO"))]  # the last two: not accepted, 415


def truncations(rng: random.Random, per_format: int) -> list[tuple[str, bytes]]:
    """Seven formats cut at random points (the header, inside the data, one byte short)."""
    img = noise(40, 30, 6)
    formats = {"JPEG": {}, "PNG": {}, "BMP": {}, "GIF": {}, "WEBP": {"lossless": True}, "TIFF": {}, "ICO": {}}
    items = []
    for fmt, kwargs in formats.items():
        raw = encode(img.quantize(32) if fmt == "GIF" else img, fmt, **kwargs)
        cuts = {1, 8, len(raw) - 1} | {rng.randrange(1, len(raw)) for _ in range(per_format)}
        items += [(f"{fmt.lower()}-cut-{cut}-of-{len(raw)}", raw[:cut]) for cut in sorted(cuts)]
    return items


def random_bodies(rng: random.Random, count: int) -> list[tuple[str, bytes]]:
    """Random bytes, some behind a real format's magic number so that a decoder is chosen."""
    items = []
    for i in range(count):
        body = rng.randbytes(rng.choice([1, 7, 64, 1000, 20_000]))
        if i % 2:
            body = rng.choice(MAGIC) + body
        items.append((f"random-{i}-{len(body)}B", body))
    return items


def deep_json() -> list[tuple[str, object]]:
    """JSON nested past Python's recursion limit, as bytes (octet-stream, or JSON TorchServe failed
    to parse), as text, and nested inside a parsed body's "data"."""
    items = []
    for depth in (100, 1_000, 100_000):
        arrays = "[" * depth + "]" * depth
        objects = '{"a":' * depth + "1" + "}" * depth
        inside = '{"data": ' + arrays + "}"
        items += [(f"arrays-{depth}", arrays.encode()), (f"objects-{depth}", objects.encode()),
                  (f"in-data-{depth}", inside.encode()), (f"arrays-{depth}-text", arrays)]
    items.append(("unclosed-1000", ("[" * 1000).encode()))
    return items


def wrong_types() -> list[tuple[str, object]]:
    """Valid JSON of the wrong shape, in every way it can arrive (parsed by TorchServe, or bytes)."""
    values = [None, 0, 1.5, True, "text", [], [1, 2, 3], {}, {"data": None}, {"data": 123}, {"data": ["x"]},
              {"data": {"a": 1}}, {"data": ""}, {"data": "   "}, {"image": "aGVsbG8="}, {"data": True}]
    items = [(f"parsed-{json.dumps(v)[:20]}", v) for v in values]
    items += [(f"bytes-{json.dumps(v)[:20]}", json.dumps(v).encode()) for v in values]
    items += [(f"text-{json.dumps(v)[:20]}", json.dumps(v)) for v in values]
    items += [("bytes-nan", b"NaN"), ("bytes-minus", b"-"), ("bytes-number-then-junk", b"123abc"),
              ("bytes-not-utf8-json", b'{"data": "\xff\xfe"}'), ("bytes-null-padded", b"  null  ")]
    return items


def huge_keys() -> list[tuple[str, dict]]:
    """Client-chosen names of 100 kB (JSON keys, multipart fields) and many fields at once."""
    key = "k" * 100_000
    odd = "\u202e\x00<script>" * 10_000
    return [("json-key-100k", {"body": {key: "aGVsbG8="}}), ("json-key-and-data", {"body": {key: 1, "data": "!!"}}),
            ("field-100k", {key: bytearray(b"x")}), ("field-control-chars", {odd: bytearray(b"x")}),
            ("many-fields", {f"f{i}": bytearray(b"x") for i in range(1000)}),
            ("json-bytes-key-100k", {"body": json.dumps({key: 1}).encode()}), ("no-fields", {})]


def base64_bodies(good: bytes) -> list[tuple[str, object]]:
    b64 = base64.b64encode(good).decode()
    return [("b64-good", {"data": b64}), ("b64-data-url", {"data": f"data:image/png;base64,{b64}"}),
            ("b64-bad-chars", {"data": "!!not base64!!"}), ("b64-bad-padding", {"data": b64[:-2] + "="}),
            ("b64-of-garbage", {"data": base64.b64encode(b"garbage").decode()}),
            ("b64-empty-after-url", {"data": "data:image/png;base64,"}), ("b64-newlines", {"data": base64.encodebytes(good).decode()}),
            ("b64-huge-key-url", {"data": "data:" + "x" * 100_000 + ",AAAA"})]


def corpus(seed: int = 0) -> list[tuple[str, str, dict]]:
    """(category, name, row) for every request of the corpus, reproducible from `seed`."""
    rng = random.Random(seed)
    good = good_image()
    raw = lambda items: [(name, {"body": bytearray(b) if isinstance(b, bytes) else b}) for name, b in items]
    rows = {
        "random bytes": raw(random_bodies(rng, 60)),
        "truncations": raw(truncations(rng, 8)),
        "PIL modes": raw(modes()),
        "huge/thin dimensions": raw(thin_and_huge()),
        "header bombs": raw(header_bombs()),
        "deep JSON": raw(deep_json()) + [(f"multipart-{n}", {"data": b}) for n, b in deep_json()[:3]],
        "wrong types": raw(wrong_types()),
        "huge keys": huge_keys(),
        "base64": [(name, {"body": body}) for name, body in base64_bodies(good)],
    }
    # The same requests as multipart fields, for a sample: TorchServe hands those over as "data".
    rows["multipart"] = [(f"mp-{name}", {"data": row["body"]}) for name, row in rng.sample(rows["random bytes"] + rows["PIL modes"], 12)]
    return [(category, name, row) for category, items in rows.items() for name, row in items]
