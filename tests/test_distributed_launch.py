"""launch/slurm.sbatch with launch/multi_node.yaml, run here as a two-node job: stand-ins for `srun`
(one task per node, SLURM_NODEID set, all on this machine) and `scontrol show hostnames`, from
launching.py. Each "node" runs its own `accelerate launch` with one CPU process; together they must form ONE two-process run."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from conftest import ROOT, read_jsonl
from launching import fake_slurm, processes_of

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def test_slurm_script_starts_one_run_across_nodes(tmp_path):
    env = {**os.environ, **fake_slurm(tmp_path)}
    result = subprocess.run(["bash", str(ROOT / "launch" / "slurm.sbatch"), "--config", "smoke.yaml",
                             "--set", f"train.output_dir={tmp_path}", "--set", "train.epochs=1"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("2 processes on 2 machines (DDP over gloo)") == 1  # one run of two processes, one main process
    assert "nothing to resume" in result.stdout  # the script always passes --resume: a first start starts
    summary = json.loads((tmp_path / "smoke" / "summary.json").read_text())
    assert summary["num_processes"] == 2 and summary["effective_batch_size"] == 64 and summary["val_samples"] == 128
    assert [m["num_processes"] for m in read_jsonl(tmp_path / "smoke" / "metrics.jsonl")] == [2]
    assert processes_of(tmp_path) == []
