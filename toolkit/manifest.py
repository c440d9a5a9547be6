"""A shard set as `toolkit shard` writes it: manifest.json (classes, preprocessing, per shard its split, sample
keys and byte offsets, size and sha256) beside WebDataset-layout tars, found from a directory, an http(s) URL
of one, or a brace pattern of shard URLs; and byte ranges of a shard opened as a stream, local or over HTTP.

Torch-free: config.py reads a shard set's preprocessing from here to resolve null image_size, channels, mean, std."""

from __future__ import annotations

import functools
import json
import os
import re
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from toolkit.errors import ToolkitError

MANIFEST = "manifest.json"
FORMAT = "toolkit-shards"
HTTP_TIMEOUT_S = 30  # a server that stops answering is an error after this, never a hang
BRACES = re.compile(r"\{[^{}]*(\.\.|,)[^{}]*\}")


def require_webdataset() -> None:
    """Shards are read and written with webdataset, an extra: say how to install it rather than fail on import."""
    try:
        import braceexpand  # noqa: F401
        import webdataset  # noqa: F401
    except ImportError as exc:
        raise ToolkitError(f"shard sets need the shards extra ({exc}): pip install 'toolkit[shards]'") from None


def is_url(root: str) -> bool:
    return root.startswith(("http://", "https://"))


@dataclass(frozen=True)
class Shard:
    name: str
    url: str  # a local path or an http(s) URL
    split: str
    keys: tuple[str, ...]
    offsets: tuple[int, ...]  # len(keys) + 1: sample i is bytes [offsets[i], offsets[i + 1]) of the tar
    size: int  # bytes of the whole tar
    sha256: str

    @property
    def count(self) -> int:
        return len(self.keys)


@dataclass(frozen=True)
class ShardSet:
    root: str
    classes: list[str]
    preprocessing: dict  # the source's own channels, image_size, mean, std
    shards: tuple[Shard, ...]

    def split(self, name: str) -> list[Shard]:
        return [s for s in self.shards if s.split == name]


def _fetch(url: str) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_S) as response:
            return response.read()
    except (urllib.error.URLError, OSError) as exc:
        raise ToolkitError(f"data.root: cannot read {url}: {exc}") from None


def _base(root: str) -> tuple[str, list[str] | None]:
    """The directory (path or URL, ending in /) holding manifest.json, and the shard names a brace pattern selects."""
    if BRACES.search(root):
        from braceexpand import braceexpand

        names = [name.rsplit("/", 1)[-1] for name in braceexpand(root)]
        return root[:root.rfind("/", 0, BRACES.search(root).start()) + 1], names
    return (root if root.endswith("/") else root + "/"), None


@functools.lru_cache(maxsize=8)
def load_shard_set(root: str) -> ShardSet:
    """The shard set at data.root: a directory, its URL, or a brace pattern of shard URLs (manifest.json beside them)."""
    require_webdataset()
    base, selected = _base(root)
    where = base + MANIFEST
    if is_url(base):
        text = _fetch(where)
    else:
        try:
            text = Path(where).read_bytes()
        except OSError as exc:
            raise ToolkitError(f"data.root: {root}: no {MANIFEST} of a shard set there ({exc.strerror}); "
                               "write one with `toolkit shard SOURCE OUT`") from None
    try:
        manifest = json.loads(text)
        if manifest.get("format") != FORMAT:
            raise ValueError(f"format is {manifest.get('format')!r}, not {FORMAT!r}")
        shards = tuple(Shard(s["name"], base + s["name"], s["split"], tuple(s["keys"]), tuple(s["offsets"]),
                             s["bytes"], s["sha256"]) for s in manifest["shards"])
        classes, preprocessing = list(manifest["classes"]), dict(manifest["preprocessing"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ToolkitError(f"data.root: {where} is not a manifest of `toolkit shard` ({exc})") from None
    if selected is not None:
        known = {s.name for s in shards}
        if missing := [n for n in selected if n not in known]:
            raise ToolkitError(f"data.root: {root} names shards that {where} does not list: {', '.join(missing[:5])}")
        shards = tuple(s for s in shards if s.name in set(selected))
    for split in ("train", "val"):
        if not any(s.split == split and s.count for s in shards):
            raise ToolkitError(f"data.root: {root} selects no {split} samples (each split needs at least one shard)")
    return ShardSet(root, classes, preprocessing, shards)


def shard_defaults(root: str) -> dict:
    """The channels, image_size, mean and std a shard set's source has (data.* null resolves to them)."""
    own = load_shard_set(root).preprocessing
    return {k: own[k] for k in ("channels", "image_size", "mean", "std")}


def check_shards(shard_set: ShardSet) -> None:
    """Every shard present at the size the manifest says, before any training: a missing or truncated shard is
    named now, not when an epoch reaches it."""
    for shard in shard_set.shards:
        try:
            size = _remote_size(shard.url) if is_url(shard.url) else os.stat(shard.url).st_size
        except (OSError, urllib.error.URLError) as exc:
            raise ToolkitError(f"shard {shard.name} ({shard.url}) is missing: {exc}") from None
        if size != shard.size:
            raise ToolkitError(f"shard {shard.name} ({shard.url}) has {size} bytes, the manifest says {shard.size}: "
                               "truncated or rewritten; write the set again with `toolkit shard`")


def _remote_size(url: str) -> int:
    request = urllib.request.Request(url, method="HEAD")
    with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_S) as response:
        return int(response.headers["Content-Length"])


class _Range:
    """Bytes [start, end) of a stream (a local file, or an HTTP answer) read piece by piece; `skip` bytes of the
    stream come before them (a server that ignores Range sends the shard from its first byte)."""

    def __init__(self, stream, length: int, skip: int = 0):
        self.stream, self.left = stream, length
        while skip > 0:  # read and dropped, never kept
            dropped = len(stream.read(min(skip, 1 << 20)))
            if not dropped:
                break
            skip -= dropped

    def read(self, n: int = -1) -> bytes:
        n = self.left if n is None or n < 0 else min(n, self.left)
        data = self.stream.read(n) if n else b""
        self.left -= len(data)
        return data

    def close(self) -> None:
        self.stream.close()


def open_range(url: str, start: int, end: int):
    """Bytes [start, end) of a shard, as a stream read piece by piece: never the whole shard copied anywhere.
    Over HTTP one Range request; a server without ranges (python -m http.server) streams from the shard's
    start, and the bytes before `start` are read and dropped."""
    if not is_url(url):
        stream = open(url, "rb")
        stream.seek(start)
        return _Range(stream, end - start)
    request = urllib.request.Request(url, headers={"Range": f"bytes={start}-{end - 1}"})
    response = urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_S)
    return _Range(response, end - start, skip=0 if response.status == 206 else start)
