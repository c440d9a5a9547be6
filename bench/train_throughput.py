"""Training throughput: the MNIST guide's plain loop against the toolkit's engine, in one run.

Both sides train the same model (mnist_cnn) on the same 28x28 grayscale PNG files, batch 128,
Adam 1e-3 decayed x0.7 after each epoch (the guide's StepLR), for the same epochs, with the same
torch thread count, each in its own process:

  plain    the MNIST guide as a user writes it for an image folder: ImageFolder of PIL images,
           ToTensor + Normalize, DataLoader(shuffle=True, num_workers=2), the guide's train/test
           loop (fp32, contiguous tensors).
  toolkit  `toolkit train` on the same folder (data.name: imagefolder): the files are decoded once
           into a uint8 tensor, batches are normalised on the device, with the toolkit's defaults
           (channels_last; mixed_precision auto: bf16 where the CPU computes it natively, else fp32).

The images are made here, offline: scikit-learn's 1,797 real 8x8 digits, each drawn as a 20x20
digit in a 28x28 frame (as MNIST is), in variants with random rotation, scale, shift and noise.
400 of the digits are held out: validation sees only their variants. Prints one table: images/s
(training passes only, mean over epochs), final validation accuracy, peak memory, wall and CPU
time per side, and how much CPU other processes took meanwhile (they distort the figures).

    python bench/train_throughput.py                       # about 2 minutes on 2 cores
    python bench/train_throughput.py --seeds 42,1,2,3      # means over seeds (accuracy noise)
    python bench/train_throughput.py --epochs 10 --threads 4 --train-variants 12

Options for finding where the two sides' accuracies differ (the default measures as above):
--crop-padding/--hflip augment both sides alike (plain: torchvision's per-image RandomCrop and
RandomHorizontalFlip on the PIL image; toolkit: data.augment.*); --plain-channels-last runs the
plain loop's model and batches channels_last, as the toolkit's default does; --toolkit-set
changes the toolkit side. The table also gives each side's spread over seeds.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
MEAN, STD = (0.1307,), (0.3081,)  # the MNIST guide's Normalize


# ---------------------------------------------------------------- data


def make_digit_folder(root: Path, train_variants: int, val_variants: int, val_digits: int, seed: int = 0) -> tuple[int, int]:
    """root/train/<digit>/*.png and root/val/<digit>/*.png; returns (train, val) image counts.

    Each of scikit-learn's 8x8 digits becomes a 20x20 digit centred in a 28x28 frame (as in
    MNIST), then variants of it: rotated up to 10 degrees, scaled up to 8%, shifted up to 2 pixels,
    with Gaussian noise. `val_digits` of the originals are seen only in val/."""
    import torch
    from PIL import Image
    from sklearn.datasets import load_digits
    from torch.nn import functional as F

    marker = root / "made.json"
    wanted = {"train_variants": train_variants, "val_variants": val_variants, "val_digits": val_digits, "seed": seed,
              "version": 3}
    if marker.is_file() and json.loads(marker.read_text()).get("spec") == wanted:
        return tuple(json.loads(marker.read_text())["counts"])
    shutil.rmtree(root, ignore_errors=True)
    digits = load_digits()
    generator = torch.Generator().manual_seed(seed)
    held_out = torch.zeros(len(digits.target), dtype=torch.bool)
    held_out[torch.randperm(len(held_out), generator=generator)[:val_digits]] = True
    frames = torch.zeros(len(held_out), 1, 28, 28)
    frames[:, :, 4:24, 4:24] = F.interpolate(torch.from_numpy(digits.images).float().unsqueeze(1) / 16, size=(20, 20),
                                             mode="bilinear", antialias=True)
    counts = {}
    for split, mask, variants in (("train", ~held_out, train_variants), ("val", held_out, val_variants)):
        originals, labels = frames[mask].repeat(variants, 1, 1, 1), torch.from_numpy(digits.target)[mask].repeat(variants)
        n = len(labels)
        angle = (torch.rand(n, generator=generator) * 2 - 1) * torch.pi * 10 / 180
        scale = 1 + (torch.rand(n, generator=generator) * 2 - 1) * 0.08
        shift = torch.randint(-2, 3, (n, 2), generator=generator) * (2 / 28)  # pixels -> grid units
        cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
        theta = torch.stack([torch.stack([cos, -sin, -shift[:, 0]], 1), torch.stack([sin, cos, -shift[:, 1]], 1)], 1)
        grid = F.affine_grid(theta, list(originals.shape), align_corners=False)
        images = F.grid_sample(originals, grid, align_corners=False) * 255
        images = (images + torch.randn(images.shape, generator=generator) * 10).clamp(0, 255).round().to(torch.uint8)
        for i, (image, label) in enumerate(zip(images, labels.tolist())):
            folder = root / split / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image[0].numpy(), mode="L").save(folder / f"{i:05d}.png")
        counts[split] = n
    marker.write_text(json.dumps({"spec": wanted, "counts": [counts["train"], counts["val"]]}))
    return counts["train"], counts["val"]


# ---------------------------------------------------------------- the two sides


def load_gray(path: str):
    """ImageFolder's loader for grayscale files (its default converts to RGB)."""
    from PIL import Image

    with open(path, "rb") as f:
        return Image.open(f).convert("L")


def plain_side(args) -> dict:
    """The MNIST guide's loop on an ImageFolder, run in a child process; returns its figures."""
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    from toolkit.models import build_model

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize(MEAN, STD)])
    augment = ([transforms.RandomCrop(28, padding=args.crop_padding)] if args.crop_padding else []) + (
        [transforms.RandomHorizontalFlip()] if args.hflip else [])
    train_transform = transforms.Compose([*augment, transform]) if augment else transform
    train_set = datasets.ImageFolder(str(args.data / "train"), transform=train_transform, loader=load_gray)
    val_set = datasets.ImageFolder(str(args.data / "val"), transform=transform, loader=load_gray)
    train_loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=True, num_workers=args.workers)
    val_loader = DataLoader(val_set, batch_size=1000, num_workers=args.workers)
    model = build_model("mnist_cnn", len(train_set.classes), 1, 28)
    layout = torch.channels_last if args.plain_channels_last else torch.contiguous_format
    model = model.to(memory_format=layout)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=args.gamma)
    rates, val_acc = [], 0.0
    for epoch in range(1, args.epochs + 1):
        model.train()
        t0, seen = time.perf_counter(), 0
        for data, target in train_loader:
            optimizer.zero_grad()
            output = model(data.contiguous(memory_format=layout))
            loss = F.cross_entropy(output, target)
            loss.backward()
            optimizer.step()
            seen += len(target)
        rates.append(seen / (time.perf_counter() - t0))
        scheduler.step()
        model.eval()
        correct = 0
        with torch.no_grad():
            for data, target in val_loader:
                correct += (model(data.contiguous(memory_format=layout)).argmax(1) == target).sum().item()
        val_acc = correct / len(val_set)
        print(f"plain   epoch {epoch}: {rates[-1]:,.0f} img/s, val acc {val_acc:.2%}", flush=True)
    return {"images_per_s": sum(rates) / len(rates), "val_acc": val_acc, "settings": plain_settings(args)}


def plain_settings(args) -> str:
    settings = ["fp32", "channels_last" if args.plain_channels_last else "contiguous"]
    if args.crop_padding or args.hflip:
        settings.append("per-image " + " + ".join(
            ([f"RandomCrop(padding={args.crop_padding})"] if args.crop_padding else []) +
            (["RandomHorizontalFlip"] if args.hflip else [])))
    return ", ".join(settings)


def toolkit_settings(args, seed: int) -> list[str]:
    """The toolkit run's overrides: same data, model, batch, epochs, threads; then fast settings."""
    same = [f"data.root={args.data}", "data.channels=1", "data.image_size=28", f"data.mean={list(MEAN)}",
            f"data.std={list(STD)}", f"data.batch_size={args.batch_size}", "model.name=mnist_cnn",
            "optim.name=adam", f"optim.lr={args.lr}", "schedule.name=step", "schedule.step_epochs=1",
            f"schedule.gamma={args.gamma}", f"train.epochs={args.epochs}", f"train.num_threads={args.threads}",
            f"train.seed={seed}"]
    if args.crop_padding:
        same.append(f"data.augment.crop_padding={args.crop_padding}")
    if args.hflip:
        same.append("data.augment.hflip=true")
    return same + list(args.toolkit_set)


def toolkit_side(args, seed: int, work: Path) -> tuple[list[str], Path]:
    """The `toolkit train` command line of the toolkit side, and its run directory."""
    config = work / "bench_train.yaml"
    config.write_text("data:\n  name: imagefolder\n")
    cmd = [str(BIN / "toolkit"), "train", "--config", str(config), "--set", f"train.output_dir={work}",
           "--set", "train.run_name=toolkit", "--set", "train.overwrite=true", "--set", "train.log_every=1000"]
    for item in toolkit_settings(args, seed):
        cmd += ["--set", item]
    return cmd, work / "toolkit"


# ---------------------------------------------------------------- measuring a child process


def busy_cpu_s() -> float:
    """CPU seconds the whole machine has spent busy since boot (every process, every core)."""
    import psutil

    times = psutil.cpu_times()
    return sum(times) - times.idle - getattr(times, "iowait", 0.0)


def run_measured(cmd: list[str], env: dict) -> dict:
    """Run cmd; wall seconds, peak RSS of its largest process (wait4), the peak summed PSS of the
    process and its children (sampled every 0.2 s; PSS splits pages shared after fork), and the
    share of the machine's CPU that other processes took meanwhile (they distort the figures)."""
    import psutil

    busy0 = busy_cpu_s()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT)
    peak_pss, done = [0], threading.Event()

    def sample():
        parent = psutil.Process(proc.pid)
        while not done.is_set():
            try:
                total = sum(p.memory_full_info().pss for p in [parent, *parent.children(recursive=True)])
                peak_pss[0] = max(peak_pss[0], total)
            except psutil.Error:
                pass
            done.wait(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    others = busy_cpu_s() - busy0 - usage.ru_utime - usage.ru_stime
    done.set()
    sampler.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:3])} ... failed with exit code {proc.returncode}")
    return {"wall_s": wall, "peak_rss_mb": usage.ru_maxrss / 1024, "peak_pss_mb": peak_pss[0] / 2**20,
            "cpu_s": usage.ru_utime + usage.ru_stime, "others_cpu": max(0.0, others) / (wall * psutil.cpu_count())}


# ---------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--gamma", type=float, default=0.7, help="the guide's StepLR: lr x gamma after every epoch")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads on both sides")
    p.add_argument("--workers", type=int, default=2, help="the plain loop's DataLoader workers")
    p.add_argument("--seeds", default="42", help="comma-separated; each side trains once per seed, figures are means")
    p.add_argument("--seed", type=int, default=42, help=argparse.SUPPRESS)
    p.add_argument("--val-digits", type=int, default=400, help="of the 1,797 digits, how many only validation sees")
    p.add_argument("--train-variants", type=int, default=7, help="images made from each training digit")
    p.add_argument("--val-variants", type=int, default=6, help="images made from each held-out digit")
    p.add_argument("--data", type=Path, help="where the PNG folder is made (default: a temporary directory)")
    p.add_argument("--sides", default="plain,toolkit", help="comma-separated: plain, toolkit")
    p.add_argument("--toolkit-set", action="append", default=None, metavar="KEY=VALUE",
                   help="settings of the toolkit side (default: none, the toolkit's defaults)")
    p.add_argument("--crop-padding", type=int, default=0, metavar="N",
                   help="both sides: random 28x28 crop of the image zero-padded by N pixels (default 0: off)")
    p.add_argument("--hflip", action="store_true", help="both sides: random horizontal flip (default: off)")
    p.add_argument("--plain-channels-last", action="store_true",
                   help="the plain loop's model and batches in channels_last, as the toolkit's default")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--child", choices=["plain"], help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def run_side(side: str, args, seed: int, work: Path, env: dict) -> dict:
    """One training run of one side with one seed, in its own process; its figures."""
    if side == "plain":
        out = work / "plain.json"
        cmd = [sys.executable, __file__, "--child", "plain", "--result", str(out), "--data", str(args.data),
               "--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "--lr", str(args.lr),
               "--gamma", str(args.gamma), "--threads", str(args.threads), "--workers", str(args.workers),
               "--seed", str(seed), "--crop-padding", str(args.crop_padding)]
        cmd += ["--hflip"] if args.hflip else []
        cmd += ["--plain-channels-last"] if args.plain_channels_last else []
        measured = run_measured(cmd, env)
        return {**json.loads(out.read_text()), **measured,
                "settings": f"{plain_settings(args)}, DataLoader {args.workers} workers"}
    if side == "toolkit":
        cmd, run_dir = toolkit_side(args, seed, work)
        print("toolkit: " + (" ".join(args.toolkit_set) or "defaults"), flush=True)
        measured = run_measured(cmd, env)
        summary = json.loads((run_dir / "summary.json").read_text())
        used = f"mixed precision {summary['mixed_precision']}, channels_last {'on' if summary['channels_last'] else 'off'}"
        return {"images_per_s": summary["train_images_per_s"], "val_acc": summary["final_val_acc"], **measured,
                "settings": f"{', '.join(args.toolkit_set) or 'defaults'}: {used}"}
    raise SystemExit(f"--sides: unknown side {side!r} (plain, toolkit)")


def combine(runs: list[dict]) -> dict:
    """Several seeds of one side: mean rate and accuracy, peak memory, summed time."""
    mean = lambda key: sum(r[key] for r in runs) / len(runs)  # noqa: E731
    return {"images_per_s": mean("images_per_s"), "val_acc": mean("val_acc"), "val_accs": [r["val_acc"] for r in runs],
            "peak_rss_mb": max(r["peak_rss_mb"] for r in runs), "peak_pss_mb": max(r["peak_pss_mb"] for r in runs),
            "wall_s": mean("wall_s"), "cpu_s": mean("cpu_s"), "others_cpu": max(r["others_cpu"] for r in runs),
            "settings": runs[0]["settings"]}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child == "plain":
        args.result.write_text(json.dumps(plain_side(args)))
        return 0
    if args.toolkit_set is None:
        args.toolkit_set = []  # the defaults are the fast settings: channels_last, mixed_precision auto
    seeds = [int(x) for x in args.seeds.split(",")]
    work = Path(tempfile.mkdtemp(prefix="bench-train-"))
    args.data = (args.data or work / "digits28").resolve()
    try:
        t0 = time.perf_counter()
        n_train, n_val = make_digit_folder(args.data, args.train_variants, args.val_variants, args.val_digits)
        print(f"data: {n_train} train / {n_val} val PNG files, 1x28x28, in {args.data} "
              f"({time.perf_counter() - t0:.1f} s to make)")
        print(f"both sides: mnist_cnn, batch {args.batch_size}, adam lr {args.lr:g} x {args.gamma:g} after each epoch, "
              f"{args.epochs} epochs, {args.threads} torch threads, seed(s) {args.seeds}; "
              f"load average {os.getloadavg()[0]:.2f}\n", flush=True)
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        runs = {side: [] for side in args.sides.split(",")}
        for seed in seeds:  # the sides take turns, so that a passing disturbance hits both
            for side in runs:
                runs[side].append(run_side(side, args, seed, work, env))
                print(flush=True)
        results = {side: combine(side_runs) for side, side_runs in runs.items()}
        print_table(results)
        if args.json:
            args.json.write_text(json.dumps({"results": results, "runs": runs}, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def print_table(results: dict) -> None:
    print(f"{'side':<8} {'images/s':>9} {'val acc':>8} {'peak RSS MB':>12} {'peak PSS MB':>12} {'wall s':>7} "
          f"{'CPU s':>6} {'others':>6}  settings")
    for side, r in results.items():
        print(f"{side:<8} {r['images_per_s']:>9,.0f} {r['val_acc']:>8.2%} {r['peak_rss_mb']:>12,.0f} "
              f"{r['peak_pss_mb']:>12,.0f} {r['wall_s']:>7.1f} {r['cpu_s']:>6.0f} {r['others_cpu']:>6.0%}  {r['settings']}")
    if any(len(r["val_accs"]) > 1 for r in results.values()):
        for side, r in results.items():
            accs = r["val_accs"]
            print(f"{side} val acc per seed: {', '.join(f'{a:.2%}' for a in accs)} "
                  f"(mean {sum(accs) / len(accs):.2%}, min-max {min(accs):.2%}-{max(accs):.2%}, sample SD "
                  f"{100 * statistics.stdev(accs):.2f} points)")
    if {"plain", "toolkit"} <= results.keys():
        plain, fast = results["plain"], results["toolkit"]
        print(f"\ntoolkit / plain: {fast['images_per_s'] / plain['images_per_s']:.2f}x images/s, "
              f"{fast['wall_s'] / plain['wall_s']:.2f}x wall time, "
              f"val acc difference {100 * (fast['val_acc'] - plain['val_acc']):+.2f} points")
    print("peak RSS: the largest single process; peak PSS: the process and its DataLoader workers together; "
          "CPU s: user + system time of the side's processes; others: the machine's CPU other processes took")
    if any(r["others_cpu"] > 0.1 for r in results.values()):
        print("WARNING: other processes took over 10% of the CPU during a side: its figures are not this machine's")


if __name__ == "__main__":
    sys.exit(main())
