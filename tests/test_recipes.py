"""The tutorials' recipes (configs/*.yaml): each says what the tutorial did, and trains one short
epoch on synthetic data of its shape (MNIST, CIFAR-10 and ImageNet weights cannot be downloaded
here). imagefolder.yaml trains on a generated folder of real JPEG and PNG files."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from conftest import ROOT, read_jsonl, train_run
from toolkit.checkpoint import load_best
from toolkit.config_io import load_config
from toolkit.errors import ConfigError, ToolkitError
from toolkit.names import DATASETS

HALF = [0.5]
IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
# config: data, (channels, size), model, optimizer, lr, batch, epochs, mean, std -- from SEED_RECIPES.md
RECIPES = {
    "mnist.yaml": ("mnist", (1, 28), "mnist_cnn", "adam", 1e-3, 128, 15, [0.1307], [0.3081]),
    "mnist_mlp.yaml": ("mnist", (1, 28), "mlp", "sgd", 0.01, 64, 5, HALF, HALF),
    "fashion_mnist.yaml": ("fashion_mnist", (1, 28), "bn_cnn", "sgd", 0.01, 64, 5, HALF, HALF),
    "fashion_mnist_mlp.yaml": ("fashion_mnist", (1, 28), "mlp", "sgd", 0.01, 64, 5, HALF, HALF),
    "cifar.yaml": ("cifar10", (3, 32), "cifar_cnn", "adam", 1e-3, 32, 10, HALF * 3, HALF * 3),
    "cifar_lenet.yaml": ("cifar10", (3, 32), "lenet", "sgd", 1e-3, 4, 2, HALF * 3, HALF * 3),
    "cifar_resnet18.yaml": ("cifar10", (3, 224), "resnet18", "adam", 1e-3, 32, 10, *IMAGENET),
    "imagefolder.yaml": ("imagefolder", (3, 224), "resnet18", "adam", 1e-3, 32, 10, *IMAGENET),
}
SMALL = [name for name in RECIPES if name not in ("cifar_resnet18.yaml", "imagefolder.yaml")]


def recipe(name: str, *overrides: str, photos: Path | None = None):
    extra = [f"data.root={photos}"] if name == "imagefolder.yaml" else []
    return load_config(ROOT / "configs" / name, [*extra, *overrides])


def shape_of(cfg) -> tuple[int, int]:
    channels, size = DATASETS[cfg.data.name][:2]
    return cfg.data.channels or channels, cfg.data.image_size or size


def synthetic(cfg, samples: int = 80, size: int | None = None) -> list[str]:
    """Overrides that swap the recipe's data for synthetic images of the same shape (10 classes)."""
    channels, native_size = shape_of(cfg)
    return ["data.name=synthetic", "data.root=null", "data.download=false", f"data.synthetic_samples={samples}",
            "data.val_fraction=0.25", f"data.image_size={size or native_size}", f"data.channels={channels}",
            "data.num_classes=10", "train.epochs=1", "train.log_every=5"]


def make_photos(root: Path, per_class: int = 14) -> Path:
    """Coloured shapes on dark backgrounds, of varied sizes, as JPEG, PNG and RGBA PNG files."""
    rng = np.random.default_rng(0)
    kinds = {"circle": (220, 40, 40), "square": (40, 200, 60), "triangle": (50, 70, 230)}
    for name, colour in kinds.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            w, h = (int(v) for v in rng.integers(40, 90, 2))
            img = Image.new("RGB", (w, h), tuple(int(v) for v in rng.integers(0, 80, 3)))
            r = int(min(w, h) * rng.uniform(0.25, 0.4))
            cx, cy = (int(v) for v in np.array([w, h]) // 2 + rng.integers(-5, 6, 2))
            fill = tuple(int(np.clip(v + rng.integers(-30, 31), 0, 255)) for v in colour)
            draw = ImageDraw.Draw(img)
            if name == "circle":
                draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
            elif name == "square":
                draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
            else:
                draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
            if i % 3 == 0:
                img.save(root / name / f"{i:02d}.jpg", quality=90)
            else:
                (img if i % 3 == 1 else img.convert("RGBA")).save(root / name / f"{i:02d}.png")
    return root


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / "best" / "weights.pt", weights_only=True)


# ------------------------------------------------------------------------- the recipes as written


