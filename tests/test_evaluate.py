"""`toolkit evaluate` and `toolkit predict` on a real digits run (scikit-learn's 8x8 digits, no
download): the report agrees with training, the pictures are real PNGs, and local prediction gives
what the served handler gives for the same files."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from rich.console import Console

from conftest import ROOT, run_main, train_run
from toolkit.errors import ToolkitError
from toolkit.evaluate import evaluate_run
from toolkit.predict import predict_files

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """configs/digits.yaml, shortened to 3 epochs (about 10 s): good, not perfect, so it makes mistakes."""
    run_dir, summary = train_run(tmp_path_factory.mktemp("evaluate"), "train.epochs=3", config="digits.yaml",
                                 name="digits")
    assert summary["status"] == "complete"
    return run_dir, summary


def quiet() -> Console:
    return Console(file=open("/dev/null", "w"), width=120)


def png_size(path: Path) -> tuple[int, int]:
    assert path.read_bytes()[:8] == PNG_MAGIC, path
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        return img.size


def validation_images(run_dir: Path):
    """The run's validation split, as uint8 N x 1 x S x S and labels, rebuilt from its config."""
    from toolkit.data import build_data
    from toolkit.rundir import load_run_config

    bundle = build_data(load_run_config(run_dir).data)
    return bundle.val.images, bundle.val.labels, bundle.classes


def write_folder(root: Path, images: torch.Tensor, labels: torch.Tensor, classes: list[str], keep=None) -> Path:
    """An ImageFolder of PNG files: root/<class name>/<i>.png."""
    for i, (image, label) in enumerate(zip(images, labels.tolist())):
        if keep is not None and label not in keep:
            continue
        folder = root / classes[label]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image[0].numpy(), mode="L").save(folder / f"{i:04d}.png")
    return root


# ------------------------------------------------------------------------- evaluate


