"""Running a sweep's points (toolkit/sweep.py plans them): each point is its own process (Accelerate keeps
process-wide state), `toolkit train --resume` of its run directory, so a rerun skips finished runs and
resumes partial ones; optionally under a launcher (`accelerate launch ...`, launch/cpu.sh). On Slurm, one
job array: task i runs point i the same way, and a task stopped with status 75 (saved: preempted) requeues
itself and resumes, as launch/slurm.sbatch does for one run."""

from __future__ import annotations

import contextlib
import os
import signal
import shlex
import subprocess
import sys
import time
from pathlib import Path

from toolkit.errors import ToolkitError
from toolkit.rundir import RunDir
from toolkit.sweep import Sweep

EXIT_RESUME = 75  # toolkit/preempt.py's: saved, resume me (kept torch-free here)
TRAIN_SCRIPT = Path(__file__).resolve().parent / "train.py"


def train_command(data: dict, run: dict, launch: str | None = None) -> list[str]:
    """The command that trains (or resumes) one point: `toolkit train`, or the launcher given. A launcher
    named `accelerate` gets toolkit/train.py; any other (launch/cpu.sh, node.sh) takes train's arguments."""
    args = ["--resume", "--config", data["config"]]
    for item in [*run["overrides"], f"train.output_dir={data['dir']}", f"train.run_name={run['name']}"]:
        args += ["--set", item]
    if not launch:
        return [sys.executable, "-m", "toolkit", "train", *args]
    words = shlex.split(launch)
    if Path(words[0]).name == "accelerate":
        return [*words, str(TRAIN_SCRIPT), *args]
    return [*words, *args]


def wait_through_interrupts(proc: subprocess.Popen) -> int:
    """The child's status. A Ctrl-C reaches the child too (same process group), which saves and exits 75:
    the sweep waits for that instead of leaving (subprocess.run would kill the child on KeyboardInterrupt).
    A scheduler's SIGUSR1 or SIGTERM is passed on (the child saves and exits 75; twice is the same as once)."""
    def forward(signum, frame):
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signum)

    for signum in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(signum, forward)
    while True:
        try:
            return proc.wait()
        except KeyboardInterrupt:
            continue


def run_point(sweep: Sweep, data: dict, run: dict, launch: str | None = None, **where) -> int:
    """Train one point to its end (or stop); records its state in sweep.json; returns the exit status."""
    layout = RunDir(sweep.path / run["name"])
    if layout.is_finished():
        sweep.update(run["name"], state="done")
        print(f"sweep: {run['name']}: done already, skipped", flush=True)
        return 0
    verb = "resuming" if layout.is_occupied() else "starting"
    print(f"sweep: {run['name']}: {verb}", flush=True)
    t0 = time.monotonic()
    proc = subprocess.Popen(train_command(data, run, launch))
    sweep.update(run["name"], state="running", pid=proc.pid, **{"host": os.uname().nodename, **where})
    status = wait_through_interrupts(proc)
    state = "done" if status == 0 and layout.is_finished() else "stopped" if status == EXIT_RESUME else "failed"
    sweep.update(run["name"], state=state, exit_status=status, wall_s=round(time.monotonic() - t0, 1))
    print(f"sweep: {run['name']}: {state} (exit status {status}, {time.monotonic() - t0:.0f} s)", flush=True)
    return status


def run_local(sweep: Sweep, launch: str | None = None) -> int:
    """Every point in turn. A stop to resume (Ctrl-C, a preemption: status 75) ends the sweep with 75 (a
    rerun goes on where it stopped); a failed point is recorded and the others still run (exit 1)."""
    data = sweep.read()
    failed = []
    for run in data["runs"]:
        status = run_point(sweep, data, run, launch)
        if status == EXIT_RESUME:
            print(f"sweep: stopped at {run['name']}; run the same command again to continue (exit status 75)")
            return EXIT_RESUME
        if status != 0:
            failed.append(run["name"])
    done = len(data["runs"]) - len(failed)
    print(f"sweep {sweep.path}: {done} of {len(data['runs'])} runs done" +
          (f"; failed: {', '.join(failed)} (see their output above; a rerun retries them)" if failed else ""))
    return 1 if failed else 0


