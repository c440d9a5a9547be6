"""Serving load: our TorchServe handler against TorchServe's built-in `image_classifier`, in one run.

Both serve the same TorchScript file (a toolkit run exported by `toolkit export`) on a TorchServe
started by toolkit.server on free loopback ports, with the same model-config.yaml (workers,
batch size, batch delay):

  ours     the .mar of `toolkit archive`: serve/handler.py (decode with PIL, resize on uint8
           tensors, normalise, one forward per batch, top-k JSON, per-request 4xx errors).
  builtin  torch-model-archiver --handler image_classifier with the same model.pt and
           index_to_name.json: PIL Resize(256) + CenterCrop(224) + ToTensor + Normalize (ImageNet),
           top-5. It needs captum (imported by its base class) and 3-channel images, so the model
           is an RGB 224x224 one with ImageNet normalisation: default mobilenet_v3_small, trained
           for one epoch on synthetic images (weights do not change the cost of a request).

The requests are real JPEG and PNG files: crops of the two photos scikit-learn ships (640x427),
240..640 pixels wide. For each worker count (default: 1, and one per core, which is TorchServe's
own default) there are three phases, each on a server of its own holding ours and builtin: at batch 1
with TorchServe's handler profiling on (concurrency 1), without dynamic batching (batch 1), and with it
(batch 8, 5 ms delay).
A bounded load (N requests, C concurrent keep-alive connections, loopback only, a time limit per
phase, the two handlers taking turns in rounds) gives requests/s, p50/p95/p99 latency at the client
and errors; TorchServe's own metrics give the server-side time of a request
(ts_inference_latency_microseconds) and of each handle() call (PredictionTime). At concurrency 1
the profiled models report each batch's preprocess/inference/postprocess time
(ts_handler_*, `handler: {profile: true}`, which both handlers honour): the share of pre- plus
post-processing in a request at batch 1, measured inside the server. The same phases are also
timed in this process on the same files.

    python bench/serve_load.py                        # about 4 minutes
    python bench/serve_load.py --model efficientnet_b0 # about 7 minutes: the model where both targets hold
    python bench/serve_load.py --requests 2000 --concurrency 16 --workers 1,2,4 --model resnet18

With `--formats torchscript,onnx,aoti` our handler serves each export format (one archive per
format, `ours-FORMAT`), beside the built-in handler (which reads TorchScript only); the model's
in-process forward time per format at batch 1 and at --batch is printed too (the limit serving
approaches), and the issue's two targets are checked in words: the best format at least 2x the
built-in handler at its own best setting, and served requests/s at least 0.8x the in-process
images/s at the same batch size. A format may name a reduced precision (`--formats
torchscript,torchscript@bf16,onnx@int8`: serve.precision, checked at export against fp32's classes).
`--quick` is a smoke run of a few requests (tests/test_bench.py).
"""

from __future__ import annotations

import argparse
import http.client
import importlib.util
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
HOST = "127.0.0.1"
IMAGENET = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


# ---------------------------------------------------------------- what is served


