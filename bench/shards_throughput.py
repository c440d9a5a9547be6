"""Shard sets against the folder DataLoader on the same generated JPEG files (docs/benchmarks.md):

1. readers: the raw bytes of every sample of the shards, by the toolkit's reader (each sample sliced at the
   manifest's offsets, its headers checked), webdataset's tar iteration, the stdlib tarfile on a stream, wids
   (indexed, memory-mapped random access) and bare seeks to the offsets; local, and over HTTP (loopback) for the
   streaming readers
2. decode: one JPEG to uint8 at the model's size, PIL (toolkit/preprocess.py, as training, evaluate and the server
   read images) against torchvision.io.decode_jpeg + a tensor resize
3. loaders: images/s of an epoch of the training loader (data only, no model), the folder DataLoader
   (data.pipeline loader) against data.name shards from disk and over HTTP, the same workers and batch size
4. --train: validation accuracy after the same epochs from the folder and from the shards (the same images)

    python bench/shards_throughput.py [--images 3000] [--size 64] [--workers 2] [--train] [--quick]
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tarfile
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from range_server import serve  # noqa: E402

from toolkit.config import DataConfig  # noqa: E402
from toolkit.data import build_data, build_loaders  # noqa: E402
from toolkit.data.shards import read_members  # noqa: E402
from toolkit.manifest import load_shard_set, open_range  # noqa: E402
from toolkit.preprocess import (PREPROCESS_VERSION, Preprocess, load_uint8, open_image, pil_to_uint8,  # noqa: E402
                                resize_uint8)
from toolkit.shard import write_shards  # noqa: E402


def make_jpeg_folder(root: Path, images: int, classes: int = 10, size=(160, 120), seed: int = 0) -> Path:
    """Class folders of photo-like JPEGs (a smooth class-coloured field, texture and noise; quality 90)."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w] / max(w, h)
    for i in range(images):
        label = i % classes
        folder = root / f"class_{label}"
        folder.mkdir(parents=True, exist_ok=True)
        base = np.array([(label * 37) % 255, (label * 91) % 255, (label * 53) % 255], dtype=np.float64)
        field = base + 60 * np.sin(6 * xx + label)[..., None] + 40 * np.cos(4 * yy * (1 + label % 3))[..., None]
        pixels = np.clip(field + rng.normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:06d}.jpg", quality=90)
    return root


def timed(fn, repeat: int = 1) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def readers(root: Path, url: str | None) -> list[tuple[str, float, int]]:
    """(reader, seconds, samples) for the raw bytes of every training sample."""
    from webdataset.tariterators import tar_file_iterator

    shards = load_shard_set(str(root)).split("train")
    n = sum(s.count for s in shards)

    def webdataset_iter(base):
        for s in shards:
            stream = open_range(base + s.name if base else s.url, 0, s.offsets[-1])
            for _ in tar_file_iterator(stream, skip_meta=None):
                pass
            stream.close()

    def stdlib(base):
        for s in shards:
            stream = open_range(base + s.name if base else s.url, 0, s.offsets[-1])
            with tarfile.open(fileobj=stream, mode="r|") as tar:
                for member in tar:
                    tar.extractfile(member).read()
            stream.close()

    def wids_local():
        from wids.wids import IndexedTarSamples

        for s in shards:
            samples = IndexedTarSamples(path=s.url)
            for i in range(len(samples)):
                samples[i]
            samples.close()

    def offsets_only():
        for s in shards:
            with open(s.url, "rb") as f:
                for a, b in zip(s.offsets, s.offsets[1:]):
                    f.seek(a)
                    f.read(b - a)

    def toolkit_reader(base):
        for s in shards:
            read_members(replace(s, url=base + s.name) if base else s, 0, s.count)

    rows = [("toolkit: manifest offsets, headers checked (data/shards.py), disk", timed(lambda: toolkit_reader(None), 3), n),
            ("webdataset tar iteration, disk", timed(lambda: webdataset_iter(None), 3), n),
            ("stdlib tarfile stream, disk", timed(lambda: stdlib(None), 3), n),
            *([("wids indexed (mmap), disk", timed(wids_local, 3), n)] if _installed("wids") else []),
            ("manifest offsets, seek + read only (no checks), disk", timed(offsets_only, 3), n)]
    if url:
        rows += [("toolkit: manifest offsets, headers checked, HTTP", timed(lambda: toolkit_reader(url), 3), n),
                 ("webdataset tar iteration, HTTP", timed(lambda: webdataset_iter(url), 3), n),
                 ("stdlib tarfile stream, HTTP", timed(lambda: stdlib(url), 3), n)]
    return rows


def _installed(module: str) -> bool:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        print(f"({module} is not installed, its row is left out: pip install {module})")
        return False
    return True


