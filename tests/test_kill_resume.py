"""Guarantee 7: a two-process run killed with SIGKILL at any moment (mid-epoch right after a checkpoint,
or while a checkpoint is being written, also before the first one) leaves `checkpoints/last` and
`checkpoints/best` loadable, and `--resume` finishes it with the weights of a run never interrupted."""

from __future__ import annotations

import json

import pytest

from conftest import read_jsonl
from conftest import ROOT
from launching import (REFERENCE, Background, command, load_best_weights, load_resume_weights, processes_of,
                       reference_run, run)
from toolkit.checkpoint import load_best

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


PAUSE_INSIDE = ROOT / "tests" / "pause_inside.py"


def _killed_at(tmp_path, name: str, kill_point, resume: bool = True, writing: str | None = None) -> Background:
    """Launch the REFERENCE run (resumed), SIGKILL it and all its processes at kill_point. With `writing`
    (a staging directory's name), the run pauses inside that checkpoint's write (tests/pause_inside.py), so
    that the kill lands there on any machine."""
    overrides = [*REFERENCE, *(["train.resume=true"] if resume else [])]
    cmd = (command(tmp_path, "run", overrides) if writing is None else
           command(tmp_path, "run", overrides, script=PAUSE_INSIDE, script_args=[writing]))
    launch = Background(cmd, tmp_path / "logs" / name)
    try:
        launch.wait_for(lambda: kill_point(launch))
    finally:
        launch.kill()
    assert processes_of(tmp_path) == []
    return launch


def _epoch_of_last(ckpt) -> int:
    return json.loads((ckpt / "last" / "trainer_state.json").read_text())["epoch"]


def test_sigkill_anywhere_then_resume_ends_like_the_uninterrupted_run(tmp_path_factory, tmp_path):
    reference_dir, _ = reference_run(tmp_path_factory)
    run_dir = tmp_path / "run"
    ckpt = run_dir / "checkpoints"

    # 1. while epoch 1's resume state is being written: checkpoints/best is complete, there is no last yet
    _killed_at(tmp_path, "1", lambda _: (ckpt / ".last-e0001-s0000008.tmp").is_dir(), resume=False,
               writing=".last-e0001-s0000008.tmp")
    assert (ckpt / ".last-e0001-s0000008.tmp").is_dir() and not (ckpt / "last").exists()
    load_best(run_dir)
    load_best_weights(run_dir)

    # 2. --resume with nothing to resume starts from the beginning, with a notice;
    #    killed in the middle of epoch 2, right after epoch 1's checkpoint
    killed = _killed_at(tmp_path, "2", lambda launch: "epoch 2/3 step 5/8" in launch.stdout())
    assert "has no complete checkpoint to resume: starting from the beginning" in killed.stdout()
    assert _epoch_of_last(ckpt) == 1
    load_resume_weights(run_dir)
    load_best_weights(run_dir)
    assert [m["epoch"] for m in read_jsonl(run_dir / "metrics.jsonl")] == [1]

    # 3. resumed after epoch 1; killed while epoch 2's resume state is being written
    killed = _killed_at(tmp_path, "3", lambda _: (ckpt / ".last-e0002-s0000016.tmp").is_dir(),
                        writing=".last-e0002-s0000016.tmp")
    assert f"resumed {run_dir} after epoch 1" in killed.stdout()
    assert (ckpt / "last").resolve().name == "last-e0001-s0000008" and _epoch_of_last(ckpt) == 1
    load_resume_weights(run_dir)
    load_best_weights(run_dir)

    # 4. resumed after epoch 1 again (epoch 2's metrics line, written before the kill, is dropped); to the end
    result = run(command(tmp_path, "run", [*REFERENCE, "train.resume=true"]))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed {run_dir} after epoch 1" in result.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "complete" and summary["epochs_completed"] == 3
    assert [m["epoch"] for m in read_jsonl(run_dir / "metrics.jsonl")] == [1, 2, 3]
    for mine, reference in ((load_resume_weights(run_dir), load_resume_weights(reference_dir)),
                            (load_best_weights(run_dir), load_best_weights(reference_dir))):
        assert mine.keys() == reference.keys()
        assert all((mine[k] == reference[k]).all() for k in mine)
    # Named by epoch and optimizer step (8 an epoch). Epoch 2's best was published by the run killed in 3,
    # and again by the resumed run: that one took the next free name, since `best` pointed at the first.
    epoch = summary["best_epoch"]
    best = f"best-e{epoch:04d}-s{8 * epoch:07d}" + ("-2" if epoch == 2 else "")
    assert (ckpt / "best").resolve().name == best
    leftovers = {p.name for p in ckpt.iterdir()} - {"best", "last", "last-e0003-s0000024", best}
    assert not leftovers  # the half-written directories of the killed runs are gone


def test_preempt_two_processes_loader_pipeline_grad_accum_killed_after_a_mid_epoch_save_resumes_exactly(tmp_path):
    """The DataLoader pipeline (image files, a worker per process) with gradient accumulation, two processes:
    train.checkpoint_every=2 saves every 2 optimizer steps (4 batches; 3 steps an epoch), inside epoch 2 at its batch 2; a SIGKILL right after
    one loses nothing before it, and --resume ends with the weights of the run that never stopped."""
    from test_data import make_folder

    root = make_folder(tmp_path / "photos", per_class=40)  # 120 files, 90 for training: 6 batches of 8 a process
    common = ["data.name=imagefolder", f"data.root={root}", "data.pipeline=loader", "data.num_workers=1",
              "data.batch_size=8", "data.image_size=16", "data.channels=3", "data.augment.crop_padding=2",
              "data.augment.hflip=true", "model.name=bn_cnn", "model.args={}", "train.epochs=2",
              "train.grad_accum_steps=2", "train.log_every=1"]
    straight = run(command(tmp_path, "straight", common))
    assert straight.returncode == 0, straight.stderr[-3000:]
    run_dir = tmp_path / "parts"
    launch = Background(command(tmp_path, "parts", [*common, "train.checkpoint_every=2"]), tmp_path / "logs")
    try:
        launch.wait_for(lambda: "checkpoints/last: epoch 2, batch 2 of 6 (step 4)" in launch.stdout())
    finally:
        launch.kill()
    assert processes_of(tmp_path) == []
    state = json.loads((run_dir / "checkpoints" / "last" / "trainer_state.json").read_text())
    assert (state["epoch"], state["batches_done"]) == (1, 2)

    resumed = run(command(tmp_path, "parts", [*common, "train.checkpoint_every=2", "train.resume=true"]))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed {run_dir} after epoch 1, batch 2 of 6 of epoch 2" in resumed.stdout
    mine, reference = load_resume_weights(run_dir), load_resume_weights(tmp_path / "straight")
    assert mine.keys() == reference.keys() and all((mine[k] == reference[k]).all() for k in mine)
    keys = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "val_samples")
    assert ([{k: m[k] for k in keys} for m in read_jsonl(run_dir / "metrics.jsonl")]
            == [{k: m[k] for k in keys} for m in read_jsonl(tmp_path / "straight" / "metrics.jsonl")])
