"""data.name: shards: `toolkit shard` writes real tar shards (WebDataset's layout) and a manifest; training streams
them from disk or from an HTTP server on loopback, every sample exactly once per epoch over processes and workers
(indices counted), reproducibly, resumable mid-epoch; bad shards stop the run naming the shard and the sample, or
are skipped and counted. The HTTP server (bench/range_server.py) runs on loopback in a module fixture, or per test
for one without byte ranges or one that breaks mid-shard. Two processes and a launch resumed: test_shards_launch.py."""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import tarfile

import pytest
import torch

from conftest import ROOT, read_jsonl, run_main, train_run
from test_data import make_folder
from toolkit.config import DataConfig
from toolkit.data import build_data
from toolkit.data.shard_plan import make_plan
from toolkit.data.shard_loader import ShardLoader
from toolkit.data.shards import ShardBlocks
from toolkit.manifest import load_shard_set
from toolkit.preprocess import PREPROCESS_VERSION, Limits, Preprocess
from toolkit.shard import write_shards

sys.path.insert(0, str(ROOT / "bench"))
from range_server import serve  # noqa: E402

# digits as 2 KB samples in shards of 64 KB: 1,617 train samples in 56 shards, 180 val in 7
TRAIN, VAL = 1617, 180


@pytest.fixture(scope="module")
def digits_shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards") / "digits"
    write_shards("digits", out, "64KB")
    return out


@pytest.fixture(scope="module")
def http_shards(digits_shards):
    """The digits' shard set served over HTTP on loopback (byte ranges, as nginx or S3 answer), for the module."""
    with serve(digits_shards) as url:
        yield url


def _pre(channels=1, size=8) -> Preprocess:
    return Preprocess(channels=channels, image_size=size, resize="resize", mean=[0.5] * channels,
                      std=[0.5] * channels, preprocess_version=PREPROCESS_VERSION)


def epoch(root, split="train", processes=1, workers=0, batch=32, buffer=128, epoch=1, start=0, skip=False):
    """Every process's batches of one epoch: {process: [(indices, labels, images), ...]}."""
    shard_set = load_shard_set(str(root))
    out = {}
    for process in range(processes):
        blocks = ShardBlocks(shard_set, split, _pre(), Limits(max_pixels=10**7, max_side=10**4), skip, buffer)
        blocks.processes, blocks.process, blocks.batch, blocks.seed = processes, process, batch, 7
        loader = ShardLoader(blocks, workers, False, torch.device("cpu"), 7)
        loader.set_epoch(epoch)
        if start:
            loader.from_batch(start)
        out[process] = [(i.tolist(), y.tolist(), x) for x, y, i in loader.batches()]
    return out


def flat(batches: dict) -> list[int]:
    return [i for process in batches.values() for indices, _, _ in process for i in indices]


def test_shard_writes_the_split_as_webdataset_tars_with_a_manifest(digits_shards):
    manifest = json.loads((digits_shards / "manifest.json").read_text())
    assert manifest["splits"] == {"train": TRAIN, "val": VAL} and manifest["classes"] == [str(d) for d in range(10)]
    assert manifest["preprocessing"] == {"channels": 1, "image_size": 8, "mean": [0.5], "std": [0.5], "source_side": 8}
    keys = [k for s in manifest["shards"] for k in s["keys"]]
    assert len(keys) == len(set(keys)) == TRAIN + VAL
    for shard in manifest["shards"]:
        path = digits_shards / shard["name"]
        assert path.stat().st_size == shard["bytes"] <= 64_000
        assert hashlib.sha256(path.read_bytes()).hexdigest() == shard["sha256"]
        with tarfile.open(path) as tar:
            members = tar.getmembers()
        assert [m.name for m in members] == [f"{k}.{ext}" for k in shard["keys"] for ext in ("cls", "png")]
        assert [m.offset for m in members[::2]] == shard["offsets"][:-1]  # each sample's first header
    # the validation split is the one training uses (data/sources.py), pixel for pixel (PNG is lossless)
    bundle = build_data(DataConfig(name="digits", val_fraction=0.1, pipeline="memory"))
    val = epoch(digits_shards, "val", batch=64)[0]
    assert torch.equal(torch.cat([x for _, _, x in val]), bundle.val.images)
    assert [y for _, labels, _ in val for y in labels] == bundle.val.labels.tolist()
    # one sample by its index (batch_size auto, toolkit samples, the export's calibration): a range read
    blocks = ShardBlocks(load_shard_set(str(digits_shards)), "val", _pre(), None)
    for i in (0, 29, 30, 179):
        image, label = blocks[i]
        assert torch.equal(image, bundle.val.images[i]) and label == bundle.val.labels[i]


