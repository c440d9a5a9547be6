"""The accuracy benches' claims that a regression in the engine would break."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

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


@pytest.mark.serve
@pytest.mark.slow
def test_serve_load_quick_serves_every_format_and_checks_the_targets_in_words(tmp_path):
    """bench/serve_load.py --quick --formats torchscript,onnx: a real TorchServe serving our handler's
    archives of both formats beside the built-in handler, real JPEG and PNG files; the in-process
    forward time per format and both targets stated (MET or NOT MET), no request failing."""
    pytest.importorskip("captum")
    result = subprocess.run([sys.executable, "bench/serve_load.py", "--quick", "--formats", "torchscript,onnx",
                             "--json", str(tmp_path / "load.json")], cwd=ROOT, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    for fmt in ("torchscript", "onnx"):
        assert f"  {fmt:<12} batch  1:" in out and f"  {fmt:<12} batch  8:" in out
        assert f"ours-{fmt}" in out
    assert "TARGET best format >= 2x builtin at its best setting:" in out
    assert out.count("TARGET served >= 0.8x in process") == 4
    assert "errors 0 -> MET" in out
    load = json.loads((tmp_path / "load.json").read_text())["load"]
    assert {key.rsplit("/", 1)[1] for key in load} == {"ours-torchscript", "ours-onnx", "builtin"}
    assert all(v["errors"] == 0 and v["requests"] > 0 for v in load.values())
