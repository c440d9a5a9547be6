"""What EMA of the weights, mixup/cutmix and the ImageNet-style augmentations do to validation accuracy at
equal epochs, over several seeds, on one of two tasks made from the built-in scikit-learn digits
(configs/digits.yaml: 1,437 train / 360 val): `digits` (16x16, 1 channel, mnist_cnn, as shipped) or
`digits32` (3 x 32 x 32, the grey digits in three channels, through the CIFAR guide's cifar_cnn: a 3-channel
32x32 task that does not saturate the way the synthetic one does). Each variant is a real `toolkit train`
(fp32, one process); prints the final-epoch val accuracy (for EMA: the EMA model's, and the trained model's
of the same run), mean and spread (sample std, min-max) per variant.

    python bench/regularisers.py --seeds 1,2,3 --epochs 8 [--task digits32] [--variant plain ...]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = {
    "plain": [],
    "ema 0.99": ["train.ema.decay=0.99"],
    "mixup 0.2": ["data.augment.mixup_alpha=0.2"],
    "cutmix 1.0": ["data.augment.cutmix_alpha=1.0"],
    "imagenet-style": ["data.augment.resized_crop_scale=[0.35, 1.0]", "data.augment.trivial_augment=true",
                       "data.augment.color_jitter=0.3", "data.augment.random_erasing=0.25"],
}
TASKS = {
    "digits": [],
    "digits32": ["data.channels=3", "data.image_size=32", "model.name=cifar_cnn", "data.augment.crop_padding=2"],
}


def final(work: Path, name: str, seed: int, epochs: int, threads: int, extra: list[str]) -> dict:
    sets = [f"train.epochs={epochs}", "train.patience=null", f"train.seed={seed}", "train.mixed_precision=no",
            f"train.num_threads={threads}", f"train.output_dir={work}", f"train.run_name={name}-{seed}",
            "train.overwrite=true", "train.log_every=1000", *extra]
    cmd = [sys.executable, "-m", "toolkit", "train", "--config", "digits.yaml"]
    for item in sets:
        cmd += ["--set", item]
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(ROOT)})
    return json.loads((work / f"{name}-{seed}" / "metrics.jsonl").read_text().splitlines()[-1])


def spread(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return (f"{statistics.mean(values):.2%} +- {sd:.2%} (min {min(values):.2%}, max {max(values):.2%}; "
            f"{', '.join(f'{v:.2%}' for v in values)})")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", default="1,2,3")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--variant", action="append", choices=list(VARIANTS), help="default: all")
    p.add_argument("--task", choices=list(TASKS), default="digits")
    args = p.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.variant or VARIANTS:
            rows = [final(Path(tmp), name.replace(" ", "_"), s, args.epochs, args.threads,
                          [*TASKS[args.task], *VARIANTS[name]]) for s in seeds]
            print(f"{name:<14} val acc at epoch {args.epochs}: {spread([r['val_acc'] for r in rows])}", flush=True)
            if "val_acc_ema" in rows[0]:
                print(f"{'':<14} its EMA model:      {spread([r['val_acc_ema'] for r in rows])}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
