"""toolkit sweep: every point validated before anything runs; runs named from their values under one sweep
directory with sweep.json; a sweep interrupted (Ctrl-C) in its third run and run again skips the finished
runs (their files untouched) and resumes the partial one; `--status`; seeded random draws; and
`toolkit compare` of that sweep. The job array on a real Slurm is tests/test_sweep_slurm.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest
from PIL import Image

from conftest import BIN, FP32, ROOT, read_jsonl, run_cli, run_main
from toolkit.sweep import parse_axis, plan, points, run_name

# Tiny digits: 8x8 images, 899 for training, an MLP; three epochs so that a run can stop in its middle.
TINY = ["--config", "digits.yaml", "--set", FP32, "--set", "data.image_size=8", "--set", "train.epochs=3",
        "--set", "train.patience=null", "--set", "train.log_every=5", "--set", "data.augment.crop_padding=0",
        "--set", "model.name=mlp", "--set", "data.val_fraction=0.5"]
GRID = ["--grid", "optim.lr=2e-3,5e-4", "--grid", "data.batch_size=32,64"]
NAMES = ["lr=2e-3,batch_size=32", "lr=2e-3,batch_size=64", "lr=5e-4,batch_size=32", "lr=5e-4,batch_size=64"]


def test_an_invalid_value_anywhere_is_reported_for_its_run_and_nothing_starts(tmp_path, capsys):
    out = tmp_path / "sweep"
    code, _, err = run_main(capsys, "sweep", *TINY, "--out", str(out), "--grid", "optim.lr=1e-3,-1",
                            "--grid", "optim.name=adam,adamm")
    assert code == 2 and "Traceback" not in err
    assert "run lr=-1,name=adam: --set: optim.lr: " in err and "greater than 0" in err
    assert "run lr=1e-3,name=adamm: --set: optim.name: 'adamm' is not one of" in err and "(did you mean 'adam'?)" in err
    assert err.rstrip().endswith("nothing was started: 3 of 4 runs are not valid")
    assert not out.exists()
    code, _, err = run_main(capsys, "sweep", *TINY, "--grid", "optim.lr=log_uniform(1e-4,1e-2)")
    assert code == 2 and "a range is drawn from, not listed: add --random N" in err
    code, _, err = run_main(capsys, "sweep", *TINY, "--grid", "train.run_name=a,b")
    assert code == 2 and "the sweep names its runs and their directory itself" in err


def test_runs_are_named_from_their_values_and_random_draws_are_seeded(tmp_path, capsys):
    assert [run_name(p) for p in points([parse_axis("optim.lr=2e-3,5e-4"), parse_axis("data.batch_size=32,64")])] == NAMES
    assert run_name({"optim.name": "sgd", "model.name": "bn_cnn"}) == "optim.name=sgd,model.name=bn_cnn"  # clash
    axes = [parse_axis("optim.lr=log_uniform(1e-4,1e-2)"), parse_axis("optim.name=adam,sgd")]
    drawn = points(axes, random_count=5, seed=3)
    assert drawn == points(axes, random_count=5, seed=3) != points(axes, random_count=5, seed=4)
    assert len({run_name(p) for p in drawn}) == 5 and all(1e-4 <= float(p["optim.lr"]) <= 1e-2 for p in drawn)
    planned = plan("digits.yaml", [FP32], ["optim.lr=log_uniform(1e-4,1e-2)"], random_count=3, seed=1,
                   out=str(tmp_path / "s"))
    assert [r["overrides"][-1] for r in planned["runs"]] == [f"optim.lr={p['optim.lr']}" for p in
                                                            points([axes[0]], random_count=3, seed=1)]
    code, out, _ = run_main(capsys, "sweep", *TINY, "--out", str(tmp_path / "dry"), *GRID, "--dry-run")
    assert code == 0 and out.splitlines()[:4] == [f"{(tmp_path / 'dry').resolve()}/{n}" for n in NAMES]
    assert not (tmp_path / "dry").exists()


def _wait(predicate, proc, timeout=300):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None and time.monotonic() < deadline, proc.poll()
        time.sleep(0.05)


@pytest.fixture(scope="session")
def sweep_2x2(tmp_path_factory):
    """The 2x2 sweep, Ctrl-C'd in the middle of its third run, then the same command again. Returns the
    sweep directory, both outputs and the file times of the first two runs before the rerun."""
    out = tmp_path_factory.mktemp("sweep") / "digits-lr-batch"
    cmd = [str(BIN / "toolkit"), "sweep", *TINY, "--out", str(out), *GRID]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    t0 = time.monotonic()
    # its own session, so that the Ctrl-C below reaches the sweep and its runs as a terminal's would
    first = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)
    third = out / NAMES[2] / "metrics.jsonl"
    _wait(lambda: third.is_file() and third.read_text().count("\n") >= 1, first)
    os.killpg(first.pid, signal.SIGINT)
    first_out, _ = first.communicate(timeout=120)
    first_s = time.monotonic() - t0
    started = sorted(p.name for p in out.iterdir() if p.is_dir())
    times = {n: {p.relative_to(out / n): p.stat().st_mtime_ns for p in (out / n).rglob("*") if p.is_file()}
             for n in NAMES[:2]}
    t0 = time.monotonic()
    second = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    print(f"2x2 sweep: {first_s:.0f} s until the Ctrl-C and its stop, {time.monotonic() - t0:.0f} s for the rerun")
    return out, (first.returncode, first_out, started), second, times


@pytest.mark.slow
def test_a_sweep_interrupted_and_run_again_skips_finished_runs_and_resumes_the_partial_one(sweep_2x2):
    out, (status, first, started), second, times = sweep_2x2
    assert status == 75, first[-3000:]
    assert [line for line in first.splitlines() if line.startswith("sweep: ")] == [
        f"sweep: {NAMES[0]}: starting", *[line for line in first.splitlines() if line.startswith(f"sweep: {NAMES[0]}: done (exit status 0")],
        f"sweep: {NAMES[1]}: starting", *[line for line in first.splitlines() if line.startswith(f"sweep: {NAMES[1]}: done (exit status 0")],
        f"sweep: {NAMES[2]}: starting", *[line for line in first.splitlines() if line.startswith(f"sweep: {NAMES[2]}: stopped (exit status 75")],
        f"sweep: stopped at {NAMES[2]}; run the same command again to continue (exit status 75)"]
    assert started == NAMES[:3]  # nothing started after the stop
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    text = second.stdout
    assert f"sweep: {NAMES[0]}: done already, skipped" in text and f"sweep: {NAMES[1]}: done already, skipped" in text
    assert f"sweep: {NAMES[2]}: resuming" in text and f"resumed {out.resolve() / NAMES[2]} after epoch 1" in text
    assert f"sweep: {NAMES[3]}: starting" in text and f"sweep {out.resolve()}: 4 of 4 runs done" in text
    assert text.count("Epoch [1/3]") == 1  # the fourth run's first epoch only: nothing trained twice
    for name, before in times.items():  # the finished runs were not touched
        assert {p.relative_to(out / name): p.stat().st_mtime_ns for p in (out / name).rglob("*") if p.is_file()} == before
    data = json.loads((out / "sweep.json").read_text())
    assert [r["name"] for r in data["runs"]] == NAMES and {r["state"] for r in data["runs"]} == {"done"}
    assert data["runs"][3]["values"] == {"optim.lr": "5e-4", "data.batch_size": "64"}
    for name in NAMES:
        assert [m["epoch"] for m in read_jsonl(out / name / "metrics.jsonl")] == [1, 2, 3]
        cfg = (out / name / "config.yaml").read_text()
        assert f"lr: {float(name.split(',')[0][3:])}" in cfg and f"batch_size: {name.rsplit('=', 1)[1]}" in cfg
    status = run_cli("sweep", "--status", str(out))
    assert status.returncode == 0 and status.stdout.rstrip().endswith("4 done"), status.stdout
    assert all(n in status.stdout for n in NAMES) and "3/3" in status.stdout


@pytest.mark.slow
def test_compare_of_the_sweep_lists_its_four_runs_best_first_and_draws_them_apart(sweep_2x2):
    out = sweep_2x2[0]
    shown = run_cli("compare", str(out))
    assert shown.returncode == 0, shown.stderr
    rows = [line for line in shown.stdout.splitlines() if any(line.strip("│ ").startswith(n) for n in NAMES)]
    assert len(rows) == 4
    for column in ("lr", "batch_size", "best val acc", "final val acc", "best epoch", "images/s", "wall", "status"):
        assert column in shown.stdout
    picture = out / "compare.png"
    assert f"curves of 4 runs: {picture}" in shown.stdout
    with Image.open(picture) as image:
        assert image.format == "PNG" and image.size == (1200, 520)
    print(shown.stdout)
    print(f"compare.png: {image.size[0]}x{image.size[1]}, {picture.stat().st_size / 1e3:.0f} kB")

    result = json.loads(run_cli("compare", str(out), "--json").stdout)
    assert result["differing"] == ["data.batch_size", "optim.lr"]
    runs = result["runs"]
    assert sorted(r["name"] for r in runs) == sorted(NAMES)
    best = [r["best_val_acc"] for r in runs]
    assert best == sorted(best, reverse=True) and all(0.3 < b <= 1 for b in best)  # 10 classes: chance is 0.1
    assert [r["name"] for r in runs] == [line.strip("│ ").split()[0] for line in rows]  # the table's order
    for run in runs:
        lr, batch = run["name"].split(",")
        assert run["values"] == {"data.batch_size": int(batch.split("=")[1]), "optim.lr": float(lr.split("=")[1])}
        assert run["label"] == f"batch_size={batch.split('=')[1]}, lr={float(lr.split('=')[1]):g}"
        history = read_jsonl(out / run["name"] / "metrics.jsonl")
        assert run["final_val_acc"] == history[-1]["val_acc"] and run["status"] == "complete"
        assert run["best_val_acc"] == max(m["val_acc"] for m in history) and run["epochs"] == 3
        assert run["images_per_s"] > 0 and run["wall_s"] > 0


@pytest.mark.distributed
@pytest.mark.slow
def test_each_point_runs_under_the_launcher_given(tmp_path):
    """--launch launch/cpu.sh: the point is a two-process run (one point, one epoch: the launcher is the point)."""
    out = tmp_path / "sweep"
    result = run_cli("sweep", *TINY, "--set", "train.epochs=1", "--out", str(out), "--grid", "optim.lr=2e-3",
                     "--launch", str(ROOT / "launch" / "cpu.sh"),
                     env={"NUM_PROCESSES": "2", "OMP_NUM_THREADS": "1", "ACCELERATE": str(BIN / "accelerate")})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    summary = json.loads((out / "lr=2e-3" / "summary.json").read_text())
    assert summary["status"] == "complete" and summary["num_processes"] == 2 and summary["val_samples"] == 898
    assert "sweep: lr=2e-3: done (exit status 0" in result.stdout


def test_status_sees_a_killed_run_and_a_directory_holds_one_sweep(tmp_path, capsys):
    from toolkit.sweep import Sweep

    out = tmp_path / "s"
    planned = plan("digits.yaml", [FP32], ["optim.lr=2e-3,5e-4"], out=str(out))
    sweep = Sweep(out)
    assert sweep.create(planned) == planned and sweep.create(plan("digits.yaml", [FP32], ["optim.lr=2e-3,5e-4"],
                                                                  out=str(out))) == planned  # a rerun
    dead = subprocess.Popen(["true"])
    dead.wait()
    sweep.update("lr=2e-3", state="running", pid=dead.pid, host=os.uname().nodename)
    sweep.update("lr=5e-4", state="running", pid=os.getpid(), host=os.uname().nodename)
    code, shown, _ = run_main(capsys, "sweep", "--status", str(out))
    assert code == 0 and shown.rstrip().endswith("1 running, 1 stopped"), shown
    code, _, err = run_main(capsys, "sweep", "--config", "digits.yaml", "--out", str(out), "--grid", "optim.lr=1e-2")
    assert code == 2 and f"{out.resolve()} holds another sweep" in err
