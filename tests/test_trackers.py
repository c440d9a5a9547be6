"""train.log_with, a list of Accelerate's trackers, tested for real and offline: one run logs to TensorBoard,
a local MLflow file store and W&B in offline mode at once, and each is read back (TensorBoard's event
files, mlflow.get_run, the W&B run's own files); a tracker whose package is missing is refused before the
run starts, naming the extra that installs it; old single-name configs still read."""

from __future__ import annotations

import json

import pytest

from conftest import ROOT, run_main, train_run
from toolkit.config_io import load_config


def _wandb_log(path):
    """The records of a W&B run file (run-ID.wandb): a 7-byte header (':W&B', magic, version), then
    LevelDB's log format, 32 KiB blocks of [crc32 (4), length (2, little-endian), type (1), data] chunks,
    type 1 a whole record, 2/3/4 its first/middle/last part. wandb no longer ships a Python reader."""
    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    records, pending, pos, block = [], b"", 7, 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0 and length == 0:
            break
        pending += chunk
        if kind in (1, 4):
            records.append(pending)
            pending = b""
    return records


def _wandb_records(run_dir):
    """The history rows, the config and the run's name of the W&B offline run under RUN/wandb."""
    from wandb.proto import wandb_internal_pb2

    (path,) = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    history, config = [], {}
    for data in _wandb_log(path):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history.append({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item})
        elif kind == "config":
            config.update({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.config.update})
        elif kind == "run":
            config["_run_name"] = record.run.display_name
            config.update({item.key: json.loads(item.value_json) for item in record.run.config.update})
    return history, config


@pytest.mark.slow
def test_one_run_logs_to_tensorboard_mlflow_and_wandb_offline_and_each_reads_back(tmp_path, monkeypatch):
    import mlflow
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    store = tmp_path / "mlruns"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3.x's opt-in to its file store
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", "")  # the toolkit's default: under the run directory
    run_dir, summary = train_run(tmp_path, "train.log_with=[tensorboard,mlflow,wandb]", "train.epochs=2",
                                 "data.synthetic_samples=128", "train.log_every=2", name="tracked")
    steps = 2 * (96 // 32)

    readers = [EventAccumulator(str(events)).Reload() for events in (run_dir / "tensorboard").rglob("events.out.tfevents.*")]
    (tb,) = [r for r in readers if "epoch/val_acc" in r.Tags()["scalars"]]
    assert [e.value for e in tb.Scalars("epoch/val_acc")] == pytest.approx(
        [json.loads(line)["val_acc"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()])

    import csv

    with open(run_dir / "metrics.csv", newline="") as f:  # metrics.jsonl as a table, beside it
        table = list(csv.DictReader(f))
    assert [float(row["val_acc"]) for row in table] == pytest.approx([e.value for e in tb.Scalars("epoch/val_acc")])
    assert [row["epoch"] for row in table] == ["1", "2"] and "images_per_s" in table[0]

    client = mlflow.tracking.MlflowClient(store.as_uri())
    (experiment,) = [e for e in client.search_experiments() if e.name == "tracked"]
    (found,) = client.search_runs([experiment.experiment_id])
    got = mlflow.get_run(found.info.run_id)
    assert got.info.run_name == "tracked" and got.info.status == "FINISHED"
    assert got.data.metrics["epoch/val_acc"] == pytest.approx(summary["final_val_acc"])
    assert got.data.params["optim.lr"] == "0.001" and got.data.params["train.run_name"] == "tracked"
    val_acc = client.get_metric_history(got.info.run_id, "epoch/val_acc")
    assert [m.step for m in val_acc] == [steps // 2, steps] and len(client.get_metric_history(got.info.run_id, "lr")) >= 2

    history, config = _wandb_records(run_dir)
    assert config["_run_name"] == "tracked" and config["optim.lr"] == 0.001 and config["data.batch_size"] == 32
    assert config["data.channels"] == 3  # the resolved config (null values filled in), as config.yaml has it
    epochs = [row for row in history if "epoch/val_acc" in row]
    assert [row["epoch/val_acc"] for row in epochs] == pytest.approx([m["epoch/val_acc"] for m in
                                                                      [{"epoch/val_acc": v.value} for v in tb.Scalars("epoch/val_acc")]])
    assert any("Loss/train" in row for row in history)


def test_a_missing_tracker_package_is_refused_naming_its_extra(tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("aim", "dvclive") else real(name, *a))
    code, _, err = run_main(capsys, "train", "--config", "smoke.yaml", "--set", f"train.output_dir={tmp_path}",
                            "--set", "train.log_with=[tensorboard,aim,dvclive]")
    assert code == 2 and "Traceback" not in err
    assert "train.log_with: 'aim' needs the aim package, which is not installed" in err
    assert "install it with: pip install 'toolkit[aim,dvclive]' (or pip install aim dvclive)" in err
    assert not (tmp_path / "smoke" / "metrics.jsonl").exists()
    assert "aim" in (ROOT / "pyproject.toml").read_text() and "dvclive = [" in (ROOT / "pyproject.toml").read_text()


def test_log_with_reads_a_list_a_single_name_and_none():
    assert load_config("smoke.yaml", ["train.log_with=tensorboard"]).train.log_with == ["tensorboard"]
    assert load_config("smoke.yaml", ["train.log_with=none"]).train.log_with == []
    assert load_config("smoke.yaml", ["train.log_with=[mlflow,wandb]"]).train.log_with == ["mlflow", "wandb"]
    from toolkit.errors import ConfigError

    with pytest.raises(ConfigError, match=r"train.log_with.0: 'mlflw' is not one of .*\(did you mean 'mlflow'\?\)"):
        load_config("smoke.yaml", ["train.log_with=[mlflw]"])
