"""Run under `accelerate launch`: train with toolkit.engine.train, then write what THIS process holds
to OUT/rank<R>.pt, so a test can compare processes from outside.

    accelerate launch ... tests/rank_probe.py OUT --config smoke.yaml --set KEY=VALUE ...

Nothing here changes what the engine does: a hook (the engine's own seam for optional features) only
keeps references to the set-up the engine builds, notes the torch RNG state at the first training
augmentation and copies the module each epoch's checkpoints/best would hold."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import torch

from toolkit import engine
from toolkit.hooks import Hook
from toolkit.config_io import load_config
from toolkit.models import train_mode
from toolkit.training import build_network


def _digest(*tensors: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()


def _norm_layers(model: torch.nn.Module):
    model = getattr(model, "module", model)  # DDP wrapper
    return [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


class Probe(Hook):
    """Keeps the set-up the engine built (data bundle, prepared model, accelerator) and notes the torch
    RNG state and the BatchNorm modes when the first training batch is augmented."""

    def __init__(self):
        self.seen: dict = {}

    def on_start(self, run):
        self.seen.update(bundle=run.bundle, model=run.model, accelerator=run.accelerator)
        augment = run.augment

        def note_rng(images, train):
            if train and "rng_at_first_augment" not in self.seen:
                self.seen["rng_at_first_augment"] = torch.get_rng_state()
                self.seen["bn_training"] = {n: m.training for n, m in _norm_layers(run.model)}
            return augment(images, train)
        run.augment = note_rng


    def on_validated(self, run, metrics, module, meta, step):
        # what checkpoints/best would hold this epoch (the EMA with train.ema on), as this process has it
        self.seen.setdefault("served", []).append({k: v.detach().cpu().clone() for k, v in module.state_dict().items()})


def main(out: Path, config: str, overrides: list[str]) -> None:
    probe = Probe()
    engine.train(load_config(config, overrides), hooks=[probe])
    seen = probe.seen

    accelerator, bundle = seen["accelerator"], seen["bundle"]
    net = accelerator.unwrap_model(seen["model"])
    # The network the engine builds with model.sync_batchnorm on (DDP refuses SyncBatchNorm on the CPU,
    # so it cannot train here), in the mode train_mode gives it.
    synced = build_network(load_config(config, [*overrides, "model.sync_batchnorm=true"]), len(bundle.classes),
                           bundle.preprocess, accelerator.num_processes, print)
    train_mode(synced)
    out.mkdir(parents=True, exist_ok=True)
    torch.save({
        "rank": accelerator.process_index,
        "num_processes": accelerator.num_processes,
        "state_dict": {k: v.detach().cpu().clone() for k, v in net.state_dict().items()},
        "bn_types": {n: type(m).__name__ for n, m in _norm_layers(net)},
        "bn_training": seen["bn_training"],  # mode of each BatchNorm while the first batch trained
        "synced_bn": {n: (type(m).__name__, m.training) for n, m in _norm_layers(synced)},
        "train_split": _digest(bundle.train.images, bundle.train.labels),
        "val_split": _digest(bundle.val.images, bundle.val.labels),
        "rng_at_first_augment": seen["rng_at_first_augment"],
        "served": seen["served"],  # per epoch
    }, out / f"rank{accelerator.process_index}.pt")


if __name__ == "__main__":
    args = sys.argv[1:]
    config = args[args.index("--config") + 1]
    sets = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
    main(Path(args[0]), config, sets)
