import json

import matplotlib.pyplot as plt
import numpy as np
import pytest
from PIL import Image
from rich.console import Console

from toolkit.report import (
    compute_report,
    load_metrics,
    most_confident_mistakes,
    plot_confusion_matrix,
    plot_curves,
    plot_predictions,
    render_report,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def probs_for(preds, k, confidence=0.8):
    """Softmax-like rows whose argmax is preds."""
    probs = np.full((len(preds), k), (1 - confidence) / (k - 1))
    probs[np.arange(len(preds)), preds] = confidence
    return probs


def assert_png(path, min_width=400, min_height=200):
    assert path.read_bytes()[:8] == PNG_MAGIC
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        assert img.width >= min_width and img.height >= min_height, img.size
        return img.size


# labels/preds chosen so that the confusion matrix is [[3, 1, 0], [1, 2, 0], [0, 1, 2]]
# plus a fourth class "fish" that never occurs and is never predicted.
LABELS = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2, 2])
PREDS = np.array([0, 0, 0, 1, 1, 1, 0, 2, 2, 1])
CLASSES = ["cat", "dog", "bird", "fish"]


def test_compute_report_hand_made_case():
    report = compute_report(LABELS, probs_for(PREDS, 4), CLASSES)
    assert report["confusion_matrix"] == [[3, 1, 0, 0], [1, 2, 0, 0], [0, 1, 2, 0], [0, 0, 0, 0]]
    assert report["accuracy"] == pytest.approx(0.7)
    assert report["samples"] == 10
    assert report["classes"] == CLASSES
    assert "top5_accuracy" not in report
    cat, dog, bird, fish = report["per_class"]
    assert (cat["name"], cat["index"], cat["support"]) == ("cat", 0, 4)
    assert cat["precision"] == pytest.approx(3 / 4) and cat["recall"] == pytest.approx(3 / 4)
    assert dog["precision"] == pytest.approx(2 / 4) and dog["recall"] == pytest.approx(2 / 3)
    assert dog["f1"] == pytest.approx(2 * 0.5 * (2 / 3) / (0.5 + 2 / 3))
    assert bird["precision"] == pytest.approx(1.0) and bird["recall"] == pytest.approx(2 / 3)
    assert bird["accuracy"] == bird["recall"]
    assert fish == {"name": "fish", "index": 3, "support": 0, "accuracy": 0.0,
                    "precision": 0.0, "recall": 0.0, "f1": 0.0}
    # macro averages over all four classes, the empty one counting as 0
    assert report["macro_avg"]["precision"] == pytest.approx((0.75 + 0.5 + 1.0) / 4)
    assert report["weighted_avg"]["recall"] == pytest.approx(0.7)


def test_report_is_json_serialisable():
    report = compute_report(LABELS, probs_for(PREDS, 7), [f"c{i}" for i in range(7)])
    assert json.loads(json.dumps(report)) == report


@pytest.mark.parametrize(("k", "has_top5"), [(3, False), (5, False), (6, True), (10, True)])
def test_top5_only_with_more_than_five_classes(k, has_top5):
    labels = np.arange(20) % k
    report = compute_report(labels, probs_for(labels, k), [str(i) for i in range(k)])
    assert ("top5_accuracy" in report) == has_top5


def test_top5_accuracy_crafted():
    # Each row ranks class 0 first, then 1, 2, ... 6; the true label sits at ranks 1, 3, 5 and 6.
    ranking = np.array([0.40, 0.20, 0.15, 0.10, 0.07, 0.05, 0.03])
    probs = np.tile(ranking, (4, 1))
    labels = np.array([0, 2, 4, 5])
    report = compute_report(labels, probs, [f"c{i}" for i in range(7)])
    assert report["accuracy"] == pytest.approx(0.25)
    assert report["top5_accuracy"] == pytest.approx(0.75)


def test_compute_report_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"probs \(N, 3\)"):
        compute_report(LABELS, probs_for(PREDS, 4), CLASSES[:3])


def test_most_confident_mistakes_order():
    labels = np.array([0, 1, 0, 1, 0])
    probs = np.array([[0.9, 0.1], [0.7, 0.3], [0.2, 0.8], [0.95, 0.05], [0.6, 0.4]])
    # wrong: index 1 (conf 0.7), 2 (0.8), 3 (0.95); index 0 and 4 are right
    assert most_confident_mistakes(labels, probs).tolist() == [3, 2, 1]
    assert most_confident_mistakes(labels, probs, n=2).tolist() == [3, 2]
    assert most_confident_mistakes(np.array([0, 0]), probs[:1].repeat(2, 0)).tolist() == []


def test_render_report_small():
    console = Console(record=True, width=120)
    render_report(compute_report(LABELS, probs_for(PREDS, 4), CLASSES), console)
    text = console.export_text()
    for expected in ("70.00%", "10 samples", "cat", "dog", "bird", "fish", "macro avg",
                     "weighted avg", "Confusion matrix"):
        assert expected in text
    assert "Top-5" not in text
    rows = [line.split() for line in text.splitlines()]
    assert ["fish", "0", "-", "0.000", "0.000", "0.000"] in rows  # no samples: no accuracy