def test_a_folder_is_copied_byte_for_byte(tmp_path):
    root = make_folder(tmp_path / "photos", per_class=10, ext="jpg")
    write_shards(str(root), tmp_path / "shards", "16KB", val_fraction=0.2)
    files = sorted(hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*.jpg"))
    stored, labels = [], {}
    for path in sorted((tmp_path / "shards").glob("*.tar")):
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                data = tar.extractfile(member).read()
                if member.name.endswith(".jpg"):
                    stored.append(hashlib.sha256(data).hexdigest())
                else:
                    labels[member.name] = int(data)
    assert sorted(stored) == files and len(labels) == 30 and set(labels.values()) == {0, 1, 2}
    assert json.loads((tmp_path / "shards" / "manifest.json").read_text())["splits"] == {"train": 24, "val": 6}


@pytest.mark.parametrize("processes, batch, buffer", [(1, 7, 1), (2, 32, 100), (3, 5, 64), (2, 1, 4), (4, 50, 1000)])
def test_the_plan_gives_every_sample_once_and_every_process_the_same_steps(processes, batch, buffer):
    counts = [5, 0, 31, 17, 1, 40, 9] if batch != 1 else [6, 4, 10]  # batch 1 needs a total the processes divide
    total = sum(counts)
    for train in (True, False):
        plans = [make_plan(counts, train=train, seed=3, epoch=2, processes=processes, process=p, batch=batch,
                           shuffle_buffer=buffer) for p in range(processes)]
        steps = -(-total // (processes * batch))  # Accelerate's: ceil(ceil(total / batch) / processes)
        assert [len(p.sizes) for p in plans] == [steps] * processes
        assert sum(sum(p.sizes) for p in plans) == total and all(s <= batch for p in plans for s in p.sizes)
        if train:
            assert all(s >= 1 for p in plans for s in p.sizes)
        else:
            assert len({tuple(p.pad_to) for p in plans}) == 1  # one shape per step on every process
        covered = []
        for plan in plans:
            for block in range(plan.num_blocks):
                a, b = plan.block_samples(block)
                covered += [(piece.shard, i) for piece in plan.pieces(a, b) for i in range(piece.lo, piece.hi)]
        assert sorted(covered) == sorted((s, i) for s, n in enumerate(counts) for i in range(n))


@pytest.mark.parametrize("processes", [1, 2, 3])
def test_every_training_sample_once_per_epoch_over_processes_and_workers(digits_shards, processes):
    one = epoch(digits_shards, processes=processes, workers=0)
    assert sorted(flat(one)) == list(range(TRAIN))
    assert len({len(batches) for batches in one.values()}) == 1  # the same steps on every process
    two = epoch(digits_shards, processes=processes, workers=2)  # real worker processes, blocks round-robin
    assert [[b[0] for b in batches] for batches in two.values()] == [[b[0] for b in batches] for batches in one.values()]
    assert all(torch.equal(x1, x2) for p in one for (_, _, x1), (_, _, x2) in zip(one[p], two[p]))
    if processes == 2:
        later = epoch(digits_shards, processes=2, epoch=2)
        assert sorted(flat(later)) == list(range(TRAIN)) and flat(later) != flat(one)  # reshuffled per epoch
        starts = [s.offsets and sum(x.count for x in load_shard_set(str(digits_shards)).split("train")[:n])
                  for n, s in enumerate(load_shard_set(str(digits_shards)).split("train"))]
        shards_seen = {max(n for n, start in enumerate(starts) if start <= i) for i in one[0][0][0]}
        assert len(shards_seen) > 1  # the shuffle buffer mixes several shards into one batch


def test_validation_is_exactly_the_validation_set_in_a_fixed_order(digits_shards):
    a, b = epoch(digits_shards, "val", processes=2, batch=16), epoch(digits_shards, "val", processes=2, batch=16)
    assert flat(a) == flat(b) and sorted(flat(a)) == list(range(VAL)) and len(a[0]) == len(a[1])
    for (_, y0, x0), (_, y1, x1) in zip(a[0], a[1]):  # padded to one shape per step (gather), pads labelled -100
        assert x0.shape == x1.shape and len(y0) == len(y1)


def test_a_resumed_epoch_starts_at_the_next_batch(digits_shards):
    whole = epoch(digits_shards, processes=2, workers=2, buffer=96)
    tail = epoch(digits_shards, processes=2, workers=2, buffer=96, start=7)  # inside the third block of 3 batches
    for p in (0, 1):
        assert [b[0] for b in tail[p]] == [b[0] for b in whole[p][7:]]
        assert all(torch.equal(x1, x2) for (_, _, x1), (_, _, x2) in zip(tail[p], whole[p][7:]))


@pytest.mark.parametrize("ranges", [True, False])
def test_over_http_the_same_batches_as_from_disk(digits_shards, ranges):
    local = epoch(digits_shards, processes=2, workers=2)
    with serve(digits_shards, ranges=ranges) as url:
        remote = epoch(url, processes=2, workers=2)
        pattern = epoch(url + "{train-{000000..000009},val-000000}.tar", processes=1)
    assert [[b[0] for b in v] for v in remote.values()] == [[b[0] for b in v] for v in local.values()]
    assert all(torch.equal(x1, x2) for p in local for (_, _, x1), (_, _, x2) in zip(local[p], remote[p]))
    manifest = json.loads((digits_shards / "manifest.json").read_text())
    assert len(flat(pattern)) == sum(s["count"] for s in manifest["shards"][:10])


COMMON = ["data.name=shards", "model.name=bn_cnn", "data.image_size=8", "data.batch_size=64", "train.epochs=1",
          "data.num_workers=1", "data.shuffle_buffer=256"]


def test_training_over_http_ends_with_the_weights_of_training_from_disk(tmp_path, digits_shards, http_shards):
    local, summary = train_run(tmp_path, *COMMON, f"data.root={digits_shards}", name="local")
    remote, _ = train_run(tmp_path, *COMMON, f"data.root={http_shards}", name="remote")
    assert summary["val_samples"] == VAL and summary["best_val_acc"] > 0.5
    a, b = (torch.load(r / "checkpoints" / "best" / "weights.pt", weights_only=True) for r in (local, remote))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert read_jsonl(local / "metrics.jsonl")[0]["val_samples"] == VAL


def test_evaluate_reads_a_shard_runs_validation_set(tmp_path, digits_shards, capsys):
    run_dir, summary = train_run(tmp_path, *COMMON, f"data.root={digits_shards}")
    code, out, err = run_main(capsys, "evaluate", str(run_dir))
    assert code == 0, err
    report = json.loads((run_dir / "eval" / "report.json").read_text())
    assert report["accuracy"] == pytest.approx(summary["best_val_acc"], abs=1e-9), report.keys()


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst, json.loads((dst / "manifest.json").read_text())


def _train(capsys, tmp_path, root, *extra):
    args = ["train", "--config", "smoke.yaml"]
    for item in ("train.mixed_precision=no", *COMMON, f"data.root={root}", f"train.output_dir={tmp_path / 'runs'}",
                 "train.overwrite=true", *extra):
        args += ["--set", item]
    return run_main(capsys, *args)


def _damage(path, offset, data: bytes):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def test_a_missing_or_truncated_shard_is_named_before_training(tmp_path, digits_shards, capsys):
    root, manifest = _copy(digits_shards, tmp_path / "set")
    (root / "train-000003.tar").unlink()
    code, _, err = _train(capsys, tmp_path, root)
    assert code == 2 and "shard train-000003.tar" in err and "missing" in err and "Traceback" not in err
    shutil.copy(digits_shards / "train-000003.tar", root)
    with open(root / "val-000001.tar", "r+b") as f:
        f.truncate(10_000)
    code, _, err = _train(capsys, tmp_path, root)
    assert code == 2 and "shard val-000001.tar" in err and "has 10000 bytes, the manifest says" in err


def test_a_corrupt_image_names_its_shard_and_sample_or_is_skipped_and_counted(tmp_path, digits_shards, capsys):
    root, manifest = _copy(digits_shards, tmp_path / "set")
    shard = manifest["shards"][5]
    key, offset = shard["keys"][3], shard["offsets"][3]
    _damage(root / shard["name"], offset + 3 * 512 + 8, b"\xff" * 40)  # inside the PNG's data (after .cls), header intact
    code, _, err = _train(capsys, tmp_path, root)
    assert code == 2 and f"shard {shard['name']}: sample {key}" in err and "cannot use this image" in err
    assert "Traceback" not in err
    code, out, _ = _train(capsys, tmp_path, root, "data.skip_bad_samples=true")
    assert code == 0 and "skipped 1 bad samples" in out


def test_a_broken_tar_header_names_its_shard_and_sample(tmp_path, digits_shards, capsys):
    root, manifest = _copy(digits_shards, tmp_path / "set")
    shard = manifest["shards"][2]
    _damage(root / shard["name"], shard["offsets"][10] + 100, b"garbage!" * 8)  # the header's size and checksum
    code, _, err = _train(capsys, tmp_path, root)
    assert code == 2 and f"shard {shard['name']}: sample {shard['keys'][10]} (#10) is not a tar member" in err
    code, out, _ = _train(capsys, tmp_path, root, "data.skip_bad_samples=true")
    assert code == 0 and "skipped 1 bad samples" in out  # the next sample is read from its own offset


def test_a_sample_without_a_label_is_named(tmp_path, digits_shards, capsys):
    root, manifest = _copy(digits_shards, tmp_path / "set")
    shard = manifest["shards"][0]
    key = shard["keys"][4]
    _damage(root / shard["name"], shard["offsets"][4], f"{key}.txt".encode().ljust(100, b"\0"))  # its .cls renamed
    with open(root / shard["name"], "r+b") as f:  # the header checksum made right again
        f.seek(shard["offsets"][4])
        header = bytearray(f.read(512))
        header[148:156] = b" " * 8
        header[148:156] = f"{sum(header):06o}\0 ".encode()
        f.seek(shard["offsets"][4])
        f.write(header)
    code, _, err = _train(capsys, tmp_path, root)
    assert code == 2 and f"shard {shard['name']}: sample {key} (#4) has no label ({key}.cls)" in err


def test_an_http_error_mid_shard_names_its_shard_and_sample(tmp_path, digits_shards, capsys):
    manifest = json.loads((digits_shards / "manifest.json").read_text())
    shard = manifest["shards"][7]
    cut = shard["offsets"][20] + 700  # inside sample 20
    with serve(digits_shards, break_after={shard["name"]: cut}) as url:
        code, _, err = _train(capsys, tmp_path, url)
        assert code == 2 and f"shard {shard['name']}: the stream broke at sample {shard['keys'][20]}" in err
        code, out, _ = _train(capsys, tmp_path, url, "data.skip_bad_samples=true")
    assert code == 0 and f"skipped {shard['count'] - 20} bad samples" in out  # none after the cut can be read


def test_shard_config_is_checked_like_the_rest(tmp_path, digits_shards, capsys):
    code, _, err = _train(capsys, tmp_path, digits_shards, "data.shuffle_buffer=0")
    assert code == 2 and "data.shuffle_buffer" in err
    code, _, err = _train(capsys, tmp_path, digits_shards, "data.pipeline=memory")
    assert code == 2 and "data.pipeline: 'memory' does not apply to data.name shards" in err
    code, _, err = _train(capsys, tmp_path, tmp_path / "nothing")
    assert code == 2 and "data.root" in err
    code, _, err = run_main(capsys, "shard", "nosuch", str(tmp_path / "x"))
    assert code == 2 and "neither a directory of class folders nor one of" in err
    code, _, err = run_main(capsys, "shard", "digits", str(tmp_path / "y"), "--shard-size", "lots")
    assert code == 2 and "--shard-size: 'lots'" in err


def test_a_shard_run_resumes_from_where_its_set_is_now(tmp_path, digits_shards, http_shards, capsys):
    """data.root may change on resume (a set moved to a server): the run's config.yaml holds the resolved
    preprocessing, so the old directory is never read again."""
    moved = shutil.copytree(digits_shards, tmp_path / "before")
    run_dir, _ = train_run(tmp_path, *COMMON, f"data.root={moved}", name="moved")
    shutil.rmtree(moved)
    code, out, err = run_main(capsys, "train", "--resume", str(run_dir), "--set", "train.epochs=2",
                              "--set", f"data.root={http_shards}")
    assert code == 0, err
    assert f"data.root: '{moved}' -> '{http_shards}'" in out and len(read_jsonl(run_dir / "metrics.jsonl")) == 2
