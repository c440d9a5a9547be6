"""TorchScript export (parity with the eager model) and .mar building, without a server."""

from __future__ import annotations

import dataclasses
import json
import zipfile
from pathlib import Path

import pytest
import torch
import yaml

from toolkit import archive, export
from toolkit.export import torchscript
from toolkit.checkpoint import save_best
from toolkit.config import RunConfig
from toolkit.errors import ToolkitError
from toolkit.models import build_model
from toolkit.rundir import Meta

CLASSES = ["cat", "dog", "owl", "yak"]


def make_run(run_dir: Path, model_name: str = "mnist_cnn", channels: int = 1, image_size: int = 16,
             seed: int = 0, serve: dict | None = None, prepare=None) -> Path:
    """A run directory with a checkpoint of `model_name` (random weights, BatchNorm statistics
    moved off their defaults by a few training-mode forward passes) and its config.yaml."""
    torch.manual_seed(seed)
    model = build_model(model_name, len(CLASSES), channels, image_size)
    if prepare is not None:
        model = prepare(model)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, channels, image_size, image_size) * 2 + 0.5)
    meta = {"model": {"name": model_name, "args": {}}, "num_classes": len(CLASSES), "classes": CLASSES,
            "channels": channels, "image_size": image_size, "resize": "resize",
            "mean": [0.5] * channels, "std": [0.25] * channels, "epoch": 1, "val_acc": 0.5, "preprocess_version": 2}
    run_dir.mkdir(parents=True, exist_ok=True)
    save_best(run_dir, getattr(model, "_orig_mod", model), Meta(**meta), step=1)
    cfg = RunConfig.model_validate({"serve": serve or {}})
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return run_dir


@pytest.mark.parametrize("model_name, channels, image_size", [("mnist_cnn", 1, 16), ("bn_cnn", 3, 16)])
def test_export_matches_eager_model(tmp_path, model_name, channels, image_size):
    run = make_run(tmp_path / "run", model_name, channels, image_size, seed=7, serve={"topk": 3, "max_pixels": 1234})
    out = export.export_torchscript(run)

    assert out == run / "export"
    assert sorted(p.name for p in out.iterdir()) == ["index_to_name.json", "model.pt", "parity.json", "preprocess.json", "preprocess.py"]
    parity = json.loads((out / "parity.json").read_text())
    assert parity["method"] == "script" and parity["max_abs_diff"] <= 1e-4
    assert parity["input_shape"] == [4, channels, image_size, image_size]
    assert json.loads((out / "index_to_name.json").read_text()) == {"0": "cat", "1": "dog", "2": "owl", "3": "yak"}
    assert json.loads((out / "preprocess.json").read_text()) == {
        "channels": channels, "image_size": image_size, "resize": "resize", "mean": [0.5] * channels,
        "std": [0.25] * channels, "topk": 3, "max_pixels": 1234, "max_side": 65_535, "preprocess_version": 2}

    from toolkit.checkpoint import load_best

    eager, _ = load_best(run)
    scripted = export.load_torchscript(out / "model.pt")
    images = torch.rand(5, channels, image_size, image_size)
    with torch.no_grad():
        assert torch.allclose(scripted(images), eager(images), atol=1e-5)
        # eval mode was exported: dropout and BatchNorm are deterministic
        assert torch.equal(scripted(images), scripted(images))


def test_a_checkpoint_from_before_preprocess_versions_is_exported_as_version_1(tmp_path):
    """Its model was trained resizing before cropping: the handler must keep doing so for it."""
    run = make_run(tmp_path / "run")
    meta_path = run / "checkpoints" / "best" / "meta.json"
    meta = json.loads(meta_path.read_text())
    del meta["preprocess_version"]
    meta_path.write_text(json.dumps(meta))
    assert json.loads((export.export_torchscript(run) / "preprocess.json").read_text())["preprocess_version"] == 1


def test_topk_argument_overrides_config_and_is_capped(tmp_path):
    run = make_run(tmp_path / "run", serve={"topk": 2})
    pre = json.loads((export.export_torchscript(run, topk=10) / "preprocess.json").read_text())
    assert pre["topk"] == len(CLASSES)
    with pytest.raises(ToolkitError, match="topk"):
        export.export_torchscript(run, topk=0)


