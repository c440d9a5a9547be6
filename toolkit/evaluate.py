"""`toolkit evaluate RUN_DIR [--data-root DIR]`: checkpoints/best on the run's validation set or on
an ImageFolder, printed as tables and written to RUN_DIR/eval/ (report.json and three pictures)."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

from toolkit import report as rep
from toolkit.checkpoint import load_best
from toolkit.data import FileImages, TensorImages
from toolkit.errors import ToolkitError
from toolkit.preprocess import READ_ERRORS, Preprocess, load_uint8, normalize, preprocess_from
from toolkit.rundir import Meta, RunDir

SHOWN = 20  # images in predictions.png and misclassified.png
DEFAULT_BATCH = 256


@dataclass
class EvalSet:
    """What to evaluate: either uint8 images in memory or image files, decoded at the model's size."""
    labels: torch.Tensor  # N, indices into the checkpoint's classes
    description: str
    images: torch.Tensor | None = None  # N x C x S x S uint8
    files: list[str] | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def fetch(self, index: torch.Tensor, pre: Preprocess, pool: ThreadPoolExecutor) -> torch.Tensor:
        """uint8 images at positions `index`."""
        if self.images is not None:
            return self.images[index]
        return torch.stack(list(pool.map(lambda i: decode(self.files[i], pre), index.tolist())))


def decode(path: str, pre: Preprocess) -> torch.Tensor:
    """An image file -> uint8 C x S x S, exactly as toolkit.preprocess.preprocess_image before normalising."""
    try:
        return load_uint8(path, pre)
    except READ_ERRORS as exc:  # PIL raises several types for unreadable files
        raise ToolkitError(f"{path}: cannot read this image: {exc}") from None


def run_validation_set(run_dir: Path, meta: Meta) -> tuple[EvalSet, int]:
    """The validation split the run was trained with, rebuilt from RUN_DIR/config.yaml."""
    from toolkit.data import build_data
    from toolkit.rundir import load_run_config

    cfg = load_run_config(run_dir)
    bundle = build_data(cfg.data)
    if bundle.classes != meta.classes:
        raise ToolkitError(f"{run_dir}: the data of config.yaml now has classes {bundle.classes}, the checkpoint "
                           f"was trained on {meta.classes}; evaluate on a folder with --data-root")
    val = bundle.val
    description = f"the validation set of {run_dir} ({cfg.data.name})"
    batch = cfg.data.eval_batch_size or 2 * cfg.data.batch_size  # as in training: the same arithmetic
    if isinstance(val, TensorImages) and val.resize is None:
        return EvalSet(val.labels.long(), description, images=val.images), batch
    if isinstance(val, TensorImages):  # resized batch by batch: take them at the model's size once
        return EvalSet(val.labels.long(), description, images=val[:][0]), batch
    if bundle.pipeline == "shards":  # read once, in the split's fixed order
        from toolkit.data.shard_loader import split_tensors

        images, labels = split_tensors(val)
        return EvalSet(labels, description, images=images), batch
    if not isinstance(val, FileImages):
        raise TypeError(f"unexpected validation dataset {type(val).__name__}")
    files, labels = zip(*val.samples) if len(val.samples) else ((), ())
    return EvalSet(torch.tensor(labels, dtype=torch.long), description, files=list(files)), batch


