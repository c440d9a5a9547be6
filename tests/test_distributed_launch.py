"""launch/slurm.sbatch with launch/multi_node.yaml, run here as a two-node job: stand-ins for `srun`
(one task per node, SLURM_NODEID set, all on this machine) and `scontrol show hostnames`. Each "node"
runs its own `accelerate launch` with one CPU process; together they must form ONE two-process run."""

from __future__ import annotations

import json
import os
import socket
import subprocess

import pytest

from conftest import BIN, ROOT, read_jsonl
from launching import processes_of

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

SRUN = """#!/usr/bin/env bash
while [[ "$1" == --* ]]; do shift; done  # srun's own options
pids=()
for (( i=0; i<SLURM_NNODES; i++ )); do SLURM_NODEID=$i SLURM_PROCID=$i "$@" & pids+=($!); done
rc=0; for p in "${pids[@]}"; do wait "$p" || rc=$?; done; exit $rc
"""
SCONTROL = """#!/usr/bin/env bash
for n in ${3//,/ }; do echo "$n"; done  # scontrol show hostnames a,b -> a and b, one a line
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_slurm_script_starts_one_run_across_nodes(tmp_path):
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    for name, text in (("srun", SRUN), ("scontrol", SCONTROL)):
        (fake_bin / name).write_text(text)
        (fake_bin / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{fake_bin}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "127.0.0.1,127.0.0.2",
           "SLURM_NNODES": "2", "SLURM_JOB_ID": "4242", "SLURM_SUBMIT_DIR": str(ROOT), "GPUS_PER_NODE": "1",
           "MAIN_PORT": str(_free_port()), "ACCELERATE": str(BIN / "accelerate"), "ACCELERATE_USE_CPU": "1",
           "OMP_NUM_THREADS": "1"}
    result = subprocess.run(["bash", str(ROOT / "launch" / "slurm.sbatch"), "--config", "smoke.yaml",
                             "--set", f"train.output_dir={tmp_path}", "--set", "train.epochs=1"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("processes 2 (MULTI_CPU)") == 1  # one run of two processes, one main process
    assert "nothing to resume" in result.stdout  # the script always passes --resume: a first start starts
    summary = json.loads((tmp_path / "smoke" / "summary.json").read_text())
    assert summary["num_processes"] == 2 and summary["effective_batch_size"] == 64 and summary["val_samples"] == 128
    assert [m["num_processes"] for m in read_jsonl(tmp_path / "smoke" / "metrics.jsonl")] == [2]
    assert processes_of(tmp_path) == []