def test_channels_last_checkpoint_exports_the_same_function(tmp_path):
    """A model trained in channels_last (the default) exports to TorchScript whose logits, on
    contiguous and channels_last batches alike, are the trained model's. (A compiled run goes through
    the engine in test_fast_path.py::test_compiled_channels_last_bf16_run_resumes_and_exports.)"""
    trained = {}

    def channels_last(model):
        trained["model"] = model.to(memory_format=torch.channels_last)
        return trained["model"]

    run = make_run(tmp_path / "cl", "bn_cnn", 3, 16, prepare=channels_last)
    scripted = export.load_torchscript(export.export_torchscript(run) / "model.pt")
    images = torch.randn(5, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = trained["model"].eval()(images.contiguous(memory_format=torch.channels_last))
        for batch in (images, images.contiguous(memory_format=torch.channels_last)):
            torch.testing.assert_close(scripted(batch), expected, atol=1e-5, rtol=1e-4)


def test_parity_failure_raises_and_keeps_previous_export(tmp_path, monkeypatch):
    run = make_run(tmp_path / "run")
    good = export.export_torchscript(run)
    before = (good / "model.pt").read_bytes()

    real = export.FORMATS["torchscript"]

    class Drifted(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, images):
            return self.inner(images) + 1e-3

    drifting = dataclasses.replace(real, load=lambda path: Drifted(real.load(path)))
    monkeypatch.setitem(export.FORMATS, "torchscript", drifting)  # the registry is the seam
    with pytest.raises(ToolkitError, match=r"max abs difference of the logits 0\.001"):
        export.export_torchscript(run)
    assert (good / "model.pt").read_bytes() == before
    assert not (run / ".export.tmp").exists()


def test_export_needs_a_run_directory(tmp_path):
    with pytest.raises(ToolkitError, match="config.yaml"):
        export.export_torchscript(tmp_path)
    (tmp_path / "config.yaml").write_text("{}\n")
    with pytest.raises(ToolkitError, match="no checkpoint"):
        export.export_torchscript(tmp_path)


def test_archive_holds_everything_the_handler_reads(tmp_path):
    run = make_run(tmp_path / "digits-v1", serve={"batch_size": 4, "max_batch_delay_ms": 20, "min_workers": 1,
                                                   "max_workers": 2, "response_timeout_s": 45})
    mar = archive.build_archive(run)  # exports first: there is no export/ yet

    assert mar == run / "model-store" / "digits-v1.mar"
    with zipfile.ZipFile(mar) as zf:
        names = set(zf.namelist())
        manifest = json.loads(zf.read("MAR-INF/MANIFEST.json"))
        config = yaml.safe_load(zf.read("model-config.yaml"))
        handler = zf.read("handler.py")
    assert names >= {"model.pt", "handler.py", "index_to_name.json", "preprocess.json",
                     "MAR-INF/MANIFEST.json", "model-config.yaml"}
    assert manifest["model"]["modelName"] == "digits-v1"
    assert manifest["model"]["modelVersion"] == "1.0"
    assert manifest["model"]["handler"] == "handler.py"
    assert config == {"minWorkers": 1, "maxWorkers": 2, "batchSize": 4, "maxBatchDelay": 20, "responseTimeout": 45}
    assert handler == archive.handler_path().read_bytes()

    again = archive.build_archive(run, name="other_name", version="2.1")  # -f and a second name
    assert again.name == "other_name.mar" and mar.is_file()
    assert archive.check_archive(again)["model"]["modelVersion"] == "2.1"


@pytest.mark.parametrize("serve, handler", [
    ({"profile": True}, {"profile": True}),
    ({"channels_last": False}, {"channels_last": False}),
    ({"profile": True, "channels_last": True}, {"profile": True, "channels_last": True}),
])
def test_handler_settings_go_into_model_config(tmp_path, serve, handler):
    """serve.profile and serve.channels_last become model-config.yaml's `handler:` section, which
    the handler reads at load; left at their defaults they write no section at all (above)."""
    run = make_run(tmp_path / "run", serve=serve)
    assert archive.model_config(run)["handler"] == handler


def test_archive_rejects_bad_names_and_broken_archives(tmp_path):
    run = make_run(tmp_path / "run")
    for bad in ("has space", "-leading", "dots.are.out", "slash/x", ""):
        with pytest.raises(ToolkitError, match="archive name"):
            archive.build_archive(run, name=bad)
    with pytest.raises(ToolkitError, match="archive version"):
        archive.build_archive(run, version="1 0")

    partial = tmp_path / "partial.mar"
    with zipfile.ZipFile(partial, "w") as zf:
        zf.writestr("model.pt", b"x")
    with pytest.raises(ToolkitError, match="lacks handler.py"):
        archive.check_archive(partial)
    unnamed = tmp_path / "unnamed.mar"  # every file the handler reads, but the manifest names no model file
    with zipfile.ZipFile(unnamed, "w") as zf:
        for entry in archive.REQUIRED_ENTRIES:
            zf.writestr(entry, b"{}" if entry.endswith(".json") else b"x")
    with pytest.raises(ToolkitError, match=r"lacks a model file \(model.pt or model.onnx or model.pt2\) named by the manifest"):
        archive.check_archive(unnamed)
    (tmp_path / "junk.mar").write_bytes(b"not a zip")
    with pytest.raises(ToolkitError, match="not a readable model archive"):
        archive.check_archive(tmp_path / "junk.mar")


def test_archiver_scratch_space_cannot_touch_a_run_named_like_the_model(tmp_path, monkeypatch):
    """torch-model-archiver wipes $TMPDIR/<model name>: a run there must survive."""
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    run = make_run(tmp_path / "victim")
    archive.build_archive(run)
    assert (run / "config.yaml").is_file() and (run / "model-store" / "victim.mar").is_file()


def test_unscriptable_model_falls_back_to_trace():
    class Unscriptable(torch.nn.Module):  # *args: TorchScript cannot compile it, tracing can
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(12, 3)

        def forward(self, *images):
            return self.linear(images[0].flatten(1))

    model = Unscriptable().eval()
    example = torch.randn(2, 3, 2, 2)
    scripted, method = torchscript.to_torchscript(model, example)
    assert method == "trace"
    with torch.no_grad():
        assert torch.allclose(scripted(example), model(example))


def test_a_new_format_is_its_module_and_one_registry_line(tmp_path, monkeypatch):
    """A format registered in export.FORMATS is exported, parity-checked, archived (the archive finds
    the model by the file the export holds) and served (the handler loads the file the manifest names)."""
    def save_traced(model, example, path):
        with torchscript.quiet_jit(), torch.no_grad():
            torch.jit.trace(model, example).save(str(path))
        return "trace"

    monkeypatch.setitem(export.FORMATS, "traced", export.Format("traced.pt", save_traced, torchscript.load_torchscript))
    run = make_run(tmp_path / "run")
    out = export.export_model(run, format="traced")
    assert sorted(p.name for p in out.iterdir()) == ["index_to_name.json", "parity.json", "preprocess.json", "preprocess.py", "traced.pt"]
    assert json.loads((out / "parity.json").read_text())["method"] == "trace"
    assert export.model_file(out) == out / "traced.pt" and export.export_is_current(run)
    mar = archive.build_archive(run)
    assert archive.check_archive(mar)["model"]["serializedFile"] == "traced.pt"

    from test_handler import load_handler_module, make_context

    with zipfile.ZipFile(mar) as zf:
        zf.extractall(tmp_path / "model-dir")
    context = make_context(tmp_path / "model-dir", 1)
    context.manifest = json.loads((tmp_path / "model-dir" / "MAR-INF" / "MANIFEST.json").read_text())
    handler = load_handler_module().ImageClassifierHandler()
    handler.initialize(context)
    images = torch.rand(2, 1, 16, 16)
    with torch.no_grad():
        assert torch.allclose(handler.model(images), torchscript.load_torchscript(out / "traced.pt")(images), atol=1e-6)
    with pytest.raises(ValueError, match=r"weights.tflite: no loader for \.tflite \(known: \.pt, \.onnx, \.pt2\)"):
        load_handler_module()._load_model(str(tmp_path / "weights.tflite"), torch.device("cpu"))
