"""The README's examples, in the order a reader runs them, on a fresh working directory: after `make demo`
(the demo fixture: launch/demo.sh, which `make demo` runs once .venv is set up), every command of its
```bash blocks runs and exits 0, except those that need what this machine has not: a download (the CIFAR-10
commands) or `make` itself (`make demo` is the fixture, `make test` is this suite). The port 8080 of the
examples becomes a free one, so the test runs beside anything."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, demo_env
from test_serve_e2e import free_port_block

pytestmark = [pytest.mark.serve, pytest.mark.slow]

NEEDS = {"cifar.yaml": "CIFAR-10, a download", "make ": "make itself (the fixture runs what `make demo` runs)"}


def readme_commands() -> list[str]:
    """Every command line of the README's ```bash blocks, comments dropped, in order."""
    text = (ROOT / "README.md").read_text()
    commands = []
    for block in re.findall(r"^```bash\n(.*?)^```", text, re.S | re.M):
        for line in block.splitlines():
            command = re.sub(r"\s+#.*$", "", line).strip()
            if command and not command.startswith("#"):
                commands.append(command)
    return commands


@pytest.fixture
def checkout(demo):
    """The demo's working directory as `make demo` left it, copied (the serving tests read the demo's own),
    under a short path: TorchServe's unix sockets live in the server's state directory under HOME."""
    demo_run, result = demo
    assert result.returncode == 0, result.stderr[-3000:]
    root = Path(tempfile.mkdtemp(prefix="readme-"))
    yield shutil.copytree(demo_run.parents[1], root / "c", symlinks=True)
    shutil.rmtree(root, ignore_errors=True)


def test_the_readme_examples_run_in_order_after_make_demo(checkout):
    root, port = checkout, free_port_block()
    run_dir = root / "runs" / "digits"
    commands = [c for c in readme_commands() if not any(need in c for need in NEEDS)]
    assert len(commands) >= 12 and commands[0].startswith("toolkit train --config digits.yaml"), commands
    outputs = {}
    try:
        for command in commands:
            command = command.replace("8080", str(port))
            done = subprocess.run(["bash", "-c", command], cwd=root, env=demo_env(root), capture_output=True,
                                  text=True, timeout=600)
            assert done.returncode == 0, f"{command}\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
            outputs[command.split()[1] if command.startswith("toolkit") else command.split()[0]] = done.stdout
    finally:
        subprocess.run(["bash", "-c", f"toolkit serve stop --port {port}"], cwd=root, env=demo_env(root),
                       capture_output=True, timeout=120)
    # what the commands did: a second run beside the demo's, resumed for two more epochs
    metrics = (root / "runs" / "digits_lr3e-4" / "metrics.jsonl").read_text().splitlines()
    assert len(metrics) == 8 and json.loads(metrics[-1])["val_acc"] > 0.5
    assert yaml.safe_load(outputs["config"])["data"]["batch_size"] == 64
    assert (run_dir / "eval" / "report.json").is_file() and len(list((root / "samples").glob("*.png"))) == 4
    answer = json.loads(outputs["curl"])  # the server's answer to the curl example: top-5 of one digit
    assert len(answer) == 5 and set(answer) <= set("0123456789") and 0 < sum(answer.values()) <= 1 + 1e-6, answer
    assert len(re.findall(r"\b\d{3}_\d\.png", outputs["predict"])) == 4  # the last predict (--export): a row per file