"""`toolkit predict`: top-k classes of image files, computed locally from checkpoints/best (--run) or
from an exported file of any format (--export, as the server would run it) with the server's exact
preprocessing (toolkit/preprocess.py), or asked of a running server (--url)."""

from __future__ import annotations

import json
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
        from PIL import UnidentifiedImageError

        from toolkit.preprocess import FORMAT_NAMES

        if isinstance(exc, UnidentifiedImageError):  # the server's 415: one list of formats everywhere
            raise ToolkitError(f"{path}: cannot read this image: not an image in a format the toolkit reads "
                               f"({FORMAT_NAMES})") from None
        raise ToolkitError(f"{path}: cannot read this image: {exc}") from None


def predict_files(run_dir: str | Path, paths: list[str | Path], topk: int = 5,
                  batch_size: int = 64) -> list[dict[str, float]]:
    """{class name: probability} for the top-k classes of each file, highest first (as the server answers)."""
    from toolkit.checkpoint import load_best
    from toolkit.preprocess import preprocess_from

    if topk < 1:
        raise ToolkitError(f"--topk: {topk} must be at least 1")
    model, meta = load_best(Path(run_dir))
    # the preprocessing version the model was trained with
    return classify(model, meta.classes, preprocess_from(meta.preprocess), paths, topk, batch_size)


def predict_export(export_dir: str | Path, paths: list[str | Path], topk: int = 5,
                   batch_size: int = 64) -> list[dict[str, float]]:
    """As predict_files, from an export directory's model file (TorchScript, ONNX or AOTInductor), its
    index_to_name.json and preprocess.json: what the server would answer, without a server."""
    from toolkit.export import FORMATS, INDEX_FILE, PREPROCESS_FILE, format_of_file, model_file
    from toolkit.preprocess import preprocess_from

    if topk < 1:
        raise ToolkitError(f"--topk: {topk} must be at least 1")
    export_dir = Path(export_dir)
    path = model_file(export_dir) if export_dir.is_dir() else None
    if path is None or not all((export_dir / f).is_file() for f in (INDEX_FILE, PREPROCESS_FILE)):
        raise ToolkitError(f"--export: {export_dir} is not an export directory (toolkit export RUN writes RUN/export: "
                           f"a model file, {INDEX_FILE} and {PREPROCESS_FILE})")
    fmt = FORMATS[format_of_file(path)]
    try:
        model = fmt.load(path)  # a compiled .pt2 needs no compiler to load; a .onnx needs onnxruntime
    except ImportError as exc:
        raise ToolkitError(f"--export: {path} needs the Python package {exc.name}: pip install 'toolkit[onnx]'") from None
    names = json.loads((export_dir / INDEX_FILE).read_text())
    classes = [names[str(i)] for i in range(len(names))]
    pre = preprocess_from(json.loads((export_dir / PREPROCESS_FILE).read_text()))
    return classify(model, classes, pre, paths, topk, batch_size)


def classify(model, classes: list[str], pre, paths: list[str | Path], topk: int,
             batch_size: int) -> list[dict[str, float]]:
    """The files through `model` (any callable images -> logits) in batches -> top-k answers."""
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


def display_names(paths: list[Path]) -> list[str]:
    """The shortest ends of the paths that tell the files apart: their names when those differ, else
    as many parent folders as it takes (cat/1.jpg, dog/1.jpg)."""
    depth, longest = 1, max((len(p.parts) for p in paths), default=1)
    while depth < longest:
        names = [str(Path(*p.parts[-depth:])) for p in paths]
        if len(set(names)) == len(set(map(str, paths))):
            return names
        depth += 1
    return [str(p) for p in paths]


def render_predictions(paths: list[Path], answers: list[dict[str, float]], console: Console) -> None:
    """One table: a row per image, a column per rank ("class  probability"). The image column is
    never cut: the rank columns wrap instead."""
    ranks = max((len(a) for a in answers), default=0)
    names = display_names(paths)
    table = Table(box=box.SIMPLE_HEAD)
    table.add_column("image", no_wrap=True, min_width=max(map(len, names), default=5))
    for rank in range(1, ranks + 1):
        table.add_column(f"top-{rank}", style="bold" if rank == 1 else None)
    for name, answer in zip(names, answers):
        table.add_row(name, *[f"{cls}  {prob:.2%}" for cls, prob in answer.items()])
    console.print(table)


def answers_json(paths: list[Path], answers: list[dict[str, float]]) -> str:
    """--json: one object per image, its path as given and its classes highest first."""
    return json.dumps([{"image": str(path), "top": [{"class": cls, "probability": prob} for cls, prob in answer.items()]}
                       for path, answer in zip(paths, answers)], indent=2)


def predict_command(args) -> None:
    """The CLI: --run RUN_DIR or --export DIR (local) or --url URL [--token T]; --topk; --json; image files."""
    paths = [Path(p) for p in args.images]
    if args.run is not None:
        answers = predict_files(args.run, paths, args.topk)
    elif getattr(args, "export", None) is not None:
        answers = predict_export(args.export, paths, args.topk)
    else:
        answers = predict_remote(args.url, paths, args.token, args.topk)
    if getattr(args, "json", False):
        print(answers_json(paths, answers))
    else:
        render_predictions(paths, answers, Console(soft_wrap=True))
