"""The tutorials' common errors as clear messages: exit 2, no traceback, the run directory resumable."""

from __future__ import annotations

import json

import torch

import toolkit.training
from conftest import FP32, ROOT, run_main

CONFIG = str(ROOT / "configs" / "smoke.yaml")


def _train(capsys, tmp_path, *overrides: str):
    args = ["train", "--config", CONFIG, "--set", FP32, "--set", f"train.output_dir={tmp_path}", "--set", "train.run_name=run"]
    for item in overrides:
        args += ["--set", item]
    return run_main(capsys, *args)


def test_out_of_memory_names_the_batch_size_and_the_way_out_and_the_run_resumes(tmp_path, capsys, monkeypatch):
    real, calls = toolkit.training.class_index_loss, []

    def loss(*args):
        calls.append(1)
        if len(calls) > 13:  # the second epoch (12 batches of 32 per epoch), after checkpoints/last of the first
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
        return real(*args)

    monkeypatch.setattr(toolkit.training, "class_index_loss", loss)
    code, _, err = _train(capsys, tmp_path)
    assert code == 2 and "Traceback" not in err
    assert "out of memory training with data.batch_size 32 per process" in err
    for advice in ("data.batch_size", "train.grad_accum_steps", "data.batch_size: auto", "--resume"):
        assert advice in err
    monkeypatch.setattr(toolkit.training, "class_index_loss", real)
    code, _, err = _train(capsys, tmp_path, "train.resume=true")
    assert code == 0, err
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["epochs_completed"] == 2


def test_a_model_too_small_for_the_image_size_names_the_layer_and_a_size_that_works(tmp_path, capsys):
    code, _, err = _train(capsys, tmp_path, "model.name=mnist_cnn", "data.image_size=2")
    assert code == 2 and "Traceback" not in err
    assert "'mnist_cnn' cannot take 3x2x2 images: layer features.10 (MaxPool2d)" in err
    assert "data.image_size: 4 (the smallest that works)" in err
    assert not (tmp_path / "run").exists()  # refused before the run directory was taken
    code, _, _ = _train(capsys, tmp_path, "model.name=mnist_cnn", "data.image_size=4", "train.epochs=1")
    assert code == 0  # the size it named does work


def test_labels_that_are_not_class_indices_are_named(tmp_path, capsys, monkeypatch):
    real = toolkit.training.build_data

    def shifted(cfg):
        bundle = real(cfg)
        bundle.train.labels = bundle.train.labels + 4  # 4 classes: 4..7 are not class indices
        return bundle

    monkeypatch.setattr(toolkit.training, "build_data", shifted)
    code, _, err = _train(capsys, tmp_path)
    assert code == 2 and "Traceback" not in err
    assert "labels must be class indices: integers 0..3" in err and "out of bounds" in err


def test_pretrained_weights_of_another_model_list_the_missing_and_unexpected_keys(tmp_path, capsys):
    from toolkit.models import build_model

    weights = tmp_path / "other.pt"
    torch.save(build_model("bn_cnn", 4, 3, 16).state_dict(), weights)
    code, _, err = _train(capsys, tmp_path, f"model.pretrained_weights={weights}")  # smoke.yaml's model is cifar_cnn
    assert code == 2 and "Traceback" not in err
    assert f"model.pretrained_weights: {weights} does not match the model" in err
    assert "missing keys:" in err and "unexpected keys:" in err
    same = tmp_path / "same.pt"
    torch.save(build_model("cifar_cnn", 10, 3, 16).state_dict(), same)  # only the head differs: loads
    code, out, err = _train(capsys, tmp_path, f"model.pretrained_weights={same}", "train.epochs=1", "train.overwrite=true")
    assert code == 0, err
