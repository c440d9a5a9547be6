"""data.name: shards: WebDataset-layout tar shards (toolkit shard) streamed from a directory or over HTTP. A worker
reads a block of its process's plan (shard_plan.py) as byte ranges of one or two shards (each sample sliced at the
manifest's offsets, its tar headers checked; never a whole shard copied), shuffles it, then decodes and augments it a batch at a
time; ShardLoader (shard_loader.py) puts the workers' batches back in plan order on the device. A bad sample stops the run naming
the shard and the sample, or, with data.skip_bad_samples, is left out and counted on the epoch line."""

from __future__ import annotations

import bisect
import http.client
import itertools
import tarfile
import urllib.error

import torch
from torch.utils.data import IterableDataset, get_worker_info

from toolkit.data.shard_plan import Plan, block_permutation, make_plan
from toolkit.errors import ImageFileError, ToolkitError
from toolkit.manifest import Shard, ShardSet, open_range
from toolkit.preprocess import READ_ERRORS, Limits, Preprocess, load_uint8

BLOCK = tarfile.BLOCKSIZE
IMAGE_EXTS = ("png", "jpg", "jpeg", "webp", "bmp", "ppm", "tif", "tiff")
STREAM_ERRORS = (tarfile.TarError, OSError, EOFError, http.client.HTTPException, urllib.error.URLError)


class BadSample(ImageFileError):
    """A shard's sample that cannot be used: the message names the shard and the sample (taken back from a
    worker's traceback as ImageFileError does)."""


def parse_member(header: bytes) -> tuple[str, int]:
    """A ustar header (as webdataset's TarWriter writes them) -> (member name, data size); ValueError if it is not one."""
    if len(header) < BLOCK:
        raise ValueError("cut short inside a tar header")
    stored = header[148:156].rstrip(b"\0 ")
    if not stored or int(stored, 8) != sum(header[:148]) + 256 + sum(header[156:BLOCK]):  # the checksum field as spaces
        raise ValueError("not a tar header (bad checksum)")
    return header[:100].rstrip(b"\0").decode(), int(header[124:136].rstrip(b"\0 ") or b"0", 8)