def decoders(root: Path, size: int, count: int = 200) -> list[tuple[str, float, int]]:
    """Per image, PIL as preprocess.py reads it (with its JPEG draft: a decode at 1/2, 1/4 or 1/8 scale when the
    image is that much larger than needed) against torchvision.io.decode_jpeg and resize_uint8, for the bench's
    images, 4x larger ones and an ImageNet-like 500 x 375 to 224."""
    import warnings

    from torchvision.io import decode_jpeg

    warnings.simplefilter("ignore", DeprecationWarning)  # torchvision 0.29's notice on its decoders

    files = sorted(root.rglob("*.jpg"))[:count]
    small = [f.read_bytes() for f in files]
    rows = []
    for data, side in ((small, size), ([_recoded(d, 4) for d in small[:100]], size),
                       ([_recoded(d, 500 / 160) for d in small[:100]], 224)):
        pre = Preprocess(channels=3, image_size=side, resize="resize", mean=[0.5] * 3, std=[0.5] * 3,
                         preprocess_version=PREPROCESS_VERSION)
        buffers = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in data]
        w, h = Image.open(io.BytesIO(data[0])).size
        pil = timed(lambda: [pil_to_uint8(open_image(d, side), 3, side, "resize") for d in data], 3)
        tv = timed(lambda: [resize_uint8(decode_jpeg(b).unsqueeze(0), side, "resize") for b in buffers], 3)
        chosen = timed(lambda: [load_uint8(d, pre) for d in data], 3)
        rows += [(f"PIL (open_image + pil_to_uint8), {w}x{h} -> {side}", pil, len(data)),
                 (f"torchvision.io.decode_jpeg + resize_uint8, {w}x{h} -> {side}", tv, len(data)),
                 (f"load_uint8, as training reads (the faster of the two), {w}x{h} -> {side}", chosen, len(data))]
    return rows


def _recoded(data: bytes, factor: float) -> bytes:
    image = Image.open(io.BytesIO(data))
    out = io.BytesIO()
    image.resize((round(image.width * factor), round(image.height * factor)), Image.BICUBIC).save(
        out, format="JPEG", quality=90)
    return out.getvalue()


def loader_rate(cfg: DataConfig, epochs: int = 2) -> float:
    """Images/s of the training loader's last epoch (the first warms the page cache and the workers)."""
    bundle = build_data(cfg)
    process = SimpleNamespace(num_processes=1, process_index=0, device=torch.device("cpu"))
    train, _ = build_loaders(bundle, cfg, 0, False, process)
    rate = 0.0
    for epoch in range(1, epochs + 1):
        train.set_epoch(epoch) if hasattr(train, "set_epoch") else train.batch_sampler.sampler.set_epoch(epoch)
        t0, seen = time.perf_counter(), 0
        for images, labels in train:
            seen += len(labels)
        rate = seen / (time.perf_counter() - t0)
    return rate


def trained_accuracy(tmp: Path, data: list[str], epochs: int) -> float:
    from toolkit.config_io import load_config
    from toolkit.engine import train

    cfg = load_config(Path(__file__).resolve().parent.parent / "configs" / "smoke.yaml",
                      [*data, "model.name=cifar_cnn", f"train.epochs={epochs}", "train.mixed_precision=no",
                       f"train.output_dir={tmp}", f"train.run_name={data[0].split('=')[1]}", "train.log_every=1000"])
    return train(cfg)["final_val_acc"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--size", type=int, default=64, help="data.image_size")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--train", type=int, default=0, metavar="EPOCHS", help="also train this many epochs from each")
    parser.add_argument("--quick", action="store_true", help="a few hundred images (the suite's check that it runs)")
    args = parser.parse_args()
    images = 300 if args.quick else args.images
    print(f"load average {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f}; torch threads {torch.get_num_threads()}")
    with tempfile.TemporaryDirectory(prefix="shards-bench-") as tmp:
        tmp = Path(tmp)
        folder = make_jpeg_folder(tmp / "photos", images)
        write_shards(str(folder), tmp / "shards", "4MB")
        common = dict(image_size=args.size, channels=3, batch_size=args.batch, num_workers=args.workers)
        with serve(tmp / "shards") as url:
            print("\n| reader (raw bytes of every training sample) | us/sample | MB/s |\n|---|---|---|")
            size_mb = sum(s.size for s in load_shard_set(str(tmp / "shards")).split("train")) / 1e6
            for name, seconds, n in readers(tmp / "shards", url):
                print(f"| {name} | {seconds / n * 1e6:.1f} | {size_mb / seconds:,.0f} |")
            print("\n| decode (one JPEG to uint8 at the model's size) | us/image |\n|---|---|")
            for name, seconds, n in decoders(folder, args.size, 40 if args.quick else 200):
                print(f"| {name} | {seconds / n * 1e6:.0f} |")
            rows = [("folder DataLoader (data.pipeline loader)",
                     DataConfig(name="imagefolder", root=str(folder), pipeline="loader", **common)),
                    ("shards, disk", DataConfig(name="shards", root=str(tmp / "shards"), **common)),
                    ("shards, HTTP (loopback, Range)", DataConfig(name="shards", root=url, **common))]
            print(f"\n| training loader, {args.workers} workers, batch {args.batch}, {args.size}x{args.size} | images/s |"
                  "\n|---|---|")
            rates = {}
            for name, cfg in rows:
                rates[name] = loader_rate(cfg)
                print(f"| {name} | {rates[name]:,.0f} |")
        folder_rate = rates[rows[0][0]]
        print(f"\nshards/folder: disk {rates[rows[1][0]] / folder_rate:.2f}x, HTTP {rates[rows[2][0]] / folder_rate:.2f}x "
              f"(targets: >= 1.00x on disk, >= 0.80x over HTTP)")
        if args.train:
            base = [f"data.image_size={args.size}", "data.channels=3", f"data.batch_size={args.batch}",
                    f"data.num_workers={args.workers}"]
            a = trained_accuracy(tmp / "runs", ["data.name=imagefolder", f"data.root={folder}", "data.pipeline=loader",
                                                "data.val_fraction=0.1", *base], args.train)
            b = trained_accuracy(tmp / "runs", ["data.name=shards", f"data.root={tmp / 'shards'}", *base], args.train)
            print(f"val accuracy after {args.train} epochs: folder {a:.2%}, shards {b:.2%}")
    print(f"load average {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f}")


if __name__ == "__main__":
    main()
