"""Mid-epoch checkpoints (train.checkpoint_every) and the stop seam (hooks.Requests), in one process: a
run stopped inside an epoch resumes at the next batch and ends with the weights of a run never stopped,
for the in-memory and the DataLoader pipelines and a shard set. Signals, Ctrl-C and two processes: test_preempt_signals.py."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file

from conftest import read_jsonl, train_run
from test_data import make_folder
from toolkit.hooks import Hook

# smoke.yaml at 128 images: 96 for training in batches of 8 = 12 steps an epoch; reduces at steps 5, 10, 12
COMMON = ["train.epochs=2", "data.synthetic_samples=128", "data.batch_size=8", "data.augment.crop_padding=2",
          "data.augment.hflip=true", "model.name=bn_cnn"]


class StopAt(Hook):
    """Asks the loop to stop at one optimizer step: the seam a feature (EMA, a budget) would use."""

    def __init__(self, step: int):
        self.step = step

    def after_optimizer_step(self, run, global_step: int) -> None:
        if global_step == self.step:
            run.requests.ask_stop("requested")


def _weights(run_dir):
    return load_file(run_dir / "checkpoints" / "last" / "model.safetensors")


def _equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.fixture(params=["memory", "loader", "shards"])
def data(request, tmp_path):
    if request.param == "memory":
        return []
    root = make_folder(tmp_path / "photos", per_class=40)  # 120 files: 90 train = 12 steps of 8 (last of 2)
    source = ["data.name=imagefolder", f"data.root={root}", "data.pipeline=loader"]
    if request.param == "shards":  # the same files as tar shards; the resume (batch 4) starts inside a block of 3 batches
        from toolkit.shard import write_shards

        write_shards(str(root), tmp_path / "shards", "16KB", val_fraction=0.25)
        source = ["data.name=shards", f"data.root={tmp_path / 'shards'}", "data.shuffle_buffer=24"]
    return [*source, "data.num_workers=1",
            "data.batch_size=8", "data.image_size=16", "data.channels=3", "model.args={}",
            # per-sample augmentation in the worker, redrawn alike after the resume (seeded by epoch and index)
            "data.augment.resized_crop_scale=[0.5, 1.0]", "data.augment.color_jitter=0.3",
            "data.augment.random_erasing=0.5"]


def test_a_stop_mid_epoch_resumes_at_the_next_batch_with_the_uninterrupted_weights(tmp_path, data):
    common = [*COMMON, *data]
    straight, _ = train_run(tmp_path, *common, name="straight")
    # asked at step 15 (epoch 2, batch 3): the loop agrees at its next collective point, the checkpoint
    # step 16 (checkpoint_every 4), saves there and stops
    parts, summary = train_run(tmp_path, *common, "train.checkpoint_every=4", name="parts", hooks=[StopAt(15)])
    assert summary["status"] == "requested" and summary["epochs_completed"] == 1 and summary["batches_done"] == 4
    assert 0 < summary["last_save_s"] < 10
    state = json.loads((parts / "checkpoints" / "last" / "trainer_state.json").read_text())
    assert (state["epoch"], state["batches_done"]) == (1, 4) and [row[2] for row in state["partial"]] == [4 * 8]
    assert (parts / "checkpoints" / "last").resolve().name == "last-e0001-s0000016"
    assert (parts / "plots" / "curves.png").is_file()  # epoch 1's curves, with the summary saying why it stopped

    resumed, summary = train_run(tmp_path, *common, "train.resume=true", name="parts")
    assert summary["status"] == "complete" and summary["epochs_completed"] == 2
    _equal(_weights(resumed), _weights(straight))
    keys = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "val_samples", "lr")
    assert ([{k: m[k] for k in keys} for m in read_jsonl(resumed / "metrics.jsonl")]
            == [{k: m[k] for k in keys} for m in read_jsonl(straight / "metrics.jsonl")])


def test_checkpoint_every_minutes_saves_at_the_next_agreed_point(tmp_path, capsys, monkeypatch):
    """`N min` is each process's own clock, agreed at the next reduce: a clock that runs a minute per read
    asks at every step, so the reduces at batches 5 and 10 save (the epoch's end has its own checkpoint)."""
    from toolkit import preempt

    clock = iter(range(0, 10**6, 61))
    monkeypatch.setattr(preempt.time, "monotonic", lambda: next(clock))
    train_run(tmp_path, *COMMON, "train.epochs=1", "train.checkpoint_every=1 min")
    out = capsys.readouterr().out
    assert [int(b) for b in re.findall(r"checkpoints/last: epoch 1, batch (\d+) of 12", out)] == [5, 10]


@pytest.mark.parametrize("value, stored", [(500, "500 steps"), ("500", "500 steps"), ("20 steps", "20 steps"),
                                           ("30 min", "30 min"), ("30min", "30min")])
def test_checkpoint_every_reads_steps_or_minutes(value, stored):
    from toolkit.config import TrainConfig

    assert TrainConfig(checkpoint_every=value).checkpoint_every == stored


def test_checkpoint_every_refuses_other_units(tmp_path):
    from toolkit.config_io import load_config
    from toolkit.errors import ConfigError

    with pytest.raises(ConfigError, match="train.checkpoint_every: '2 hours'"):
        load_config("smoke.yaml", ["train.checkpoint_every=2 hours"])


def test_a_mid_epoch_checkpoint_resumes_only_with_the_processes_that_saved_it():
    """Each process carries on from its own totals (so the epoch's sums keep their order), and the epoch's
    remaining batches are split as they were: another process count is refused, naming the one to use."""
    from toolkit.engine import partial_rows
    from toolkit.errors import ToolkitError

    two = [[8.0, 7.0, 16.0, 0.0], [6.0, 5.0, 16.0, 0.0]]
    assert partial_rows(two, 2) == two
    with pytest.raises(ToolkitError, match="saved inside an epoch by 2 processes: resume it with 2 processes"):
        partial_rows(two, 1)
    assert partial_rows([14.0, 12.0, 32.0, 0.0], 2) == [[14.0, 12.0, 32.0, 0.0], [0.0] * 4]  # one summed row
