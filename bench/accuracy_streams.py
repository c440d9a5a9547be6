"""Which random stream carries the accuracy gap between the MNIST guide's loop and the toolkit.

bench/train_parity.py shows that the toolkit's training step computes exactly what the guide's
loop computes, given the same batches, the same dropout random numbers and the same input
normalisation. Over whole runs the two sides still differ in four ways, each a choice with no
arithmetic of its own:

  norm     guide: (x / 255 - mean) / std          toolkit: x * scale + shift (one rounding apart)
  order    guide: DataLoader(shuffle=True): its    toolkit: EpochShuffle, a permutation drawn from
           RandomSampler seeded from the global    (seed x 100,003 + epoch) by its own generator;
           RNG each epoch, and each loader's       the loaders draw nothing from the global RNG
           iterator drawing a base seed from it
  dropout  guide: the global RNG goes on from      toolkit: the global RNG is re-seeded with the
           where drawing the weights left it       seed after the weights are drawn
  layout   guide: contiguous tensors               toolkit: channels_last model and batches (the
                                                   default): dropout's masks fall on other elements

This script runs the guide's loop in one process on the bench's digits (bench/train_throughput.py
makes them; pixels decoded once, as the toolkit does: identical to the guide's per-file decoding)
with each of the four set either way, over several seeds, and prints the final validation
accuracy of every run and each variant's mean. With norm, order and dropout set the toolkit's way
the loop must reproduce a real `toolkit train` run (fp32, the same seed, channels_last as the
layout says) epoch for epoch: `--check-toolkit` runs one and compares every epoch's training loss
and validation accuracy.

    python bench/accuracy_streams.py --check-toolkit --seeds 42
    python bench/accuracy_streams.py --seeds 42,1,2,3,4,5,6,7 --variant guide --variant toolkit
    python bench/accuracy_streams.py --seeds 42,1,2,3 --variant guide --variant order=toolkit
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))

from train_throughput import MEAN, STD, make_digit_folder  # noqa: E402

CHOICES = ("norm", "order", "dropout", "layout")
PRESETS = {"guide": dict.fromkeys(CHOICES, "guide"), "toolkit": dict.fromkeys(CHOICES, "toolkit")}


def parse_variant(text: str) -> dict:
    """'guide', 'toolkit', or 'norm=toolkit,order=guide' (unnamed choices are the guide's)."""
    if text in PRESETS:
        return dict(PRESETS[text])
    variant = dict(PRESETS["guide"])
    for item in text.split(","):
        key, _, value = item.partition("=")
        if key not in CHOICES or value not in ("guide", "toolkit"):
            raise SystemExit(f"--variant: {item!r}: expected one of {', '.join(CHOICES)} = guide or toolkit")
        variant[key] = value
    return variant


def label(variant: dict) -> str:
    for name, preset in PRESETS.items():
        if variant == preset:
            return name
    return ",".join(f"{k}={v}" for k, v in variant.items() if v != "guide")


def guide_loop(images, labels, val_images, val_labels, seed: int, variant: dict, epochs: int, batch_size: int,
               lr: float, gamma: float) -> list[dict]:
    """The MNIST guide's train/test loop (Adam, StepLR per epoch, fp32) on uint8 tensors; returns
    each epoch's mean training loss and validation accuracy."""
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader

    from toolkit.data import EpochShuffle
    from toolkit.models import build_model
    from toolkit.preprocess import normalize

    layout = torch.channels_last if variant["layout"] == "toolkit" else torch.contiguous_format
    if variant["norm"] == "guide":
        scale = lambda x: (x.float() / 255 - MEAN[0]) / STD[0]  # noqa: E731  ToTensor + Normalize
    else:
        scale = lambda x: normalize(x, list(MEAN), list(STD))  # noqa: E731
    norm = lambda x: scale(x).contiguous(memory_format=layout)  # noqa: E731
    torch.manual_seed(seed)
    model = build_model("mnist_cnn", 10, 1, 28).to(memory_format=layout)
    if variant["dropout"] == "toolkit":
        torch.manual_seed(seed)  # what set_seed(seed, device_specific=True) does for process 0
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    shuffle = EpochShuffle(len(labels), seed)
    # The guide's loaders, as torch draws for them from the global RNG: each iterator a base seed,
    # the training set's RandomSampler a seed for its permutation at the first batch of each epoch.
    train_order = DataLoader(range(len(labels)), batch_size=batch_size, shuffle=True)
    test_loader = DataLoader(range(1))
    history = []
    for epoch in range(1, epochs + 1):
        for group in optimizer.param_groups:  # StepLR's rate, in the closed form the toolkit's LambdaLR uses
            group["lr"] = lr * gamma ** (epoch - 1)
        if variant["order"] == "toolkit":
            shuffle.set_epoch(epoch)
            order = shuffle.order()
        else:
            order = torch.cat(list(train_order))
        model.train()
        loss_sum = 0.0
        for index in order.split(batch_size):
            optimizer.zero_grad()
            loss = F.cross_entropy(model(norm(images[index])), labels[index])
            loss.backward()
            optimizer.step()
            loss_sum += loss.item() * len(index)
        model.eval()
        if variant["order"] == "guide":
            iter(test_loader)  # the guide's test loader: its iterator's base seed
        with torch.no_grad():
            correct = sum((model(norm(x)).argmax(1) == y).sum().item()
                          for x, y in zip(val_images.split(2 * batch_size), val_labels.split(2 * batch_size)))
        history.append({"epoch": epoch, "train_loss": loss_sum / len(labels), "val_acc": correct / len(val_labels)})
    return history


def percents(values) -> str:
    return ", ".join(f"{v:.2%}" for v in values)


def losses(values) -> str:
    return ", ".join(f"{v:.6f}" for v in values)


def toolkit_run(data: Path, seed: int, args, work: Path, channels_last: bool) -> list[dict]:
    """A real `toolkit train` on the same folder in fp32; its metrics.jsonl."""
    config = work / "streams.yaml"
    config.write_text("data:\n  name: imagefolder\n")
    sets = [f"data.root={data}", "data.channels=1", "data.image_size=28", f"data.mean={list(MEAN)}",
            f"data.std={list(STD)}", f"data.batch_size={args.batch_size}", "model.name=mnist_cnn", "optim.name=adam",
            f"optim.lr={args.lr}", "schedule.name=step", "schedule.step_epochs=1", f"schedule.gamma={args.gamma}",
            f"train.epochs={args.epochs}", f"train.num_threads={args.threads}", f"train.seed={seed}",
            f"train.channels_last={channels_last}", "train.mixed_precision=no", f"train.output_dir={work}",
            "train.run_name=toolkit", "train.overwrite=true", "train.log_every=1000"]
    cmd = [sys.executable, "-m", "toolkit", "train", "--config", str(config)]
    for item in sets:
        cmd += ["--set", item]
    subprocess.run(cmd, check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    lines = (work / "toolkit" / "metrics.jsonl").read_text().splitlines()
    return [{k: m[k] for k in ("epoch", "train_loss", "val_acc")} for m in map(json.loads, lines)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", default="42")
    p.add_argument("--variant", action="append", dest="variants",
                   help="repeatable: guide, toolkit, or e.g. 'order=toolkit,dropout=toolkit' (default: guide and toolkit)")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--gamma", type=float, default=0.7)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--train-variants", type=int, default=7, help="images made from each training digit")
    p.add_argument("--val-variants", type=int, default=6, help="images made from each held-out digit")
    p.add_argument("--data", type=Path, help="the bench's PNG folder (default: made in a temporary directory)")
    p.add_argument("--check-toolkit", action="store_true",
                   help="also run `toolkit train` per seed and compare it, epoch for epoch, with the loop set the toolkit's way")
    p.add_argument("--json", type=Path, help="append one JSON line per run here")
    args = p.parse_args(argv)
    variants = [parse_variant(v) for v in args.variants or ["guide", "toolkit"]]
    if args.check_toolkit and not any(all(v[k] == "toolkit" for k in ("norm", "order", "dropout")) for v in variants):
        variants.append(dict(PRESETS["toolkit"]))

    import torch

    from toolkit.config_io import load_config
    from toolkit.data import build_data

    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="bench-streams-"))
    data = (args.data or work / "digits28").resolve()
    make_digit_folder(data, args.train_variants, args.val_variants, 400)
    cfg = load_config(None, ["data.name=imagefolder", f"data.root={data}", "data.channels=1", "data.image_size=28",
                             f"data.mean={list(MEAN)}", f"data.std={list(STD)}", "data.pipeline=memory"])
    bundle = build_data(cfg.data)
    train, val = bundle.train, bundle.val
    print(f"{len(train)} train / {len(val)} val images; mnist_cnn, batch {args.batch_size}, adam {args.lr:g} x "
          f"{args.gamma:g} per epoch, {args.epochs} epochs, {args.threads} threads; load average "
          f"{os.getloadavg()[0]:.2f}", flush=True)
    finals: dict[str, dict[int, float]] = {label(v): {} for v in variants}
    mismatches = 0
    for seed in (int(s) for s in args.seeds.split(",")):
        for variant in variants:
            t0 = time.perf_counter()
            history = guide_loop(train.images, train.labels, val.images, val.labels, seed, variant, args.epochs,
                                 args.batch_size, args.lr, args.gamma)
            finals[label(variant)][seed] = history[-1]["val_acc"]
            print(f"seed {seed:>4} {label(variant):<40} final val acc {history[-1]['val_acc']:.2%}  "
                  f"(epochs: {percents(h['val_acc'] for h in history)}; {time.perf_counter() - t0:.0f} s)",
                  flush=True)
            if args.json:
                with args.json.open("a") as f:
                    f.write(json.dumps({"seed": seed, "variant": label(variant), "history": history}) + "\n")
            if args.check_toolkit and all(variant[k] == "toolkit" for k in ("norm", "order", "dropout")):
                real = toolkit_run(data, seed, args, work, channels_last=variant["layout"] == "toolkit")
                same = all(r["epoch"] == h["epoch"] and r["val_acc"] == h["val_acc"]
                           and abs(r["train_loss"] - h["train_loss"]) <= 1e-6 * h["train_loss"]
                           for r, h in zip(real, history)) and len(real) == len(history)
                mismatches += not same
                print(f"seed {seed:>4} toolkit train (real run)                  final val acc {real[-1]['val_acc']:.2%}  "
                      f"(train loss per epoch {losses(r['train_loss'] for r in real)}; loop "
                      f"{losses(h['train_loss'] for h in history)}): "
                      f"{'SAME as the loop set the toolkit way' if same else 'DIFFERENT from the loop'}", flush=True)
    print()
    names = list(finals)
    for name in names:
        accs = list(finals[name].values())
        spread = f", SD {100 * statistics.stdev(accs):.2f}" if len(accs) > 1 else ""
        print(f"{name:<40} mean {statistics.mean(accs):.2%} over {len(accs)} seeds{spread}")
    for name in names[1:]:
        diffs = [100 * (finals[name][s] - finals[names[0]][s]) for s in finals[name]]
        spread = f", SD {statistics.stdev(diffs):.2f}" if len(diffs) > 1 else ""
        print(f"{name} - {names[0]}, paired by seed: mean {statistics.mean(diffs):+.2f} points{spread} "
              f"({', '.join(f'{d:+.2f}' for d in diffs)})")
    if mismatches:
        print(f"{mismatches} real toolkit run(s) differ from the loop set the toolkit's way")
    return 1 if mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
