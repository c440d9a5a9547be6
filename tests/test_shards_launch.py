"""A shard set under a real two-process `accelerate launch` (gloo, two DataLoader workers each): every training
sample exactly once per epoch over both processes, the same steps on each, validation exactly the validation
set, counted by the indices each process recorded (tests/shard_probe.py); and a run stopped mid-epoch, resumed
with two processes, trains exactly the batches the uninterrupted run did and ends with its weights."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT
from launching import command, run
from toolkit.shard import write_shards

pytestmark = pytest.mark.distributed

PROBE = ROOT / "tests" / "shard_probe.py"
TRAIN, VAL, STEPS = 1617, 180, 26  # digits; batches of 32 on two processes: ceil(1617 / 64) steps an epoch
COMMON = ["data.name=shards", "model.name=bn_cnn", "data.image_size=8", "data.batch_size=32", "train.epochs=1",
          "data.num_workers=2", "data.shuffle_buffer=128", "data.augment.crop_padding=1", "data.augment.hflip=true",
          "train.checkpoint_every=4"]


def _launch(out, name, root, *extra, stop_at=None):
    args = [str(out / f"keys-{name}"), *(["--stop-at", str(stop_at)] if stop_at else [])]
    result = run(command(out, name, [*COMMON, f"data.root={root}", *extra], script=PROBE, script_args=args))
    assert result.returncode == 0, result.stderr[-3000:]  # the probe returns what engine.train returned, stopped or not
    logs = [json.loads((out / f"keys-{name}" / f"keys-{rank}.json").read_text()) for rank in (0, 1)]
    return out / name, logs


def _passes(log) -> list[list]:
    """The validation passes of one process (the val loader has no epoch: its batches, cut into equal passes)."""
    val = [indices for name, _, indices, _ in log if name == "val"]
    return [val]  # one epoch: one pass


def _batches(log, split, epoch):
    return [indices for name, e, indices, _ in log if name == split and e == epoch]


def test_two_processes_see_every_sample_once_and_resume_mid_epoch_exactly(tmp_path):
    root = tmp_path / "digits"
    write_shards("digits", root, "64KB")
    straight, logs = _launch(tmp_path, "straight", root)
    for epoch in (1,):
        per_rank = [_batches(log, "train", epoch) for log in logs]
        assert [len(b) for b in per_rank] == [STEPS, STEPS]
        seen = [i for batches in per_rank for batch in batches for i in batch]
        assert sorted(seen) == list(range(TRAIN))  # exactly once: no padding, no duplicate, none missing
    for rank_passes in zip(*[_passes(log) for log in logs]):  # each epoch's validation, over both processes
        assert sorted(i for rank in rank_passes for batch in rank for i in batch) == list(range(VAL))
    metrics = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    assert [m["val_samples"] for m in metrics] == [VAL]

    # asked to stop at step 5: saved at the next point the processes agree on, the reduce of
    # batch 5 (smoke.yaml's log_every), inside the second block of 4 batches
    parts, first = _launch(tmp_path, "parts", root, stop_at=5)
    state = json.loads((parts / "checkpoints" / "last" / "trainer_state.json").read_text())
    assert (state["epoch"], state["batches_done"]) == (0, 5)
    resumed, second = _launch(tmp_path, "parts", root, "train.resume=true")
    for rank in (0, 1):
        done = _batches(first[rank], "train", 1)
        assert len(done) == 5 and done + _batches(second[rank], "train", 1) == _batches(logs[rank], "train", 1)
    a = load_file(straight / "checkpoints" / "last" / "model.safetensors")
    b = load_file(resumed / "checkpoints" / "last" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
