"""Peak memory of training from a shard set several times larger than data.memory_limit_mb (docs/benchmarks.md):
a generated set of JPEGs (their pixels at the model's size `--times` x the limit) written as shards, trained one
epoch by `toolkit train` (mlp, so the data path is most of the work), the resident memory of the main process
and of each DataLoader worker sampled every 0.1 s. Flat in the dataset size: nothing grows with it.

    python bench/shards_memory.py [--limit-mb 64] [--times 4 8] [--size 64] [--workers 2] [--quick]
"""

from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
from PIL import Image

from toolkit.shard import write_set

ROOT = Path(__file__).resolve().parent.parent


def jpeg_samples(count: int, side: int, seed: int, classes: int = 10) -> list:
    """(ext, bytes loader, label) of generated JPEGs, made when the writer asks for them (never all in memory)."""
    def make(i: int):
        def encode() -> bytes:
            rng = np.random.default_rng(seed * 1_000_003 + i)
            base = np.array([(i % classes) * 25, 255 - (i % classes) * 25, 128], dtype=np.float64)
            pixels = np.clip(base + rng.normal(0, 40, (side, side, 3)), 0, 255).astype(np.uint8)
            out = io.BytesIO()
            Image.fromarray(pixels).save(out, format="JPEG", quality=85)
            return out.getvalue()
        return ("jpg", encode, i % classes)
    return [make(i) for i in range(count)]


def write(out: Path, train: int, size: int) -> None:
    pre = {"channels": 3, "image_size": size, "mean": [0.5] * 3, "std": [0.5] * 3, "source_side": size + size // 2}
    write_set(out, {"train": jpeg_samples(train, size + size // 2, 0), "val": jpeg_samples(256, size + size // 2, 1)},
              [str(c) for c in range(10)], pre, {"name": "generated"}, 64 * 10**6)


def peak_rss(cmd: list[str], env: dict) -> tuple[int, dict, dict, int, str]:
    """Run cmd; (exit status, peak RSS and USS in MB of the main process, the same of any of its workers, workers
    seen, output). USS: the memory only that process holds (a worker shares its parent's pages after the fork)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    peaks: dict[int, dict] = {}
    done = threading.Event()

    def sample() -> None:
        main = psutil.Process(proc.pid)
        while not done.is_set():
            try:
                for p in [main, *main.children(recursive=True)]:
                    info, seen = p.memory_full_info(), peaks.setdefault(p.pid, {"rss": 0.0, "uss": 0.0})
                    seen["rss"], seen["uss"] = max(seen["rss"], info.rss / 2**20), max(seen["uss"], info.uss / 2**20)
            except psutil.Error:
                pass
            time.sleep(0.1)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    out, _ = proc.communicate()
    done.set()
    thread.join()
    workers = [mb for pid, mb in peaks.items() if pid != proc.pid]
    worst = {k: max((w[k] for w in workers), default=0.0) for k in ("rss", "uss")}
    return proc.returncode, peaks.get(proc.pid, {"rss": 0.0, "uss": 0.0}), worst, len(workers), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit-mb", type=float, default=64, help="data.memory_limit_mb")
    parser.add_argument("--times", type=float, nargs="+", default=[4, 8], help="dataset sizes, as multiples of the limit")
    parser.add_argument("--size", type=int, default=64, help="data.image_size")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="a limit of 2 MB (the suite's check that it runs)")
    args = parser.parse_args()
    limit = 2 if args.quick else args.limit_mb
    per_image = 3 * args.size * args.size
    print(f"load average {os.getloadavg()[0]:.2f}; data.memory_limit_mb {limit:g}; {per_image:,} bytes an image at "
          f"3x{args.size}x{args.size}")
    print("\n| dataset (pixels at the model's size) | x limit | shards on disk | main: peak RSS / USS | a worker: peak RSS / "
          "USS | workers | images/s |\n|---|---|---|---|---|---|---|")
    toolkit = str(Path(sys.executable).parent / "toolkit")
    for times in args.times:
        count = int(times * limit * 2**20 / per_image)
        with tempfile.TemporaryDirectory(prefix="shards-memory-") as tmp:
            write(Path(tmp) / "set", count, args.size)
            disk = sum(f.stat().st_size for f in (Path(tmp) / "set").glob("*.tar")) / 2**20
            cmd = [toolkit, "train", "--config", str(ROOT / "configs" / "smoke.yaml")]
            for item in ("data.name=shards", f"data.root={tmp}/set", f"data.image_size={args.size}", "model.name=mlp",
                         "train.epochs=1", "data.batch_size=128", f"data.num_workers={args.workers}",
                         f"data.memory_limit_mb={limit}", "train.mixed_precision=no", f"train.output_dir={tmp}/runs",
                         "train.log_every=100000", "train.log_every_s=0"):
                cmd += ["--set", item]
            code, main_mb, worker_mb, workers, out = peak_rss(cmd, {**os.environ, "OMP_NUM_THREADS": "1"})
            if code != 0:
                raise SystemExit(out[-3000:])
            rate = next((line.split("|")[-1].strip(" *") for line in out.splitlines() if line.startswith("Epoch [")), "?")
            print(f"| {count:,} images, {count * per_image / 2**20:,.0f} MB | {times:g} | {disk:,.0f} MB | "
                  f"{main_mb['rss']:,.0f} / {main_mb['uss']:,.0f} MB | {worker_mb['rss']:,.0f} / {worker_mb['uss']:,.0f} MB | "
                  f"{workers} | {rate} |")
    print(f"\nload average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
