"""serve.precision: bf16 (TorchScript) and int8 (ONNX, onnxruntime static quantization) exports of a
really trained run, each with its top-1 agreement with fp32 on the run's validation set measured,
printed and written to parity.json, refused under its threshold, refused for a format that cannot
take it, warned about where bf16 is not native (this AVX2 CPU), and served by the handler."""

from __future__ import annotations

import json
import logging
import shutil
import zipfile

import onnx as onnx_lib
import pytest
import torch
import yaml

from conftest import run_main, train_run
from test_handler import encode, handle, load_handler_module, make_context, pil_image
from toolkit import archive, export
from toolkit.checkpoint import load_best
from toolkit.errors import ToolkitError
from toolkit.export import precision as reduced


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """configs/smoke.yaml trained for real (cifar_cnn, 4 classes, 128 validation images)."""
    run, _ = train_run(tmp_path_factory.mktemp("precision"))
    return run


def copy_run(trained, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained, run, ignore=shutil.ignore_patterns("export", "model-store"))
    return run


def independent_agreement(run, export_dir) -> tuple[float, int]:
    """Top-1 agreement of the exported file with the fp32 checkpoint, computed here from the parts."""
    model, meta = load_best(run)
    settings = json.loads((export_dir / "preprocess.json").read_text())
    exported = export.FORMATS[export.format_of_file(export.model_file(export_dir))].load(export.model_file(export_dir))
    same = total = 0
    with torch.no_grad():
        for images in reduced.validation_batches(run, meta, settings):
            same += int((model.float().eval()(images).argmax(1) == exported(images).argmax(1)).sum())
            total += len(images)
    return same / total, total


@pytest.mark.parametrize("fmt, precision", [("torchscript", "bf16"), ("onnx", "int8")])
def test_reduced_precision_is_measured_on_the_validation_set_printed_and_recorded(trained, tmp_path, capsys, fmt,
                                                                                  precision):
    run = copy_run(trained, tmp_path)
    code, out, err = run_main(capsys, "export", str(run), "--format", fmt, "--precision", precision)
    assert code == 0, err
    parity = json.loads((run / "export" / "parity.json").read_text())
    assert parity["precision"] == precision and parity["agreement_images"] == 128
    assert parity["agreement_threshold"] == reduced.THRESHOLDS[precision]
    share, total = independent_agreement(run, run / "export")
    assert (parity["top1_agreement"], parity["agreement_images"]) == (pytest.approx(share), total)
    assert share >= reduced.THRESHOLDS[precision]
    assert f"precision {precision}: fp32's class for {share:.2%} of the 128 validation images" in out
    settings = json.loads((run / "export" / "preprocess.json").read_text())
    assert settings["precision"] == precision
    if precision == "int8":  # the file holds quantized weights and activations, not the fp32 graph
        ops = {node.op_type for node in onnx_lib.load(str(run / "export" / "model.onnx")).graph.node}
        assert {"QuantizeLinear", "DequantizeLinear"} <= ops
        assert parity["int8"]["calibration_images"] == reduced.CALIBRATION_IMAGES
        assert not (run / "export" / "fp32-model.onnx").exists()
    else:
        assert next(p for p in load_best(run)[0].parameters()).dtype == torch.float32  # the checkpoint untouched
        native, _ = reduced.native_bf16()
        assert ("warning: this machine" in out) == (not native)
        assert ("precision_warning" in parity) == (not native)


def test_an_agreement_under_the_threshold_is_refused_and_the_export_kept(trained, tmp_path, capsys, monkeypatch):
    run = copy_run(trained, tmp_path)
    assert run_main(capsys, "export", str(run))[0] == 0
    before = (run / "export" / "model.pt").read_bytes()
    monkeypatch.setitem(reduced.THRESHOLDS, "bf16", 1.01)  # no model can reach it
    code, out, err = run_main(capsys, "export", str(run), "--precision", "bf16")
    assert code == 2 and "Traceback" not in err
    assert "model 'cifar_cnn' exported to torchscript at serve.precision bf16 gives fp32's class for" in err
    assert "of the 128 validation images, under the 101.0% required: refused" in err
    assert (run / "export" / "model.pt").read_bytes() == before  # the previous export stays


@pytest.mark.parametrize("precision, fmt", [("bf16", "onnx"), ("int8", "torchscript"), ("int8", "aoti")])
def test_a_format_that_cannot_take_the_precision_is_refused_before_any_work(trained, tmp_path, capsys, precision,
                                                                           fmt):
    run = copy_run(trained, tmp_path)
    code, _, err = run_main(capsys, "export", str(run), "--format", fmt, "--precision", precision)
    assert code == 2 and "Traceback" not in err
    assert f"model 'cifar_cnn' cannot be exported to {fmt} at serve.precision {precision}" in err
    assert "supported: " in err and not (run / "export").exists()


def test_the_config_key_chooses_the_precision_and_bad_values_name_the_field(trained, tmp_path, capsys):
    run = copy_run(trained, tmp_path)
    config = run / "config.yaml"
    for value, message in (("bf16", "cannot be exported to onnx at serve.precision bf16"), ("fp16", "serve.precision")):
        cfg = yaml.safe_load(config.read_text())
        cfg["serve"]["precision"] = value
        config.write_text(yaml.safe_dump(cfg, sort_keys=False))
        with pytest.raises(ToolkitError, match=message):
            export.export_model(run, format="onnx")


def test_the_handler_serves_a_bf16_archive_and_warns_where_bf16_is_not_native(trained, tmp_path, capsys, caplog,
                                                                            monkeypatch):
    run = copy_run(trained, tmp_path)
    assert run_main(capsys, "export", str(run), "--precision", "bf16")[0] == 0
    model_dir = tmp_path / "model-dir"
    with zipfile.ZipFile(archive.build_archive(run, name="clf-bf16")) as zf:
        zf.extractall(model_dir)
    rows = [{"body": bytearray(encode(pil_image("RGB", 40, 30, seed=s), "PNG"))} for s in range(4)]
    for native in (False, True):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
        caplog.clear()
        handler = load_handler_module().ImageClassifierHandler()
        with caplog.at_level(logging.WARNING):
            handler.initialize(make_context(model_dir, 1))
        warned = [r.getMessage() for r in caplog.records if "bf16" in r.getMessage()]
        assert bool(warned) == (not native), warned
        answers, ctx = handle(handler, model_dir, rows)
        assert [ctx.get_response_status(i)[0] for i in range(4)] == [200] * 4
        assert all(len(a) == 4 and abs(sum(a.values()) - 1) < 1e-2 for a in answers)
