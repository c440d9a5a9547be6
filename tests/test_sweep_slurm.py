"""`toolkit sweep --slurm`: one job array on the real two-node Slurm of tests/cluster.py, one task per point,
each training its run in the sweep directory's layout; task 0 is preempted (SIGUSR1, as Slurm's time-limit
warning) in its middle, saves, exits 75, requeues itself and resumes; `--status` shows the runs done."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from cluster import Nodes, Slurm, install_slurm, why_not
from conftest import BIN, ROOT, read_jsonl
from test_sweep import TINY
from toolkit.rundir import RunDir

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


@pytest.fixture(scope="module")
def slurm():
    reason = why_not() or install_slurm()
    if reason:
        pytest.skip(reason)
    nodes = Nodes()
    root = Path(tempfile.mkdtemp(prefix="toolkit-slurm-"))  # munged (the munge user) must reach its files
    try:
        cluster = Slurm(nodes, root)
        yield cluster
        cluster.stop()
    finally:
        nodes.delete()
        shutil.rmtree(root, ignore_errors=True)


def _tasks(slurm, job: str) -> dict[str, dict]:
    """Each task of the array (`scontrol show job`, one line per task) by its ArrayTaskId."""
    out = slurm.scontrol("show", "job", "-o", job, check=False).stdout
    tasks = [dict(item.split("=", 1) for item in line.split() if "=" in item) for line in out.splitlines()]
    return {t.get("ArrayTaskId"): t for t in tasks if "ArrayTaskId" in t}


def _why(slurm, job: str, out: Path) -> str:
    """What a failed wait shows: each task's state, and the end of its log and of the daemons' logs."""
    fields = ("JobId", "JobState", "Reason", "Restarts", "EligibleTime", "StartTime", "ExitCode", "NodeList")
    states = {i: {k: t.get(k) for k in fields} for i, t in _tasks(slurm, job).items()}
    logs = {p.name: p.read_text()[-1500:] for p in sorted((out / "logs").glob("*.out"))}
    return f"tasks: {states}\ntask logs: {logs}\ndaemons: {slurm.logs()[-3000:]}"


def test_a_sweep_as_a_job_array_runs_every_point_and_a_preempted_task_requeues_and_resumes(slurm, tmp_path):
    out = tmp_path / "sweep"
    env = {**slurm.env, "PATH": f"{BIN}:/usr/bin:/bin:/usr/sbin:/sbin", "OMP_NUM_THREADS": "1",
           "PYTHONUNBUFFERED": "1", "SBATCH": slurm.bin["sbatch"], "SRUN": slurm.bin["srun"],
           "SCONTROL": slurm.bin["scontrol"]}
    t0 = time.monotonic()
    submitted = subprocess.run([str(BIN / "toolkit"), "sweep", *TINY, "--set", "train.log_every=2", "--out", str(out),
                                "--grid", "optim.lr=2e-3,5e-4", "--slurm", "--ntasks", "1", "--cpus-per-task", "1"],
                               cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert submitted.returncode == 0, submitted.stderr
    job = json.loads((out / "sweep.json").read_text())["slurm_job"]
    assert f"submitted job array {job}: 2 task(s)" in submitted.stdout
    names = ["lr=2e-3", "lr=5e-4"]
    first = out / names[0] / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while not (first.is_file() and first.read_text().count("\n") >= 1):  # task 0 in its second epoch
        assert time.monotonic() < deadline, _why(slurm, job, out)
        time.sleep(0.05)
    signalled = subprocess.run([slurm.bin["scancel"], "--signal=USR1", f"{job}_0"], env=env, capture_output=True,
                               text=True)
    assert signalled.returncode == 0, signalled.stderr
    deadline = time.monotonic() + 120
    while not (_tasks(slurm, job).get("0", {}).get("JobState") == "PENDING" and
               int(_tasks(slurm, job)["0"].get("Restarts", 0)) >= 1):
        assert time.monotonic() < deadline, _why(slurm, job, out)
        time.sleep(0.5)
    deadline = time.monotonic() + 300
    while not all((RunDir(out / n).read_summary() or {}).get("status") == "complete" for n in names):
        assert time.monotonic() < deadline, _why(slurm, job, out)
        time.sleep(0.5)
    took = time.monotonic() - t0
    logs = {p.name: p.read_text() for p in (out / "logs").glob("*.out")}
    task0 = logs[f"{job}_0.out"]
    assert "stopped: preempted (SIGUSR1)" in task0 and f"requeueing task {job}_0" in task0, task0[-3000:]
    assert f"resumed {out.resolve() / names[0]} after epoch" in task0, task0[-3000:]
    for name in names:
        assert [m["epoch"] for m in read_jsonl(out / name / "metrics.jsonl")] == [1, 2, 3]
        assert (out / name / "checkpoints" / "best").is_dir() and (out / name / "config.yaml").is_file()
    status = subprocess.run([str(BIN / "toolkit"), "sweep", "--status", str(out)], env=env, capture_output=True,
                            text=True, timeout=60)
    assert status.returncode == 0 and "2 done" in status.stdout and f"slurm job {job}" in status.stdout, status.stdout
    print(f"job array {job}: 2 tasks, task 0 preempted, requeued and resumed; all done in {took:.0f} s")
