"""Run under `accelerate launch` (or in a test's process): train a shard set with toolkit.engine.train and write
the split indices of every batch THIS process trained and validated to OUT/keys-<R>.json, so a test can count
them over processes and workers; `--stop-at N` asks the loop to stop at optimizer step N (as test_preempt's
StopAt), where train.checkpoint_every saves.

    accelerate launch ... tests/shard_probe.py OUT [--stop-at N] --config smoke.yaml --set KEY=VALUE ...

The engine is unchanged: a hook (its seam for optional features) wraps the loaders it built in recorders."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from toolkit import engine
from toolkit.config_io import load_config
from toolkit.hooks import Hook


class Recording:
    """A ShardLoader that notes each batch's indices (under `name`, with the epoch) as it hands the batch on."""

    def __init__(self, loader, log: list, name: str):
        self.loader, self.log, self.name = loader, log, name

    def __getattr__(self, attr):
        return getattr(self.loader, attr)

    def __len__(self) -> int:
        return len(self.loader)

    def from_batch(self, batch: int):
        self.loader.from_batch(batch)
        return self

    def __iter__(self):
        for images, labels, indices in self.loader.batches():
            self.log.append([self.name, self.loader.blocks.epoch, indices.tolist(), labels.tolist()])
            yield images, labels


class Recorder(Hook):
    def __init__(self, out: Path, stop_at: int | None = None):
        self.out, self.stop_at, self.log = out, stop_at, []

    def on_setup(self, run) -> None:
        run.train_loader = Recording(run.train_loader, self.log, "train")
        run.val_loader = Recording(run.val_loader, self.log, "val")
        self.rank = run.accelerator.process_index

    def after_optimizer_step(self, run, global_step: int) -> None:
        if global_step == self.stop_at:
            run.requests.ask_stop("requested")

    def on_end(self, run, summary: dict) -> None:
        (self.out / f"keys-{self.rank}.json").write_text(json.dumps(self.log))


def main(argv: list[str]) -> int:
    out = Path(argv[0])
    stop_at = None
    rest = argv[1:]
    if rest[:1] == ["--stop-at"]:
        stop_at, rest = int(rest[1]), rest[2:]
    config = rest[rest.index("--config") + 1]
    overrides = [rest[i + 1] for i, arg in enumerate(rest) if arg == "--set"]
    out.mkdir(parents=True, exist_ok=True)
    engine.train(load_config(config, overrides), hooks=[Recorder(out, stop_at)])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
