"""The prepared GPU check (bench/gpu_check.sh runs it once .venv is set up): every CUDA path of the toolkit,
proved and measured in a few minutes whenever a GPU is lent.

    python bench/gpu_check.py OUT_DIR                 # on a GPU machine: fails (exit 1) on any failed check
    python bench/gpu_check.py OUT_DIR --cpu-dry-run   # the same steps on the CPU, tiny (the suite runs this)

Steps: the device as torch sees it; configs/digits.yaml and a CIFAR-shaped synthetic task trained in each
precision (auto, bf16, fp16 with its gradient scaler; the CPU dry run: auto, and bf16 on the CIFAR-shaped
task only, since the toolkit refuses fp16 on a CPU) with accuracy above chance, peak device memory and
images/s; a resume that must end with the weights of an uninterrupted run (fp32); a real SIGUSR1 to a
`toolkit train` inside an epoch (saves mid-epoch, exit 75) and its resume, to the same weights; EMA, mixup and
cutmix, the ImageNet-style augmentations and top-k checkpoints averaged by `toolkit average`, together;
batch_size auto (on a GPU a real search through out-of-memory errors, on the CPU its cap); the digits as tar
shards (`toolkit shard`) trained from disk and over HTTP, every validation sample once; images/s of the
in-memory path, the DataLoader path over PNG files and a plain PyTorch loop of the same model; two processes
through `accelerate launch` (NCCL on GPUs, gloo in the dry run); every export format, and TorchScript at
bf16 (serve.precision), archived, served by TorchServe, answered for real image files with the top-1 of the
same file in this process, and requests/s at concurrency 8. Writes OUT_DIR/gpu_check.json (every figure)
and OUT_DIR/summary.txt."""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from toolkit.ports import free_port_block

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
CHANCE = {"digits": 0.1, "cifar_shape": 0.25}


class Check:
    """The record of one step: passed, failed (the reason) or skipped (the reason), with its figures."""

    def __init__(self, results: list, name: str):
        self.results, self.name, self.figures, self.status, self.why = results, name, {}, "passed", ""

    def __enter__(self):
        self.t0 = time.perf_counter()
        print(f"\n== {self.name}", flush=True)
        return self

    def fail(self, why: str) -> None:
        self.status, self.why = "failed", why

    def skip(self, why: str) -> None:
        self.status, self.why = "skipped", why

    def __exit__(self, kind, exc, tb):
        if exc is not None:
            self.fail(f"{kind.__name__}: {exc}")
            traceback.print_exception(kind, exc, tb)
        self.figures["seconds"] = round(time.perf_counter() - self.t0, 2)
        self.results.append({"check": self.name, "status": self.status, "why": self.why, **self.figures})
        print(f"   {self.status}{': ' + self.why if self.why else ''} {json.dumps(self.figures)}", flush=True)
        return True  # the next check runs


def reset_accelerate() -> None:
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


def train(out: Path, name: str, config: str, *overrides: str) -> tuple[Path, dict, float]:
    """Train in this process; (run dir, summary, peak device memory in MiB, 0 on a CPU)."""
    from toolkit.config_io import load_config
    from toolkit.engine import train as engine_train

    cfg = load_config(ROOT / "configs" / config, [f"train.output_dir={out}", f"train.run_name={name}",
                                                 "train.overwrite=true", *overrides])
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    try:
        summary = engine_train(cfg)
    finally:
        reset_accelerate()
    peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else 0.0
    return cfg.run_dir, summary, round(peak, 1)


def device_check(results: list, dry: bool) -> None:
    with Check(results, "device") as c:
        c.figures.update(torch=torch.__version__, cuda=torch.version.cuda, gpus=torch.cuda.device_count())
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            c.figures.update(name=props.name, memory_gib=round(props.total_memory / 2**30, 1),
                             capability=f"{props.major}.{props.minor}", bf16=torch.cuda.is_bf16_supported())
        elif not dry:
            c.fail("no CUDA device visible to torch (use --cpu-dry-run to run the steps on the CPU)")


