"""data.batch_size: auto — the search under an injected memory limit, the cap, the record, the resume."""

from __future__ import annotations

import json

import pytest
import yaml

import toolkit.batch_size
from conftest import ROOT, train_run


def inject_limit(monkeypatch, limit: int) -> list[int]:
    """Steps over `limit` images fail as CUDA's allocator does; returns the sizes tried."""
    real, tried = toolkit.batch_size.step_fits, []

    def step_fits(cfg, accelerator, bundle, network, augment, batch_size):
        tried.append(batch_size)
        if batch_size > limit:
            raise RuntimeError(f"CUDA out of memory. Tried to allocate {batch_size} images (injected)")
        real(cfg, accelerator, bundle, network, augment, batch_size)

    monkeypatch.setattr(toolkit.batch_size, "step_fits", step_fits)
    return tried


def test_auto_lands_on_the_largest_size_under_the_limit_records_it_and_resume_reuses_it(tmp_path, monkeypatch, capsys):
    tried = inject_limit(monkeypatch, 40)
    common = ["data.batch_size=auto", "data.auto_batch_size_max=256", "optim.lr_scaling=linear",
              "optim.lr_base_batch_size=64", "train.epochs=2"]
    run_dir, summary = train_run(tmp_path, *common, "train.stop_after=1")
    assert tried == [256, 128, 64, 32]  # halving, real steps from 32 down
    assert summary["batch_size"] == 32 and summary["effective_batch_size"] == 32
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["data"]["batch_size"] == 32
    out = capsys.readouterr().out
    assert "data.batch_size auto: 32 per process" in out and "batch 32 per process" in out
    assert "| lr 0.0005\n" in out  # optim.lr 1e-3 scaled linearly by 32 / 64
    tried.clear()
    _, resumed = train_run(tmp_path, *common, "train.resume=true")
    assert tried == [] and resumed["batch_size"] == 32 and resumed["epochs_completed"] == 2
    assert json.loads((run_dir / "summary.json").read_text())["batch_size"] == 32
    assert "as this run found it before" in capsys.readouterr().out


def test_auto_on_the_cpu_stops_at_the_cap(tmp_path, capsys):
    _, summary = train_run(tmp_path, "data.batch_size=auto", "data.auto_batch_size_max=48", "train.epochs=1")
    assert summary["batch_size"] == 48 and summary["status"] == "complete"
    assert "48 per process (the cap, data.auto_batch_size_max)" in capsys.readouterr().out


def test_auto_when_nothing_fits_is_a_clear_error(tmp_path, monkeypatch):
    from toolkit.errors import ToolkitError

    inject_limit(monkeypatch, 0)
    with pytest.raises(ToolkitError, match="not even one image per step fits"):
        train_run(tmp_path, "data.batch_size=auto", "data.auto_batch_size_max=4")


@pytest.mark.distributed
def test_two_processes_agree_on_the_smallest_size_found(tmp_path):
    from launching import command, run

    probe = ROOT / "tests" / "oom_probe.py"
    cmd = command(tmp_path, "two", ["data.batch_size=auto", "data.auto_batch_size_max=64", "train.epochs=1"],
                  script=probe, script_args=["40,20"])  # process 0 fits 32, process 1 only 16
    result = run(cmd)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["batch_size"] == 16 and summary["effective_batch_size"] == 32 and summary["num_processes"] == 2
    assert "data.batch_size auto: 16 per process" in result.stdout
    assert yaml.safe_load((tmp_path / "two" / "config.yaml").read_text())["data"]["batch_size"] == 16
