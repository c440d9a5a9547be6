"""top-k checkpoints (train.save_top_k) under checkpoints/top/ and `toolkit average RUN`: exactly k, the
epochs with the best val accuracy, each loadable like checkpoints/best; kept right across a SIGKILL and a
resume; averaging one checkpoint gives that checkpoint back."""

from __future__ import annotations

import sys

import pytest
import torch

from conftest import FP32, ROOT, read_jsonl, run_cli, run_main, train_run
from toolkit.average import average_states
from toolkit.checkpoint import load_best
from toolkit.rundir import read_meta

# smoke.yaml at 128 images: 96 for training in batches of 8 = 12 steps an epoch; a low lr so the val
# accuracy moves from epoch to epoch
COMMON = ["data.synthetic_samples=128", "data.batch_size=8", "optim.lr=2e-4", "train.save_top_k=2"]


def top(run_dir) -> dict:
    return {p.name: p for p in sorted((run_dir / "checkpoints" / "top").iterdir())}


def expected_top(run_dir, k: int) -> list[str]:
    """The k best epochs of metrics.jsonl (ties: the earlier epoch), named by epoch and step."""
    metrics = sorted(read_jsonl(run_dir / "metrics.jsonl"), key=lambda m: (-m["val_acc"], m["epoch"]))[:k]
    return sorted(f"e{m['epoch']:04d}-s{12 * m['epoch']:07d}" for m in metrics)


def weights(path) -> dict:
    return torch.load(path / "weights.pt", weights_only=True)


def test_top_k_keeps_the_k_best_epochs_and_average_writes_their_mean(tmp_path, capsys):
    run_dir, summary = train_run(tmp_path, *COMMON, "train.epochs=4")
    entries = top(run_dir)
    assert sorted(entries) == expected_top(run_dir, 2)
    for path in entries.values():
        model, meta = load_best(path)  # loadable like checkpoints/best
        assert meta.epoch == int(path.name[1:5]) and meta.val_acc is not None
    best = read_meta(run_dir)[1].epoch
    assert f"e{best:04d}-s{12 * best:07d}" in entries and summary["best_epoch"] == best

    code, out, _ = run_main(capsys, "average", str(run_dir))
    assert code == 0 and "averaged 2 checkpoints of checkpoints/top/" in out, out
    average = weights(run_dir / "checkpoints" / "average")
    a, b = (weights(p) for p in entries.values())
    for key, value in average.items():
        if value.is_floating_point():
            torch.testing.assert_close(value, (a[key] + b[key]) / 2)
    load_best(run_dir / "checkpoints" / "average")
    assert ("the average is better" in out) or ("the average is not better" in out)


def test_averaging_one_checkpoint_gives_that_checkpoint(tmp_path, capsys):
    run_dir, _ = train_run(tmp_path, *COMMON, "train.epochs=2", "train.save_top_k=1")
    (only,) = top(run_dir).values()
    code, out, _ = run_main(capsys, "average", str(run_dir))
    assert code == 0, out
    mine, theirs = weights(run_dir / "checkpoints" / "average"), weights(only)
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    best = weights(run_dir / "checkpoints" / "best")  # the top-1 is the best
    assert all(torch.equal(best[k], theirs[k]) for k in best)
    assert "the average is not better" in out  # equal to best, so not better
    state = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(3)}
    assert average_states([state])["w"].equal(state["w"]) and average_states([state])["n"].equal(state["n"])


def test_average_without_top_k_is_a_clear_error(tmp_path):
    run_dir, _ = train_run(tmp_path, "data.synthetic_samples=64", "train.epochs=1")
    result = run_cli("average", str(run_dir))
    assert result.returncode == 2 and "train.save_top_k" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_top_k_survives_a_sigkill_and_a_resume(tmp_path):
    args = ["--config", "smoke.yaml"]
    for item in (FP32, *COMMON, "train.epochs=5", f"train.output_dir={tmp_path}"):
        args += ["--set", item]
    straight = run_cli("train", *args, "--set", "train.run_name=straight")
    assert straight.returncode == 0, straight.stderr[-2000:]
    # killed once epoch 3's resume state is written, before its link: epoch 3 is in top/ already, checkpoints/last
    # is epoch 2's; the resume drops epoch 3's entry and trains it again
    import subprocess

    killed = subprocess.run([sys.executable, str(ROOT / "tests" / "kill_inside.py"), "mid", ".last-e0003-s0000036.tmp",
                             *args, "--set", "train.run_name=run"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert killed.returncode == -9, killed.stderr[-2000:]
    run_dir = tmp_path / "run"
    assert (run_dir / "checkpoints" / "last").resolve().name == "last-e0002-s0000024"
    for path in top(run_dir).values():
        load_best(path)
    resumed = run_cli("train", *args, "--set", "train.run_name=run", "--set", "train.resume=true")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert sorted(top(run_dir)) == sorted(top(tmp_path / "straight")) == expected_top(run_dir, 2)
    assert not [p for p in (run_dir / "checkpoints" / "top").iterdir() if p.name.startswith(".")]
    for name, path in top(run_dir).items():
        mine, theirs = weights(path), weights(tmp_path / "straight" / "checkpoints" / "top" / name)
        assert all(torch.equal(mine[k], theirs[k]) for k in mine)