@pytest.mark.parametrize("name", list(RECIPES))
def test_recipe_is_the_tutorials(name, tmp_path):
    data, shape, model, optim, lr, batch, epochs, mean, std = RECIPES[name]
    cfg = recipe(name, photos=make_photos(tmp_path / "photos", 1))
    assert (cfg.data.name, shape_of(cfg), cfg.model.name) == (data, shape, model)
    assert (cfg.optim.name, cfg.optim.lr, cfg.data.batch_size, cfg.train.epochs) == (optim, lr, batch, epochs)
    assert (cfg.data.mean, cfg.data.std) == (mean, std)
    assert cfg.train.run_name == Path(name).stem and cfg.train.mixed_precision == "auto"
    if optim == "sgd":
        assert cfg.optim.momentum == 0.9
    if data != "imagefolder":
        assert cfg.data.root == f"data/{data}" and cfg.data.download is False
    if name == "mnist.yaml":  # StepLR(5, 0.5), early stopping patience 10
        assert (cfg.schedule.name, cfg.schedule.step_epochs, cfg.schedule.gamma) == ("step", 5, 0.5)
        assert cfg.train.patience == 10
    elif name != "imagefolder.yaml":
        assert cfg.schedule.name == "none" and cfg.train.patience is None
    augmented = (cfg.data.augment.hflip, cfg.data.augment.crop_padding)
    assert augmented == {"cifar.yaml": (True, 4), "imagefolder.yaml": (True, 16)}.get(name, (False, 0))
    if model == "resnet18":  # transfer learning, ImageNet style
        assert cfg.model.freeze_backbone and cfg.model.torchvision_weights == "DEFAULT"
        assert cfg.data.resize == "resize_center_crop"


def test_imagefolder_recipe_needs_its_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # data/photos is relative to the working directory
    with pytest.raises(ConfigError, match=r"data\.root: 'data/photos' does not exist"):
        load_config(ROOT / "configs" / "imagefolder.yaml")
    make_photos(tmp_path / "data" / "photos", 1)
    assert load_config(ROOT / "configs" / "imagefolder.yaml").data.root == "data/photos"


@pytest.mark.parametrize("name", ["mnist.yaml", "fashion_mnist.yaml", "cifar.yaml"])
def test_missing_dataset_says_how_to_get_it(name, tmp_path):
    with pytest.raises(ToolkitError, match=r"not found under .*Set data\.download: true \(needs internet\)"):
        train_run(tmp_path, f"data.root={tmp_path / 'nothing'}", config=name)


def test_recipes_are_documented():
    text = (ROOT / "docs" / "recipes.md").read_text()
    for name in RECIPES:
        assert f"configs/{name}" in text, name
    for claim in ("99.40%", "97.45%", "87.60%", "91.53%"):
        assert claim in text


# ------------------------------------------------------------------------- each trains on its shape


@pytest.mark.parametrize("name", SMALL)
def test_recipe_trains_one_epoch_on_synthetic_data_of_its_shape(name, tmp_path):
    data, (channels, size), model_name, *_, mean, std = RECIPES[name]
    run_dir, summary = train_run(tmp_path, *synthetic(recipe(name)), config=name, name=Path(name).stem)
    assert summary["status"] == "complete" and summary["epochs_completed"] == 1
    assert summary["val_samples"] == 20  # 25% of 80
    (epoch,) = read_jsonl(run_dir / "metrics.jsonl")
    assert np.isfinite(epoch["train_loss"]) and np.isfinite(epoch["val_loss"])
    model, meta = load_best(run_dir)
    assert (meta.model.name, meta.channels, meta.image_size) == (model_name, channels, size)
    assert (meta.mean, meta.std) == (mean, std)  # the recipe's normalisation travels with the weights
    with torch.no_grad():
        assert model(torch.zeros(2, channels, size, size)).shape == (2, 10)
    assert (run_dir / "plots" / "curves.png").stat().st_size > 10_000


def test_resnet18_transfer_trains_only_the_new_head(tmp_path):
    """ImageNet weights cannot be downloaded here: a local file stands in for them (the documented
    offline route), and every tensor but the new head must come out of training unchanged."""
    import torchvision
    from accelerate.utils import set_seed

    from toolkit.models import build_model

    torch.manual_seed(7)
    pretrained = torchvision.models.resnet18(weights=None).state_dict()  # 1000 ImageNet classes
    path = tmp_path / "resnet18.pth"
    torch.save(pretrained, path)
    overrides = [*synthetic(recipe("cifar_resnet18.yaml"), samples=40), "data.val_fraction=0.2",
                 "data.batch_size=16", "model.torchvision_weights=null", f"model.pretrained_weights={path}"]
    run_dir, summary = train_run(tmp_path, *overrides, config="cifar_resnet18.yaml")
    assert summary["status"] == "complete" and summary["val_samples"] == 8
    _, meta = load_best(run_dir)
    assert (meta.image_size, meta.resize, meta.mean) == (224, "resize_center_crop", IMAGENET[0])

    trained = weights(run_dir)
    head = {k for k in trained if k.startswith("fc.")}
    assert head == {"fc.weight", "fc.bias"} and trained["fc.weight"].shape == (10, 512)
    assert set(trained) - head == set(pretrained) - head
    for key in set(trained) - head:  # convolutions and BatchNorm statistics alike
        assert torch.equal(trained[key], pretrained[key]), key
    set_seed(42)  # the engine's train.seed, then the same build: the head as it started
    start = build_model("resnet18", 10, 3, 224).state_dict()
    assert not torch.equal(trained["fc.weight"], start["fc.weight"])


