"""The fast training path: compiled, channels_last, bf16 runs keep plain checkpoints that resume and
export; the in-memory pipeline serves whole batches of uint8 (no per-sample fetch, no float copy of
the set) and gives exactly the loader pipeline's batches and augmentation."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from accelerate.data_loader import BatchSamplerShard
from PIL import Image
from safetensors.torch import load_file
from torch.utils.data import BatchSampler, SequentialSampler

from conftest import ROOT, train_run
from toolkit.config import DataConfig
from toolkit.augment import BatchAugment
from toolkit.data import EpochShuffle, SliceBatches, TensorImages, build_data, build_loaders

PLAIN = ("module.", "_orig_mod.")


def make_folder(root, per_class=9, size=(20, 14)):
    """Three class folders of noisy PNG files; colour tells the class."""
    rng = np.random.default_rng(0)
    for name, colour in {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (20, 40, 230)}.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = np.clip(np.array(colour) + rng.integers(-60, 60, (size[1], size[0], 3)), 0, 255)
            Image.fromarray(pixels.astype(np.uint8), "RGB").save(root / name / f"{i}.png")
    return root


def epoch_batches(loader, epoch):
    loader.batch_sampler.sampler.set_epoch(epoch)
    return list(loader)


# ---------------------------------------------------------------- compile, channels_last, bf16


@pytest.mark.slow
def test_compiled_channels_last_bf16_run_resumes_and_exports(tmp_path):
    from toolkit.export import export_torchscript, load_torchscript

    fast = ["train.compile=true", "train.channels_last=true", "train.mixed_precision=bf16", "data.augment.crop_padding=1"]
    run_dir, first = train_run(tmp_path, *fast, "train.epochs=2", "train.stop_after=1")
    assert first["epochs_completed"] == 1
    _, summary = train_run(tmp_path, *fast, "train.epochs=2", "train.resume=true")
    assert summary["status"] == "complete" and summary["epochs_completed"] == 2
    assert summary["best_val_acc"] > 0.5  # 4 classes: chance is 0.25

    best = torch.load(run_dir / "checkpoints" / "best" / "weights.pt", weights_only=True)
    last = load_file(run_dir / "checkpoints" / "last" / "model.safetensors")
    assert best and last and not any(k.startswith(PLAIN) for k in [*best, *last])
    assert set(best) == set(last)

    export_dir = export_torchscript(run_dir)
    assert json.loads((export_dir / "parity.json").read_text())["max_abs_diff"] <= 1e-4
    scripted = load_torchscript(export_dir / "model.pt")
    images = torch.rand(3, 3, 16, 16)
    with torch.no_grad():
        assert scripted(images).shape == (3, 4)
        assert torch.allclose(scripted(images.contiguous(memory_format=torch.channels_last)), scripted(images), atol=1e-5)


# ---------------------------------------------------------------- batches


@pytest.mark.parametrize("size, batch, drop_last", [(103, 16, False), (103, 16, True), (96, 32, False)])
def test_slice_batches_equal_torch_batch_sampler_also_sharded(size, batch, drop_last):
    shuffle = EpochShuffle(size, seed=5)
    ours, theirs = SliceBatches(shuffle, batch, drop_last), BatchSampler(shuffle, batch, drop_last)
    for epoch in (0, 3):
        shuffle.set_epoch(epoch)
        assert list(ours) == list(theirs)
        assert all(isinstance(b, list) and isinstance(b[0], int) for b in ours)
        for rank in (0, 1):  # what Accelerate makes of them for two processes (pads the short last batch)
            shard = dict(num_processes=2, process_index=rank, split_batches=False, even_batches=True)
            assert list(BatchSamplerShard(ours, **shard)) == list(BatchSamplerShard(theirs, **shard))
    in_order = SequentialSampler(range(size))
    assert list(SliceBatches(in_order, batch, drop_last)) == list(BatchSampler(in_order, batch, drop_last))
    assert len(ours) == len(theirs)


def test_memory_pipeline_fetches_whole_batches_of_uint8(monkeypatch):
    cfg = DataConfig(name="synthetic", channels=1, image_size=12, synthetic_samples=300, batch_size=32)
    bundle = build_data(cfg)
    assert bundle.pipeline == "memory" and bundle.train.images.dtype == torch.uint8
    assert bundle.train.images.is_contiguous() and bundle.train.images.shape[1:] == (1, 12, 12)
    calls = []
    real = TensorImages.__getitems__

    def count(self, indices):
        calls.append(len(indices))
        return real(self, indices)

    def per_sample(self, index):
        raise AssertionError("the memory pipeline fetched one sample at a time")

    monkeypatch.setattr(TensorImages, "__getitems__", count)
    monkeypatch.setattr(TensorImages, "__getitem__", per_sample)
    train, val = build_loaders(bundle, cfg, seed=0, pin_memory=False)
    assert train.num_workers == 0
    batches = epoch_batches(train, 1)
    assert calls == [len(labels) for _, labels in batches] == [32] * 8 + [270 - 256]
    for images, labels in batches:
        assert images.dtype == torch.uint8 and labels.dtype == torch.long
    out = BatchAugment(bundle.preprocess, crop_padding=2, hflip=True, channels_last=True)(batches[0][0], train=True)
    assert out.dtype == torch.float32 and out.is_contiguous(memory_format=torch.channels_last)
    assert sum(len(labels) for _, labels in val) == 30


def test_memory_and_loader_pipelines_give_the_same_batches_and_augmentation(tmp_path):
    root = make_folder(tmp_path / "photos")
    bundles, loaders = {}, {}
    for pipeline in ("memory", "loader"):
        cfg = DataConfig(name="imagefolder", root=str(root), channels=3, image_size=16, batch_size=6,
                         val_fraction=0.25, pipeline=pipeline, num_workers=2)
        bundles[pipeline] = build_data(cfg)
        loaders[pipeline] = build_loaders(bundles[pipeline], cfg, seed=3, pin_memory=False)
    assert bundles["memory"].pipeline == "memory" and isinstance(bundles["memory"].train, TensorImages)
    assert bundles["loader"].pipeline == "loader" and loaders["loader"][0].num_workers == 2
    augment = BatchAugment(bundles["memory"].preprocess, crop_padding=3, hflip=True)
    for epoch in (1, 2):
        memory, loader = epoch_batches(loaders["memory"][0], epoch), epoch_batches(loaders["loader"][0], epoch)
        assert len(memory) == len(loader) == 4  # 20 training images in batches of 6, 6, 6, 2
        for (m_images, m_labels), (l_images, l_labels) in zip(memory, loader):
            assert m_images.dtype == l_images.dtype == torch.uint8
            assert torch.equal(m_images, l_images) and torch.equal(m_labels, l_labels)
            torch.manual_seed(epoch)
            m_out = augment(m_images, train=True)
            torch.manual_seed(epoch)
            assert torch.equal(m_out, augment(l_images, train=True))
    memory_val = list(loaders["memory"][1])
    loader_val = list(loaders["loader"][1])
    assert [torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(memory_val, loader_val)] == [True]
    assert epoch_batches(loaders["memory"][0], 1)[0][1].tolist() != epoch_batches(loaders["memory"][0], 2)[0][1].tolist()


def test_auto_pipeline_follows_the_memory_limit(tmp_path):
    root = make_folder(tmp_path / "photos", per_class=4)
    nbytes = 12 * 3 * 16 * 16  # every image, uint8, at the model's size
    common = dict(name="imagefolder", root=str(root), channels=3, image_size=16)
    assert build_data(DataConfig(**common, memory_limit_mb=nbytes / 2**20)).pipeline == "memory"
    assert build_data(DataConfig(**common, memory_limit_mb=(nbytes - 1) / 2**20)).pipeline == "loader"
    assert build_data(DataConfig(**common, pipeline="memory", memory_limit_mb=1e-6)).pipeline == "memory"


def test_memory_pipeline_never_holds_a_float_copy_of_the_set():
    """Peak memory of building a 61 MB uint8 set (20,000 x 3 x 32 x 32): a float32 copy alone is 246 MB. The
    kernel's high-water mark (VmHWM) sees every spike; measured 2.1x, and 5.1x with one transient float copy."""
    script = textwrap.dedent("""
        import torch
        from toolkit.config import DataConfig
        from toolkit.data import build_data
        def status(key):  # kB, from the kernel's own accounting of this process
            return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key + ":"))
        torch.zeros(1).add_(1)  # load torch's kernels before the baseline
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak RSS (VmHWM) to the current RSS: the kernel then records any spike
        before = status("VmRSS")
        bundle = build_data(DataConfig(name="synthetic", synthetic_samples=20_000, image_size=32, channels=3))
        peak = status("VmHWM")
        nbytes = bundle.train.images.nbytes + bundle.val.images.nbytes
        assert bundle.train.images.dtype == torch.uint8 and nbytes == 20_000 * 3 * 32 * 32
        print(max(0, peak - before) / nbytes)
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    growth = float(result.stdout.strip().splitlines()[-1])
    assert growth < 3, f"building the set took {growth:.1f}x its uint8 size at peak"
