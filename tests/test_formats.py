"""Every export format (TorchScript, ONNX, AOTInductor): exported with its parity check, refused with a
message naming the model, the format and the cause, run by `toolkit predict --export` with the
checkpoint's answers, archived, and served by the handler from an archive on a host where the toolkit
is not installed. One AOTInductor compile per session (the `format_runs` fixture, conftest.py)."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
import typing
import zipfile
from pathlib import Path

import onnx as onnx_lib
import pytest
import torch
from PIL import Image

from conftest import ROOT, run_main
from test_export import CLASSES, make_run
from toolkit import archive, export
from toolkit.config import ExportConfig
from toolkit.errors import ToolkitError
from toolkit.predict import predict_export, predict_files
from toolkit.rundir import Meta

# The recipe models of configs/*.yaml (test_recipes.RECIPES), at small sizes: (model, channels, size).
RECIPE_MODELS = [("mlp", 1, 28), ("mnist_cnn", 1, 28), ("bn_cnn", 1, 28), ("cifar_cnn", 3, 32), ("lenet", 3, 32),
                 ("resnet18", 3, 32)]


def photos(folder: Path, count: int = 6) -> list[Path]:
    """Real image files of other sizes than the model's: PNG, JPEG and TIFF."""
    folder.mkdir(exist_ok=True)
    paths = []
    for i in range(count):
        rng = torch.Generator().manual_seed(i)
        pixels = (torch.rand(40 + 7 * i, 30 + 5 * i, 3, generator=rng) * 255).to(torch.uint8).numpy()
        path = folder / f"photo{i}.{('png', 'jpg', 'tif')[i % 3]}"
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths


def test_one_list_of_formats_for_the_cli_the_config_and_the_registry():
    from toolkit import cli

    assert tuple(export.FORMATS) == cli.EXPORT_FORMATS
    assert ("auto", *export.FORMATS) == typing.get_args(ExportConfig.model_fields["format"].annotation)
    assert set(export.FASTEST.values()) <= set(export.FORMATS)


def test_export_format_auto_is_the_format_measured_fastest_per_model(monkeypatch):
    """export.format auto (the default): ONNX for EfficientNet-B0 (faster than TorchScript through TorchServe in
    both runs of docs/benchmarks.md), TorchScript for the others, and TorchScript, saying why, where the faster
    format's package is missing."""
    assert ExportConfig().format == "auto"
    assert export.auto_format("mnist_cnn")[0] == "torchscript" and export.auto_format("resnet18")[0] == "torchscript"
    assert export.auto_format("efficientnet_b0") == (
        "onnx", "export.format auto: onnx, measured the fastest for efficientnet_b0 (docs/benchmarks.md)")

    def missing():
        raise ToolkitError("export format onnx needs the Python package(s) onnxscript: pip install 'toolkit[onnx]'")

    monkeypatch.setitem(export.FORMATS, "onnx", dataclasses.replace(export.FORMATS["onnx"], require=missing))
    fmt, why = export.auto_format("efficientnet_b0")
    assert fmt == "torchscript" and "onnx serves efficientnet_b0 faster, but export format onnx needs" in why
    assert {f.model_file for f in export.FORMATS.values()} == {"model.pt", "model.onnx", "model.pt2"}
    assert export.FORMATS["torchscript"].model_file == "model.pt" and export.DEFAULT_FORMAT == "torchscript"


