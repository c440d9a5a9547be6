"""Preemption on a plain `toolkit train` (the command, in this process, receiving real signals at a chosen
step): SIGUSR1 (Slurm's warning) saves checkpoints/last mid-epoch and exits 75 ("saved, resume me") with
summary.json and plots/curves.png, and --resume ends with the weights of a run never stopped; Ctrl-C does
the same, a second Ctrl-C stops at once (exit 130, summary `aborted`). A SIGKILL inside save_best or inside
a mid-epoch save (a process of its own) leaves the previous checkpoint loadable. Signals from outside, to
real processes: test_cluster.py (scancel --signal=USR1 under Slurm)."""

from __future__ import annotations

import json
import os
import signal
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import FP32, ROOT, read_jsonl, run_main, train_run
from launching import run
from toolkit.checkpoint import load_best
from toolkit.hooks import Hook

pytestmark = pytest.mark.slow

# smoke.yaml at 128 images: 12 steps of 8 an epoch, progress lines (and reduces) at steps 5, 10, 12
COMMON = ["train.epochs=2", "data.synthetic_samples=128", "data.batch_size=8", "data.augment.crop_padding=2",
          "model.name=bn_cnn"]


def _args(out, name, *extra):
    args = ["--config", "smoke.yaml"]
    for item in (*COMMON, FP32, f"train.output_dir={out}", f"train.run_name={name}", *extra):
        args += ["--set", item]
    return args


def _weights(run_dir):
    return load_file(run_dir / "checkpoints" / "last" / "model.safetensors")


def _same(a, b):
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _summary(run_dir):
    return json.loads((run_dir / "summary.json").read_text())


class SignalAt(Hook):
    """Sends this process real signals at one optimizer step, as a scheduler or a terminal would."""

    def __init__(self, step: int, *signums: int):
        self.step, self.signums = step, signums

    def after_optimizer_step(self, run, global_step: int) -> None:
        if global_step == self.step:
            for signum in self.signums:
                os.kill(os.getpid(), signum)


def _cli_with_signals(capsys, monkeypatch, args, step: int, *signums: int):
    """The `toolkit` command in this process, receiving `signums` at optimizer step `step`."""
    from toolkit import engine

    real = engine.preempt_hooks
    monkeypatch.setattr(engine, "preempt_hooks", lambda cfg: [*real(cfg), SignalAt(step, *signums)])
    return run_main(capsys, "train", *args)


def test_preempt_sigusr1_saves_mid_epoch_exits_75_and_resumes_to_the_same_weights(tmp_path, capsys, monkeypatch):
    before = signal.getsignal(signal.SIGUSR1)
    straight, _ = train_run(tmp_path, *COMMON, name="straight")
    # SIGUSR1 at step 15 (epoch 2, batch 3): saved at the next agreed point, the reduce at batch 5
    code, out, err = _cli_with_signals(capsys, monkeypatch, _args(tmp_path, "run"), 15, signal.SIGUSR1)
    assert code == 75, err
    run_dir = tmp_path / "run"
    summary = _summary(run_dir)
    assert (summary["status"], summary["epochs_completed"], summary["batches_done"]) == ("preempted", 1, 5)
    assert 0 < summary["last_save_s"] < 5  # measured: the save of this model takes well under a second
    assert err.rstrip().splitlines()[-1] == (
        f"stopped: preempted (SIGUSR1): checkpoints/last of {run_dir} saved at epoch 2, batch 5 in "
        f"{summary['last_save_s']:.2f} s; continue with --resume (exit status 75)")
    assert (run_dir / "plots" / "curves.png").is_file() and [m["epoch"] for m in read_jsonl(run_dir / "metrics.jsonl")] == [1]
    assert signal.getsignal(signal.SIGUSR1) == before  # handlers given back

    code, out, err = run_main(capsys, "train", *_args(tmp_path, "run"), "--resume")
    assert code == 0, err
    assert f"resumed {run_dir} after epoch 1, batch 5 of 12 of epoch 2" in out
    assert _summary(run_dir)["status"] == "complete"
    _same(_weights(run_dir), _weights(straight))


def test_ctrl_c_saves_and_writes_summary_and_curves_a_second_stops_at_once(tmp_path, capsys, monkeypatch):
    before = signal.getsignal(signal.SIGINT)  # Python's default_int_handler, or SIG_IGN in a background job
    code, out, err = _cli_with_signals(capsys, monkeypatch, _args(tmp_path, "once"), 15, signal.SIGINT)
    assert code == 75, err
    once = tmp_path / "once"
    assert "Ctrl-C: saving checkpoints/last at the next step all processes agree on" in out
    assert (_summary(once)["status"], _summary(once)["batches_done"]) == ("interrupted", 5)
    assert err.rstrip().splitlines()[-1].startswith(f"stopped: interrupted (Ctrl-C): checkpoints/last of {once} saved")
    assert (once / "plots" / "curves.png").is_file()

    code, out, err = _cli_with_signals(capsys, monkeypatch, _args(tmp_path, "twice"), 15, signal.SIGINT, signal.SIGINT)
    assert code == 130
    twice = tmp_path / "twice"
    assert err.strip() == "interrupted at once: checkpoints/last holds the last save; continue with --resume"
    assert _summary(twice)["status"] == "aborted" and (twice / "plots" / "curves.png").is_file()
    assert (twice / "checkpoints" / "last").resolve().name == "last-e0001-s0000012"  # nothing saved after Ctrl-C
    assert signal.getsignal(signal.SIGINT) == before  # given back, after a second Ctrl-C too


def _kill_inside(tmp_path, where: str, target: str, *extra):
    return run([sys.executable, str(ROOT / "tests" / "kill_inside.py"), where, target, *_args(tmp_path, "run", *extra)])


def test_kill_inside_save_best_or_a_mid_epoch_save_leaves_the_previous_checkpoint(tmp_path):
    run_dir, ckpt = tmp_path / "run", tmp_path / "run" / "checkpoints"
    # 1. SIGKILL once the second best's weights are written, before its meta.json: best is still the first
    result = _kill_inside(tmp_path, "best", "2", "train.epochs=3")
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    staged = [p.name for p in ckpt.iterdir() if p.name.startswith(".best-")]
    assert len(staged) == 1 and (ckpt / staged[0] / "weights.pt").is_file()
    model, meta = load_best(run_dir)
    assert meta.epoch == 1 and (ckpt / "best").resolve().name == "best-e0001-s0000012"

    # 2. resumed with mid-epoch saves every 4 steps: SIGKILL inside the save at step 16 (epoch 2, batch 4),
    #    once Accelerate wrote it and before trainer_state.json and the link; checkpoints/last is epoch 1's
    result = _kill_inside(tmp_path, "mid", ".last-e0001-s0000016.tmp", "train.epochs=3", "train.resume=true",
                          "train.checkpoint_every=4")
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    assert (ckpt / ".last-e0001-s0000016.tmp" / "model.safetensors").is_file()
    assert (ckpt / "last").resolve().name == "last-e0001-s0000012"
    state = json.loads((ckpt / "last" / "trainer_state.json").read_text())
    assert (state["epoch"], state["batches_done"]) == (1, 0)
    load_file(ckpt / "last" / "model.safetensors")
    torch.load(ckpt / "last" / "optimizer.bin", weights_only=True)
    load_best(run_dir)