def folder_set(root: Path, classes: list[str]) -> EvalSet:
    """Class folders under root (or under root/val when root holds train/ and val/), named as the
    checkpoint's classes; a folder may hold only some of them."""
    from torchvision.datasets import ImageFolder

    from toolkit.preprocess import is_image_file

    root = Path(root)
    if (root / "train").is_dir() and (root / "val").is_dir():
        root = root / "val"
    if not root.is_dir():
        raise ToolkitError(f"--data-root: {root} is not a directory (expected one folder of images per class)")
    try:
        folder = ImageFolder(root, allow_empty=True, is_valid_file=is_image_file)  # the formats every stage reads
    except (FileNotFoundError, RuntimeError) as exc:
        raise ToolkitError(f"--data-root: {root}: {exc}") from None
    unknown = [c for c in folder.classes if c not in classes]
    if unknown:
        raise ToolkitError(f"--data-root: {root} has class folder(s) {', '.join(map(repr, unknown))} that the model "
                           f"does not know; its classes are: {', '.join(classes)}")
    if not folder.samples:
        raise ToolkitError(f"--data-root: {root} holds no image files in its class folders")
    to_model = [classes.index(c) for c in folder.classes]  # folder index -> checkpoint index
    labels = torch.tensor([to_model[label] for _, label in folder.samples], dtype=torch.long)
    return EvalSet(labels, f"{root} (image folders)", files=[path for path, _ in folder.samples])


@torch.inference_mode()
def predict_probs(model: torch.nn.Module, data: EvalSet, pre: Preprocess, batch_size: int,
                  pool: ThreadPoolExecutor) -> np.ndarray:
    """Softmax outputs N x K (float64) for every image, in order."""
    device = next(model.parameters()).device
    out = []
    for index in torch.arange(len(data)).split(batch_size):
        images = normalize(data.fetch(index, pre, pool).to(device), pre["mean"], pre["std"])
        out.append(torch.softmax(model(images).float(), dim=1).double().cpu())
    return torch.cat(out).numpy()


def evaluate_run(run_dir: str | Path, data_root: str | Path | None = None,
                 console: Console | None = None) -> dict:
    """Evaluate checkpoints/best, print the report, write RUN_DIR/eval/; returns the report dict."""
    run_dir = Path(run_dir)
    console = console or Console(soft_wrap=True)
    model, meta = load_best(run_dir, device="cuda" if torch.cuda.is_available() else "cpu")
    classes = meta.classes
    pre = preprocess_from(meta.preprocess)  # the version the model was trained with
    if data_root is None:
        data, batch_size = run_validation_set(run_dir, meta)
    else:
        data, batch_size = folder_set(Path(data_root), classes), DEFAULT_BATCH
    if len(data) == 0:
        raise ToolkitError(f"nothing to evaluate: {data.description} is empty")
    console.print(f"Evaluating {run_dir}/checkpoints/best ({meta.model.name}, epoch {'?' if meta.epoch is None else meta.epoch}) "
                  f"on {data.description}: {len(data)} images", highlight=False)

    with ThreadPoolExecutor(max_workers=4) as pool:  # PIL decoding and resizing release the GIL
        probs = predict_probs(model, data, pre, batch_size, pool)
        labels = data.labels.numpy()
        result = rep.compute_report(labels, probs, classes)
        result.update(source=data.description, checkpoint_epoch=meta.epoch, checkpoint_val_acc=meta.val_acc)
        rep.render_report(result, console)

        out = RunDir(run_dir).eval
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.json").write_text(json.dumps(result, indent=2))
        rep.plot_confusion_matrix(np.asarray(result["confusion_matrix"]), classes, out / "confusion_matrix.png")
        preds, confidence = probs.argmax(1), probs.max(1)
        # A fixed spread of images, not the first 20: folders are sorted by class.
        shown = np.sort(np.random.default_rng(0).permutation(len(data))[:SHOWN])
        mistakes = rep.most_confident_mistakes(labels, probs, SHOWN)
        for name, index, title in (
                ("predictions.png", shown, f"Predictions on {len(shown)} of the {len(data)} images"),
                ("misclassified.png", mistakes, f"Most confident mistakes ({len(mistakes)} shown, "
                                                f"{int((preds != labels).sum())} in all)")):
            images = data.fetch(torch.as_tensor(index, dtype=torch.long), pre, pool).numpy() if len(index) else \
                np.zeros((0, pre["channels"], pre["image_size"], pre["image_size"]), np.uint8)
            rep.plot_predictions(images, labels[index], preds[index], confidence[index], classes, out / name, title)
    console.print(f"wrote {out}/report.json, confusion_matrix.png, predictions.png, misclassified.png", highlight=False)
    return result