def precision_checks(results: list, out: Path, dry: bool, sizes: dict) -> None:
    tasks = {"digits": ("digits.yaml", [f"train.epochs={sizes['epochs']}"]),
             "cifar_shape": ("smoke.yaml", ["data.image_size=32", "data.num_classes=4",
                                            f"data.synthetic_samples={sizes['synthetic']}", "model.name=cifar_cnn",
                                            f"train.epochs={sizes['epochs']}", "data.batch_size=32"])}
    for task, (config, overrides) in tasks.items():
        # the dry run's bf16 (emulated, slow, on CPUs without AVX512-BF16) on the small task only
        for precision in ["auto"] + ([] if dry and task == "digits" else ["bf16"]) + ([] if dry else ["fp16"]):
            with Check(results, f"train {task} {precision}") as c:
                run_dir, summary, peak = train(out, f"{task}-{precision}", config, *overrides,
                                               f"train.mixed_precision={precision}")
                c.figures.update(val_acc=round(summary["best_val_acc"], 4), precision=summary["mixed_precision"],
                                 images_per_s=round(summary["train_images_per_s"], 1), peak_mib=peak)
                if precision == "fp16":
                    scaler = run_dir / "checkpoints" / "last" / "scaler.pt"
                    c.figures["scaler_scale"] = float(torch.load(scaler, weights_only=True)["scale"]) \
                        if scaler.is_file() else None
                    if c.figures["scaler_scale"] is None:
                        c.fail("fp16 run has no gradient scaler in its resume state")
                if summary["best_val_acc"] <= CHANCE[task] + 0.1:
                    c.fail(f"val accuracy {summary['best_val_acc']:.3f} is not above chance ({CHANCE[task]})")
    if dry:
        results.append({"check": "train fp16", "status": "skipped", "why": "the toolkit refuses fp16 on a CPU"})


def weights_diff(a: Path, b: Path) -> float:
    """Largest |difference| between the checkpoints/last weights of two runs (0.0: bit-identical)."""
    from safetensors.torch import load_file

    wa, wb = (load_file(d / "checkpoints" / "last" / "model.safetensors") for d in (a, b))
    return max(float((wa[k].float() - wb[k].float()).abs().max()) for k in wa)


def resume_check(results: list, out: Path, sizes: dict) -> None:
    common = ["model.name=bn_cnn", "data.augment.crop_padding=2", "data.augment.hflip=true",
              "train.mixed_precision=no", f"train.epochs={sizes['epochs'] + 1}", "data.synthetic_samples=512"]
    with Check(results, "resume exact (fp32)") as c:
        straight, _, _ = train(out, "straight", "smoke.yaml", *common)
        train(out, "parts", "smoke.yaml", *common, "train.stop_after=1")
        parts, summary, _ = train(out, "parts", "smoke.yaml", *common, "train.resume=true", "train.overwrite=false")
        diff = weights_diff(straight, parts)
        c.figures.update(max_abs_diff=diff, epochs=summary["epochs_completed"])
        if diff != 0.0:
            c.fail(f"resumed weights differ from the uninterrupted run's (max {diff:.3g}): on a GPU, a kernel "
                   "that is not deterministic (cuDNN) can do this; on a CPU it is a bug")


