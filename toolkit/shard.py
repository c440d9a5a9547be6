"""`toolkit shard SOURCE OUT`: a data source written once as WebDataset-layout tar shards (`key.jpg`/`key.png` +
`key.cls`) per split, split as training splits it (data/sources.py), with manifest.json (classes, preprocessing,
per shard its split, sample keys, byte offsets, size, sha256) for `data.name: shards`. A folder's files are copied
byte for byte; an in-memory source's images are encoded once as PNG. Training samples are written in a seeded
random order, so that a shard holds every class (the reader shuffles shard order and within a bounded buffer)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
from pathlib import Path

from toolkit.errors import ToolkitError
from toolkit.manifest import FORMAT, MANIFEST
from toolkit.names import DATASETS

UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
MTIME = 0  # fixed: the same source gives byte-identical shards


def parse_size(text: str) -> int:
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", text)
    if not match or match.group(2).upper() not in UNITS or float(match.group(1)) <= 0:
        raise ToolkitError(f"--shard-size: {text!r} is not a size such as 256MB, 1GB or 64KiB")
    return int(float(match.group(1)) * UNITS[match.group(2).upper()])


def source_config(source: str, root: str | None, val_fraction: float, split_seed: int):
    """The DataConfig that reads SOURCE: a folder of class folders (imagefolder), or a dataset name."""
    from toolkit.config import DataConfig

    if source in DATASETS and source not in ("imagefolder", "shards"):
        if DATASETS[source].needs_root and not root:
            raise ToolkitError(f"toolkit shard {source}: --root DIR is needed (where torchvision keeps {source})")
        return DataConfig(name=source, root=root, val_fraction=val_fraction, split_seed=split_seed).resolved()
    if not Path(source).is_dir():
        names = ", ".join(n for n in DATASETS if n not in ("imagefolder", "shards"))
        raise ToolkitError(f"toolkit shard: {source!r} is neither a directory of class folders nor one of {names}")
    return DataConfig(name="imagefolder", root=source, val_fraction=val_fraction, split_seed=split_seed).resolved()


def samples_of(cfg):
    """(train, val, classes, source_side): each split a list of (extension, bytes or a loader of them, label)."""
    import torch

    if cfg.name == "imagefolder":
        from toolkit.data.sources import _typical_side, folder_samples

        train, val, classes = folder_samples(cfg)
        as_files = lambda pairs: [(_extension(path), Path(path).read_bytes, label) for path, label in pairs]  # noqa: E731
        return as_files(train), as_files(val), classes, _typical_side([p for p, _ in train])
    from toolkit.data.sources import source_arrays

    images, labels, val_images, val_labels, classes = source_arrays(cfg)
    as_png = lambda x, y: [("png", _png_of(x[i]), int(y[i])) for i in range(len(y))]  # noqa: E731
    with torch.no_grad():
        return as_png(images, labels), as_png(val_images, val_labels), classes, min(images.shape[-2:])


def _extension(path: str) -> str:
    ext = Path(path).suffix.lower().lstrip(".")
    return "jpg" if ext == "jpeg" else ext


def _png_of(image):
    def encode() -> bytes:
        from PIL import Image

        array = image.permute(1, 2, 0).numpy()
        out = io.BytesIO()
        Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).save(out, format="PNG")
        return out.getvalue()
    return encode


def write_shards(source: str, out: Path, shard_size: str = "256MB", root: str | None = None,
                 val_fraction: float = 0.1, split_seed: int = 0, console=None) -> dict:
    """Write SOURCE's splits as shards under OUT with manifest.json; returns the manifest."""
    import torch

    from toolkit.manifest import require_webdataset

    require_webdataset()
    limit = parse_size(shard_size)
    out = Path(out)
    if (out / MANIFEST).exists():
        raise ToolkitError(f"{out} already holds a shard set ({MANIFEST}); choose another directory")
    cfg = source_config(source, root, val_fraction, split_seed)
    train, val, classes, side = samples_of(cfg)
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(split_seed)).tolist()
    train = [train[i] for i in order]  # every shard holds every class
    source_info = {"name": cfg.name, "root": str(Path(cfg.root).resolve()) if cfg.root else None,
                   "val_fraction": val_fraction, "split_seed": split_seed}
    preprocessing = {"channels": cfg.channels, "image_size": cfg.image_size, "mean": cfg.mean, "std": cfg.std,
                     "source_side": side}
    return write_set(out, {"train": train, "val": val}, classes, preprocessing, source_info, limit, console)


