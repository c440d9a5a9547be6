"""The loader of a shard set's split for one process (data/shards.py reads, data/shard_plan.py orders): the
workers' batches put back in plan order, on the device, its length known from the manifest; and the shard set
as a DataBundle and its loaders."""

from __future__ import annotations

import torch
from accelerate.data_loader import DataLoaderStateMixin
from accelerate.state import GradientState
from torch.utils.data import DataLoader

from toolkit.data.shard_plan import PAD_LABEL
from toolkit.data.shards import ShardBlocks
from toolkit.errors import ToolkitError
from toolkit.preprocess import Limits, Preprocess


class ShardLoader(DataLoaderStateMixin):
    """The batches of one process, in plan order, on the device; its length is known up front from the manifest.
    Not prepared by Accelerate (whose sharding of an iterable dataset would read every sample on every process):
    it tells Accelerate's gradient state where the epoch ends, as a prepared loader does."""

    def __init__(self, blocks: ShardBlocks, num_workers: int, pin_memory: bool, device: torch.device, seed: int):
        self.blocks, self.num_workers, self.pin_memory, self.device, self.seed = blocks, num_workers, pin_memory, device, seed
        self.gradient_state = GradientState()
        self.skipped: list[str] = []  # bad samples left out in the latest pass
        self.loader: DataLoader | None = None

    def __len__(self) -> int:
        return len(self.blocks.plan().sizes)

    def set_epoch(self, epoch: int) -> None:
        self.blocks.epoch = epoch

    def from_batch(self, batch: int) -> "ShardLoader":
        """The next pass starts at this batch of the epoch (a mid-epoch resume): read from its block on."""
        self.blocks.start_batch = batch
        return self

    def batches(self):
        """(images, labels, indices in the split) per batch, in plan order: the workers' batches come round-robin,
        each worker's in its own order, and wait here (at most a block per worker) until their turn."""
        plan, start = self.blocks.plan(), self.blocks.start_batch
        order = [(block, batch) for block in range(start // plan.per_block, plan.num_blocks)
                 for batch in range(len(plan.block_batches(block)))][start % plan.per_block:]
        if self.loader is None:  # workers that stay: each pass reads its epoch and start from shared memory
            self.loader = DataLoader(self.blocks, batch_size=None, num_workers=self.num_workers,
                                     pin_memory=self.pin_memory, persistent_workers=self.num_workers > 0,
                                     prefetch_factor=4 if self.num_workers else None,
                                     generator=torch.Generator().manual_seed(self.seed))  # never a draw of the global RNG
        self.skipped, waiting, done = [], {}, 0
        self.begin()
        try:
            items = iter(self.loader)
            for turn in order:
                while turn not in waiting:
                    item = next(items, None)
                    if item is None:  # never a silently shorter epoch
                        raise ToolkitError(f"the {self.blocks.split} split gave {done} batches where the plan has "
                                           f"{len(order)}")
                    waiting[item["block"], item["batch"]] = item
                item = waiting.pop(turn)
                self.skipped += item["skipped"]
                images, labels = item["images"], item["labels"]
                if item["pad_to"] is not None and item["pad_to"] > len(labels):  # validation: one shape everywhere
                    pad = item["pad_to"] - len(labels)
                    images = torch.cat([images, images.new_zeros((pad, *images.shape[1:]))])
                    labels = torch.cat([labels, labels.new_full((pad,), PAD_LABEL)])
                done += 1
                self.end_of_dataloader = done == len(order)
                yield images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True), item["indices"]
        finally:
            self.blocks.start_batch = 0
            self.end()

    def __iter__(self):
        for images, labels, _ in self.batches():
            yield images, labels


def split_tensors(blocks: ShardBlocks) -> tuple[torch.Tensor, torch.Tensor]:
    """A whole split in memory, in its order (toolkit evaluate, and the export's check, on a run's validation set)."""
    blocks.processes, blocks.process, blocks.batch = 1, 0, 256
    batches = list(ShardLoader(blocks, 0, False, torch.device("cpu"), 0).batches())
    return torch.cat([x for x, _, _ in batches]), torch.cat([y for _, y, _ in batches])


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


def skipped_samples(run) -> dict:
    """data.skip_bad_samples on a shard set: the bad samples left out this epoch, over every process."""
    if not run.cfg.data.skip_bad_samples or not hasattr(run.train_loader, "skipped"):
        return {}
    mine = [*run.train_loader.skipped, *run.val_loader.skipped]
    total = int(run.accelerator.reduce(torch.tensor([float(len(mine))], device=run.accelerator.device), "sum").item())
    if mine:
        run.reporter.print(f"[yellow]skipped {len(mine)} bad sample(s) on the main process, the first: {mine[0]}[/]",
                           highlight=False)
    return {"skipped_samples": total}