def preempt_check(results: list, out: Path, sizes: dict) -> None:
    """A real SIGUSR1 (Slurm's time-limit warning) to a `toolkit train` mid-epoch: it saves checkpoints/last
    inside the epoch, exits 75, and `toolkit train --resume RUN` ends with the weights of a run never stopped."""
    common = ["model.name=bn_cnn", "data.augment.crop_padding=2", "data.augment.hflip=true",
              "train.mixed_precision=no", f"train.epochs={sizes['epochs'] + 1}", "data.synthetic_samples=512",
              "data.batch_size=16"]
    with Check(results, "preempted mid-epoch (SIGUSR1), resumed exactly (fp32)") as c:
        straight, _, _ = train(out, "pre-straight", "smoke.yaml", *common)
        parts = out / "pre-parts"

        def command(*extra: str) -> list[str]:
            sets = [f"train.output_dir={out}", "train.run_name=pre-parts", "train.checkpoint_every=4 steps", *common, *extra]
            return [str(BIN / "toolkit"), "train", "--config", "smoke.yaml", *(a for s in sets for a in ("--set", s))]

        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        log = out / "pre-parts.log"
        with log.open("w") as sink:
            proc = subprocess.Popen(command("train.overwrite=true"), cwd=ROOT, env=env, stdout=sink,
                                    stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 600
        while not (parts / "checkpoints" / "last").is_dir() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if proc.poll() is not None:
            c.fail(f"the run ended (exit {proc.returncode}) before its first mid-epoch checkpoint: nothing to preempt")
            return
        proc.send_signal(signal.SIGUSR1)
        proc.wait(timeout=600)
        c.figures["exit_on_signal"] = proc.returncode
        if proc.returncode != 75:
            c.fail(f"exit {proc.returncode} after SIGUSR1 (75 expected): {log.read_text().strip().splitlines()[-1:]}")
            return
        stopped = json.loads((parts / "summary.json").read_text())
        c.figures.update(stopped_at_batch=stopped["batches_done"], save_s=stopped["last_save_s"])
        resumed = subprocess.run([str(BIN / "toolkit"), "train", "--resume", str(parts)], cwd=ROOT, env=env, capture_output=True, text=True,
                                 timeout=600)
        if resumed.returncode != 0:
            c.fail(f"the resume exited {resumed.returncode}: {resumed.stderr.strip().splitlines()[-1:]}")
            return
        diff = weights_diff(straight, parts)
        c.figures["max_abs_diff"] = diff
        if diff != 0.0:
            c.fail(f"resumed weights differ from the uninterrupted run's (max {diff:.3g}): on a GPU, a kernel "
                   "that is not deterministic (cuDNN) can do this; on a CPU it is a bug")


def trainer_features_check(results: list, out: Path, sizes: dict) -> None:
    """What the best trainers have, on the device together: EMA of the weights, mixup and cutmix, the
    ImageNet-style augmentations, top-k checkpoints averaged by `toolkit average`, and batch_size auto: on a
    GPU a real search through out-of-memory errors (ResNet-18 at 224 from a batch of 8192, which fits on no
    GPU), on the CPU the stated cap."""
    from toolkit.average import average_run

    with Check(results, "EMA + mixup/cutmix + ImageNet-style augmentations + top-k and averaging") as c:
        run_dir, summary, peak = train(
            out, "features", "smoke.yaml", "data.image_size=32", "data.num_classes=4",
            f"data.synthetic_samples={sizes['synthetic']}", "model.name=cifar_cnn", f"train.epochs={sizes['epochs'] + 1}",
            "data.batch_size=32", f"train.ema.decay={sizes['ema']}", "data.augment.mixup_alpha=0.2",
            "data.augment.cutmix_alpha=1.0", "data.augment.resized_crop_scale=[0.35, 1.0]",
            "data.augment.trivial_augment=true", "data.augment.color_jitter=0.3", "data.augment.random_erasing=0.25",
            "train.save_top_k=2")
        last = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][-1]
        averaged = average_run(run_dir)
        c.figures.update(val_acc=round(last["val_acc"], 4), val_acc_ema=round(last.get("val_acc_ema", -1), 4),
                         average_val_acc=round(averaged["val_acc"], 4), averaged_epochs=averaged["epochs"],
                         images_per_s=round(summary["train_images_per_s"], 1), peak_mib=peak)
        if "val_acc_ema" not in last:
            c.fail("the EMA run's metrics have no val_acc_ema")
        elif max(last["val_acc"], averaged["val_acc"]) <= CHANCE["cifar_shape"]:
            c.fail(f"val accuracy {last['val_acc']:.3f} (average {averaged['val_acc']:.3f}) is not above chance")
    gpu = torch.cuda.is_available()
    with Check(results, "batch_size auto" + (" (out-of-memory search)" if gpu else " (the CPU's cap)")) as c:
        cap = 8192 if gpu else 64
        task = (["model.name=resnet18", "data.image_size=224", "data.synthetic_samples=2048"] if gpu else
                ["model.name=cifar_cnn", "data.image_size=32", "data.synthetic_samples=256"])
        run_dir, summary, peak = train(out, "auto-batch", "smoke.yaml", *task, "data.num_classes=4", "train.epochs=1",
                                       "data.batch_size=auto", f"data.auto_batch_size_max={cap}")
        c.figures.update(batch_size=summary["batch_size"], cap=cap, peak_mib=peak,
                         images_per_s=round(summary["train_images_per_s"], 1))
        if not isinstance(summary["batch_size"], int) or not 1 <= summary["batch_size"] <= cap:
            c.fail(f"batch size {summary['batch_size']!r} is not a size from 1 to the cap {cap}")
        elif gpu and summary["batch_size"] == cap:
            c.fail(f"batch {cap} of ResNet-18 at 224 cannot fit: the search did not meet an out-of-memory error")
        elif not gpu and summary["batch_size"] != cap:
            c.fail(f"on the CPU the search lands on the cap {cap}, not {summary['batch_size']}")


