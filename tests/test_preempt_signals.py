"""Preemption on a plain `toolkit train` (one process, as a user runs it): SIGUSR1 (Slurm's warning) saves
checkpoints/last mid-epoch and exits 75 ("saved, resume me") with summary.json and plots/curves.png, and
--resume ends with the weights of a run never stopped; Ctrl-C does the same, a second Ctrl-C stops at once
(exit 130, summary `aborted`); a SIGKILL inside save_best or inside a mid-epoch save leaves the previous
checkpoint loadable, and a resume still ends with the uninterrupted weights."""

from __future__ import annotations

import json
import signal
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import BIN, FP32, ROOT, read_jsonl
from launching import Background, run
from toolkit.checkpoint import load_best

pytestmark = pytest.mark.slow

# smoke.yaml at 256 images: 12 steps of 16 an epoch, progress lines (and reduces) at steps 5, 10, 12
COMMON = ["train.epochs=2", "data.synthetic_samples=256", "data.batch_size=16", "data.augment.crop_padding=2",
          "model.name=bn_cnn", FP32]


def _args(out, name, *extra):
    args = ["--config", "smoke.yaml"]
    for item in (*COMMON, f"train.output_dir={out}", f"train.run_name={name}", *extra):
        args += ["--set", item]
    return args


def run_cli(*args):
    """`toolkit train` in the environment of a Background launch (one thread: the same arithmetic)."""
    return run([str(BIN / "toolkit"), *args])


def _weights(run_dir):
    return load_file(run_dir / "checkpoints" / "last" / "model.safetensors")


def _same(a, b):
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _summary(run_dir):
    return json.loads((run_dir / "summary.json").read_text())


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    result = run_cli("train", *_args(out, "run"))
    assert result.returncode == 0, result.stderr[-3000:]
    return out / "run"


def _launch(tmp_path, name, *extra) -> Background:
    return Background([str(BIN / "toolkit"), "train", *_args(tmp_path, name, *extra)], tmp_path / "logs" / name)


def test_preempt_sigusr1_saves_mid_epoch_exits_75_and_resumes_to_the_same_weights(straight, tmp_path):
    launch = _launch(tmp_path, "run")
    launch.wait_for(lambda: "epoch 2/2 step 5/12" in launch.stdout())
    launch.signal(signal.SIGUSR1)
    assert launch.wait() == 75
    run_dir = tmp_path / "run"
    summary = _summary(run_dir)
    assert (summary["status"], summary["epochs_completed"], summary["batches_done"]) == ("preempted", 1, 10)
    assert 0 < summary["last_save_s"] < 5  # measured: the save of this model takes well under a second
    line = launch.stderr().rstrip().splitlines()[-1]
    assert line == (f"stopped: preempted (SIGUSR1): checkpoints/last of {run_dir} saved at epoch 2, batch 10 in "
                    f"{summary['last_save_s']:.2f} s; continue with --resume (exit status 75)")
    assert (run_dir / "plots" / "curves.png").is_file() and [m["epoch"] for m in read_jsonl(run_dir / "metrics.jsonl")] == [1]

    result = run_cli("train", *_args(tmp_path, "run"), "--resume")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed {run_dir} after epoch 1, batch 10 of 12 of epoch 2" in result.stdout
    assert _summary(run_dir)["status"] == "complete"
    _same(_weights(run_dir), _weights(straight))


def test_ctrl_c_saves_and_writes_summary_and_curves_a_second_stops_at_once(tmp_path):
    launch = _launch(tmp_path, "once")
    launch.wait_for(lambda: "epoch 2/2 step 5/12" in launch.stdout())
    launch.signal(signal.SIGINT)
    assert launch.wait() == 75
    once = tmp_path / "once"
    assert "Ctrl-C: saving checkpoints/last at the next step" in launch.stdout()
    assert (_summary(once)["status"], _summary(once)["batches_done"]) == ("interrupted", 10)
    assert launch.stderr().rstrip().splitlines()[-1].startswith("stopped: interrupted (Ctrl-C): checkpoints/last of")
    assert (once / "plots" / "curves.png").is_file()

    launch = _launch(tmp_path, "twice")
    launch.wait_for(lambda: "epoch 2/2 step 5/12" in launch.stdout())
    launch.signal(signal.SIGINT)
    launch.wait_for(lambda: "Ctrl-C again to stop at once" in launch.stdout())
    launch.signal(signal.SIGINT)
    assert launch.wait() == 130
    twice = tmp_path / "twice"
    assert "interrupted at once: checkpoints/last holds the last save; continue with --resume" in launch.stderr()
    assert "Traceback" not in launch.stderr()
    assert _summary(twice)["status"] == "aborted" and (twice / "plots" / "curves.png").is_file()
    assert (twice / "checkpoints" / "last").resolve().name == "last-e0001-s0000012"  # nothing saved after Ctrl-C


def _kill_inside(tmp_path, where: str, target: str, *extra) :
    return run([sys.executable, str(ROOT / "tests" / "kill_inside.py"), where, target, *_args(tmp_path, "run", *extra)])


def test_kill_inside_save_best_or_a_mid_epoch_save_leaves_the_previous_checkpoint(straight, tmp_path):
    run_dir, ckpt = tmp_path / "run", tmp_path / "run" / "checkpoints"
    # 1. SIGKILL once the second best's weights are written, before its meta.json: best is still the first
    result = _kill_inside(tmp_path, "best", "2", "train.epochs=3")
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    staged = [p.name for p in ckpt.iterdir() if p.name.startswith(".best-")]
    assert len(staged) == 1 and (ckpt / staged[0] / "weights.pt").is_file()
    model, meta = load_best(run_dir)
    assert meta.epoch == 1 and (ckpt / "best").resolve().name == "best-e0001-s0000012"

    # 2. resumed (3 epochs) with mid-epoch saves every 4 steps: SIGKILL inside the save at step 16 (epoch 2,
    #    batch 4), once Accelerate wrote it and before trainer_state.json and the link
    result = _kill_inside(tmp_path, "mid", ".last-e0001-s0000016.tmp", "train.epochs=3", "train.resume=true",
                          "train.checkpoint_every=4")
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    assert (ckpt / ".last-e0001-s0000016.tmp" / "model.safetensors").is_file()
    assert (ckpt / "last").resolve().name == "last-e0001-s0000012"
    state = json.loads((ckpt / "last" / "trainer_state.json").read_text())
    assert (state["epoch"], state["batches_done"]) == (1, 0)
    load_best(run_dir)

    # 3. --resume (2 epochs, as the straight run) from epoch 1's checkpoint ends with the straight weights
    result = run_cli("train", *_args(tmp_path, "run", "train.checkpoint_every=4"), "--resume")
    assert result.returncode == 0, result.stderr[-3000:]
    _same(_weights(run_dir), _weights(straight))