ARRAY_SCRIPT = """#!/usr/bin/env bash
# One task per point of the sweep in {dir}: task i trains point i (toolkit sweep --point), with --resume,
# so a requeued task continues from its checkpoints/last. Status 75 (saved: preempted) requeues the task.
# The point runs as a job step (srun): Slurm's --signal warning and scancel --signal reach job steps, not
# this script, which ignores SIGUSR1 itself (as launch/slurm.sbatch does).
set -uo pipefail
trap '' USR1
cd {cwd}
status=0
"${{SRUN:-srun}}" --ntasks=1 {python} -m toolkit sweep --point {dir} "$SLURM_ARRAY_TASK_ID" {launch} || status=$?
if (( status == 75 )); then
  task="${{SLURM_ARRAY_JOB_ID}}_${{SLURM_ARRAY_TASK_ID}}"
  echo "requeueing task $task: it resumes from checkpoints/last" >&2
  "${{SCONTROL:-scontrol}}" requeue "$task"
fi
exit "$status"
"""


def submit_array(sweep: Sweep, sbatch_args: list[str], launch: str | None = None) -> str:
    """sbatch one job array over the points not done yet; returns the job id (recorded in sweep.json)."""
    data = sweep.read()
    todo = [i for i, run in enumerate(data["runs"]) if not RunDir(sweep.path / run["name"]).is_finished()]
    if not todo:
        print(f"sweep {sweep.path}: every run is done already; nothing submitted")
        return ""
    (sweep.path / "logs").mkdir(exist_ok=True)
    script = sweep.path / "array.sbatch"
    script.write_text(ARRAY_SCRIPT.format(dir=shlex.quote(str(sweep.path.resolve())), cwd=shlex.quote(os.getcwd()),
                                          python=shlex.quote(sys.executable),
                                          launch=f"--launch {shlex.quote(launch)}" if launch else ""))
    cmd = [os.environ.get("SBATCH", "sbatch"), "--parsable", "--job-name", f"sweep-{sweep.path.name}"[:64],
           "--array", ",".join(map(str, todo)), "--requeue", "--signal=USR1@120",
           "--output", str(sweep.path / "logs" / "%A_%a.out"), "--open-mode", "append", *sbatch_args, str(script)]
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    except FileNotFoundError:
        raise ToolkitError(f"--slurm: {cmd[0]} not found: run toolkit sweep --slurm where Slurm's sbatch is "
                           "(or name it with SBATCH=/path/to/sbatch)") from None
    if result.returncode != 0:
        raise ToolkitError(f"--slurm: sbatch refused the job array (exit {result.returncode}): "
                           f"{result.stderr.strip()}; command: {shlex.join(cmd)}")
    job = result.stdout.strip().split(";")[0]
    sweep.set_meta(slurm_job=job)
    for i in todo:
        sweep.update(data["runs"][i]["name"], state="pending", job=f"{job}_{i}")
    print(f"submitted job array {job}: {len(todo)} task(s), one per run not done "
          f"(logs: {sweep.path / 'logs'}); follow with: toolkit sweep --status {sweep.path}")
    return job


def run_task(sweep_dir: str | Path, index: int, launch: str | None = None) -> int:
    """A job array's task: point `index` of the sweep."""
    sweep = Sweep(sweep_dir)
    data = sweep.read()
    if not 0 <= index < len(data["runs"]):
        raise ToolkitError(f"--point {index}: the sweep in {sweep_dir} has runs 0 to {len(data['runs']) - 1}")
    job = os.environ.get("SLURM_ARRAY_JOB_ID")
    where = {"job": f"{job}_{index}", "host": os.uname().nodename} if job else {"host": os.uname().nodename}
    return run_point(sweep, data, data["runs"][index], launch, **where)