@pytest.mark.parametrize("fmt", list(export.FORMATS))
def test_each_format_is_exported_with_its_parity_check(format_runs, fmt):
    out = format_runs[fmt] / "export"
    model_file = export.FORMATS[fmt].model_file
    assert sorted(p.name for p in out.iterdir()) == sorted([model_file, *export.HANDLER_FILES, "parity.json"])
    parity = json.loads((out / "parity.json").read_text())
    print(fmt, {k: parity.get(k) for k in ("max_abs_diff_by_batch", "tolerance", "compile_seconds", "opset")})
    assert parity["format"] == fmt and parity["model_file"] == model_file
    assert set(parity["max_abs_diff_by_batch"]) == {"1", "4"}  # one image and several
    assert 0 <= parity["max_abs_diff"] <= parity["tolerance"] == export.FORMATS[fmt].tolerance
    assert (out / "preprocess.py").read_bytes() == (ROOT / "toolkit" / "preprocess.py").read_bytes()
    if fmt == "onnx":
        assert parity["opset"] == 18
        model = onnx_lib.load(str(out / model_file))
        onnx_lib.checker.check_model(model, full_check=True)
        assert max(op.version for op in model.opset_import if op.domain in ("", "ai.onnx")) == 18
        batch_dim = model.graph.input[0].type.tensor_type.shape.dim[0]
        assert batch_dim.dim_param and not batch_dim.dim_value  # a dynamic batch dimension
    if fmt == "aoti":
        assert parity["compile_seconds"] > 0 and parity["compiler"]
    # batch sizes the check did not try: the batch dimension is dynamic in every format
    run = export.FORMATS[fmt].load(out / model_file)
    from toolkit.checkpoint import load_best

    eager, _ = load_best(format_runs[fmt])
    images = torch.randn(7, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(run(images), eager(images), atol=1e-4, rtol=0)


@pytest.mark.parametrize("name, channels, size", RECIPE_MODELS)
def test_every_recipe_model_exports_to_torchscript_and_onnx(tmp_path, name, channels, size):
    """The ONNX exporter's first step is the torch.export.export capture, with the dynamic batch
    dimension, that AOTInductor compiles; the compile itself (15-60 s a model here) runs once per session,
    for cifar_cnn (format_runs), and for every recipe model in bench/export_formats.py (docs/benchmarks.md)."""
    run = make_run(tmp_path / name, name, channels, size, seed=1)
    for fmt in ("torchscript", "onnx"):
        parity = json.loads((export.export_model(run, format=fmt) / "parity.json").read_text())
        assert parity["format"] == fmt and parity["max_abs_diff"] <= parity["tolerance"], (name, fmt, parity)


@pytest.mark.parametrize("name, channels, size", RECIPE_MODELS)
def test_every_recipe_model_passes_the_aoti_capture_and_its_decompositions(tmp_path, name, channels, size):
    """AOTInductor per model x the steps that can refuse a model: the torch.export capture with the
    dynamic batch (aoti.capture, the call the export makes) and the decomposition to the core ATen ops
    that Inductor lowers, the result checked on batches of 1 and 3. Only the C++ compile is left out,
    15-60 s a model on 2 cores: it runs once per session (format_runs, cifar_cnn, and every format
    test built on it) and for every recipe model in bench/export_formats.py, which prints the times
    (docs/benchmarks.md, "Export formats")."""
    from toolkit.checkpoint import load_best
    from toolkit.export import aoti

    model, _ = load_best(make_run(tmp_path / name, name, channels, size, seed=1))
    model = model.float().eval()
    program = aoti.capture(model, torch.randn(4, channels, size, size)).run_decompositions()
    for n in (1, 3):
        images = torch.randn(n, channels, size, size)
        with torch.no_grad():
            torch.testing.assert_close(program.module()(images), model(images), atol=1e-4, rtol=0)


class DataDependent(torch.nn.Module):
    """A branch on the values of the input: TorchScript scripts it, torch.export (ONNX, AOTInductor) cannot."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(3 * 4 * 4, 4)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = self.linear(images.flatten(1))
        if logits.sum() > 0:
            return logits
        return -logits


@pytest.mark.parametrize("fmt", ["onnx", "aoti"])
def test_a_model_the_format_cannot_take_is_refused_naming_model_format_and_cause(tmp_path, fmt):
    meta = Meta(model={"name": "branchy", "args": {}}, num_classes=4, classes=CLASSES, channels=3, image_size=4,
                resize="resize", mean=[0.5] * 3, std=[0.25] * 3)
    with pytest.raises(ToolkitError) as refused:
        export.save_checked(DataDependent().eval(), meta, fmt, tmp_path / export.FORMATS[fmt].model_file)
    message = str(refused.value)
    assert message.startswith(f"model 'branchy' cannot be exported to {fmt}: ") and "\n" not in message
    assert "data" in message.lower() or "guard" in message.lower() or "symbolic" in message.lower(), message


def test_missing_packages_and_compiler_are_named(tmp_path, monkeypatch, capsys):
    run = make_run(tmp_path / "run")
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxscript" else real(name, *a))
    code, out, err = run_main(capsys, "export", str(run), "--format", "onnx")
    assert code == 2 and "Traceback" not in err
    assert err.strip() == ("error: export format onnx needs the Python package(s) onnxscript: "
                           "pip install 'toolkit[onnx]' (or pip install onnxscript)")
    monkeypatch.undo()

    import torch._inductor.config as inductor_config

    with inductor_config.patch({"cpp.cxx": ("no-such-compiler-here",)}):  # as on a host without g++
        code, out, err = run_main(capsys, "export", str(run), "--format", "aoti")
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "export format aoti compiles C++ and found no C++ compiler" in err and "apt-get install g++" in err
    assert not (run / "export").exists()  # refused before any work


def test_export_says_format_parity_and_size(tmp_path, capsys):
    """`toolkit export` printed only a path (issue 27, item 12)."""
    run = make_run(tmp_path / "run", "bn_cnn", 3, 16)
    code, out, err = run_main(capsys, "export", str(run))  # the config's export.format: auto, torchscript for bn_cnn
    assert code == 0, err
    size = (run / "export" / "model.pt").stat().st_size / 1e6
    parity = json.loads((run / "export" / "parity.json").read_text())
    assert parity["format_choice"] == "export.format auto: torchscript"
    assert out.splitlines()[0] == f"exported {run / 'export' / 'model.pt'} (torchscript; {size:.2f} MB)"
    assert out.splitlines()[1] == (f"  parity with the checkpoint: max |logit difference| {parity['max_abs_diff']:.2g} "
                                   f"(tolerance 0.0001) on random batches of 1 and 4")


def test_export_format_comes_from_the_config_and_the_archive_packs_it(tmp_path, capsys):
    run = make_run(tmp_path / "run")
    config = run / "config.yaml"
    assert "format: auto" in config.read_text()  # the default
    config.write_text(config.read_text().replace("format: auto", "format: onnx"))
    mar = archive.build_archive(run)  # no export yet: exported first, in export.format
    assert archive.check_archive(mar)["model"]["serializedFile"] == "model.onnx"
    assert json.loads((run / "export" / "parity.json").read_text())["opset"] == 18
    code, out, _ = run_main(capsys, "export", str(run), "--format", "torchscript")  # the flag wins
    assert code == 0 and "(torchscript;" in out and not (run / "export" / "model.onnx").exists()
    code, out, _ = run_main(capsys, "archive", str(run))  # packs what the export holds
    assert code == 0 and "(torchscript: model.pt;" in out


@pytest.mark.parametrize("fmt", list(export.FORMATS))
def test_predict_from_an_export_gives_the_checkpoints_answers(format_runs, tmp_path, fmt, capsys):
    run = format_runs[fmt]
    paths = photos(tmp_path / "photos")
    expected = predict_files(run, paths, topk=3)
    got = predict_export(run / "export", paths, topk=3)
    for want, answer in zip(expected, got):
        assert list(answer) == list(want)  # the same classes in the same order
        assert list(answer.values()) == pytest.approx(list(want.values()), abs=1e-5)
    code, out, err = run_main(capsys, "predict", "--export", str(run / "export"), "--json", "--topk", "2", *map(str, paths))
    assert code == 0, err
    shown = json.loads(out)
    assert [row["image"] for row in shown] == list(map(str, paths))
    assert [[t["class"] for t in row["top"]] for row in shown] == [list(a)[:2] for a in expected]


def test_predict_names_files_a_reader_can_tell_apart(tmp_path, capsys, monkeypatch):
    """Three files in a long folder were all shown as `/tmp/realdata/cifar_…` at 120 columns (issue 27, item 8)."""
    run = make_run(tmp_path / "run", "bn_cnn", 3, 16)
    folder = tmp_path / ("a-rather-long-folder-name-" * 3) / "realdata"
    folder.mkdir(parents=True)
    paths = []
    for i, kind in enumerate(("cifar_airplane_0001", "cifar_airplane_0002", "cifar_automobile_0003")):
        paths.append(folder / f"{kind}.png")
        Image.new("RGB", (20, 20), (40 * i, 90, 200)).save(paths[-1])
    (tmp_path / "other").mkdir()
    shutil.copy(paths[0], tmp_path / "other" / paths[0].name)  # the same name in another folder
    paths.append(tmp_path / "other" / paths[0].name)
    monkeypatch.setenv("COLUMNS", "120")
    code, out, err = run_main(capsys, "predict", "--run", str(run), "--topk", "4", *map(str, paths))
    assert code == 0, err
    for shown in ("realdata/cifar_airplane_0001.png", "realdata/cifar_airplane_0002.png",
                  "realdata/cifar_automobile_0003.png", "other/cifar_airplane_0001.png"):
        assert sum(shown in line for line in out.splitlines()) == 1, out
    assert "…" not in out  # nothing cut


def test_tiff_is_read_by_predict_and_the_handler_alike(format_runs, tmp_path):
    """predict answered a TIFF file that the server refused with 415 (issue 27, item 5): one list of
    formats. A real file of each format the toolkit lists, through predict and the handler."""
    from test_handler import handle, load_handler_module, make_context
    from toolkit.preprocess import IMAGE_FORMATS

    run = format_runs["torchscript"]
    files = []
    picture = Image.fromarray((torch.rand(30, 44, 3, generator=torch.Generator().manual_seed(5)) * 255).byte().numpy())
    for fmt, suffix in (("JPEG", "jpg"), ("PNG", "png"), ("BMP", "bmp"), ("GIF", "gif"), ("WEBP", "webp"),
                        ("TIFF", "tif"), ("PPM", "ppm")):
        files.append(tmp_path / f"picture.{suffix}")
        picture.save(files[-1], fmt)
    assert {Image.open(f).format for f in files} == set(IMAGE_FORMATS)
    local = predict_files(run, files, topk=2)
    handler = load_handler_module().ImageClassifierHandler()
    handler.initialize(make_context(run / "export", 1))
    answers, ctx = handle(handler, run / "export", [{"body": bytearray(f.read_bytes())} for f in files])
    assert [ctx.get_response_status(i)[0] for i in range(len(files))] == [200] * len(files), answers
    for mine, theirs in zip(local, answers):
        assert list(theirs)[:2] == list(mine)
    # an LZW-compressed 16-bit grayscale TIFF, as scanners write them
    scan = tmp_path / "scan.tif"
    Image.fromarray((torch.rand(25, 25) * 65535).to(torch.int32).numpy().astype("uint16")).save(scan, compression="tiff_lzw")
    answers, ctx = handle(handler, run / "export", [{"body": bytearray(scan.read_bytes())}])
    assert ctx.get_response_status(0)[0] == 200 and list(answers[0])[0] == list(predict_files(run, [scan], topk=1)[0])[0]


NO_TOOLKIT = """
import importlib.abc, json, sys
class NoToolkit(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "toolkit" or name.startswith("toolkit."):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked: a TorchServe host without the toolkit)")
sys.meta_path.insert(0, NoToolkit())
"""
SERVE_IN_SUBPROCESS = NO_TOOLKIT + """
import importlib.util
from ts.context import Context, RequestProcessor
image_paths, model_dirs = sys.argv[1].split(","), sys.argv[2:]
def context(model_dir, manifest, n):
    ctx = Context("m", model_dir, manifest, n, None, "0.12.0")
    ctx.request_processor = [RequestProcessor({}) for _ in range(n)]
    return ctx
served = {}
for model_dir in model_dirs:
    manifest = json.load(open(f"{model_dir}/MAR-INF/MANIFEST.json"))
    spec = importlib.util.spec_from_file_location("handler", f"{model_dir}/handler.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    handler = module.ImageClassifierHandler()
    handler.initialize(context(model_dir, manifest, 1))
    rows = [{"body": bytearray(open(p, "rb").read())} for p in image_paths]
    served[manifest["model"]["serializedFile"]] = handler.handle(rows, context(model_dir, manifest, len(rows)))
assert not [m for m in sys.modules if m == "toolkit" or m.startswith("toolkit.")]
print(json.dumps(served))
"""


def test_an_archive_is_served_where_the_toolkit_is_not_installed(format_runs, tmp_path):
    """The handler and the preprocess.py shipped beside it are all an archive needs of the toolkit."""
    model_dirs = []
    for fmt, source in format_runs.items():
        run = tmp_path / fmt
        shutil.copytree(source, run)
        with zipfile.ZipFile(archive.build_archive(run)) as zf:
            assert {"preprocess.py", "handler.py", export.FORMATS[fmt].model_file} <= set(zf.namelist())
            zf.extractall(tmp_path / f"{fmt}-model-dir")
        model_dirs.append(str(tmp_path / f"{fmt}-model-dir"))
    paths = photos(tmp_path / "photos", 3)
    result = subprocess.run([sys.executable, "-c", SERVE_IN_SUBPROCESS, ",".join(map(str, paths)), *model_dirs],
                            capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    served = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(served) == {f.model_file for f in export.FORMATS.values()}
    expected = predict_files(format_runs["torchscript"], paths, topk=5)
    for answers in served.values():
        for want, answer in zip(expected, answers):
            assert list(answer) == list(want)[:len(answer)]
            assert list(answer.values()) == pytest.approx(list(want.values())[:len(answer)], abs=1e-5)
    # the blocker itself works: the toolkit is installed in this environment
    blocked = subprocess.run([sys.executable, "-c", NO_TOOLKIT + "import toolkit"], capture_output=True, text=True)
    assert blocked.returncode == 1 and "blocked" in blocked.stderr


def test_training_and_evaluate_read_a_file_of_each_format(tmp_path):
    """The same list for training (imagefolder) and evaluate: torchvision's ImageFolder alone leaves GIF
    out, the server refused TIFF (issue 27, item 5). Every file is found and decoded."""
    from concurrent.futures import ThreadPoolExecutor

    from toolkit.config import DataConfig
    from toolkit.data import build_data
    from toolkit.evaluate import folder_set
    from toolkit.preprocess import EXTENSIONS, Preprocess

    root = tmp_path / "photos"
    for k, name in enumerate(("a", "b")):
        (root / name).mkdir(parents=True)
        for i, (fmt, suffix) in enumerate((("JPEG", "jpg"), ("PNG", "png"), ("BMP", "bmp"), ("GIF", "gif"),
                                           ("WEBP", "webp"), ("TIFF", "tif"), ("PPM", "ppm"))):
            Image.new("RGB", (24 + i, 20), (100 * k, 20 * i, 50)).save(root / name / f"{i}.{suffix}", fmt)
        (root / name / "notes.txt").write_text("not an image")
    assert {p.suffix for p in root.rglob("*.*")} - {".txt"} <= set(EXTENSIONS)
    bundle = build_data(DataConfig(name="imagefolder", root=str(root), image_size=16, val_fraction=0.5,
                                   num_workers=0, pipeline="loader"))
    assert len(bundle.train) + len(bundle.val) == 14
    for dataset in (bundle.train, bundle.val):
        assert all(dataset[i][0].shape == (3, 16, 16) for i in range(len(dataset)))
    data = folder_set(root, ["a", "b"])
    assert len(data) == 14 and sorted(Path(f).suffix for f in data.files) == sorted([".jpg", ".png", ".bmp", ".gif",
                                                                                      ".webp", ".tif", ".ppm"] * 2)
    pre = Preprocess(channels=3, image_size=16, resize="resize", mean=[0.5] * 3, std=[0.25] * 3, preprocess_version=2)
    with ThreadPoolExecutor(1) as pool:
        assert data.fetch(torch.arange(14), pre, pool).shape == (14, 3, 16, 16)