def write_set(out: Path, splits: dict[str, list], classes: list[str], preprocessing: dict, source: dict, limit: int,
              console=None) -> dict:
    """Each split's samples (extension, a function returning the bytes, label), in order, as shards under OUT,
    then manifest.json; returns the manifest."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    out.mkdir(parents=True, exist_ok=True)
    shards = []
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[mb]:,.1f} MB"),
               TimeRemainingColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        for split, samples in splits.items():
            task = progress.add_task(f"{split} shards", total=len(samples), mb=0.0)
            shards += _write_split(out, split, samples, limit, lambda n, b: progress.update(task, advance=n, mb=b / 1e6))
    manifest = {"format": FORMAT, "version": 1, "classes": classes, "source": source, "preprocessing": preprocessing,
                "splits": {split: len(samples) for split, samples in splits.items()}, "shards": shards}
    tmp = out / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest))
    os.replace(tmp, out / MANIFEST)  # a set is complete once its manifest is there
    return manifest


BLOCK = tarfile.BLOCKSIZE


def _closed_size(end: int) -> int:
    """A tar's size once closed: two zero blocks after its members, padded to whole records."""
    return -(-(end + 2 * BLOCK) // tarfile.RECORDSIZE) * tarfile.RECORDSIZE


def _write_split(out: Path, split: str, samples: list, limit: int, advance) -> list[dict]:
    """The split's samples in shards of at most `limit` bytes (a larger sample gets a shard of its own)."""
    from webdataset import TarWriter

    shards, index, written = [], 0, 0
    pending = samples[0][1]() if samples else None
    while index < len(samples) or not shards:
        name = f"{split}-{len(shards):06d}.tar"
        keys, offsets = [], []
        with open(out / name, "wb") as stream:
            writer = TarWriter(stream, encoder=False, mtime=MTIME)
            while index < len(samples):
                ext, _, label = samples[index]
                offset = writer.tarstream.offset
                if keys and _closed_size(offset + 3 * BLOCK + -(-len(pending) // BLOCK) * BLOCK) > limit:
                    break
                key = f"{split}-{index:08d}"
                writer.write({"__key__": key, ext: pending, "cls": str(label).encode()})
                keys.append(key)
                offsets.append(offset)
                index += 1
                pending = samples[index][1]() if index < len(samples) else None
                advance(1, written + writer.tarstream.offset)
            offsets.append(writer.tarstream.offset)
            writer.close()
        data = (out / name).read_bytes()
        shards.append({"name": name, "split": split, "count": len(keys), "bytes": len(data),
                       "sha256": hashlib.sha256(data).hexdigest(), "keys": keys, "offsets": offsets})
        written += len(data)
    return shards


def shard_parser(sub) -> None:
    shard = sub.add_parser("shard", help="write a dataset once as WebDataset tar shards + manifest.json, for data.name: shards")
    shard.add_argument("source", help="a folder of class folders (or of train/ and val/ of them), digits, synthetic, or a "
                                      "torchvision dataset the toolkit knows (mnist, fashion_mnist, cifar10, cifar100; with --root)")
    shard.add_argument("out", type=Path, help="the directory to write (train-000000.tar, ..., val-000000.tar, manifest.json)")
    shard.add_argument("--shard-size", default="256MB", help="most bytes per shard (256MB, 1GB, 64KiB, ...)")
    shard.add_argument("--root", help="where a torchvision dataset is kept (data.root)")
    shard.add_argument("--val-fraction", type=float, default=0.1,
                       help="share held out for validation where the source has no validation split (data.val_fraction)")
    shard.add_argument("--split-seed", type=int, default=0, help="seed of that split and of the training samples' order (data.split_seed)")


def cmd_shard(args) -> int:
    if not 0 < args.val_fraction < 1:
        raise ToolkitError(f"--val-fraction: {args.val_fraction} must be between 0 and 1")
    manifest = write_shards(args.source, args.out, args.shard_size, args.root, args.val_fraction, args.split_seed)
    for split, count in manifest["splits"].items():
        shards = [s for s in manifest["shards"] if s["split"] == split]
        print(f"{split}: {count:,} samples in {len(shards)} shard(s), {sum(s['bytes'] for s in shards) / 1e6:,.1f} MB")
    print(f"wrote {args.out / 'manifest.json'}; train from it with --set data.name=shards --set data.root={args.out}")
    return 0
