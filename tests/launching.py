"""Two-process launches for the distributed tests, beyond conftest.accelerate_launch: any launcher
flags and environment, a launch in the background that a test kills with SIGKILL, and checks that
no process of a run outlives it."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from contextlib import suppress
from pathlib import Path

import psutil
import torch
from safetensors.torch import load_file

from conftest import BIN, FP32, ROOT
from toolkit.ports import free_port_block

TRAIN = ROOT / "toolkit" / "train.py"
CPU_SH = ROOT / "launch" / "cpu.sh"
# launch/cpu.sh with 2 processes of 1 thread; PYTHONUNBUFFERED so a test can follow stdout as the run goes
CPU_ENV = {"ACCELERATE": str(BIN / "accelerate"), "NUM_PROCESSES": "2", "OMP_NUM_THREADS": "1",
           "ACCELERATE_USE_CPU": "1", "PYTHONUNBUFFERED": "1"}
EXPLICIT = ("--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
            "--dynamo_backend", "no", "--main_process_port", "0")


def command(output_dir: Path, name: str, overrides, *, script: Path = TRAIN, script_args=(), launcher=None,
            config: str = "smoke.yaml") -> list[str]:
    """launch/cpu.sh, as users run it, for toolkit/train.py; for another script, or other launcher
    flags, `accelerate launch` with every flag explicit (a default accelerate config is never read)."""
    args = [*script_args, "--config", config, "--set", f"train.output_dir={output_dir}",
            "--set", f"train.run_name={name}"]
    for item in (FP32, *overrides):
        args += ["--set", item]
    if script == TRAIN and launcher is None:
        return [str(CPU_SH), *args]
    return [str(BIN / "accelerate"), "launch", *(EXPLICIT if launcher is None else launcher), str(script), *args]


def _environment(env: dict | None) -> dict:
    inherited = {k: v for k, v in os.environ.items() if k not in ("ACCELERATE_USE_CPU", "MASTER_ADDR", "WORLD_SIZE")}
    return {**inherited, **(CPU_ENV if env is None else env), "PYTHONFAULTHANDLER": "1"}  # see dump_stacks


def dump_stacks(proc: subprocess.Popen) -> None:
    """Before a hung launch is killed: SIGABRT to every process under it, each of which (PYTHONFAULTHANDLER,
    inherited by DataLoader workers across fork) writes the Python stack of every thread to its stderr."""
    with suppress(psutil.NoSuchProcess):
        for p in psutil.Process(proc.pid).children(recursive=True):
            with suppress(psutil.NoSuchProcess):
                p.send_signal(signal.SIGABRT)
    time.sleep(3)


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a launcher and every process under it in one burst (torchrun starts each worker in a
    session of its own, so the launcher's process group alone would leave the workers running)."""
    try:
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        tree = []
    for p in reversed(tree):  # workers first
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    proc.wait(timeout=30)
    psutil.wait_procs(tree, timeout=30)


def run(cmd: list[str], env: dict | None = None, timeout: float = 180, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """Run a launch to its end; a launch still running after `timeout` (a hang) is killed, workers too."""
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env=_environment(env))
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        dump_stacks(proc)
        kill_tree(proc)
        stdout, stderr = proc.communicate()
        stacks = "\n".join(line for line in stderr.splitlines() if "Extension modules:" not in line)  # every stack, not
        raise AssertionError(f"the launch hung for {timeout} s:\n{stdout[-2000:]}\n{stacks}") from None  # a tail of them
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


# Stand-ins for SLURM on one machine: `srun` starts one task per "node" here, each with its SLURM_NODEID;
# `scontrol show hostnames a,b` prints a and b, one a line.
SRUN = """#!/usr/bin/env bash
while [[ "$1" == --* ]]; do shift; done  # srun's own options
pids=()
for (( i=0; i<SLURM_NNODES; i++ )); do SLURM_NODEID=$i SLURM_PROCID=$i "$@" & pids+=($!); done
rc=0; for p in "${pids[@]}"; do wait "$p" || rc=$?; done; exit $rc
"""
SCONTROL = """#!/usr/bin/env bash
for n in ${3//,/ }; do echo "$n"; done
"""


def free_port() -> int:
    return free_port_block(1)