def make_images(folder: Path, count: int, seed: int = 0) -> list[Path]:
    """`count` crops of scikit-learn's sample photos, 240..640 px wide, alternately JPEG and PNG."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_sample_images

    folder.mkdir(parents=True, exist_ok=True)
    photos = load_sample_images().images  # two 427 x 640 x 3 uint8 photos
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        photo = photos[i % len(photos)]
        width = int(rng.integers(240, 641))
        height = min(photo.shape[0], int(width * rng.uniform(0.6, 1.0)))
        top, left = int(rng.integers(0, photo.shape[0] - height + 1)), int(rng.integers(0, photo.shape[1] - width + 1))
        image = Image.fromarray(photo[top:top + height, left:left + width])
        path = folder / (f"{i:02d}.jpg" if i % 2 == 0 else f"{i:02d}.png")
        image.save(path, quality=90) if path.suffix == ".jpg" else image.save(path)
        paths.append(path)
    return paths


def train_run(work: Path, model: str) -> Path:
    """A toolkit run of `model` on synthetic RGB 224x224 images (one epoch), exported."""
    config = work / "serve_bench.yaml"
    config.write_text(yaml.safe_dump({
        "data": {"name": "synthetic", "channels": 3, "image_size": 224, "resize": "resize_center_crop",
                 "num_classes": 10, "synthetic_samples": 64, "batch_size": 16, **IMAGENET},
        "model": {"name": model},
        "train": {"epochs": 1, "output_dir": str(work), "run_name": "served", "overwrite": True},
    }))
    subprocess.run([str(BIN / "toolkit"), "train", "--config", str(config)], check=True, cwd=work,
                   stdout=subprocess.DEVNULL)
    subprocess.run([str(BIN / "toolkit"), "export", str(work / "served")], check=True, stdout=subprocess.DEVNULL)
    return work / "served"


def format_runs(run_dir: Path, work: Path, formats: list[str]) -> dict[str, Path]:
    """{format: a copy of the run exported in it} (the torchscript one is the run itself). A format may
    name a reduced precision, `FORMAT@PRECISION` (`torchscript@bf16`, `onnx@int8`: serve.precision),
    keyed `FORMAT-PRECISION`."""
    from toolkit.export import export_model

    runs = {}
    for spec in formats:
        fmt, _, precision = spec.partition("@")
        key = f"{fmt}-{precision}" if precision else fmt
        runs[key] = run_dir if key == "torchscript" else work / f"run-{key}"
        if key != "torchscript":
            shutil.copytree(run_dir, runs[key], ignore=shutil.ignore_patterns("model-store", "export"))
            started = time.perf_counter()
            export_model(runs[key], format=fmt, precision=precision or None)
            print(f"exported {fmt} at {precision or 'fp32'} in {time.perf_counter() - started:.1f} s", flush=True)
    return runs


def forward_times(runs: dict[str, Path], batches: tuple[int, ...], threads: int, repeat: int = 5) -> dict:
    """{(format, batch): best ms of one forward} of each export's file, loaded as the handler loads it
    (serve/loaders.py: TorchScript frozen), contiguous inputs, after three warm-up calls."""
    import torch

    from toolkit.export import FORMATS

    torch.set_num_threads(threads)
    spec = importlib.util.spec_from_file_location("bench_serve_loaders", ROOT / "serve" / "loaders.py")
    loaders = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loaders)
    out = {}
    for fmt, run in runs.items():
        model = loaders.load_model(str(run / "export" / FORMATS[fmt.split("-")[0]].model_file), torch.device("cpu"))
        for batch in batches:
            images = torch.randn(batch, 3, 224, 224)
            with torch.inference_mode():
                for _ in range(3):
                    model(images)
                best = float("inf")
                for _ in range(repeat):
                    started = time.perf_counter()
                    model(images)
                    best = min(best, time.perf_counter() - started)
            out[(fmt, batch)] = best * 1000
    return out


def build_store(runs: dict[str, Path], store: Path, variants: list[tuple[str, int, bool]], delay_ms: int,
                workers: int) -> None:
    """For each (tag, batch size, profile): ours-FORMAT_TAG.mar (toolkit archive) per format and
    builtin_TAG.mar (image_classifier, the torchscript run's model.pt), the same model-config.yaml
    (workers, batch size, batch delay, `handler: {profile: true}` if profiled)."""
    from toolkit import archive

    run_dir = runs["torchscript"]
    export = run_dir / "export"
    store.mkdir(parents=True, exist_ok=True)
    for tag, batch, profile in variants:
        for fmt, run in runs.items():
            config_path = run / "config.yaml"
            config = yaml.safe_load(config_path.read_text())
            config["serve"].update(batch_size=batch, max_batch_delay_ms=delay_ms if batch > 1 else 0,
                                   min_workers=workers, max_workers=workers, profile=profile)
            config_path.write_text(yaml.safe_dump(config, sort_keys=False))  # as if trained with --set serve.*
            shutil.copy(archive.build_archive(run, name=f"ours-{fmt}_{tag}"), store / f"ours-{fmt}_{tag}.mar")
        model_config = store / f"model-config-{tag}.yaml"
        model_config.write_text(yaml.safe_dump(archive.model_config(run_dir)))
        with tempfile.TemporaryDirectory(prefix="bench-mar-") as scratch:  # the archiver stages in $TMPDIR/<name>
            subprocess.run([archive.archiver_command(), "--model-name", f"builtin_{tag}", "--version", "1.0",
                            "--serialized-file", str(export / "model.pt"), "--handler", "image_classifier",
                            "--extra-files", str(export / "index_to_name.json"), "--config-file", str(model_config),
                            "--export-path", str(store), "-f"], check=True, env={**os.environ, "TMPDIR": scratch})


# ---------------------------------------------------------------- load


def run_load(port: int, model: str, token: str, bodies: list[bytes], total: int, concurrency: int,
             time_limit: float) -> dict:
    """`total` PUT requests over `concurrency` keep-alive connections, stopped at `time_limit` s."""
    counter, lock, results = itertools.count(), threading.Lock(), []
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/octet-stream"}
    deadline = time.monotonic() + time_limit

    def client():
        conn = http.client.HTTPConnection(HOST, port, timeout=60)
        mine = []
        while True:
            i = next(counter)
            if i >= total or time.monotonic() > deadline:
                break
            t0 = time.perf_counter()
            try:
                conn.request("PUT", f"/predictions/{model}", body=bodies[i % len(bodies)], headers=headers)
                response = conn.getresponse()
                answer = response.read()
                ok = response.status == 200 and isinstance(json.loads(answer), dict)
            except (OSError, http.client.HTTPException, ValueError):
                ok = False
                conn.close()
                conn = http.client.HTTPConnection(HOST, port, timeout=60)
            mine.append((time.perf_counter() - t0, ok))
        conn.close()
        with lock:
            results.extend(mine)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return {"wall_s": time.perf_counter() - t0, "latencies_ms": [r[0] * 1000 for r in results],
            "errors": sum(not ok for _, ok in results), "cut_by_time_limit": total - len(results)}


def summary_stats(parts: list[dict]) -> dict:
    """Rounds of one phase -> requests/s over their summed wall time, pooled latency percentiles."""
    import numpy as np

    latencies = np.array([x for part in parts for x in part["latencies_ms"]])
    p50, p95, p99 = np.percentile(latencies, [50, 95, 99]) if len(latencies) else (float("nan"),) * 3
    return {"requests": len(latencies), "rps": len(latencies) / sum(p["wall_s"] for p in parts),
            "p50_ms": p50, "p95_ms": p95, "p99_ms": p99, "mean_ms": float(latencies.mean()) if len(latencies) else float("nan"),
            "errors": sum(p["errors"] for p in parts), "cut_by_time_limit": sum(p["cut_by_time_limit"] for p in parts)}


def server_metrics(port: int, model: str) -> dict:
    """TorchServe's own counters for `model`: requests, summed latency and queue time (us)."""
    import urllib.request

    wanted = {"ts_inference_requests_total": "requests", "ts_inference_latency_microseconds": "latency_us",
              "ts_queue_latency_microseconds": "queue_us"}
    found = dict.fromkeys(wanted.values(), 0.0)
    with urllib.request.urlopen(f"http://{HOST}:{port + 2}/metrics", timeout=10) as response:
        for line in response.read().decode().splitlines():
            name = line.split("{", 1)[0]
            if name in wanted and f'model_name="{model}"' in line:
                found[wanted[name]] += float(line.rsplit(" ", 1)[1])
    return found


# ---------------------------------------------------------------- handler phases, in process


def phase_times(export_dir: Path, bodies: list[bytes], threads: int, repeat: int = 3) -> dict:
    """Mean ms of preprocess / inference / postprocess per single-request batch, for both handlers."""
    import torch
    from ts.context import Context, RequestProcessor

    torch.set_num_threads(threads)
    spec = importlib.util.spec_from_file_location("toolkit_serve_handler", ROOT / "serve" / "handler.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    from ts.torch_handler.image_classifier import ImageClassifier

    def context(name):
        ctx = Context(name, str(export_dir), {"model": {"modelName": name, "serializedFile": "model.pt"}},
                      1, None, "0.12.0", model_yaml_config={})
        ctx.request_processor = [RequestProcessor({})]
        return ctx

    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for side, handler in (("ours-torchscript", module.ImageClassifierHandler()), ("builtin", ImageClassifier())):
            handler.initialize(context(side))
            handler.context = context(side)
            totals = [0.0, 0.0, 0.0]
            for step in range(repeat * len(bodies) + 4):
                rows = [{"body": bytearray(bodies[step % len(bodies)])}]
                t0 = time.perf_counter()
                batch = handler.preprocess(rows)
                t1 = time.perf_counter()
                logits = handler.inference(batch[0] if side != "builtin" else batch)
                t2 = time.perf_counter()
                handler.postprocess(logits)
                t3 = time.perf_counter()
                if step >= 4:  # the first calls warm TorchScript's profiling executor
                    for k, dt in enumerate((t1 - t0, t2 - t1, t3 - t2)):
                        totals[k] += dt * 1000
            n = repeat * len(bodies)
            out[side] = {"pre_ms": totals[0] / n, "inference_ms": totals[1] / n, "post_ms": totals[2] / n}
    return out


# ---------------------------------------------------------------- servers


def free_port_block(size: int = 5) -> int:
    """A port p with p..p+size-1 free on loopback (TorchServe takes five consecutive ports)."""
    from toolkit.ports import free_port_block as block

    return block(size, HOST)


METRICS = ("PredictionTime", "ts_handler_preprocess", "ts_handler_inference", "ts_handler_postprocess")


def logged_times(log: Path, offset: int) -> tuple[dict[tuple[str, str], list[float]], int]:
    """{(metric, model): [ms, ...]} from ts_log.log past `offset`, and the new offset: PredictionTime
    (TorchServe's time of one handle() call, one batch) and, for profiled models, the handler's
    ts_handler_* phase times per batch. Each metric line appears twice: deduplicated."""
    import re

    text = log.read_bytes()[offset:].decode(errors="replace") if log.is_file() else ""
    seen, times = set(), {}
    for match in re.finditer(rf"({'|'.join(METRICS)})\.Milliseconds:([\d.]+)\|#ModelName:([\w-]+)(\S*)", text):
        if match.group(0) not in seen:
            seen.add(match.group(0))
            times.setdefault((match.group(1), match.group(3)), []).append(float(match.group(2)))
    return times, offset + len(text.encode())


def measure_workers(args, runs: dict[str, Path], work: Path, workers: int, bodies: list[bytes]) -> dict:
    """The phases at one worker count, each on a TorchServe of its own holding that phase's models
    (ours-FORMAT_TAG per format and builtin_TAG, `workers` each): one server for every phase at once held
    every model's workers together (18 ResNet-18 workers of about 1 GB each at two worker counts of five
    formats), more than the memory of a small machine."""
    from toolkit import server

    variants = [("b1p", 1, True), ("b1", 1, False), (f"b{args.batch}", args.batch, False)]
    store = work / f"store-w{workers}"
    build_store(runs, store, variants, args.batch_delay_ms, workers)
    state_root = work / "ts"
    sides = [f"ours-{fmt}" for fmt in runs] + ["builtin"]
    results = {}
    # (model tag, batch, concurrency, requests): the profiled models serve the concurrency-1 phase
    phases = [("b1p", 1, 1, args.requests // 4), ("b1", 1, args.concurrency, args.requests),
              (f"b{args.batch}", args.batch, args.concurrency, args.requests)]
    for tag, batch, concurrency, total in phases:
        port = free_port_block()
        models = [f"{side}_{tag}" for side in sides]
        try:
            server.start_server(store, port=port, models=models, state_root=state_root, timeout=300)
            token = server.read_token(port, "inference", state_root)
            log = server.state_dir_for(port, state_root) / "logs" / "ts_log.log"
            for model in models:  # warm-up: TorchScript's profiling executor, the connections
                run_load(port, model, token, bodies, 2 * args.concurrency, args.concurrency, args.time_limit)
            parts = {side: [] for side in sides}
            counters = {side: dict.fromkeys(("requests", "latency_us", "queue_us"), 0.0) for side in parts}
            handled = {side: {metric: [] for metric in METRICS} for side in parts}
            for round_ in range(args.rounds):  # alternate, so that a passing disturbance hits both sides
                for side in sides if round_ % 2 == 0 else sides[::-1]:
                    model = f"{side}_{tag}"
                    _, offset = logged_times(log, 0)
                    before = server_metrics(port, model)
                    parts[side].append(run_load(port, model, token, bodies, total // args.rounds, concurrency,
                                                args.time_limit / args.rounds))
                    after = server_metrics(port, model)
                    for key in counters[side]:
                        counters[side][key] += after[key] - before[key]
                    time.sleep(0.5)  # the frontend logs the worker's metric lines asynchronously
                    logged = logged_times(log, offset)[0]
                    for metric in METRICS:
                        handled[side][metric] += logged.get((metric, model), [])
        finally:
            server.stop_server(port, state_root)
            left = server.instance_processes(server.state_dir_for(port, state_root))
            if left:
                raise SystemExit(f"TorchServe processes left running: {[p.pid for p in left]}")
        for side in sides:
            stats = summary_stats(parts[side])
            served = max(counters[side]["requests"], 1)
            stats["server_ms"] = counters[side]["latency_us"] / served / 1000
            stats["queue_ms"] = counters[side]["queue_us"] / served / 1000
            for metric, key in zip(METRICS, ("handle_ms", "pre_ms", "inference_ms", "post_ms")):
                values = handled[side][metric]
                stats[key] = sum(values) / len(values) if values else float("nan")
            stats["batches"] = len(handled[side]["PredictionTime"])
            results[(workers, batch, concurrency, side)] = stats
            print(row(workers, batch, concurrency, side, stats), flush=True)
    return results


HEADER = (f"{'workers':>7} {'batch':>5} {'conc':>4} {'handler':<16} {'done':>5} {'req/s':>7} {'p50 ms':>7} "
          f"{'p95 ms':>7} {'p99 ms':>7} {'errors':>6} {'server ms':>9} {'handle ms':>9} {'req/batch':>9}")


def row(workers, batch, concurrency, side, s) -> str:
    per_batch = s["requests"] / s["batches"] if s["batches"] else float("nan")
    return (f"{workers:>7} {batch:>5} {concurrency:>4} {side:<16} {s['requests']:>5} {s['rps']:>7.1f} {s['p50_ms']:>7.1f} "
            f"{s['p95_ms']:>7.1f} {s['p99_ms']:>7.1f} {s['errors']:>6} {s['server_ms']:>9.1f} {s['handle_ms']:>9.1f} "
            f"{per_batch:>9.1f}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=400, help="requests per handler per phase")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--batch", type=int, default=8, help="dynamic batching's batch size (the other phase uses 1)")
    p.add_argument("--batch-delay-ms", type=int, default=5)
    p.add_argument("--workers", default=None, help="comma-separated worker counts per model, one server each "
                   "(default: 1 and one per core, TorchServe's own default)")
    p.add_argument("--model", default="mobilenet_v3_small", help="any RGB 224x224 model the toolkit builds")
    p.add_argument("--images", type=int, default=16, help="distinct files sent in turn")
    p.add_argument("--rounds", type=int, default=2, help="each phase split in rounds, the handlers taking turns")
    p.add_argument("--time-limit", type=float, default=30, help="seconds per phase at most (then it stops sending)")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--keep", type=Path, help="keep the run, archives and TorchServe logs in this directory")
    p.add_argument("--formats", default="torchscript", help="comma-separated export formats our handler serves "
                   "(torchscript, onnx, aoti), one archive each; FORMAT@PRECISION for a reduced serve.precision "
                   "(torchscript@bf16, aoti@bf16, onnx@int8)")
    p.add_argument("--quick", action="store_true", help="a smoke run: few requests and images, one worker, one round")
    args = p.parse_args(argv)
    args.formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    if "torchscript" not in args.formats:  # the built-in handler's file and the in-process phases
        args.formats.insert(0, "torchscript")
    if args.quick:
        args.requests, args.images, args.rounds, args.time_limit = 16, 4, 1, 10
        args.workers = args.workers or "1"
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        import captum  # noqa: F401  (TorchServe's VisionHandler imports it)
    except ImportError:
        raise SystemExit("the built-in image_classifier handler imports captum: pip install -e '.[bench]'") from None
    if args.keep:
        shutil.rmtree(args.keep, ignore_errors=True)
        args.keep.mkdir(parents=True)
    work = args.keep.resolve() if args.keep else Path(tempfile.mkdtemp(prefix="bench-serve-"))
    cores = len(os.sched_getaffinity(0))
    worker_counts = [int(w) for w in (args.workers or f"1,{cores}").split(",")]
    worker_counts = sorted(set(worker_counts))
    try:
        files = make_images(work / "images", args.images)
        bodies = [f.read_bytes() for f in files]
        sizes = [image_size(f) for f in files]
        print(f"{len(files)} files ({sum(f.suffix == '.jpg' for f in files)} JPEG, {sum(f.suffix == '.png' for f in files)} "
              f"PNG), {min(sizes)[0]}..{max(sizes)[0]} px wide, {sum(map(len, bodies)) / len(bodies) / 1024:.0f} KiB on "
              f"average; model {args.model} (3x224x224); {cores} cores; load average {os.getloadavg()[0]:.2f}", flush=True)
        run_dir = train_run(work, args.model)
        runs = format_runs(run_dir, work, args.formats)
        phases = phase_times(run_dir / "export", bodies, cores)  # one worker: every core to it
        forwards = forward_times(runs, (1, args.batch), cores)
        print("\nin-process forward of the exported file (best of 5, all cores):")
        for (fmt, batch), ms in forwards.items():
            print(f"  {fmt:<12} batch {batch:>2}: {ms:7.1f} ms = {batch * 1000 / ms:6.1f} images/s", flush=True)
        print("\n" + HEADER, flush=True)
        results = {}
        for workers in worker_counts:
            results.update(measure_workers(args, runs, work, workers, bodies))
        summarise(args, results, phases, worker_counts, forwards)
        print(f"load average at the end: {os.getloadavg()[0]:.2f}")
        if args.json:
            args.json.write_text(json.dumps({"phases": phases, "forward_ms": {"/".join(map(str, k)): v for k, v in forwards.items()},
                                             "load": {"/".join(map(str, k)): v for k, v in results.items()}}, indent=2))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


def image_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as image:
        return image.size


def summarise(args, results: dict, phases: dict, worker_counts: list[int], forwards: dict) -> None:
    c = args.concurrency
    sides = sorted({k[3] for k in results}, key=lambda side: (side == "builtin", side))
    print("\nhandler phases at batch 1, concurrency 1 (mean ms per request):")
    for side, p in phases.items():
        for workers in worker_counts:
            one = results[(workers, 1, 1, side)]
            print(f"  {side:<16} in TorchServe, {workers} worker(s): preprocess {one['pre_ms']:.2f} + inference "
                  f"{one['inference_ms']:.2f} + postprocess {one['post_ms']:.2f} | handle {one['handle_ms']:.2f}, "
                  f"request {one['server_ms']:.2f} ({one['mean_ms']:.2f} at the client) | pre+post = "
                  f"{(one['pre_ms'] + one['post_ms']) / one['server_ms']:.0%} of the request")
        one = results[(worker_counts[0], 1, 1, side)]
        print(f"  {side:<16} in this process:           preprocess {p['pre_ms']:.2f} + inference {p['inference_ms']:.2f} + "
              f"postprocess {p['post_ms']:.2f} | pre+post = {(p['pre_ms'] + p['post_ms']) / one['server_ms']:.0%} of "
              f"the request in TorchServe ({worker_counts[0]} worker(s))")
    for workers in worker_counts:
        for batch in (1, args.batch):
            builtin = results[(workers, batch, c, "builtin")]
            for side in sides[:-1]:
                ours = results[(workers, batch, c, side)]
                print(f"{workers} worker(s), batch {batch}, concurrency {c}: {side} / builtin = "
                      f"{ours['rps'] / builtin['rps']:.2f}x req/s; errors {ours['errors']} / {builtin['errors']}")
    best = {side: max(((r["rps"], k) for k, r in results.items() if k[3] == side and k[2] == c)) for side in sides}
    b_rps, b_key = best["builtin"]
    for side in sides[:-1]:
        o_rps, o_key = best[side]
        print(f"each at its best setting: {side} {o_rps:.1f} req/s ({o_key[0]} worker(s), batch {o_key[1]}), builtin "
              f"{b_rps:.1f} req/s ({b_key[0]} worker(s), batch {b_key[1]}): {o_rps / b_rps:.2f}x")
    top = max(sides[:-1], key=lambda side: best[side][0])
    errors = sum(r["errors"] for r in results.values())
    ratio = best[top][0] / b_rps
    print(f"TARGET best format >= 2x builtin at its best setting: {top} {ratio:.2f}x -> "
          f"{'MET' if ratio >= 2 else 'NOT MET'}; errors {errors} -> {'MET' if errors == 0 else 'NOT MET'}")
    for side in sides[:-1]:
        fmt = side.split("-", 1)[1]
        for batch in (1, args.batch):
            served = max(results[(w, batch, c, side)]["rps"] for w in worker_counts)
            in_process = batch * 1000 / forwards[(fmt, batch)]
            print(f"TARGET served >= 0.8x in process, {side} batch {batch}: {served:.1f} req/s vs {in_process:.1f} "
                  f"images/s in process = {served / in_process:.2f}x -> {'MET' if served >= 0.8 * in_process else 'NOT MET'}")
    cut = sum(r["cut_by_time_limit"] for r in results.values())
    if cut:
        print(f"{cut} requests were not sent: their phase reached --time-limit {args.time_limit:g} s")


if __name__ == "__main__":
    sys.exit(main())
