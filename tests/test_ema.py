"""EMA of the weights (train.ema): equal to a reference computed by hand over the same optimizer steps,
validated beside the trained model, what checkpoints/best holds (use_for: best), and part of the resume
state: a run stopped mid-epoch and resumed ends bit-identical to one never stopped (one process and two)."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import accelerate_launch, read_jsonl, train_run
from test_preempt import StopAt
from toolkit.hooks import Hook

# smoke.yaml at 128 images: 96 for training in batches of 8 = 12 optimizer steps an epoch; bn_cnn brings
# BatchNorm statistics (floating buffers, averaged too) and a counter (copied)
COMMON = ["train.epochs=2", "data.synthetic_samples=128", "data.batch_size=8", "model.name=bn_cnn",
          "data.augment.hflip=true", "train.ema.decay=0.8", "train.ema.warmup=5"]


class Recorder(Hook):
    """The network's state after set-up and after every optimizer step, on the CPU (a test only)."""

    def __init__(self):
        self.states = []

    def _take(self, run):
        self.states.append({k: v.detach().cpu().clone() for k, v in run.net.state_dict().items()})

    def on_setup(self, run):
        self._take(run)

    def after_optimizer_step(self, run, global_step):
        self._take(run)


def by_hand(states: list[dict], decay: float, warmup: int, steps: int) -> dict:
    """ema_0 = the initial weights; ema_t = d_t ema_{t-1} + (1 - d_t) w_t, d_t = decay min(1, (t-1)/warmup),
    in float64; counters are those of w_t."""
    ema = {k: v.double() if v.is_floating_point() else v for k, v in states[0].items()}
    for t in range(1, steps + 1):
        d = decay * min(1.0, (t - 1) / warmup)
        ema = {k: d * ema[k] + (1 - d) * w.double() if w.is_floating_point() else w for k, w in states[t].items()}
    return ema


def ema_state(run_dir) -> dict:
    state = torch.load(run_dir / "checkpoints" / "last" / "custom_checkpoint_0.pkl", weights_only=True)
    return state


def best_weights(run_dir) -> dict:
    return torch.load(run_dir / "checkpoints" / "best" / "weights.pt", weights_only=True)


def test_ema_equals_the_reference_by_hand_and_is_what_best_holds(tmp_path):
    recorder = Recorder()
    run_dir, summary = train_run(tmp_path, *COMMON, hooks=[recorder])
    assert len(recorder.states) == 1 + 24
    saved = ema_state(run_dir)
    assert saved["updates"] == 24
    reference = by_hand(recorder.states, 0.8, 5, 24)
    raw = recorder.states[-1]
    for key, value in saved["module"].items():
        if value.is_floating_point():
            torch.testing.assert_close(value.double(), reference[key], rtol=1e-5, atol=1e-6, msg=key)
        else:
            assert torch.equal(value, reference[key]), key
    assert any(not torch.allclose(saved["module"][k], raw[k]) for k in raw if raw[k].is_floating_point())

    metrics = read_jsonl(run_dir / "metrics.jsonl")
    assert all({"val_acc", "val_acc_ema", "val_loss_ema"} <= m.keys() for m in metrics)
    # best is chosen by the EMA's accuracy and holds the EMA's weights of that epoch
    best_epoch = max(metrics, key=lambda m: m["val_acc_ema"])["epoch"]
    assert summary["best_epoch"] == best_epoch and summary["best_val_acc"] == metrics[best_epoch - 1]["val_acc_ema"]
    assert json.loads((run_dir / "checkpoints" / "best" / "meta.json").read_text())["ranked_by"] == "val_acc_ema"
    at_best = by_hand(recorder.states, 0.8, 5, 12 * best_epoch)
    for key, value in best_weights(run_dir).items():
        if value.is_floating_point():
            torch.testing.assert_close(value.double(), at_best[key], rtol=1e-5, atol=1e-6, msg=key)


def test_use_for_none_keeps_the_trained_weights_in_best(tmp_path):
    recorder = Recorder()
    run_dir, summary = train_run(tmp_path, *COMMON, "train.epochs=1", "train.ema.use_for=none", hooks=[recorder])
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    assert summary["best_val_acc"] == metrics[0]["val_acc"] and "val_acc_ema" in metrics[0]
    for key, value in best_weights(run_dir).items():
        assert torch.equal(value, recorder.states[-1][key]), key


def _equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], dict):
            _equal(a[key], b[key])
        else:
            assert torch.equal(torch.as_tensor(a[key]), torch.as_tensor(b[key])), key


def test_ema_resumed_mid_epoch_is_bit_identical_to_an_uninterrupted_run(tmp_path):
    straight, _ = train_run(tmp_path, *COMMON, name="straight")
    # asked to stop at step 15, saved at step 16 (checkpoint_every 4), inside epoch 2; then resumed
    parts, summary = train_run(tmp_path, *COMMON, "train.checkpoint_every=4", name="parts", hooks=[StopAt(15)])
    assert summary["status"] == "requested" and ema_state(parts)["updates"] == 16
    resumed, summary = train_run(tmp_path, *COMMON, "train.resume=true", name="parts")
    assert summary["status"] == "complete"
    _equal(ema_state(resumed), ema_state(straight))
    _equal(best_weights(resumed), best_weights(straight))
    keys = ("epoch", "val_acc", "val_loss", "val_acc_ema", "val_loss_ema")
    assert ([{k: m[k] for k in keys} for m in read_jsonl(resumed / "metrics.jsonl")]
            == [{k: m[k] for k in keys} for m in read_jsonl(straight / "metrics.jsonl")])


@pytest.mark.distributed
def test_ema_of_two_processes_resumed_is_bit_identical_to_an_uninterrupted_run(tmp_path):
    common = [*COMMON, "train.epochs=3", "data.synthetic_samples=160"]  # 120 train: 8 steps of 8 per process
    straight, result = accelerate_launch(tmp_path, *common, name="straight")
    assert result.returncode == 0, result.stderr[-3000:]
    parts, result = accelerate_launch(tmp_path, *common, "train.stop_after=1", name="parts")
    assert result.returncode == 0, result.stderr[-3000:]
    assert ema_state(parts)["updates"] == 8
    parts, result = accelerate_launch(tmp_path, *common, "train.resume=true", name="parts")
    assert result.returncode == 0, result.stderr[-3000:]
    _equal(ema_state(parts), ema_state(straight))
    _equal(best_weights(parts), best_weights(straight))
    assert ema_state(parts)["updates"] == 24


@pytest.mark.distributed
def test_ema_is_identical_on_both_processes_where_it_is_validated_and_saved(tmp_path):
    """rank_probe.py copies, on each process, the module each epoch's checkpoints/best would hold: with
    train.ema on, the EMA (weights and BatchNorm statistics, the latter the main process's, as validated)."""
    from launching import ROOT, command, run

    overrides = [*COMMON, "data.synthetic_samples=160"]
    result = run(command(tmp_path / "runs", "run", overrides, script=ROOT / "tests" / "rank_probe.py",
                         script_args=[str(tmp_path / "ranks")]))
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [torch.load(tmp_path / "ranks" / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert len(ranks[0]["served"]) == len(ranks[1]["served"]) == 2
    for mine, theirs in zip(ranks[0]["served"], ranks[1]["served"]):
        _equal(mine, theirs)
    final, raw = ranks[0]["served"][-1], ranks[0]["state_dict"]
    assert any(not torch.equal(final[k], raw[k]) for k in raw if raw[k].is_floating_point())  # the EMA, not the weights
    _equal(ema_state(tmp_path / "runs" / "run")["module"], final)