# ------------------------------------------------------------------------- your own photos


def test_imagefolder_recipe_trains_on_real_files_in_both_pipelines(tmp_path, capsys):
    from toolkit.evaluate import evaluate_run

    photos = make_photos(tmp_path / "photos")  # 3 classes x 14 files
    common = [f"data.root={photos}", "model.torchvision_weights=null", "model.freeze_backbone=false",
              "data.image_size=64", "train.epochs=1"]
    runs = {}
    for pipeline in ("memory", "loader"):
        runs[pipeline], summary = train_run(tmp_path, *common, f"data.pipeline={pipeline}",
                                            config="imagefolder.yaml", name=pipeline)
        out = capsys.readouterr().out
        assert "34 train / 8 val images, 3 classes, 3x64x64, mean [0.485, 0.456, 0.406]" in out
        assert f"{pipeline} pipeline" in out
        assert summary["status"] == "complete"
        _, meta = load_best(runs[pipeline])
        assert meta.classes == ["circle", "square", "triangle"]
    # Decoding once into memory or per sample in workers gives the same pixels, hence the same run.
    assert read_jsonl(runs["memory"] / "metrics.jsonl")[0]["train_loss"] == \
        read_jsonl(runs["loader"] / "metrics.jsonl")[0]["train_loss"]
    memory, loader = weights(runs["memory"]), weights(runs["loader"])
    assert all(torch.equal(memory[k], loader[k]) for k in memory)

    # `toolkit evaluate` on a run whose validation images are files: training's own figure
    report = evaluate_run(runs["loader"])
    summary = json.loads((runs["loader"] / "summary.json").read_text())
    assert report["samples"] == 8 and report["accuracy"] == pytest.approx(summary["best_val_acc"], abs=1e-12)
    assert "top5_accuracy" not in report  # 3 classes


@pytest.mark.slow
def test_imagefolder_from_scratch_learns_the_shapes(tmp_path):
    """The config's documented no-weights alternative, on real files: well above chance (1/3)."""
    photos = make_photos(tmp_path / "photos")
    run_dir, summary = train_run(
        tmp_path, f"data.root={photos}", "model.name=cifar_cnn", "model.torchvision_weights=null",
        "model.freeze_backbone=false", "data.image_size=64", "train.epochs=6", config="imagefolder.yaml")
    assert summary["best_val_acc"] >= 0.75, summary


# ------------------------------------------------------------------------- tracking and device report


def test_tensorboard_gets_loss_and_lr_at_the_reduce_cadence_and_epoch_metrics(tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, summary = train_run(tmp_path, "train.log_with=tensorboard", "train.epochs=2", "data.synthetic_samples=128",
                                 "train.mixed_precision=auto")  # the start line says what auto chose, and why
    out = capsys.readouterr().out
    assert re.search(r"^1 process \| device cpu \(\d+ cores, \w+ kernels, "
                     r"(bf16 native\) \| precision bf16 autocast \(auto: the CPU has native bf16\)|"
                     r"bf16 emulated: slow\) \| precision fp32 \(auto: the CPU would emulate bf16\)) \| "
                     r"channels_last on$", out, re.M), out  # the start line, in words
    assert summary["mixed_precision"] in ("no", "bf16") and summary["channels_last"] is True
    steps = read_jsonl(run_dir / "metrics.jsonl")
    steps_per_epoch = 3  # 128 images, 25% held out (smoke.yaml), batch 32
    scalars = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for events in (run_dir / "tensorboard").rglob("events.out.tfevents.*"):
            accumulator = EventAccumulator(str(events))
            accumulator.Reload()
            for tag in accumulator.Tags()["scalars"]:
                scalars[tag] = accumulator.Scalars(tag)
    # Step values are read at the reduce cadence only (here each epoch's last step: fewer than 10
    # steps), never with a device sync per step: the mean loss since the previous reduce.
    assert [e.step for e in scalars["Loss/train"]] == [steps_per_epoch, 2 * steps_per_epoch]
    assert [e.value for e in scalars["Loss/train"]] == pytest.approx([m["train_loss"] for m in steps], rel=1e-6)
    assert [e.value for e in scalars["lr"]] == pytest.approx([m["lr"] for m in steps], rel=1e-6)
    for key in ("train_loss", "train_acc", "val_loss", "val_acc", "lr"):
        logged = scalars[f"epoch/{key}"]
        assert [e.step for e in logged] == [steps_per_epoch, 2 * steps_per_epoch]
        assert [e.value for e in logged] == pytest.approx([m[key] for m in steps], rel=1e-6)
