"""data.name: shards: WebDataset-layout tar shards (toolkit shard) streamed from a directory or over HTTP. A worker
reads a block of its process's plan (shard_plan.py) as byte ranges of one or two shards (webdataset's tar
iteration over the stream; never a whole shard copied), decodes and augments each sample, and hands the block to
ShardLoader, which cuts it into the plan's batches on the device. A bad sample stops the run naming the shard and
the sample, or, with data.skip_bad_samples, is left out and counted on the epoch line."""

from __future__ import annotations

import http.client
import tarfile
import urllib.error

import torch
from accelerate.data_loader import DataLoaderStateMixin
from accelerate.state import GradientState
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from toolkit.data.shard_plan import PAD_LABEL, Plan, block_permutation, make_plan
from toolkit.errors import ImageFileError, ToolkitError
from toolkit.manifest import Shard, ShardSet, open_range
from toolkit.preprocess import READ_ERRORS, Limits, Preprocess, load_uint8

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp", "bmp", "ppm", "tif", "tiff")
STREAM_ERRORS = (tarfile.TarError, OSError, EOFError, http.client.HTTPException, urllib.error.URLError)


class BadSample(ImageFileError):
    """A shard's sample that cannot be used: the message names the shard and the sample (taken back from a
    worker's traceback as ImageFileError does)."""


def read_members(shard: Shard, lo: int, hi: int) -> dict[str, dict[str, bytes]]:
    """Samples [lo, hi) of a shard: key -> {extension: bytes}, from the byte range the manifest gives them.
    A stream that breaks (truncated or corrupt tar, HTTP error) raises BadSample naming the first sample
    it did not deliver whole; what came before is in `exc.members`."""
    from webdataset.tariterators import tar_file_iterator

    members: dict[str, dict[str, bytes]] = {}
    try:
        stream = open_range(shard.url, shard.offsets[lo], shard.offsets[hi])
    except urllib.error.HTTPError as exc:
        raise BadSample(f"shard {shard.name}: HTTP {exc.code} {exc.reason} for {shard.url}") from None
    except STREAM_ERRORS as exc:
        raise BadSample(f"shard {shard.name} ({shard.url}) cannot be opened: {exc}") from None
    try:
        for member in tar_file_iterator(stream, skip_meta=None):
            key, _, ext = member["fname"].partition(".")
            members.setdefault(key, {})[ext] = member["data"]
    except STREAM_ERRORS as exc:
        done = [k for k in shard.keys[lo:hi] if k in members]
        # the last key seen may be incomplete (its .cls not read yet): it is the first not delivered whole
        at = lo + max(0, len(done) - 1)
        error = BadSample(f"shard {shard.name}: the stream broke at sample {shard.keys[at]} (#{at} of {shard.count}, "
                          f"bytes from {shard.offsets[at]}): {type(exc).__name__}: {exc}")
        error.members = {k: members[k] for k in shard.keys[lo:at]}
        error.first_lost = at
        raise error from None
    finally:
        stream.close()
    lost = next((i for i in range(lo, hi) if shard.keys[i] not in members), None)
    if lost is not None and not any(k in members for k in shard.keys[lost + 1:hi]):  # tarfile reads garbage as the end
        error = BadSample(f"shard {shard.name}: the stream broke at sample {shard.keys[lost]} (#{lost} of {shard.count}, "
                          f"bytes from {shard.offsets[lost]}): the tar ends there (corrupt or truncated)")
        error.members, error.first_lost = {k: members[k] for k in shard.keys[lo:lost]}, lost
        raise error
    return members


def decode(shard: Shard, index: int, member: dict[str, bytes] | BadSample | None, pre: Preprocess, limits: Limits | None,
           num_classes: int) -> tuple[torch.Tensor, int]:
    key = shard.keys[index]
    if isinstance(member, BadSample):  # lost with the stream that broke
        raise member
    if member is None:
        raise BadSample(f"shard {shard.name}: sample {key} (#{index}) is not in the shard where the manifest puts it")
    if "cls" not in member:
        raise BadSample(f"shard {shard.name}: sample {key} (#{index}) has no label ({key}.cls)")
    image = next((member[ext] for ext in IMAGE_EXTS if ext in member), None)
    if image is None:
        raise BadSample(f"shard {shard.name}: sample {key} (#{index}) has no image ({key}.png or .jpg); it has "
                        f"{', '.join(sorted(member))}")
    try:
        label = int(member["cls"].decode().strip())
    except (UnicodeDecodeError, ValueError):
        label = -1
    if not 0 <= label < num_classes:
        raise BadSample(f"shard {shard.name}: sample {key} (#{index}): label {member['cls'][:20]!r} is not a class "
                        f"index 0..{num_classes - 1}")
    try:
        return load_uint8(image, pre, limits), label
    except READ_ERRORS as exc:
        raise BadSample(f"shard {shard.name}: sample {key} (#{index}): cannot use this image: {exc}") from None