def fake_slurm(tmp_path: Path, nodes: int = 2) -> dict:
    """The environment of launch/slurm.sbatch as a job of `nodes` nodes with one process each, on this machine."""
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir(exist_ok=True)
    for name, text in (("srun", SRUN), ("scontrol", SCONTROL)):
        (fake_bin / name).write_text(text)
        (fake_bin / name).chmod(0o755)
    # SRUN and SCONTROL name the stand-ins to launch/slurm.sbatch, whatever Slurm this machine has installed
    return {"PATH": f"{fake_bin}:{BIN}:{os.environ['PATH']}", "SRUN": str(fake_bin / "srun"),
            "SCONTROL": str(fake_bin / "scontrol"),
            "SLURM_JOB_NODELIST": ",".join(f"127.0.0.{i + 1}" for i in range(nodes)), "SLURM_NNODES": str(nodes),
            "SLURM_JOB_ID": "4242", "SLURM_SUBMIT_DIR": str(ROOT), "GPUS_PER_NODE": "1", "MAIN_PORT": str(free_port()),
            "ACCELERATE": str(BIN / "accelerate"), "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}


class Background:
    """A launch running in the background, its output in files, for a test to kill at a moment it picks."""

    def __init__(self, cmd: list[str], log_dir: Path, env: dict | None = None):
        log_dir.mkdir(parents=True, exist_ok=True)
        self.stdout_path, self.stderr_path = log_dir / "stdout.txt", log_dir / "stderr.txt"
        with open(self.stdout_path, "w") as out, open(self.stderr_path, "w") as err:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=err, start_new_session=True,
                                         env={**_environment(None), **(env or {})})

    def stdout(self) -> str:
        return self.stdout_path.read_text()

    def wait_for(self, condition, timeout: float = 120, poll_s: float = 0.002) -> None:
        """Poll until condition() is true, then freeze every process of the run (SIGSTOP) and check again:
        the run is left frozen in a state where condition() holds, so a kill that follows kills exactly
        that state (a write that finished between the check and the kill would otherwise go unseen).
        Fail if the run ends or the time runs out first."""
        deadline = time.monotonic() + timeout
        while not (condition() and self._frozen_still(condition)):
            if self.proc.poll() is not None:
                raise AssertionError(f"the run ended (exit {self.proc.returncode}) before the kill point:\n"
                                     f"{self.stdout()[-2000:]}\n{self.stderr_path.read_text()[-2000:]}")
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError("kill point not reached in time")
            time.sleep(poll_s)

    def _frozen_still(self, condition) -> bool:
        tree = self._tree()
        for p in tree:
            with suppress(psutil.NoSuchProcess):
                p.send_signal(signal.SIGSTOP)
        if condition():
            return True
        for p in tree:  # missed: the state moved on before the freeze; let the run go on
            with suppress(psutil.NoSuchProcess):
                p.send_signal(signal.SIGCONT)
        return False

    def signal(self, signum: int) -> None:
        """Send `signum` to the launched process (left frozen by wait_for: it arrives on waking), then let
        every process of the run go on."""
        self.proc.send_signal(signum)
        for p in self._tree():
            with suppress(psutil.NoSuchProcess):
                p.send_signal(signal.SIGCONT)

    def wait(self, timeout: float = 120) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"the run did not end within {timeout} s:\n{self.stdout()[-2000:]}") from None

    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def _tree(self) -> list[psutil.Process]:
        try:
            return [psutil.Process(self.proc.pid), *psutil.Process(self.proc.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def kill(self) -> None:
        kill_tree(self.proc)  # SIGKILL reaches stopped processes too


def processes_of(output_dir: Path) -> list[str]:
    """Command lines of live processes started for runs under output_dir."""
    found = []
    for p in psutil.process_iter(["cmdline", "status"]):
        cmdline = " ".join(p.info["cmdline"] or [])
        if str(output_dir) in cmdline and p.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(cmdline)
    return found


def load_resume_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """checkpoints/last: the weights (safetensors) and every other file of the resume state load."""
    last = run_dir / "checkpoints" / "last"
    for extra in ("optimizer.bin", "scheduler.bin"):
        torch.load(last / extra, weights_only=True)
    for rank in (0, 1):
        assert (last / f"random_states_{rank}.pkl").is_file()  # save_state ran on both processes
    return load_file(last / "model.safetensors")


def load_best_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / "best" / "weights.pt", weights_only=True)


# 683 images, val_fraction 0.25 -> 171 val (eval batches of 64 + 64 + 43: three batches for two processes,
# so one process gets a padded duplicate) and 512 train (8 steps of 32 per process and epoch).
# bn_cnn brings BatchNorm buffers and dropout; crop + flip bring augmentation randomness to restore on resume.
REFERENCE = ["data.synthetic_samples=683", "model.name=bn_cnn", "data.augment.crop_padding=2",
             "data.augment.hflip=true", "train.epochs=3"]
_shared: dict = {}


def reference_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """The uninterrupted two-process REFERENCE run, launched once per test session for every module that
    compares against it."""
    if "reference" not in _shared:
        out = tmp_path_factory.mktemp("reference")
        _shared["reference"] = (out / "run", run(command(out, "run", REFERENCE)))
    run_dir, result = _shared["reference"]
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir, result
