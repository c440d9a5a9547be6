"""Validation accuracy at equal epochs with and without the ImageNet-style augmentations, on the
built-in 3-channel 32x32 synthetic task, over several seeds; prints mean, spread and each run.

    .venv/bin/python bench/augment_accuracy.py [--seeds 3] [--epochs 6]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile

from toolkit.config_io import load_config
from toolkit.engine import train

SETTINGS = {
    "none": [],
    "imagenet-style": ["data.augment.resized_crop_scale=[0.35, 1.0]", "data.augment.trivial_augment=true",
                       "data.augment.color_jitter=0.3", "data.augment.random_erasing=0.25"],
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=6)
    args = parser.parse_args()
    common = ["data.name=synthetic", "data.channels=3", "data.image_size=32", "data.synthetic_samples=1024",
              "data.num_classes=10", "model.name=cifar_cnn", f"train.epochs={args.epochs}", "train.mixed_precision=no",
              "train.log_every=1000"]
    for name, keys in SETTINGS.items():
        accs = []
        for seed in range(args.seeds):
            with tempfile.TemporaryDirectory() as out:
                cfg = load_config(None, [*common, *keys, f"train.seed={seed}", f"train.output_dir={out}"])
                accs.append(train(cfg)["final_val_acc"])
            from accelerate.state import AcceleratorState, GradientState, PartialState
            AcceleratorState._reset_state(True), GradientState._reset_state(), PartialState._reset_state()
        spread = statistics.stdev(accs) if len(accs) > 1 else 0.0
        print(f"{name:15s} final val acc {statistics.mean(accs):.4f} +- {spread:.4f} (sd over {len(accs)} seeds): "
              + ", ".join(f"{a:.4f}" for a in accs), flush=True)


if __name__ == "__main__":
    main()
