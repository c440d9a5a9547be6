"""`toolkit predict`: top-k classes of image files, computed locally from checkpoints/best with the
server's exact preprocessing (toolkit/preprocess.py), or asked of a running server (--url)."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

import torch
from rich import box
from rich.console import Console
from rich.table import Table

from toolkit.errors import ToolkitError


def load_tensor(path: Path, pre) -> torch.Tensor:
    """One image file -> the model's input C x S x S; a file that is not an image is the user's error."""
    from toolkit.preprocess import READ_ERRORS, preprocess_image

    try:
        return preprocess_image(str(path), pre)
    except FileNotFoundError:
        raise ToolkitError(f"{path}: no such file") from None
    except READ_ERRORS as exc:  # PIL: unidentified, truncated or corrupt
        raise ToolkitError(f"{path}: cannot read this image: {exc}") from None


def predict_files(run_dir: str | Path, paths: list[str | Path], topk: int = 5,
                  batch_size: int = 64) -> list[dict[str, float]]:
    """{class name: probability} for the top-k classes of each file, highest first (as the server answers)."""
    from toolkit.checkpoint import load_best

    if topk < 1:
        raise ToolkitError(f"--topk: {topk} must be at least 1")
    model, meta = load_best(Path(run_dir))
    from toolkit.preprocess import preprocess_from

    classes, pre = meta.classes, preprocess_from(meta.preprocess)  # the version the model was trained with
    k = min(topk, len(classes))
    answers = []
    paths = [Path(p) for p in paths]
    for start in range(0, len(paths), batch_size):
        batch = torch.stack([load_tensor(p, pre) for p in paths[start:start + batch_size]])
        with torch.inference_mode():
            probs = torch.softmax(model(batch).float(), dim=1)
        values, indices = probs.topk(k, dim=1)  # sorted, highest first
        answers += [{classes[i]: p for p, i in zip(row_p, row_i)}
                    for row_p, row_i in zip(values.tolist(), indices.tolist())]
    return answers


def _url_port(url: str) -> int:
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ToolkitError(f"--url: {url!r} is not an http(s) URL, e.g. http://127.0.0.1:8080/predictions/digits")
    try:
        return parsed.port or (443 if parsed.scheme == "https" else 80)
    except ValueError:
        raise ToolkitError(f"--url: {url!r} has a bad port") from None


def predict_remote(url: str, paths: list[Path], token: str | None, topk: int) -> list[dict[str, float]]:
    """Each file sent to a TorchServe predictions URL; its answers cut to top-k."""
    from toolkit import client, server

    if topk < 1:
        raise ToolkitError(f"--topk: {topk} must be at least 1")
    port = _url_port(url)
    from_key_file = token is None
    if from_key_file:
        try:
            token = server.read_token(port)
        except ToolkitError:
            token = None  # a server started elsewhere, perhaps without token auth: try without
    try:
        answers = client.predict_url(url, list(paths), token)
    except ToolkitError as exc:
        if from_key_file and token is None and "answered HTTP" in str(exc):  # reached, but refused
            raise ToolkitError(f"{exc}\n(no --token given and no local server's key file for port {port}: "
                               "pass the inference key with --token)") from None
        raise
    cut = []
    for path, answer in zip(paths, answers):
        if not isinstance(answer, dict) or not all(isinstance(v, (int, float)) for v in answer.values()):
            raise ToolkitError(f"{path}: {url} answered {answer!r}, not {{class: probability}}")
        ranked = sorted(answer.items(), key=lambda item: -item[1])[:topk]
        cut.append({name: float(p) for name, p in ranked})
    return cut


def render_predictions(paths: list[Path], answers: list[dict[str, float]], console: Console) -> None:
    """One table: a row per image, a column per rank ("class  probability")."""
    ranks = max((len(a) for a in answers), default=0)
    table = Table(box=box.SIMPLE_HEAD)
    table.add_column("image")
    for rank in range(1, ranks + 1):
        table.add_column(f"top-{rank}", style="bold" if rank == 1 else None)
    for path, answer in zip(paths, answers):
        table.add_row(str(path), *[f"{name}  {prob:.2%}" for name, prob in answer.items()])
    console.print(table)


def predict_command(args) -> None:
    """The CLI: --run RUN_DIR (local) or --url URL [--token T]; --topk; image files."""
    paths = [Path(p) for p in args.images]
    if args.run is not None:
        answers = predict_files(args.run, paths, args.topk)
    else:
        answers = predict_remote(args.url, paths, args.token, args.topk)
    render_predictions(paths, answers, Console(soft_wrap=True))
