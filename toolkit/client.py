"""HTTP client of a TorchServe inference API: send image files the way `curl -T` does."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

from toolkit.errors import ToolkitError

HOST = "127.0.0.1"


def request(url: str, token: str | None = None, body: bytes | None = None, method: str | None = None,
             timeout: float = 60) -> tuple[int, str]:
    """(HTTP status, body text); connection problems raise OSError (URLError is one)."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    if body is not None:  # else urllib says x-www-form-urlencoded, and TorchServe parses a form
        headers["Content-Type"] = "application/octet-stream"
    request = urllib.request.Request(url, data=body, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read().decode("utf-8", errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode("utf-8", errors="replace")


def parse_json(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return text


def send_bytes(url: str, body: bytes, token: str | None, timeout: float = 60) -> tuple[int, object]:
    """PUT raw bytes like `curl -T file` -> (HTTP status, parsed JSON or the text)."""
    try:
        status, text = request(url, token, body, method="PUT", timeout=timeout)
    except OSError as exc:
        raise ToolkitError(f"cannot reach {url}: {getattr(exc, 'reason', exc)} (is the server running?)") from None
    return status, parse_json(text)


def predict_url(url: str, image_paths: list[str | Path], token: str | None, timeout: float = 60) -> list[dict]:
    """Send each image file to a predictions URL; one parsed answer per file, in order."""
    answers = []
    for path in map(Path, image_paths):
        try:
            body = path.read_bytes()
        except OSError as exc:
            raise ToolkitError(f"{path}: cannot read: {exc.strerror}") from None
        status, answer = send_bytes(url, body, token, timeout)
        if status != 200:
            shown = answer if isinstance(answer, str) else json.dumps(answer)
            raise ToolkitError(f"{path}: {url} answered HTTP {status}: {shown}")
        answers.append(answer)
    return answers