def test_render_report_twenty_long_names_fit_without_truncating_counts():
    k = 20
    labels = np.arange(2000) % k
    preds = np.where(np.arange(2000) // k % 4 == 0, (labels + 1) % k, labels)  # 25% wrong
    classes = [f"very_long_class_{i}" for i in range(k)]
    console = Console(record=True, width=120)
    render_report(compute_report(labels, probs_for(preds, k), classes), console)
    lines = console.export_text().splitlines()
    # Truncated names would all read "very…": the columns are numbered instead, rows keep names.
    header = next(line for line in lines if line.startswith("true \\ pred"))
    assert header.split()[3:] == [str(i) for i in range(k)]
    row = next(line for line in lines if line.startswith("19 very_long_class_19"))
    assert row.split()[2:] == ["25"] + ["0"] * 18 + ["75"]
    assert all(len(line) <= 120 for line in lines)


def test_render_report_many_classes_lists_top_confusions():
    k = 30
    labels = np.arange(300) % k
    preds = labels.copy()
    preds[:7] = (labels[:7] + 1) % k  # 7 single confusions, class i -> i+1
    preds[labels == 12] = 13  # all of class 12 goes to 13: the largest confusion
    classes = [f"a_rather_long_class_name_{i}" for i in range(k)]
    console = Console(record=True, width=120)
    render_report(compute_report(labels, probs_for(preds, k), classes), console)
    text = console.export_text()
    assert "Top-5" in text and "30 classes" in text
    assert "a_rather_long_class_name_12 -> a_rather_long_class_name_13: 10" in text
    assert "true \\ pred" not in text  # no grid


@pytest.mark.parametrize("k", [3, 10, 100])
def test_plot_confusion_matrix(tmp_path, k):
    rng = np.random.default_rng(k)
    cm = rng.integers(0, 50, size=(k, k)) + np.diag(np.full(k, 200))
    cm[0] = 0  # a class without samples must not produce NaNs or warnings
    path = tmp_path / "new_dir" / "confusion_matrix.png"
    plot_confusion_matrix(cm, [f"class_{i}" for i in range(k)], path)
    width, height = assert_png(path)
    assert width > height  # two heat maps side by side


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("n", [3, 25])
def test_plot_predictions(tmp_path, channels, n):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(n, channels, 28, 28), dtype=np.uint8)
    labels = np.arange(n) % 3
    preds = np.where(np.arange(n) % 2 == 0, labels, (labels + 1) % 3)
    path = tmp_path / "out" / "predictions.png"
    plot_predictions(images, labels, preds, rng.uniform(0.3, 1, n), ["cat", "dog", "bird"], path,
                     title="Validation predictions")
    assert_png(path, min_height=150 if n == 3 else 400)


def test_plot_predictions_of_mistakes(tmp_path):
    probs = probs_for(PREDS, 4)
    idx = most_confident_mistakes(LABELS, probs)
    images = np.zeros((10, 3, 32, 32), dtype=np.uint8)
    plot_predictions(images[idx], LABELS[idx], PREDS[idx], probs.max(1)[idx], CLASSES,
                     tmp_path / "misclassified.png", title="Most confident mistakes")
    assert_png(tmp_path / "misclassified.png", min_width=200, min_height=150)


def test_plot_predictions_rejects_channels_last(tmp_path):
    with pytest.raises(ValueError, match="C 1 or 3"):
        plot_predictions(np.zeros((2, 28, 28, 3), np.uint8), [0, 0], [0, 0], [1, 1], ["a"],
                         tmp_path / "x.png")


def write_metrics(path, epochs):
    lines = []
    for e in range(1, epochs + 1):
        row = {"epoch": e, "train_loss": 2 / e, "train_acc": 1 - 0.5 / e,
               "val_loss": 2.2 / e + 0.05 * e, "val_acc": 0.6 + 0.05 * min(e, 3)}
        lines.append(json.dumps(row))
        lines.append("")  # blank lines are skipped
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("epochs", [1, 5])
def test_load_metrics_and_plot_curves(tmp_path, epochs):
    write_metrics(tmp_path / "metrics.jsonl", epochs)
    metrics = load_metrics(tmp_path / "metrics.jsonl")
    assert [m["epoch"] for m in metrics] == list(range(1, epochs + 1))
    plot_curves(metrics, tmp_path / "plots" / "curves.png")
    assert_png(tmp_path / "plots" / "curves.png")


def test_load_metrics_reports_bad_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"epoch": 1}\n{"epoch": 2, "trunc\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not valid JSON"):
        load_metrics(path)


def test_no_figures_left_open(tmp_path):
    before = plt.get_fignums()
    for i in range(5):
        plot_confusion_matrix(np.eye(3, dtype=int), ["a", "b", "c"], tmp_path / f"cm{i}.png")
        plot_curves([{"epoch": 1, "train_loss": 1, "train_acc": 0.5, "val_loss": 1,
                      "val_acc": 0.5}], tmp_path / f"c{i}.png")
    assert plt.get_fignums() == before
