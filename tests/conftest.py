"""Shared fixtures: in-process training on generated data, and the CLI as a user runs it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Under pytest-xdist each worker gets its share of the cores for torch's threads, and so does every process
# it starts (they inherit OMP_NUM_THREADS): two workers of two threads each on two cores oversubscribe them,
# and OpenMP's spinning threads then run some trainings several times slower. Set before torch is imported.
if os.environ.get("PYTEST_XDIST_WORKER") and "OMP_NUM_THREADS" not in os.environ:
    _cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    os.environ["OMP_NUM_THREADS"] = str(max(1, _cores // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))
BIN = Path(sys.executable).parent
# Training precision of every test run unless a test asks for another: `auto` resolves to bf16 on CPUs
# with AVX512-BF16/AMX and to fp32 elsewhere, and no test may depend on which machine it runs on.
FP32 = "train.mixed_precision=no"


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """Accelerate keeps process-wide singletons; each in-process run starts from a clean slate."""
    yield
    if "accelerate" in sys.modules:
        from accelerate.state import AcceleratorState, GradientState, PartialState

        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        PartialState._reset_state()


def train_run(tmp_path: Path, *overrides: str, config: str | Path = "smoke.yaml", name: str = "run", **seams):
    """Train in this process with `configs/<config>` and overrides; returns (run_dir, summary).
    `seams` go to engine.train (hooks, accelerator)."""
    from toolkit.config_io import load_config
    from toolkit.engine import train

    cfg = load_config(ROOT / "configs" / config if not Path(config).is_file() else config,
                      [FP32, f"train.output_dir={tmp_path}", f"train.run_name={name}", *overrides])
    summary = train(cfg, **{k: v(cfg) if k == "accelerator" else v for k, v in seams.items()})
    return cfg.run_dir, summary


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 600):
    """The installed `toolkit` command, as a user runs it."""
    return subprocess.run([str(BIN / "toolkit"), *args], cwd=cwd or ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def run_main(capsys, *args: str) -> tuple[int, str, str]:
    """The `toolkit` command in this process (cli.main, as the console script calls it): (exit status,
    stdout, stderr). For the tests where a new interpreter is not the point."""
    from toolkit.cli import main

    capsys.readouterr()  # only this command's output
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def accelerate_launch(tmp_path: Path, *overrides: str, config: str = "smoke.yaml", name: str = "run",
                      num_processes: int = 2, extra_env: dict | None = None, timeout: float = 600):
    """`accelerate launch toolkit/train.py` with N CPU processes over gloo (the recipe in launch/cpu.sh):
    every flag explicit, so a user's default accelerate config is never read."""
    cmd = [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", str(num_processes),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", "0", str(ROOT / "toolkit" / "train.py"),
           "--config", config, "--set", f"train.output_dir={tmp_path}", "--set", f"train.run_name={name}"]
    for item in (FP32, *overrides):
        cmd += ["--set", item]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", **(extra_env or {})}
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    return tmp_path / name, result


def pytest_configure(config):
    """The controller (or the only process) makes one directory that every xdist worker inherits by name
    (TOOLKIT_TEST_SHARED), for what the whole run builds once; removed when the run ends."""
    if not hasattr(config, "workerinput") and "TOOLKIT_TEST_SHARED" not in os.environ:
        # a short path: TorchServe's unix sockets live under a state directory in it
        os.environ["TOOLKIT_TEST_SHARED"] = config._toolkit_shared = tempfile.mkdtemp(prefix="tk-")


def pytest_unconfigure(config):
    if getattr(config, "_toolkit_shared", None):
        shutil.rmtree(config._toolkit_shared, ignore_errors=True)
        del os.environ["TOOLKIT_TEST_SHARED"]


@pytest.fixture(scope="session")
def demo():
    """`launch/demo.sh`, what `make demo` runs once .venv is set up, as a newcomer runs it: the built-in
    digits config trained as shipped (fp32 or bf16, as `auto` picks on this machine), exported and
    archived by the CLI, served, asked, stopped, in a fresh working directory (the run is its
    runs/digits). HOME is a temporary folder, so the server's state (and the key `toolkit predict --url`
    reads without --token) lives there. Returns (run dir, result); shared by the end-to-end serving
    tests and the README walk-through, which goes on from a copy: run once for the whole suite, by the
    first worker that needs it (the others wait for it), and read only."""
    from filelock import FileLock
    from test_serve_e2e import free_port_block  # demo.sh's own choice (from 18080) could race another worker's

    shared = Path(os.environ["TOOLKIT_TEST_SHARED"])
    root, record = shared / "demo", shared / "demo.json"
    with FileLock(shared / "demo.lock"):
        if not record.exists():
            root.mkdir()
            done = subprocess.run(["bash", str(ROOT / "launch" / "demo.sh")], cwd=root,
                                  env={**demo_env(root), "DEMO_PORT": str(free_port_block())},
                                  capture_output=True, text=True, timeout=900)
            record.write_text(json.dumps({"args": done.args, "returncode": done.returncode, "stdout": done.stdout,
                                          "stderr": done.stderr}))
    result = subprocess.CompletedProcess(**json.loads(record.read_text()))
    return root / "runs" / "digits", result


@pytest.fixture
def short_tmp():
    """A directory with a short path for a TorchServe state root (its unix sockets live there, and pytest's
    own directories are long, longer still under a worker's popen-gwN)."""
    root = Path(tempfile.mkdtemp(prefix="ts-"))
    yield root
    shutil.rmtree(root, ignore_errors=True)


def demo_env(root: Path) -> dict:
    return {**os.environ, "HOME": str(root / "home"), "DEMO_RUN_DIR": str(root / "runs" / "digits"),
            "COLUMNS": "250", "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}


@pytest.fixture(scope="session")
def format_runs(tmp_path_factory) -> dict[str, Path]:
    """{export format: run directory exported in it}: one recipe model (cifar_cnn, 3 x 16 x 16, four
    classes, the same weights in each) exported once per session in every format of toolkit.export,
    since an AOTInductor compile takes 15-60 s on 2 cores. Tests that change a run copy it first."""
    from test_export import make_run
    from toolkit.export import FORMATS, export_model

    base = tmp_path_factory.mktemp("formats")
    runs = {}
    for name in FORMATS:
        runs[name] = make_run(base / name, "cifar_cnn", 3, 16, seed=3)
        export_model(runs[name], format=name)
    return runs


# `make test` runs the suite on two workers (pytest-xdist, --dist loadfile): a module goes to one worker whole,
# so its module fixtures are built once; the longest modules are handed out first, so that neither worker is
# left with a long one at the end. (A session fixture is built once per worker that needs it, except the
# demo, built once for the run: test_readme.py comes after the first few, when it is ready.)
LONGEST = ("test_serve_e2e.py", "test_formats.py", "test_handler_formats.py", "test_cluster.py", "test_readme.py",
           "test_gpu_check.py", "test_kill_resume.py", "test_sweep_slurm.py", "test_distributed.py", "test_ema.py",
           "test_sweep.py", "test_launch_errors.py", "test_preempt_signals.py", "test_shards_launch.py",
           "test_handler.py", "test_precision.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONGEST)))  # stable: each module's own order is kept
