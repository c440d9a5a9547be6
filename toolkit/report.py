"""Evaluation reports: metrics from labels and softmax outputs, rich tables and PNG plots.

Pure functions of arrays, dicts and paths; they know nothing about models or training.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from rich import box
from rich.console import Console
from rich.table import Table
from sklearn.metrics import accuracy_score, classification_report, confusion_matrix
from sklearn.metrics import top_k_accuracy_score

# Figures are built with matplotlib.figure.Figure, never pyplot: pyplot keeps every figure alive
# until plt.close and needs a GUI backend choice, while a bare Figure renders PNG with Agg and is
# freed like any object (matplotlib's "embedding in a web server" recipe).
MAX_GRID_CLASSES = 20
GRID_SIZE = 20  # plot_predictions shows at most 4 rows x 5 columns


def compute_report(labels: np.ndarray, probs: np.ndarray, classes: list[str]) -> dict:
    """labels (N,) int and softmax probs (N, K) -> a JSON-serialisable dict of metrics."""
    labels, probs = np.asarray(labels).astype(int), np.asarray(probs, dtype=float)
    if probs.ndim != 2 or probs.shape != (len(labels), len(classes)) or len(labels) == 0:
        raise ValueError(f"expected labels (N,) and probs (N, {len(classes)}) with N > 0, "
                         f"got labels {labels.shape} and probs {probs.shape}")
    ids = list(range(len(classes)))
    preds = probs.argmax(axis=1)
    # Keys "0", "1", ... rather than target_names, so duplicate class names cannot collide.
    cr = classification_report(labels, preds, labels=ids, output_dict=True, zero_division=0)
    report = {"accuracy": float(accuracy_score(labels, preds))}
    if len(classes) > 5:
        report["top5_accuracy"] = float(top_k_accuracy_score(labels, probs, k=5, labels=ids))
    report["samples"] = len(labels)
    report["per_class"] = [
        {"name": name, "index": i, "support": int(cr[str(i)]["support"]),
         "accuracy": float(cr[str(i)]["recall"]), "precision": float(cr[str(i)]["precision"]),
         "recall": float(cr[str(i)]["recall"]), "f1": float(cr[str(i)]["f1-score"])}
        for i, name in enumerate(classes)
    ]
    for key, sk_key in (("macro_avg", "macro avg"), ("weighted_avg", "weighted avg")):
        report[key] = {m: float(cr[sk_key][s]) for m, s in
                       (("precision", "precision"), ("recall", "recall"), ("f1", "f1-score"))}
    report["confusion_matrix"] = confusion_matrix(labels, preds, labels=ids).tolist()
    report["classes"] = list(classes)
    return report


def _short(name: str, width: int) -> str:
    return name if len(name) <= width else name[: max(width - 1, 1)] + "…"


def top_confusions(cm: np.ndarray, classes: list[str], n: int = 10) -> list[tuple[str, str, int]]:
    """The n largest off-diagonal cells as (true name, predicted name, count), largest first."""
    off = np.array(cm, dtype=np.int64)
    np.fill_diagonal(off, 0)
    flat = np.argsort(-off, axis=None, kind="stable")[:n]
    pairs = [np.unravel_index(i, off.shape) for i in flat]
    return [(classes[t], classes[p], int(off[t, p])) for t, p in pairs if off[t, p] > 0]


def render_report(report: dict, console: Console) -> None:
    """Print accuracy, a per-class table and the confusion matrix (or its top confusions)."""
    line = f"[bold]Accuracy[/bold] {report['accuracy']:.2%} on {report['samples']} samples"
    if "top5_accuracy" in report:
        line += f"   [bold]Top-5[/bold] {report['top5_accuracy']:.2%}"
    console.print(line)

    table = Table(title="Per class", box=box.SIMPLE_HEAD)
    table.add_column("Class")
    for header in ("Support", "Accuracy", "Precision", "Recall", "F1"):
        table.add_column(header, justify="right")
    for row in report["per_class"]:
        accuracy = f"{row['accuracy']:.2%}" if row["support"] else "-"  # no samples: undefined
        table.add_row(row["name"], str(row["support"]), accuracy,
                      f"{row['precision']:.3f}", f"{row['recall']:.3f}", f"{row['f1']:.3f}")
    table.add_section()
    for key, label in (("macro_avg", "macro avg"), ("weighted_avg", "weighted avg")):
        avg = report[key]
        table.add_row(f"[italic]{label}[/italic]", str(report["samples"]), "",
                      f"{avg['precision']:.3f}", f"{avg['recall']:.3f}", f"{avg['f1']:.3f}")
    console.print(table)

    classes, cm = report["classes"], np.asarray(report["confusion_matrix"])
    k, digits = len(classes), len(str(cm.max()))
    if k > MAX_GRID_CLASSES or 16 + k * (digits + 1) > console.width:
        console.print(f"Confusion matrix: {k} classes are too many for a grid; "
                      "the most frequent confusions (true -> predicted):")
        support = dict(zip(classes, cm.sum(axis=1)))
        for true, pred, count in top_confusions(cm, classes):
            console.print(f"  {true} -> {pred}: {count} ({count / support[true]:.0%} of {true})")
        return
    # Counts are never truncated: names get what the columns of digits leave of the width.
    label_width = min(24, max(11, *map(len, classes)))
    width = max(digits, min(10, (console.width - label_width) // k - 1))
    headers = [_short(c, width) for c in classes]
    names = [_short(c, label_width) for c in classes]
    if len(set(headers)) < k:  # truncation made names ambiguous: number the classes instead
        headers = [str(i) for i in range(k)]
        room = console.width - 4 - k * (max(digits, len(headers[-1])) + 1)
        names = [f"{i:>2} {_short(c, max(room, 8))}" for i, c in enumerate(classes)]
    # Columns are separated by the box's one-space divider alone, so a column costs digits + 1.
    grid = Table(title="Confusion matrix", box=box.SIMPLE_HEAD, padding=0, show_edge=False)
    grid.add_column("true \\ pred", no_wrap=True)
    for header in headers:
        grid.add_column(header, justify="right", no_wrap=True)
    for t, name in enumerate(names):
        cells = [f"[green]{c}[/green]" if t == p else (f"[red]{c}[/red]" if c else "[dim]0[/dim]")
                 for p, c in enumerate(cm[t])]
        grid.add_row(name, *cells)
    console.print(grid)


def _save(fig: Figure, path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    fig.clear()


def plot_confusion_matrix(cm: np.ndarray, classes: list[str], path) -> None:
    """Two heat maps side by side: raw counts and rows normalised to sum to 1."""
    cm = np.asarray(cm, dtype=np.int64)
    k = len(classes)
    totals = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, totals, out=np.zeros(cm.shape), where=totals > 0)  # empty rows stay 0
    side = min(max(4.0, 0.45 * k + 2.0), 16.0)
    tick_size = min(9.0, 0.6 * side * 72 / k)  # points; the axes span a little less than side
    fig = Figure(figsize=(2 * side + 2, side), layout="constrained")
    axes = fig.subplots(1, 2)
    panels = ((cm, "Counts", "d", None),
              (norm, "Normalised by true class (recall on diagonal)", ".2f", 1.0))
    for ax, (values, title, fmt, vmax) in zip(axes, panels):
        im = ax.imshow(values, cmap="Blues", vmin=0, vmax=vmax, interpolation="nearest")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
        ax.set_title(title)
        ax.set_xlabel("Predicted")
        ax.set_ylabel("True")
        if tick_size >= 4:  # below that names are unreadable: keep matplotlib's index ticks
            names = [_short(c, 16) for c in classes]
            ax.set_xticks(range(k), names, fontsize=tick_size, rotation=45 if k <= 20 else 90,
                          ha="right", rotation_mode="anchor")
            ax.set_yticks(range(k), names, fontsize=tick_size)
        if k <= MAX_GRID_CLASSES:
            threshold = values.max() / 2 if values.max() > 0 else 1
            for (t, p), v in np.ndenumerate(values):
                ax.text(p, t, format(v, fmt), ha="center", va="center",
                        fontsize=10 if k <= 8 else 7,
                        color="white" if v > threshold else "black")
    _save(fig, path)


def plot_predictions(images: np.ndarray, labels, preds, confidences, classes, path,
                     title: str = "Predictions") -> None:
    """A grid of up to 20 uint8 (N, C, H, W) images titled "pred (conf%) / true: name"."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images (N, C, H, W) with C 1 or 3, got {images.shape}")
    n = min(len(images), GRID_SIZE)
    cols = max(min(n, 5), 1)
    rows = max(-(-n // cols), 1)
    fig = Figure(figsize=(2.4 * cols, 2.7 * rows + 0.4), layout="constrained")
    fig.suptitle(title)
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    for i, ax in enumerate(axes):
        ax.axis("off")
        if i >= n:
            continue
        if images.shape[1] == 1:
            ax.imshow(images[i, 0], cmap="gray", vmin=0, vmax=255)
        else:
            ax.imshow(images[i].transpose(1, 2, 0))
        label, pred = int(labels[i]), int(preds[i])
        ax.set_title(f"{_short(classes[pred], 16)} ({float(confidences[i]):.0%})\n"
                     f"true: {_short(classes[label], 16)}", fontsize=9,
                     color="green" if pred == label else "red")
    if n == 0:
        axes[0].text(0.5, 0.5, "no images", ha="center", va="center")
    _save(fig, path)


def most_confident_mistakes(labels, probs, n: int = 20) -> np.ndarray:
    """Indices of wrong predictions, the most confident first (at most n)."""
    probs = np.asarray(probs)
    preds, confidence = probs.argmax(axis=1), probs.max(axis=1)
    wrong = np.flatnonzero(preds != np.asarray(labels))
    return wrong[np.argsort(-confidence[wrong], kind="stable")][:n]


def plot_curves(metrics: list[dict], path) -> None:
    """plots/curves.png: curves_figure saved."""
    _save(curves_figure(metrics), path)


def curves_figure(metrics: list[dict]) -> Figure:
    """Loss and accuracy (%) per epoch, train and val: the best val-accuracy epoch a dashed line on both
    panels, a star at the highest val accuracy and another at the lowest val loss, each labelled."""
    if not metrics:
        raise ValueError("plot_curves needs at least one epoch of metrics")
    epochs = [m["epoch"] for m in metrics]
    best = max(range(len(metrics)), key=lambda i: metrics[i]["val_acc"])  # first on ties
    lowest = min(range(len(metrics)), key=lambda i: metrics[i]["val_loss"])
    fig = Figure(figsize=(11, 4), layout="constrained")
    loss_ax, acc_ax = fig.subplots(1, 2)
    panels = ((loss_ax, "loss", 1, "Loss", lowest, "lowest val loss {:.4f}"),
              (acc_ax, "acc", 100, "Accuracy (%)", best, "best val acc {:.2f}%"))
    for ax, key, scale, ylabel, star, star_label in panels:
        for split, colour in (("train", "tab:blue"), ("val", "tab:orange")):
            values = [m[f"{split}_{key}"] * scale for m in metrics]
            ax.plot(epochs, values, marker="o", markersize=4, color=colour, label=split)
        ax.axvline(epochs[best], color="gray", linestyle="--", linewidth=1,
                   label=f"best val acc {metrics[best]['val_acc']:.2%} (epoch {epochs[best]})")
        value = metrics[star][f"val_{key}"] * scale
        ax.plot(epochs[star], value, marker="*", markersize=14, color="tab:orange", linestyle="none",
                label=f"{star_label.format(value)} (epoch {epochs[star]})")
        ax.set_xlabel("Epoch")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{ylabel} per epoch")
        if len(epochs) <= 12:  # one tick per epoch; a lone epoch would get fractional ticks
            ax.set_xticks(epochs)
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend()
    return fig


def load_metrics(path) -> list[dict]:
    """Read metrics.jsonl: one JSON object per line, blank lines skipped."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: not valid JSON ({err.msg})") from None
    return rows
