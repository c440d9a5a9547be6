"""Every recipe model in every export format: export (and compile) time, parity figures, file size, the
in-process forward time at batch 1 and 8, and, for one model, the cold start of `toolkit serve start`
(from the command to READY) per format. The figures of docs/benchmarks.md, "Export formats".

Each model gets a run directory with random weights (BatchNorm statistics moved off their defaults):
weights change neither the cost nor, much, the parity of an export. The AOTInductor compiles are the
slow part (15-120 s a model on 2 cores), which is why the test suite compiles one model only.

    python bench/export_formats.py                              # the recipe models, about 8 minutes
    python bench/export_formats.py --models resnet18:3:224 --formats onnx,aoti --cold-start resnet18
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from toolkit import archive, export, server  # noqa: E402
from toolkit.checkpoint import save_best  # noqa: E402
from toolkit.config import RunConfig  # noqa: E402
from toolkit.models import build_model  # noqa: E402
from toolkit.rundir import Meta  # noqa: E402

RECIPE_MODELS = "mlp:1:28,mnist_cnn:1:28,bn_cnn:1:28,cifar_cnn:3:32,lenet:3:32,resnet18:3:224"
CLASSES = [f"class{i}" for i in range(10)]


def make_run(run_dir: Path, name: str, channels: int, size: int) -> Path:
    torch.manual_seed(0)
    model = build_model(name, len(CLASSES), channels, size).train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(8, channels, size, size) * 2 + 0.5)
    meta = Meta(model={"name": name, "args": {}}, num_classes=len(CLASSES), classes=CLASSES, channels=channels,
                image_size=size, resize="resize_center_crop", mean=[0.5] * channels, std=[0.25] * channels,
                epoch=1, val_acc=0.5, preprocess_version=2)
    run_dir.mkdir(parents=True)
    save_best(run_dir, model, meta, step=1)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(RunConfig().to_dict(), sort_keys=False))
    return run_dir


def forward_ms(run, channels: int, size: int, batch: int, repeat: int) -> float:
    images = torch.randn(batch, channels, size, size)
    times = []
    with torch.inference_mode():
        for _ in range(3):  # warm-up: TorchScript's profiling executor optimises after its first runs
            run(images)
        for _ in range(repeat):
            started = time.perf_counter()
            run(images)
            times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def time_to_ready(run_dir: Path, work: Path) -> float:
    """`toolkit serve start` on this run's archive alone: seconds from the call to READY."""
    from serve_load import free_port_block  # bench/serve_load.py, beside this file

    port = free_port_block()
    mar = archive.build_archive(run_dir)
    store = work / "store"
    store.mkdir(exist_ok=True)
    for old in store.glob("*.mar"):
        old.unlink()
    (store / mar.name).write_bytes(mar.read_bytes())
    started = time.perf_counter()
    server.start_server(store, port=port, state_root=work / "state", timeout=600)
    seconds = time.perf_counter() - started
    server.stop_server(port, work / "state")
    return seconds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=RECIPE_MODELS, help="name:channels:size,...")
    parser.add_argument("--formats", default=",".join(export.FORMATS))
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--cold-start", default="resnet18", help="model whose cold start is timed per format ('' = none)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"{torch.get_num_threads()} threads")
    rows = []
    with tempfile.TemporaryDirectory(prefix="export-formats-") as tmp:
        work = Path(tmp)
        for spec in args.models.split(","):
            name, channels, size = spec.split(":")
            channels, size = int(channels), int(size)
            for fmt in args.formats.split(","):
                run_dir = make_run(work / f"{name}-{fmt}", name, channels, size)
                started = time.perf_counter()
                try:
                    out = export.export_model(run_dir, format=fmt)
                except Exception as exc:  # a refusal is a figure too
                    print(f"{name:10s} {fmt:12s} refused: {exc}", flush=True)
                    rows.append({"model": name, "format": fmt, "refused": str(exc)})
                    continue
                seconds = time.perf_counter() - started
                parity = json.loads((out / "parity.json").read_text())
                run = export.FORMATS[fmt].load(out / export.FORMATS[fmt].model_file)
                if fmt == "torchscript":  # as serve/handler.py runs it
                    run = torch.jit.freeze(run)
                row = {"model": name, "size": size, "format": fmt, "export_s": round(seconds, 1),
                       "compile_s": parity.get("compile_seconds"), "max_abs_diff": parity["max_abs_diff"],
                       "by_batch": parity["max_abs_diff_by_batch"],
                       "mb": round((out / export.FORMATS[fmt].model_file).stat().st_size / 1e6, 2),
                       "forward_ms_1": round(forward_ms(run, channels, size, 1, args.repeat), 2),
                       "forward_ms_8": round(forward_ms(run, channels, size, 8, args.repeat), 2)}
                if name == args.cold_start:
                    row["cold_start_s"] = round(time_to_ready(run_dir, work), 1)
                rows.append(row)
                print(json.dumps(row), flush=True)
    print("\n| model | format | export s (compile s) | max abs logit diff (batch 1 / 4) | MB | forward ms batch 1 | batch 8 | cold start s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "refused" in r:
            print(f"| {r['model']} | {r['format']} | refused: {r['refused']} | | | | | |")
            continue
        compile_s = f" ({r['compile_s']:.1f})" if r["compile_s"] else ""
        diffs = " / ".join(f"{r['by_batch'][k]:.1e}" for k in ("1", "4"))
        print(f"| {r['model']} {r['size']} | {r['format']} | {r['export_s']:.1f}{compile_s} | {diffs} | {r['mb']} | "
              f"{r['forward_ms_1']} | {r['forward_ms_8']} | {r.get('cold_start_s', '')} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
