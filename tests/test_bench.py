"""The accuracy benches' claims that a regression in the engine would break."""

from __future__ import annotations

import subprocess
import sys

from conftest import ROOT


def test_toolkit_training_is_the_guides_loop_with_the_toolkits_random_streams(tmp_path):
    """A real `toolkit train` (fp32, default channels_last) gives, epoch for epoch, the training
    loss and validation accuracy of the MNIST guide's plain loop fed the toolkit's normalisation,
    data order, dropout seeding and memory layout (bench/accuracy_streams.py). So any accuracy difference between the
    toolkit and the guide comes from those four choices, which the bench measures over seeds;
    a change to the step, schedule, train/eval modes or validation shows up here as a mismatch."""
    result = subprocess.run(
        [sys.executable, "bench/accuracy_streams.py", "--check-toolkit", "--variant", "toolkit", "--seeds", "3",
         "--epochs", "2", "--train-variants", "1", "--val-variants", "1", "--data", str(tmp_path / "digits")],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "1397 train / 400 val images" in result.stdout
    real = [line for line in result.stdout.splitlines() if "toolkit train (real run)" in line]
    assert len(real) == 1 and "SAME as the loop set the toolkit way" in real[0], result.stdout
