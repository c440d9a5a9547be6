"""The toolkit's training step against the MNIST guide's loop, step for step, on the bench's digits.

Both start from the same weights (the same seed), see the same batches in the same order and draw
dropout from the same global RNG stream; the plain side normalises as the guide does
((x / 255 - mean) / std), or with `--toolkit-normalize` as the toolkit does (x * scale + shift, the
same value within one float rounding). Prints the largest weight difference after --steps steps
and how many validation predictions differ. With --toolkit-normalize and channels_last off the two
are bit-identical: the engine (loss, backward, Adam, schedule, accumulation) computes what the
plain loop computes, so an accuracy difference between them comes from the random streams (data
order, dropout) and rounding, which then grow into different trajectories.

    python bench/train_parity.py --steps 15                       # guide's normalisation
    python bench/train_parity.py --steps 15 --toolkit-normalize   # bit-identical
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from train_throughput import MEAN, STD, make_digit_folder  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--toolkit-normalize", action="store_true", help="plain side normalises as the toolkit does")
    p.add_argument("--channels-last", action="store_true",
                   help="toolkit side channels_last (dropout masks then fall on other elements: not comparable bit for bit)")
    p.add_argument("--data", type=Path, help="the bench's PNG folder (default: made in a temporary directory)")
    args = p.parse_args(argv)

    import torch
    import torch.nn.functional as F
    from accelerate.utils import set_seed
    from rich.console import Console

    from toolkit import engine
    from toolkit.config_io import load_config
    from toolkit.augment import BatchAugment
    from toolkit.data import build_data
    from toolkit.models import build_model
    from toolkit.optim import build_optimizer, build_scheduler
    from toolkit.preprocess import normalize
    from toolkit.progress import Reporter

    data = (args.data or Path(tempfile.mkdtemp(prefix="bench-parity-")) / "digits28").resolve()
    make_digit_folder(data, 7, 6, 400)
    cfg = load_config(None, ["data.name=imagefolder", f"data.root={data}", "data.channels=1", "data.image_size=28",
                             f"data.mean={list(MEAN)}", f"data.std={list(STD)}", "data.batch_size=128",
                             "model.name=mnist_cnn", "optim.name=adam", "optim.lr=0.001", "schedule.name=step",
                             "schedule.step_epochs=1", "schedule.gamma=0.7", "train.epochs=5",
                             f"train.num_threads={args.threads}", "train.log_every=1000",
                             f"train.channels_last={args.channels_last}"])
    torch.set_num_threads(args.threads)
    bundle = build_data(cfg.data)
    pre = bundle.preprocess
    order = torch.randperm(len(bundle.train), generator=torch.Generator().manual_seed(0))[:args.steps * 128].split(128)
    batches = [(bundle.train.images[i], bundle.train.labels[i]) for i in order]
    steps_per_epoch = -(-len(bundle.train) // 128)

    # toolkit: its own pieces and its step (engine.train_epoch)
    accelerator = engine.make_accelerator(cfg)
    set_seed(args.seed)
    net = engine.build_network(cfg, len(bundle.classes), pre, 1, print)
    optimizer = build_optimizer(cfg.optim, net.parameters(), cfg.optim.lr)
    model, optimizer = accelerator.prepare(net, optimizer)
    scheduler = accelerator.prepare(build_scheduler(cfg.schedule, optimizer, steps_per_epoch, cfg.train.epochs))
    augment = BatchAugment(pre, 0, False, args.channels_last)
    torch.manual_seed(7)
    loss_t, *_ = engine.train_epoch(cfg, accelerator, model, net, batches, optimizer, scheduler, augment,
                                    Reporter(Console(), False, 1000), 1, steps_per_epoch, 0)

    # plain: the guide's loop on the same batches
    norm = (lambda x: normalize(x, list(MEAN), list(STD))) if args.toolkit_normalize else (
        lambda x: (x.float() / 255 - MEAN[0]) / STD[0])
    torch.manual_seed(args.seed)
    plain = build_model("mnist_cnn", len(bundle.classes), 1, 28)
    optimizer2 = torch.optim.Adam(plain.parameters(), lr=cfg.optim.lr)
    torch.manual_seed(7)
    plain.train()
    total = 0.0
    for x, y in batches:
        optimizer2.zero_grad()
        loss = F.cross_entropy(plain(norm(x)), y)
        loss.backward()
        optimizer2.step()
        total += loss.item() * len(y)
    diff = max((a - b).abs().max().item() for a, b in zip(net.state_dict().values(), plain.state_dict().values()))
    with torch.no_grad():
        net.eval()
        plain.eval()
        val_x, val_y = bundle.val.images, bundle.val.labels
        ours, theirs = net(augment(val_x, train=False)).argmax(1), plain(norm(val_x)).argmax(1)
    print(f"{args.steps} steps, seed {args.seed}, toolkit channels_last {'on' if args.channels_last else 'off'}, plain "
          f"normalised as {'the toolkit' if args.toolkit_normalize else 'the guide'}: train loss toolkit {loss_t:.6f}, "
          f"plain {total / sum(len(y) for _, y in batches):.6f}; largest weight difference {diff:.2e}; val acc toolkit "
          f"{(ours == val_y).float().mean():.2%}, plain {(theirs == val_y).float().mean():.2%}; "
          f"{(ours != theirs).sum().item()} of {len(val_y)} predictions differ")
    return 0


if __name__ == "__main__":
    sys.exit(main())