class ShardBlocks(IterableDataset):
    """One split of a shard set, yielded a block at a time (a dict of uint8 images, labels, their indices in
    the split and the block's batch sizes). `epoch`, `start_batch` and the process are set before each
    iteration (the workers get a fresh copy each epoch)."""

    def __init__(self, shard_set: ShardSet, split: str, pre: Preprocess, limits: Limits | None,
                 skip_bad: bool = False, shuffle_buffer: int = 1024):
        self.shards, self.split, self.pre, self.limits = shard_set.split(split), split, pre, limits
        self.num_classes, self.skip_bad, self.shuffle_buffer = len(shard_set.classes), skip_bad, shuffle_buffer
        self.counts = [s.count for s in self.shards]
        self.starts = [sum(self.counts[:i]) for i in range(len(self.counts))]  # each shard's first index in the split
        self.transform, self.seed = None, 0
        self.epoch, self.start_batch, self.processes, self.process, self.batch = 0, 0, 1, 0, 1

    def augment(self, transform, seed: int) -> None:
        self.transform, self.seed = transform, seed

    def __len__(self) -> int:
        return sum(self.counts)

    def plan(self) -> Plan:
        return make_plan(self.counts, train=self.split == "train", seed=self.seed, epoch=self.epoch,
                         processes=self.processes, process=self.process, batch=self.batch,
                         shuffle_buffer=self.shuffle_buffer)

    def __getitem__(self, index: int):
        """One sample by its index in the split (batch_size auto, `toolkit samples`, calibration): a range read."""
        shard = max(i for i, start in enumerate(self.starts) if start <= index)
        local = index - self.starts[shard]
        members = read_members(self.shards[shard], local, local + 1)
        return decode(self.shards[shard], local, members.get(self.shards[shard].keys[local]), self.pre, self.limits,
                      self.num_classes)

    def __iter__(self):
        plan = self.plan()
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        first = self.start_batch // plan.per_block
        for block in range(first + worker, plan.num_blocks, workers):
            item = self.read_block(plan, block)
            if block == first and self.start_batch % plan.per_block:  # a resume: the batches trained before it
                item = drop_batches(item, self.start_batch % plan.per_block)
            yield item

    def read_block(self, plan: Plan, block: int) -> dict:
        a, b = plan.block_samples(block)
        samples: list[tuple[int, int, dict | None]] = []  # (shard, index in shard, members)
        for piece in plan.pieces(a, b):
            shard, members, lost = self.shards[piece.shard], {}, {}
            start = piece.lo
            while start < piece.hi:  # after a bad sample, read on from the next one's offset (the manifest has it)
                try:
                    members.update(read_members(shard, start, piece.hi))
                    break
                except BadSample as exc:
                    if not self.skip_bad:
                        raise
                    members.update(getattr(exc, "members", {}))
                    first = getattr(exc, "first_lost", None)
                    for i in ([first] if first is not None else range(start, piece.hi)):
                        lost[i] = exc
                    start = piece.hi if first is None else first + 1
            samples += [(piece.shard, i, lost.get(i) or members.get(shard.keys[i])) for i in range(piece.lo, piece.hi)]
        if self.split == "train":
            samples = [samples[i] for i in block_permutation(len(samples), self.seed, self.epoch, self.process, block)]
        return self.decode_block(samples, plan.block_batches(block), plan.pad_to[block] if plan.pad_to else None)

    def decode_block(self, samples: list, sizes: list[int], pad_to: int | None) -> dict:
        images, labels, indices, kept_sizes, skipped = [], [], [], [], []
        position = 0
        for size in sizes:
            kept = 0
            for shard, index, members in samples[position:position + size]:
                try:
                    image, label = decode(self.shards[shard], index, members, self.pre, self.limits, self.num_classes)
                except BadSample as exc:
                    if not self.skip_bad:
                        raise
                    skipped.append(str(exc))
                    continue
                where = self.starts[shard] + index
                if self.transform is not None:
                    with torch.random.fork_rng(devices=[]):  # seeded by (seed, epoch, index): any worker, any resume
                        torch.manual_seed(((self.seed * 1_000_003 + self.epoch) * 10_000_019 + where) % 2**63)
                        image = self.transform(image)
                images.append(image)
                labels.append(label)
                indices.append(where)
                kept += 1
            if kept == 0 and size > 0:
                raise BadSample(f"every sample of a batch of the {self.split} split was bad ({skipped[-1]}): too many "
                                "bad samples to go on")
            kept_sizes.append(kept)
            position += size
        shape = (0, self.pre["channels"], self.pre["image_size"], self.pre["image_size"])
        return {"images": torch.stack(images) if images else torch.empty(shape, dtype=torch.uint8),
                "labels": torch.tensor(labels, dtype=torch.long), "indices": torch.tensor(indices, dtype=torch.long),
                "sizes": kept_sizes, "pad_to": pad_to, "skipped": skipped}


