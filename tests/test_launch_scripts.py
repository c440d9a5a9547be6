"""What launch/cpu.sh and launch/slurm.sbatch hand to the launcher, with a recording stand-in for
`accelerate` (and `nproc`; `srun` and `scontrol` are stand-ins named by SRUN and SCONTROL, so a real Slurm
installed on the machine is never the one run): the thread split per process and the SLURM port from the
job id, on any machine, in milliseconds. The real launches are in test_launch_errors.py and
test_distributed_launch.py."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from conftest import ROOT
from launching import fake_slurm

# One file per call: the nodes of a SLURM stand-in run at the same time
RECORDER = """#!/usr/bin/env bash
python3 - "$@" <<'PY' > "$RECORD/$$.json"
import json, os, sys
print(json.dumps({"args": sys.argv[1:], "omp": os.environ.get("OMP_NUM_THREADS"),
                  "cpu": os.environ.get("ACCELERATE_USE_CPU"), "node": os.environ.get("SLURM_NODEID")}))
PY
"""


def stand_ins(tmp_path: Path, cores: int) -> dict:
    """A bin/ with `accelerate` recording its arguments and environment, and `nproc` saying `cores`."""
    fake_bin = tmp_path / "stand-ins"
    fake_bin.mkdir(exist_ok=True)
    (fake_bin / "accelerate").write_text(RECORDER)
    (fake_bin / "nproc").write_text(f"#!/usr/bin/env bash\necho {cores}\n")
    for tool in fake_bin.iterdir():
        tool.chmod(0o755)
    (tmp_path / "record").mkdir(exist_ok=True)
    return {"ACCELERATE": str(fake_bin / "accelerate"), "RECORD": str(tmp_path / "record"),
            "PATH": f"{fake_bin}:{os.environ['PATH']}"}


def launched(tmp_path: Path, script: str, env: dict) -> list[dict]:
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "NUM_PROCESSES", "MAIN_PORT")}
    result = subprocess.run(["bash", str(ROOT / script), "--config", "smoke.yaml"], cwd=ROOT, env={**base, **env},
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    calls = []
    for record in Path(env["RECORD"]).iterdir():
        calls.append(json.loads(record.read_text()))
        record.unlink()
    return calls


def flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


@pytest.mark.parametrize("cores, processes, preset, threads", [
    (8, "2", None, "4"), (8, "3", None, "2"), (8, None, None, "4"),  # NUM_PROCESSES defaults to 2
    (2, "4", None, "1"),  # never 0 threads
    (8, "2", "3", "3"),  # the user's OMP_NUM_THREADS is kept
])
def test_cpu_sh_splits_the_cores_between_processes(tmp_path, cores, processes, preset, threads):
    env = stand_ins(tmp_path, cores)
    env.update({"NUM_PROCESSES": processes} if processes else {})
    env.update({"OMP_NUM_THREADS": preset} if preset else {})
    (call,) = launched(tmp_path, "launch/cpu.sh", env)
    args = call["args"]
    assert call["omp"] == threads and call["cpu"] == "1"
    assert flag(args, "--num_processes") == (processes or "2") and "--multi_gpu" in args and "-q" in args
    assert flag(args, "--mixed_precision") == "no" and flag(args, "--main_process_port") == "0"
    assert args[-3:] == [str(ROOT / "launch" / ".." / "toolkit" / "train.py"), "--config", "smoke.yaml"]


@pytest.mark.parametrize("job_id, port", [("12345", "32345"), ("45678", "25678"), ("20000", "20000")])
def test_slurm_port_comes_from_the_job_id(tmp_path, job_id, port):
    """Two jobs sharing a node get different ports: 20000 + job id mod 20000, unless MAIN_PORT is set."""
    slurm, recorder = fake_slurm(tmp_path, nodes=2), stand_ins(tmp_path, 8)
    # launch/node.sh's check that node 0 answers passes at once (`timeout` stand-in): nothing listens here
    (tmp_path / "stand-ins" / "timeout").write_text("#!/usr/bin/env bash\nexit 0\n")
    (tmp_path / "stand-ins" / "timeout").chmod(0o755)
    env = {**slurm, **recorder, "PATH": f"{tmp_path / 'stand-ins'}:{slurm['PATH']}", "SLURM_JOB_ID": job_id,
           "SLURM_CPUS_PER_TASK": "32", "GPUS_PER_NODE": "8"}
    env.pop("MAIN_PORT")
    env.pop("OMP_NUM_THREADS")
    calls = sorted(launched(tmp_path, "launch/slurm.sbatch", env), key=lambda c: c["node"])
    assert [c["node"] for c in calls] == ["0", "1"]  # one launcher per node
    for rank, call in enumerate(calls):
        args = call["args"]
        assert flag(args, "--main_process_port") == port and flag(args, "--main_process_ip") == "127.0.0.1"
        assert flag(args, "--machine_rank") == str(rank) and flag(args, "--num_machines") == "2"
        assert flag(args, "--num_processes") == "16" and call["omp"] == "4"  # 32 cores / 8 GPUs
        assert args[-4:] == [str(ROOT / "launch" / ".." / "toolkit" / "train.py"), "--resume", "--config", "smoke.yaml"]
        assert flag(args, "--rdzv_conf") == "timeout=60"  # start-up problems reported in a minute, not ten
    env["MAIN_PORT"] = "29999"
    assert {flag(c["args"], "--main_process_port") for c in launched(tmp_path, "launch/slurm.sbatch", env)} == {"29999"}