def split_sample(data: bytes) -> dict[str, tuple[str, bytes]]:
    """One sample's bytes (its members, header and padded data each) -> {extension: (name, data)}."""
    members, position = {}, 0
    while position < len(data):
        name, size = parse_member(data[position:position + BLOCK])
        content = data[position + BLOCK:position + BLOCK + size]
        if len(content) < size:
            raise ValueError(f"{name} cut short")
        members[name.partition(".")[2]] = (name, content)
        position += BLOCK + -(-size // BLOCK) * BLOCK
    return members


def read_members(shard: Shard, lo: int, hi: int) -> dict[str, dict[str, bytes]]:
    """Samples [lo, hi) of a shard: key -> {extension: bytes}, each sample sliced out of the byte range the manifest
    gives it (its headers checked, no scan of the tar). A stream that breaks (truncated shard, HTTP error) raises
    BadSample naming the first sample it did not deliver whole, what came before in `exc.members`; a sample whose
    own bytes are not its tar members carries `__wrong__`, why (decode names it)."""
    members: dict[str, dict[str, bytes] | None] = {}
    try:
        stream = open_range(shard.url, shard.offsets[lo], shard.offsets[hi])
    except urllib.error.HTTPError as exc:
        raise BadSample(f"shard {shard.name}: HTTP {exc.code} {exc.reason} for {shard.url}") from None
    except STREAM_ERRORS as exc:
        raise BadSample(f"shard {shard.name} ({shard.url}) cannot be opened: {exc}") from None
    try:
        for i in range(lo, hi):
            want = shard.offsets[i + 1] - shard.offsets[i]
            try:
                data = stream.read(want)
                if len(data) < want:
                    raise EOFError(f"the stream ended {want - len(data)} bytes early")
            except STREAM_ERRORS as exc:
                error = BadSample(f"shard {shard.name}: the stream broke at sample {shard.keys[i]} (#{i} of {shard.count}, "
                                  f"bytes from {shard.offsets[i]}): {type(exc).__name__}: {exc}")
                error.members, error.first_lost = members, i
                raise error from None
            try:
                found = split_sample(data)
                names = {name.partition(".")[0] for name, _ in found.values()}
                members[shard.keys[i]] = {ext: content for ext, (_, content) in found.items()} if names == {shard.keys[i]} else {
                    "__wrong__": f"holds {', '.join(sorted(name for name, _ in found.values()))}".encode()}
            except (ValueError, UnicodeDecodeError) as exc:
                members[shard.keys[i]] = {"__wrong__": f"is not a tar member where the manifest puts it ({exc})".encode()}
    finally:
        stream.close()
    return members


def decode(shard: Shard, index: int, member: dict[str, bytes] | BadSample | None, pre: Preprocess, limits: Limits | None,
           num_classes: int) -> tuple[torch.Tensor, int]:
    key = shard.keys[index]
    if isinstance(member, BadSample):  # lost with the stream that broke
        raise member
    if member is None or "__wrong__" in member:
        why = member["__wrong__"].decode() if member else "is not in the shard where the manifest puts it"
        raise BadSample(f"shard {shard.name}: sample {key} (#{index}) {why}")
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
    """One split of a shard set, yielded a batch at a time (a dict of uint8 images, labels, their indices in the
    split, the bad samples left out, and where the batch is in the plan). The process is set before the workers start; `epoch` and
    `start_batch` live in shared memory, so persistent workers read each pass's values when it begins."""

    def __init__(self, shard_set: ShardSet, split: str, pre: Preprocess, limits: Limits | None,
                 skip_bad: bool = False, shuffle_buffer: int = 1024):
        self.shards, self.split, self.pre, self.limits = shard_set.split(split), split, pre, limits
        self.num_classes, self.skip_bad, self.shuffle_buffer = len(shard_set.classes), skip_bad, shuffle_buffer
        self.counts = [s.count for s in self.shards]
        self.starts = [0, *itertools.accumulate(self.counts)][:-1]  # each shard's first index in the split
        self.transform, self.seed = None, 0
        self.processes, self.process, self.batch = 1, 0, 1
        self.position = torch.zeros(2, dtype=torch.long).share_memory_()  # epoch, start_batch

    @property
    def epoch(self) -> int:
        return int(self.position[0])

    @epoch.setter
    def epoch(self, value: int) -> None:
        self.position[0] = value

    @property
    def start_batch(self) -> int:
        return int(self.position[1])

    @start_batch.setter
    def start_batch(self, value: int) -> None:
        self.position[1] = value

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
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} of a split of {len(self)}")
        shard = bisect.bisect_right(list(itertools.accumulate(self.counts)), index)  # empty shards are passed over
        local = index - self.starts[shard]
        members = read_members(self.shards[shard], local, local + 1)
        return decode(self.shards[shard], local, members.get(self.shards[shard].keys[local]), self.pre, self.limits,
                      self.num_classes)

    def __iter__(self):
        """This worker's blocks (round-robin from the resume's block), one batch per item, tagged (block, batch)."""
        plan, start_batch = self.plan(), self.start_batch
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        first = start_batch // plan.per_block
        for block in range(first + worker, plan.num_blocks, workers):
            samples, position = self.read_block(plan, block), 0
            for batch, size in enumerate(plan.block_batches(block)):
                chosen, position = samples[position:position + size], position + size
                if block == first and batch < start_batch % plan.per_block:  # trained before the resume
                    continue
                item = self.decode_batch(chosen)
                item.update(block=block, batch=batch, pad_to=plan.pad_to[block] if plan.pad_to else None)
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
        return samples

    def decode_batch(self, samples: list) -> dict:
        images, labels, indices, skipped = [], [], [], []
        for shard, index, members in samples:
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
        if samples and not images:
            raise BadSample(f"every sample of a batch of the {self.split} split was bad ({skipped[-1]}): too many "
                            "bad samples to go on")
        shape = (0, self.pre["channels"], self.pre["image_size"], self.pre["image_size"])
        return {"images": torch.stack(images) if images else torch.empty(shape, dtype=torch.uint8),
                "labels": torch.tensor(labels, dtype=torch.long), "indices": torch.tensor(indices, dtype=torch.long),
                "skipped": skipped}
