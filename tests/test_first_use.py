"""What a first user meets (issue 27): a frozen backbone without weights, what a resume may change and
records, a finished run extended, resume from the run's own config, resolved values and upsampling,
model names checked before the data, progress lines by time, the start-up line, offline weights, the
schema for editors, and the curves' markers. Each test failed before its fix."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from conftest import FP32, ROOT, read_jsonl, run_main, train_run

SMOKE = ["--config", "smoke.yaml", "--set", FP32]


def _train(capsys, tmp_path, *args: str) -> tuple[int, str, str]:
    return run_main(capsys, "train", *SMOKE, "--set", f"train.output_dir={tmp_path}", *args)


# ---------------------------------------------------------------- 1: a frozen random backbone


def test_a_frozen_backbone_without_weights_is_refused_naming_both_keys(capsys):
    code, out, err = run_main(capsys, "config", "show", "--config", "imagefolder.yaml", "--set", f"data.root={ROOT}",
                              "--set", "model.name=cifar_cnn", "--set", "model.torchvision_weights=null")
    assert code == 2 and "Traceback" not in err
    line = next(line for line in err.splitlines() if "model.freeze_backbone" in line)
    assert "model.torchvision_weights" in line and "model.pretrained_weights" in line and "random features" in line


def test_the_documented_from_scratch_command_of_imagefolder_yaml_validates(capsys):
    text = (ROOT / "configs" / "imagefolder.yaml").read_text()
    line = next(line for line in text.splitlines() if "model.name=cifar_cnn" in line)
    sets = re.findall(r"--set (\S+)", line)
    assert "model.freeze_backbone=false" in sets
    args = [a for s in sets for a in ("--set", s)]
    code, out, err = run_main(capsys, "config", "show", "--config", "imagefolder.yaml", "--set", f"data.root={ROOT}", *args)
    assert code == 0, err
    assert yaml.safe_load(out)["model"]["freeze_backbone"] is False


def test_the_start_line_counts_parameters_and_trainable_ones(tmp_path, capsys):
    from toolkit.models import build_model

    weights = tmp_path / "w.pt"
    torch.save(build_model("cifar_cnn", 4, 3, 16).state_dict(), weights)
    _, summary = train_run(tmp_path, "train.epochs=1", "model.freeze_backbone=true", f"model.pretrained_weights={weights}")
    out = capsys.readouterr().out
    assert "cifar_cnn: 225,604 parameters, 1,028 trainable" in out  # only the last Linear(256, 4)
    assert re.search(r"^1 process \| device cpu .* \| precision fp32 \| channels_last on$", out, re.M), out


# ---------------------------------------------------------------- 2, 3, 4: what a resume may change


def test_a_resume_refuses_a_change_it_cannot_make_and_records_none(tmp_path, capsys):
    assert _train(capsys, tmp_path, "--set", "train.epochs=2", "--set", "train.stop_after=1")[0] == 0
    run_dir = tmp_path / "smoke"
    config_before = (run_dir / "config.yaml").read_text()
    code, out, err = _train(capsys, tmp_path, "--resume", "--set", "optim.lr=0.01", "--set", "model.name=lenet")
    assert code == 2 and "Traceback" not in err
    assert "--set: optim.lr: 0.001 -> 0.01: cannot change when" in err
    assert "--set: model.name: 'cifar_cnn' -> 'lenet': cannot change when" in err
    assert f"model.pretrained_weights={run_dir / 'checkpoints' / 'best' / 'weights.pt'}" in err
    assert (run_dir / "config.yaml").read_text() == config_before and not (run_dir / "resumes.jsonl").exists()
    assert [m["epoch"] for m in read_jsonl(run_dir / "metrics.jsonl")] == [1]

    # what may change is applied, printed, written into config.yaml and kept in resumes.jsonl
    code, out, err = _train(capsys, tmp_path, "--resume", "--set", "train.stop_after=null",
                            "--set", "train.log_every=3", "--set", "serve.topk=2")
    assert code == 0, err
    assert "resume changes train.log_every: 5 -> 3" in out and "stop_after" not in out  # each invocation's own
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["train"]["stop_after"] is None and saved["train"]["log_every"] == 3 and saved["serve"]["topk"] == 2
    assert saved["optim"]["lr"] == 0.001
    (record,) = read_jsonl(run_dir / "resumes.jsonl")
    assert record["after_epoch"] == 1
    assert record["changed"] == {"train.log_every": [5, 3], "serve.topk": [5, 2]}
    assert "epoch 2/2 step 3/12" in out  # the new log_every ran


def test_a_refused_change_given_to_train_directly_is_refused_too(tmp_path):
    """The engine checks what a config passed to train() would change (not only the command line)."""
    from toolkit.errors import ConfigError

    train_run(tmp_path, "train.epochs=2", "train.stop_after=1")
    with pytest.raises(ConfigError, match=r"resume: data.augment.hflip: False -> True: cannot change"):
        train_run(tmp_path, "train.epochs=2", "train.resume=true", "data.augment.hflip=true")


def test_extending_a_finished_run_replans_the_schedule_and_a_finished_run_says_so(tmp_path, capsys):
    assert _train(capsys, tmp_path, "--set", "train.epochs=2", "--set", "schedule.name=cosine")[0] == 0
    run_dir = tmp_path / "smoke"
    done = load_file(run_dir / "checkpoints" / "last" / "model.safetensors")

    code, out, err = _train(capsys, tmp_path, "--resume")  # as it is: nothing to train, and said
    assert code == 0, err
    assert f"{run_dir} is finished: 2 of 2 epochs trained" in out and "--set train.epochs=N" in out
    assert "Epoch [" not in out and len(read_jsonl(run_dir / "metrics.jsonl")) == 2

    code, out, err = _train(capsys, tmp_path, "--resume", "--set", "train.epochs=4")
    assert code == 0, err
    # cosine over 4 epochs, 2 done: the next step's rate is lr * (1 + cos(pi / 2)) / 2 = lr / 2
    assert "learning-rate schedule (cosine) re-planned over 4 epochs: the next step uses lr 0.0005" in out
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    assert [m["epoch"] for m in metrics] == [1, 2, 3, 4] and metrics[2]["lr"] > 0.0001
    after = load_file(run_dir / "checkpoints" / "last" / "model.safetensors")
    assert not torch.equal(done["head.3.weight"], after["head.3.weight"])  # it trained, at a rate above 0
    assert json.loads((run_dir / "summary.json").read_text())["epochs_completed"] == 4

    code, _, err = _train(capsys, tmp_path, "--resume", "--set", "train.epochs=3")
    assert code == 2 and "train.epochs: 3 is fewer than the 4 epochs" in err


def test_a_run_stopped_early_says_how_to_go_on(tmp_path, capsys):
    # patience 1 on a learning rate that cannot improve: stops after epoch 2
    args = ["--set", "train.epochs=6", "--set", "train.patience=1", "--set", "optim.lr=1e-12"]
    assert _train(capsys, tmp_path, *args)[0] == 0
    run_dir = tmp_path / "smoke"
    epochs = len(read_jsonl(run_dir / "metrics.jsonl"))
    assert epochs < 6
    code, out, _ = _train(capsys, tmp_path, "--resume")
    assert code == 0 and f"{run_dir} stopped early after epoch {epochs}" in out and "train.patience=N" in out
    code, out, _ = _train(capsys, tmp_path, "--resume", "--set", "train.patience=null", "--set", "train.stop_after=1")
    assert code == 0 and len(read_jsonl(run_dir / "metrics.jsonl")) == epochs + 1


def test_resume_reads_the_runs_own_config(tmp_path, capsys, monkeypatch):
    """Started with --set values the config file does not have; resumed by naming the run only."""
    monkeypatch.chdir(tmp_path)
    started = ["--set", "data.name=synthetic", "--set", "data.image_size=12", "--set", "model.name=cifar_cnn",
               "--set", "data.synthetic_samples=200",
               "--set", "train.epochs=3", "--set", "train.stop_after=1", "--set", FP32]
    assert run_main(capsys, "train", "-c", "digits.yaml", "--set", "train.run_name=mine", *started)[0] == 0
    code, out, err = run_main(capsys, "train", "-c", "digits.yaml", "--set", "train.run_name=mine", "--resume",
                              "--set", "train.stop_after=1")
    assert code == 0, err
    assert "resuming from runs/mine/config.yaml; kept, as the run was started:" in out
    assert "data.name: 'synthetic' (the run's;" in out and "says 'digits')" in out
    assert "resumed runs/mine after epoch 1" in out and "3x12x12" in out
    code, out, err = run_main(capsys, "train", "--resume", "runs/mine")  # the run directory alone
    assert code == 0, err
    assert "resumed runs/mine after epoch 2" in out and "resume changes train.stop_after: 1 -> None" not in out
    assert len(read_jsonl(tmp_path / "runs" / "mine" / "metrics.jsonl")) == 3
    code, _, err = run_main(capsys, "train", "--resume", "runs/nothing")
    assert code == 2 and "runs/nothing: nothing to resume there" in err


def test_a_run_started_with_overwrite_resumes_by_its_directory(tmp_path, capsys, monkeypatch):
    """train.overwrite says how a run was started (over an older one), not what it is: its resume must not
    refuse `overwrite with resume` when the user gave neither (it did, naming a --set nobody passed)."""
    monkeypatch.chdir(tmp_path)
    started = ["--set", "train.run_name=again", "--set", "train.epochs=2", "--set", "train.stop_after=1",
               "--set", "data.synthetic_samples=64"]
    assert run_main(capsys, "train", *SMOKE, *started)[0] == 0
    assert run_main(capsys, "train", *SMOKE, *started, "--set", "train.overwrite=true")[0] == 0  # over the first
    code, out, err = run_main(capsys, "train", "--resume", "runs/again")
    assert code == 0, err
    assert "resumed runs/again after epoch 1" in out
    assert len(read_jsonl(tmp_path / "runs" / "again" / "metrics.jsonl")) == 2
    assert yaml.safe_load((tmp_path / "runs" / "again" / "config.yaml").read_text())["train"]["overwrite"] is False


# ---------------------------------------------------------------- 6: resolved values, upsampling


def test_resolved_values_are_recorded_and_upsampling_is_warned(tmp_path, capsys):
    folder = tmp_path / "small"
    for c, colour in enumerate([(200, 30, 30), (30, 200, 30)]):
        (folder / f"c{c}").mkdir(parents=True)
        for i in range(6):
            Image.new("RGB", (32, 32), colour).save(folder / f"c{c}" / f"{i}.png")
    args = ["--set", "data.name=imagefolder", "--set", f"data.root={folder}", "--set", "data.mean=null",
            "--set", "data.std=null", "--set", "data.augment.crop_padding=0"]
    code, out, err = run_main(capsys, "config", "show", "-c", "cifar.yaml", *args)
    assert code == 0, err
    shown = yaml.safe_load(out)["data"]
    assert (shown["image_size"], shown["channels"]) == (224, 3) and shown["mean"] == [0.485, 0.456, 0.406]

    code, out, err = run_main(capsys, "train", "-c", "cifar.yaml", *args, "--set", f"train.output_dir={tmp_path}",
                              "--set", "train.epochs=1", "--set", FP32)
    assert code == 0, err
    assert "3x224x224, mean [0.485, 0.456, 0.406] std [0.229, 0.224, 0.225]" in out
    assert "images of about 32 px a side are upsampled 7.0x per side to data.image_size 224" in out
    saved = yaml.safe_load((tmp_path / "cifar" / "config.yaml").read_text())["data"]
    assert (saved["image_size"], saved["channels"], saved["std"]) == (224, 3, [0.229, 0.224, 0.225])


# ---------------------------------------------------------------- 7: names checked before the data


def test_an_unknown_model_is_refused_before_the_data_and_leaves_nothing(tmp_path, capsys, monkeypatch):
    import toolkit.data

    def no_data(*_):
        raise AssertionError("the data was read before the model name was checked")

    monkeypatch.setattr(toolkit.data, "build_data", no_data)
    code, _, err = _train(capsys, tmp_path, "--set", "model.name=resnet1")
    assert code == 2 and "model.name: 'resnet1' is neither a seed model" in err and "did you mean 'resnet18'" in err
    assert not (tmp_path / "smoke").exists()


@pytest.mark.parametrize("key, meant", [("optim.learning_rate", "lr"), ("train.num_epochs", "epochs"),
                                        ("data.img_size", "image_size"), ("train.max_epochs", "epochs"),
                                        ("optim.wd", "weight_decay")])
def test_common_synonyms_get_a_suggestion(capsys, key, meant):
    code, _, err = run_main(capsys, "config", "show", "--set", f"{key}=1")
    assert code == 2 and f"--set: {key}: unknown key (did you mean {meant!r}?)" in err


# ---------------------------------------------------------------- 9: progress lines by time


def test_a_log_gets_progress_lines_by_time_when_log_every_exceeds_an_epoch(tmp_path, capsys):
    train_run(tmp_path, "train.epochs=1", "train.log_every=1000", "train.log_every_s=1e-9")
    out = capsys.readouterr().out
    assert "epoch 1/1 step 10/12 loss" in out  # by time, at the first reduce (every 10 steps)
    train_run(tmp_path, "train.epochs=1", "train.log_every=1000", "train.log_every_s=0", name="steps_only")
    out = capsys.readouterr().out
    assert "step 10/12" not in out and "epoch 1/1 step 12/12 loss" in out  # each epoch's last step, always


# ---------------------------------------------------------------- 13: offline weights


def test_weights_that_cannot_be_downloaded_name_the_offline_way(monkeypatch):
    import urllib.error

    import torchvision

    from toolkit.errors import ToolkitError
    from toolkit.models import build_model

    def offline(*_, **__):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.models, "get_model", offline)
    with pytest.raises(ToolkitError) as caught:
        build_model("resnet18", 10, 3, 224, torchvision_weights="DEFAULT")
    message = str(caught.value)
    assert "name resolution" in message and "resnet18-f37072fd.pth" in message
    assert "--set model.torchvision_weights=null --set model.pretrained_weights=PATH/resnet18-f37072fd.pth" in message


# ---------------------------------------------------------------- 15: the schema, for editors


def test_the_schema_has_its_ids_ships_current_and_every_config_points_at_it():
    from toolkit.config_io import schema

    current = schema()
    assert current["$schema"] == "https://json-schema.org/draft/2020-12/schema" and current["$id"]
    assert json.loads((ROOT / "configs" / "schema.json").read_text()) == current, \
        "configs/schema.json is stale: toolkit config schema > configs/schema.json"
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        assert path.read_text().splitlines()[0] == "# yaml-language-server: $schema=schema.json", path.name


# ---------------------------------------------------------------- 16: the curves' markers


def test_the_loss_panel_marks_the_lowest_loss_and_says_so(tmp_path):
    from toolkit.report import curves_figure, plot_curves

    rows = [dict(epoch=e, train_loss=1 / e, train_acc=0.5, val_loss=v, val_acc=a)
            for e, v, a in ((1, 0.9, 0.5), (2, 0.4, 0.6), (3, 0.6, 0.8))]
    fig = curves_figure(rows)
    loss_ax, acc_ax = fig.axes
    legend = [t.get_text() for t in loss_ax.get_legend().get_texts()]
    assert "lowest val loss 0.4000 (epoch 2)" in legend and "best val acc 80.00% (epoch 3)" in legend
    star = next(line for line in loss_ax.get_lines() if line.get_marker() == "*")
    assert list(star.get_xdata()) == [2] and list(star.get_ydata()) == [0.4]
    assert "best val acc 80.00% (epoch 3)" in [t.get_text() for t in acc_ax.get_legend().get_texts()]
    plot_curves(rows, tmp_path / "curves.png")
    assert Path(tmp_path / "curves.png").stat().st_size > 10_000