def drop_batches(item: dict, count: int) -> dict:
    cut = sum(item["sizes"][:count])
    return {**item, "images": item["images"][cut:], "labels": item["labels"][cut:], "indices": item["indices"][cut:],
            "sizes": item["sizes"][count:]}


class ShardLoader(DataLoaderStateMixin):
    """The batches of one process, in plan order, on the device; its length is known up front from the manifest.
    Not prepared by Accelerate (whose sharding of an iterable dataset would read every sample on every process):
    it tells Accelerate's gradient state where the epoch ends, as a prepared loader does."""

    def __init__(self, blocks: ShardBlocks, num_workers: int, pin_memory: bool, device: torch.device, seed: int):
        self.blocks, self.num_workers, self.pin_memory, self.device, self.seed = blocks, num_workers, pin_memory, device, seed
        self.gradient_state = GradientState()
        self.skipped: list[str] = []  # bad samples left out in the latest pass

    def __len__(self) -> int:
        return len(self.blocks.plan().sizes)

    def set_epoch(self, epoch: int) -> None:
        self.blocks.epoch = epoch

    def from_batch(self, batch: int) -> "ShardLoader":
        """The next pass starts at this batch of the epoch (a mid-epoch resume): read from its block on."""
        self.blocks.start_batch = batch
        return self

    def batches(self):
        """(images, labels, indices in the split) per batch, in plan order."""
        total, done = len(self) - self.blocks.start_batch, 0
        loader = DataLoader(self.blocks, batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory,
                            prefetch_factor=2 if self.num_workers else None,
                            generator=torch.Generator().manual_seed(self.seed))  # never a draw of the global RNG
        self.skipped = []
        self.begin()
        try:
            for item in loader:
                self.skipped += item["skipped"]
                start = 0
                for size in item["sizes"]:
                    images, labels, indices = (item[k][start:start + size] for k in ("images", "labels", "indices"))
                    start += size
                    if item["pad_to"] is not None and item["pad_to"] > size:  # validation: the same shape everywhere
                        pad = item["pad_to"] - size
                        images = torch.cat([images, images.new_zeros((pad, *images.shape[1:]))])
                        labels = torch.cat([labels, labels.new_full((pad,), PAD_LABEL)])
                    done += 1
                    self.end_of_dataloader = done == total
                    yield (images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True),
                           indices)
            if done != total:  # never a silently shorter epoch
                raise ToolkitError(f"the {self.blocks.split} split gave {done} batches where the plan has {total}")
        finally:
            self.blocks.start_batch = 0
            self.end()

    def __iter__(self):
        for images, labels, _ in self.batches():
            yield images, labels


def shard_bundle(cfg, pre: Preprocess):
    """data.name shards: the shard set at data.root, every shard checked present and whole, as a DataBundle."""
    from toolkit.data.pipelines import DataBundle
    from toolkit.manifest import check_shards, load_shard_set

    shard_set = load_shard_set(cfg.root)
    check_shards(shard_set)
    limits = Limits(max_pixels=cfg.max_pixels, max_side=cfg.max_side)
    train, val = (ShardBlocks(shard_set, split, pre, limits, cfg.skip_bad_samples, cfg.shuffle_buffer)
                  for split in ("train", "val"))
    return DataBundle(train, val, shard_set.classes, pre, "shards", source_side=shard_set.preprocessing.get("source_side"))


def shard_loaders(bundle, cfg, seed: int, pin_memory: bool, accelerator) -> tuple[ShardLoader, ShardLoader]:
    """This process's train loader (its span of each epoch's plan) and val loader (its span, in order)."""
    loaders = []
    for blocks, batch in ((bundle.train, cfg.batch_size), (bundle.val, cfg.eval_batch_size or 2 * cfg.batch_size)):
        blocks.processes, blocks.process, blocks.batch = accelerator.num_processes, accelerator.process_index, batch
        blocks.seed = seed
        loaders.append(ShardLoader(blocks, cfg.num_workers, pin_memory, accelerator.device, seed))
    return loaders[0], loaders[1]