def throughput_check(results: list, out: Path, sizes: dict) -> None:
    from PIL import Image

    from toolkit.models import build_model

    with Check(results, "images/s: in memory, DataLoader, plain loop") as c:
        n = sizes["synthetic"]
        memory = ["data.image_size=32", "data.num_classes=4", f"data.synthetic_samples={n}", "data.batch_size=64",
                  "model.name=cifar_cnn", "train.epochs=1", "train.mixed_precision=no"]
        _, summary, _ = train(out, "in-memory", "smoke.yaml", *memory)
        c.figures["in_memory"] = round(summary["train_images_per_s"], 1)
        folder = out / "pngs"
        generator = torch.Generator().manual_seed(0)
        for i in range(n):
            label = i % 4
            pixels = (torch.rand(32, 32, 3, generator=generator) * 64 + 48 * label).clamp(0, 255).to(torch.uint8)
            (folder / str(label)).mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels.numpy()).save(folder / str(label) / f"{i}.png")
        loader = [*memory, "data.name=imagefolder", f"data.root={folder}", "data.pipeline=loader",
                  "data.num_workers=2", "data.channels=3", "model.args={}"]
        _, summary, _ = train(out, "loader", "smoke.yaml", *loader)
        c.figures["dataloader"] = round(summary["train_images_per_s"], 1)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model = build_model("cifar_cnn", 4, 3, 32).to(device)
        optimizer = torch.optim.Adam(model.parameters(), 1e-3)
        images, labels = torch.randn(64, 3, 32, 32, device=device), torch.randint(0, 4, (64,), device=device)
        steps = max(n // 64, 4)
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        for step in range(steps + 2):  # two warm-up steps
            if step == 2:
                sync()
                t0 = time.perf_counter()
            loss = torch.nn.functional.cross_entropy(model(images), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        sync()
        c.figures["plain_loop"] = round(steps * 64 / (time.perf_counter() - t0), 1)


def shards_check(results: list, out: Path, sizes: dict) -> None:
    """The digits written once as tar shards (`toolkit shard`), trained on the device from the directory and
    over HTTP (a loopback `python -m http.server`, without ranges: each shard read from its start): every
    validation sample counted once, accuracy above chance, images/s of the streamed path."""
    with Check(results, "shard set: from disk and over HTTP") as c:
        shards = out / "shards" / "digits"
        done = subprocess.run([str(BIN / "toolkit"), "shard", "digits", str(shards), "--shard-size", "64KB"],
                              cwd=ROOT, capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            c.fail(f"toolkit shard exited {done.returncode}: {done.stderr.strip().splitlines()[-1:]}")
            return
        manifest = json.loads((shards / "manifest.json").read_text())
        val = sum(s["count"] for s in manifest["shards"] if s["split"] == "val")
        port = free_port_block(1)
        server = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                                   "--directory", str(shards.parent)], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        try:
            for where, root in (("disk", str(shards)), ("http", f"http://127.0.0.1:{port}/digits/")):
                _, summary, peak = train(out, f"shards-{where}", "digits.yaml", "data.name=shards", f"data.root={root}",
                                         f"train.epochs={sizes['epochs']}", "data.num_workers=2")
                c.figures.update({f"{where}_val_acc": round(summary["best_val_acc"], 4),
                                  f"{where}_val_samples": summary["val_samples"],
                                  f"{where}_images_per_s": round(summary["train_images_per_s"], 1),
                                  f"{where}_peak_mib": peak})
                if summary["val_samples"] != val:
                    c.fail(f"{where}: {summary['val_samples']} validation samples counted, the manifest has {val}")
                elif summary["best_val_acc"] <= CHANCE["digits"] + 0.1:
                    c.fail(f"{where}: val accuracy {summary['best_val_acc']:.3f} is not above chance")
        finally:
            server.terminate()
            server.wait(timeout=30)


def two_process_check(results: list, out: Path, dry: bool) -> None:
    with Check(results, "two processes (accelerate launch)") as c:
        if not dry and torch.cuda.device_count() < 2:
            c.skip("one GPU: NCCL does not run two ranks of one job on the same device")
            return
        env = {**os.environ, "OMP_NUM_THREADS": "1", **({"ACCELERATE_USE_CPU": "1"} if dry else {})}
        cmd = [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
               str(ROOT / "toolkit" / "train.py"), "--config", "smoke.yaml", "--set", f"train.output_dir={out}",
               "--set", "train.run_name=two", "--set", "train.overwrite=true", "--set", "train.epochs=1"]
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            c.fail(f"exit {done.returncode}: {done.stderr.strip().splitlines()[-1:] or ''}")
            return
        summary = json.loads((out / "two" / "summary.json").read_text())
        c.figures.update(num_processes=summary["num_processes"], val_samples=summary["val_samples"],
                         backend="gloo" if dry else "nccl", images_per_s=round(summary["train_images_per_s"], 1))
        if summary["num_processes"] != 2 or summary["val_samples"] != 128:
            c.fail(f"{summary['num_processes']} processes, {summary['val_samples']} validation images (2, 128 expected)")


def serving_checks(results: list, out: Path, sizes: dict) -> None:
    from toolkit.archive import build_archive
    from toolkit.client import send_bytes
    from toolkit.export import FORMATS, export_model
    from toolkit.predict import predict_export
    from toolkit.samples import write_samples
    from toolkit.server import read_token, start_server, stop_server

    run_dir = out / "digits-auto"
    files = write_samples(run_dir, out / "samples", count=sizes["images"])
    expected = {}
    # every format at fp32, and TorchScript at bf16 (serve.precision: native on GPUs and AVX512-BF16/AMX CPUs)
    for fmt, precision in [*((f, "fp32") for f in FORMATS), ("torchscript", "bf16")]:
        name = fmt if precision == "fp32" else f"{fmt}_{precision}"
        with Check(results, f"export {fmt} ({precision})") as c:
            export_model(run_dir, format=fmt, precision=precision)
            expected[name] = [max(a, key=a.get) for a in predict_export(run_dir / "export", files)]
            build_archive(run_dir, name=f"check_{name}")
            c.figures["parity"] = json.loads((run_dir / "export" / "parity.json").read_text())
    # TorchServe's unix sockets live in its state directory: a short path, whatever OUT_DIR is
    port, state = free_port_block(5), Path(tempfile.mkdtemp(prefix="gpucheck-"))
    with Check(results, "TorchServe start") as c:
        start_server(run_dir / "model-store", port=port, models=[f"check_{f}" for f in expected], state_root=state)
    try:
        token = read_token(port, state_root=state)
        bodies = [f.read_bytes() for f in files]
        for fmt, top1 in expected.items():
            with Check(results, f"serve {fmt}") as c:
                url = f"http://127.0.0.1:{port}/predictions/check_{fmt}"
                answers = [send_bytes(url, body, token) for body in bodies]
                served = [max(a, key=a.get) if s == 200 else f"HTTP {s}" for s, a in answers]
                c.figures["same_top1_as_cpu"] = f"{sum(a == b for a, b in zip(served, top1))}/{len(top1)}"
                if served != top1:
                    c.fail(f"served top-1 {served} differ from the CPU's {top1}")
                t0, count = time.perf_counter(), sizes["requests"]
                with concurrent.futures.ThreadPoolExecutor(8) as pool:
                    codes = list(pool.map(lambda i: send_bytes(url, bodies[i % len(bodies)], token)[0], range(count)))
                c.figures.update(requests_per_s_c8=round(count / (time.perf_counter() - t0), 1),
                                 errors=sum(code != 200 for code in codes))
                if c.figures["errors"]:
                    c.fail(f"{c.figures['errors']} of {count} requests failed")
    finally:
        stop_server(port, state_root=state)
        shutil.rmtree(state, ignore_errors=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path)
    p.add_argument("--cpu-dry-run", action="store_true", help="the same steps on the CPU, tiny")
    args = p.parse_args()
    dry, out = args.cpu_dry_run, args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    # ema: a decay whose memory (1 / (1 - decay) steps) the run's few hundred (GPU) or few dozen steps can fill
    sizes = ({"epochs": 1, "synthetic": 512, "images": 4, "requests": 16, "ema": 0.9} if dry else
             {"epochs": 3, "synthetic": 8192, "images": 16, "requests": 400, "ema": 0.99})
    results: list = []
    t0 = time.perf_counter()
    device_check(results, dry)
    if results[0]["status"] == "passed":
        precision_checks(results, out / "runs", dry, sizes)
        resume_check(results, out / "runs", sizes)
        preempt_check(results, out / "runs", sizes)
        trainer_features_check(results, out / "runs", sizes)
        throughput_check(results, out / "runs", sizes)
        shards_check(results, out / "runs", sizes)
        two_process_check(results, out / "runs", dry)
        serving_checks(results, out / "runs", sizes)
    failed = [r for r in results if r["status"] == "failed"]
    report = {"mode": "cpu dry run" if dry else "gpu", "wall_s": round(time.perf_counter() - t0, 1),
              "failed": len(failed), "checks": results}
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2))
    lines = [f"{r['status']:8} {r['check']}: " + ", ".join(f"{k} {v}" for k, v in r.items()
                                                           if k not in ("check", "status", "why"))
             + (f" ({r['why']})" if r.get("why") else "") for r in results]
    lines.append(f"{len(failed)} failed of {len(results)} checks in {report['wall_s']} s ({report['mode']})")
    (out / "summary.txt").write_text("\n".join(lines) + "\n")
    print("\n" + "\n".join(lines))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