def test_report_matches_training_and_pictures_are_written(digits_run):
    run_dir, summary = digits_run
    result = evaluate_run(run_dir, console=quiet())
    saved = json.loads((run_dir / "eval" / "report.json").read_text())
    assert saved == result
    # The same weights on the same validation set: exactly the accuracy training measured.
    assert saved["samples"] == summary["val_samples"] == 359  # 20% of 1,797
    assert saved["accuracy"] == pytest.approx(summary["best_val_acc"], abs=1e-12)
    assert saved["checkpoint_epoch"] == summary["best_epoch"]
    assert 0.8 < saved["accuracy"] < 1.0, "3 epochs: well above chance (10%), with some mistakes to show"
    assert 0 < saved["top5_accuracy"] <= 1 and saved["top5_accuracy"] >= saved["accuracy"]
    cm = np.array(saved["confusion_matrix"])
    assert cm.shape == (10, 10) and cm.sum() == 359
    assert np.trace(cm) == round(saved["accuracy"] * 359)
    assert [row["name"] for row in saved["per_class"]] == [str(d) for d in range(10)]
    assert [row["support"] for row in saved["per_class"]] == cm.sum(axis=1).tolist()

    width, height = png_size(run_dir / "eval" / "confusion_matrix.png")
    assert width >= 800 and height >= 350 and width > height  # two square panels side by side
    width, height = png_size(run_dir / "eval" / "predictions.png")
    assert width >= 1000 and height >= 900  # 4 rows x 5 columns
    width, height = png_size(run_dir / "eval" / "misclassified.png")
    mistakes = 359 - np.trace(cm)
    assert width >= 200 * min(mistakes, 5) and height >= 250 * -(-min(mistakes, 20) // 5)


def test_cli_prints_every_table(digits_run, tmp_path, capsys, monkeypatch):
    run_dir, summary = digits_run
    copy = tmp_path / "digits"  # its own copy: no report of another test can be taken for this one's
    shutil.copytree(run_dir, copy, symlinks=True, ignore=shutil.ignore_patterns("eval"))
    monkeypatch.setenv("COLUMNS", "120")
    code, out, err = run_main(capsys, "evaluate", str(copy))
    assert code == 0, err
    for text in ("Accuracy", "Top-5", "Per class", "Precision", "Recall", "F1", "macro avg",
                 "Confusion matrix", "true \\ pred", f"Accuracy {summary['best_val_acc']:.2%} on 359 samples"):
        assert text in out, text
    report = json.loads((copy / "eval" / "report.json").read_text())
    assert report["accuracy"] == summary["best_val_acc"] and report["samples"] == 359
    for row in report["per_class"]:  # each class's line of the table, with its own figures
        assert re.search(rf"^\s*{re.escape(row['name'])}\s+{row['support']}\s+{row['accuracy']:.2%}", out, re.M), row


def test_folder_of_the_same_images_gives_the_same_report(digits_run, tmp_path):
    run_dir, _ = digits_run
    images, labels, classes = validation_images(run_dir)
    expected = evaluate_run(run_dir, console=quiet())
    # PNG files at the model's size: decoding them gives back the same pixels, hence the same answers.
    folder = write_folder(tmp_path / "all", images, labels, classes)
    got = evaluate_run(run_dir, data_root=folder, console=quiet())
    assert got["confusion_matrix"] == expected["confusion_matrix"]
    assert got["accuracy"] == expected["accuracy"] and got["samples"] == 359
    assert got["source"].startswith(str(folder))
    assert json.loads((run_dir / "eval" / "report.json").read_text())["source"] == got["source"]

    # A folder with only some of the classes: labels follow the names, not folder positions.
    subset = write_folder(tmp_path / "some", images, labels, classes, keep={7, 8, 9})
    part = evaluate_run(run_dir, data_root=subset, console=quiet())
    cm = np.array(expected["confusion_matrix"])
    assert np.array(part["confusion_matrix"])[7:].tolist() == cm[7:].tolist()
    assert part["samples"] == cm[7:].sum()


def test_folder_problems_are_clear_user_errors(digits_run, tmp_path, capsys):
    run_dir, _ = digits_run
    images, labels, classes = validation_images(run_dir)
    folder = write_folder(tmp_path / "digits", images[:30], labels[:30], classes)
    (folder / "cat").mkdir()
    Image.new("L", (8, 8)).save(folder / "cat" / "x.png")
    with pytest.raises(ToolkitError, match=r"class folder\(s\) 'cat' that the model does not know; its classes are: 0, 1"):
        evaluate_run(run_dir, data_root=folder, console=quiet())

    (folder / "cat" / "x.png").unlink()
    (folder / "cat").rmdir()
    broken = folder / classes[int(labels[0])] / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(ToolkitError, match=r"broken\.png: cannot read this image"):
        evaluate_run(run_dir, data_root=folder, console=quiet())

    code, _, err = run_main(capsys, "evaluate", str(run_dir), "--data-root", str(tmp_path / "missing"))
    assert code == 2 and err.count("is not a directory") == 1
    with pytest.raises(ToolkitError, match="no checkpoint found"):
        evaluate_run(tmp_path, console=quiet())


# ------------------------------------------------------------------------- predict


def served_handler(model_dir: Path):
    """serve/handler.py in this process, initialised by TorchServe's own Context (as tests/test_handler.py)."""
    from ts.context import Context, RequestProcessor

    spec = importlib.util.spec_from_file_location("served_handler", ROOT / "serve" / "handler.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def context(batch: int):
        ctx = Context("digits", str(model_dir), {"model": {"modelName": "digits"}}, batch, None, "0.12.0")
        ctx.request_processor = [RequestProcessor({}) for _ in range(batch)]
        return ctx

    handler = module.ImageClassifierHandler()
    handler.initialize(context(1))
    return lambda rows: handler.handle(rows, context(len(rows)))


def image_files(run_dir: Path, folder: Path) -> list[Path]:
    """Held-out digits as a user would have them: other sizes, modes and formats than the model's."""
    images, labels, _ = validation_images(run_dir)
    folder.mkdir()
    paths = []
    for i in range(12):
        img = Image.fromarray(images[i, 0].numpy(), mode="L")
        kind = i % 4
        if kind == 1:
            img = img.resize((37, 41), Image.BILINEAR).convert("RGB")  # another size, colour
        elif kind == 2:
            img = img.convert("RGBA")
            img.putalpha(255)
        elif kind == 3:
            img = img.resize((64, 64), Image.NEAREST)
        path = folder / f"{i:02d}-{labels[i].item()}.{'jpg' if kind == 3 else 'png'}"
        img.save(path)
        paths.append(path)
    return paths


def test_predict_and_served_handler_agree(digits_run, tmp_path, capsys, monkeypatch):
    from toolkit.export import export_torchscript

    run_dir, _ = digits_run
    paths = image_files(run_dir, tmp_path / "images")
    local = predict_files(run_dir, paths, topk=5)
    served = served_handler(export_torchscript(run_dir))([{"body": bytearray(p.read_bytes())} for p in paths])
    assert len(local) == len(served) == len(paths)
    for path, mine, theirs in zip(paths, local, served):
        assert "error" not in theirs, (path, theirs)
        assert list(mine)[0] == list(theirs)[0], path  # same top-1 class
        assert list(mine) == list(theirs) or np.allclose(sorted(mine.values()), sorted(theirs.values()), atol=1e-5)
        for name in set(mine) & set(theirs):
            assert mine[name] == pytest.approx(theirs[name], abs=1e-5)
    # the model is good: most held-out digits are recognised (file names end in the true label)
    right = sum(list(answer)[0] == p.stem.split("-")[1] for p, answer in zip(paths, local))
    assert right >= 9

    monkeypatch.setenv("COLUMNS", "200")
    code, out, err = run_main(capsys, "predict", "--run", str(run_dir), "--topk", "3", *map(str, paths[:2]))
    assert code == 0, err
    for path, answer in zip(paths[:2], local):
        row = next(line for line in out.splitlines() if path.name in line)
        ranked = list(answer.items())[:3]
        assert re.findall(r"(\S+)  ([\d.]+)%", row) == [(name, f"{prob * 100:.2f}") for name, prob in ranked], row


def test_predict_topk_and_bad_files(digits_run, tmp_path, capsys):
    run_dir, _ = digits_run
    paths = image_files(run_dir, tmp_path / "images")[:2]
    answers = predict_files(run_dir, paths, topk=50)
    assert all(len(a) == 10 for a in answers)  # never more than the model has
    assert all(list(a.values()) == sorted(a.values(), reverse=True) for a in answers)
    assert all(sum(a.values()) == pytest.approx(1.0, abs=1e-5) for a in answers)
    assert len(predict_files(run_dir, paths, topk=1)[0]) == 1
    with pytest.raises(ToolkitError, match="--topk: 0 must be at least 1"):
        predict_files(run_dir, paths, topk=0)

    junk = tmp_path / "notes.png"
    junk.write_text("not an image")
    with pytest.raises(ToolkitError, match=r"notes\.png: cannot read this image"):
        predict_files(run_dir, [paths[0], junk], topk=3)
    code, _, err = run_main(capsys, "predict", "--run", str(run_dir), str(tmp_path / "missing.png"))
    assert code == 2 and err.count("missing.png: no such file") == 1


