"""A user error under every launcher the README and launch/ name: one `error: ...` line of ours, a
non-zero status (2 where the toolkit or our scripts set it), no traceback through our code, and, where
the launcher allows it, our message as the last line. Run on the tested set (`make test`) and on the
newest releases (`make test-latest`), and on the oldest supported versions (the lower bounds): the
launcher's own output changes between Accelerate releases, so these tests read only what is ours
(lines starting `error: `, Python's `File "..."` traceback lines) and exit statuses."""

from __future__ import annotations

import os
import sys

import pytest

from conftest import BIN, ROOT
from launching import CPU_SH, TRAIN, fake_slurm, processes_of, run

pytestmark = pytest.mark.distributed

# accelerate launch with every flag explicit (a user's default accelerate config is never read) and -q,
# the README's form: without it Accelerate >= 1.16 repeats a failed single process's stderr in a traceback.
ONE = ("-q", "--cpu", "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no",
       "--dynamo_backend", "no")
TWO = ("-q", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
       "--dynamo_backend", "no", "--main_process_port", "0")
LAUNCHERS = ["toolkit", "python -m toolkit", "accelerate launch (1)", "accelerate launch (2)", "launch/cpu.sh",
             "launch/slurm.sbatch"]
# the last line a user sees is ours, except after torchrun's own failure report (2 processes launched bare)
LAST_LINE_OURS = {"toolkit", "python -m toolkit", "accelerate launch (1)", "launch/cpu.sh", "launch/slurm.sbatch"}
# exit status 2 where the toolkit's process or our script is the last word; Accelerate's launcher exits 1
STATUS = {"toolkit": 2, "python -m toolkit": 2, "launch/cpu.sh": 2, "launch/slurm.sbatch": 2}


def launch(launcher: str, tmp_path, *overrides: str):
    args = ["--config", "smoke.yaml", "--set", f"train.output_dir={tmp_path / 'runs'}", "--set", "train.run_name=run"]
    for item in overrides:
        args += ["--set", item]
    env = {"OMP_NUM_THREADS": "1", "PATH": f"{BIN}:{os.environ['PATH']}"}
    cwd = ROOT
    if launcher == "toolkit":
        cmd = [str(BIN / "toolkit"), "train", *args]
    elif launcher == "python -m toolkit":
        cmd = [sys.executable, "-m", "toolkit", "train", *args]
    elif launcher == "accelerate launch (1)":
        cmd = [str(BIN / "accelerate"), "launch", *ONE, str(TRAIN), *args]
    elif launcher == "accelerate launch (2)":
        cmd = [str(BIN / "accelerate"), "launch", *TWO, str(TRAIN), *args]
        env["ACCELERATE_USE_CPU"] = "1"
    elif launcher == "launch/cpu.sh":
        cmd = [str(CPU_SH), *args]
        env |= {"ACCELERATE": str(BIN / "accelerate"), "NUM_PROCESSES": "2"}
    else:
        cmd = ["bash", str(ROOT / "launch" / "slurm.sbatch"), *args]
        env |= fake_slurm(tmp_path)
        cwd = tmp_path
    return run(cmd, env=env, timeout=180, cwd=cwd)


def assert_one_clean_error(launcher: str, result, expected: str) -> None:
    ours = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(ours) == 1 and ours[0].startswith(expected), result.stderr[-3000:]
    assert result.returncode == STATUS.get(launcher, result.returncode) and result.returncode != 0
    assert not [line for line in result.stderr.splitlines()
                if line.lstrip().startswith("File ") and "/toolkit/" in line], result.stderr[-3000:]
    if launcher in LAST_LINE_OURS:
        assert result.stderr.rstrip().splitlines()[-1] == ours[0], result.stderr[-3000:]
    assert "error:" not in result.stdout


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_bad_config(launcher, tmp_path):
    result = launch(launcher, tmp_path, "optim.name=adamm")
    assert_one_clean_error(launcher, result, "error: --set: optim.name: 'adamm' is not one of")
    assert not (tmp_path / "runs").exists() and processes_of(tmp_path) == []


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_missing_dataset(launcher, tmp_path):
    result = launch(launcher, tmp_path, "data.name=cifar10", f"data.root={tmp_path / 'nowhere'}")
    assert_one_clean_error(launcher, result, "error: data.root: cifar10 not found under")
    assert processes_of(tmp_path) == []


@pytest.mark.parametrize("launcher", [name for name in LAUNCHERS if name != "launch/slurm.sbatch"])  # it resumes
def test_taken_run_directory(launcher, tmp_path):
    (tmp_path / "runs" / "run").mkdir(parents=True)
    (tmp_path / "runs" / "run" / "notes.txt").write_text("mine")
    result = launch(launcher, tmp_path)
    assert_one_clean_error(launcher, result, f"error: {tmp_path / 'runs' / 'run'} already holds a partial run")
    assert (tmp_path / "runs" / "run" / "notes.txt").read_text() == "mine"
    assert processes_of(tmp_path) == []
