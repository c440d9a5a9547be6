"""The checkpoint keeper and meta.json, without training: which directories are live, an atomic publish
that never removes what a link points at, and meta.json files of every format version."""

from __future__ import annotations

import json
import os

import pytest
import torch

from toolkit import checkpoint
from toolkit.checkpoint import Keeper, load_best
from toolkit.errors import ToolkitError
from toolkit.models import build_model
from toolkit.rundir import META_VERSION, Meta, read_meta


def staged(keeper: Keeper, kind: str, epoch: int, step: int, content: str):
    path = keeper.staging(kind, epoch, step)
    path.mkdir(parents=True)
    (path / "content.txt").write_text(content)
    return path


def content(keeper: Keeper, kind: str) -> str:
    return (keeper.dir / kind / "content.txt").read_text()


def test_names_are_step_granular(tmp_path):
    keeper = Keeper(tmp_path)
    final = keeper.publish("last", staged(keeper, "last", 3, 24, "a"))
    assert final.name == "last-e0003-s0000024" and os.readlink(keeper.dir / "last") == final.name
    assert keeper.live() == {final}


def test_publishing_a_live_name_again_keeps_the_live_directory_until_the_link_moves(tmp_path, monkeypatch):
    """The same step saved twice (a preemption save, then the epoch's own): the second publish must not
    remove the directory `last` points at before the link is swapped (a kill in between would leave
    `last` dangling)."""
    keeper = Keeper(tmp_path)
    first = keeper.publish("last", staged(keeper, "last", 2, 16, "preempted"))
    second = staged(keeper, "last", 2, 16, "epoch end")
    real_replace = os.replace

    def killed_at_the_link_swap(src, dst):
        if str(dst).endswith("/last"):
            raise KeyboardInterrupt("killed")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", killed_at_the_link_swap)
    with pytest.raises(KeyboardInterrupt):
        keeper.publish("last", second)
    monkeypatch.setattr(os, "replace", real_replace)
    assert content(keeper, "last") == "preempted" and (keeper.dir / "last").resolve() == first

    keeper.clean_stale()  # the next start
    assert content(keeper, "last") == "preempted"
    final = keeper.publish("last", staged(keeper, "last", 2, 16, "epoch end"))
    assert content(keeper, "last") == "epoch end" and final != first and not first.exists()


def test_clean_stale_keeps_every_linked_directory_and_what_it_did_not_write(tmp_path):
    keeper = Keeper(tmp_path)
    best = keeper.publish("best", staged(keeper, "best", 1, 8, "best"))
    last = keeper.publish("last", staged(keeper, "last", 2, 16, "last"))
    top = keeper.publish("top1", staged(keeper, "best", 2, 16, "top-k"))  # a third link, as top-k adds
    orphan = staged(keeper, "last", 3, 24, "orphan")
    orphan = orphan.rename(keeper.dir / "last-e0003-s0000024")  # renamed, then killed before the link swap
    half = staged(keeper, "last", 4, 32, "half-written")
    (keeper.dir / ".last.link.tmp").symlink_to(orphan.name)
    (keeper.dir / "notes").mkdir()  # not the keeper's: left alone

    keeper.clean_stale()
    assert {p.name for p in keeper.dir.iterdir()} == {"best", "last", "top1", best.name, last.name, top.name, "notes"}
    assert not half.exists() and not orphan.exists()
    assert (content(keeper, "best"), content(keeper, "last"), content(keeper, "top1")) == ("best", "last", "top-k")


def test_moving_a_link_keeps_a_directory_another_link_points_at(tmp_path):
    keeper = Keeper(tmp_path)
    first = keeper.publish("best", staged(keeper, "best", 1, 8, "one"))
    (keeper.dir / "top1").symlink_to(first.name)
    keeper.publish("best", staged(keeper, "best", 2, 16, "two"))
    assert first.is_dir() and content(keeper, "top1") == "one" and content(keeper, "best") == "two"


META = {"model": {"name": "mlp", "args": {"hidden": 8}}, "num_classes": 3, "classes": ["a", "b", "c"],
        "channels": 1, "image_size": 4, "resize": "resize_center_crop", "mean": [0.5], "std": [0.25],
        "epoch": 2, "val_acc": 0.75}


def test_meta_json_is_versioned_and_round_trips(tmp_path):
    model = build_model("mlp", 3, 1, 4, {"hidden": 8})
    checkpoint.save_best(tmp_path, model, Meta(**META), step=16)
    ckpt = tmp_path / "checkpoints" / "best"
    written = json.loads((ckpt / "meta.json").read_text())
    assert written == {"format_version": META_VERSION, "preprocess_version": 1, **META}
    _, meta = load_best(tmp_path)
    assert meta == Meta(**META) and meta.preprocess == {"channels": 1, "image_size": 4, "resize": "resize_center_crop",
                                                         "mean": [0.5], "std": [0.25], "preprocess_version": 1}


def test_meta_json_written_before_format_version_still_loads(tmp_path):
    """A literal meta.json of a checkpoint written before this change: no format_version, and from the
    oldest ones no `resize` (every image was squashed then) and no class names."""
    model = build_model("mnist_cnn", 2, 1, 8)
    ckpt = tmp_path / "checkpoints" / "best-e0003"
    ckpt.mkdir(parents=True)
    (tmp_path / "checkpoints" / "best").symlink_to("best-e0003")
    torch.save(model.state_dict(), ckpt / "weights.pt")
    (ckpt / "meta.json").write_text("""{
  "model": {"name": "mnist_cnn", "args": {}},
  "num_classes": 2,
  "channels": 1,
  "image_size": 8,
  "mean": [0.1307],
  "std": [0.3081],
  "epoch": 3,
  "val_acc": 0.5
}""")
    loaded, meta = load_best(tmp_path)
    assert (meta.classes, meta.resize, meta.epoch, meta.format_version) == (["0", "1"], "resize", 3, META_VERSION)
    assert meta.preprocess["preprocess_version"] == 1  # trained before preprocessing version 2: kept on version 1
    assert torch.equal(loaded.state_dict()["head.0.weight"], model.state_dict()["head.0.weight"])

    (ckpt / "meta.json").write_text(json.dumps({**META, "format_version": META_VERSION + 1}))
    with pytest.raises(ToolkitError, match="newer than this toolkit reads"):
        read_meta(tmp_path)
    (ckpt / "meta.json").write_text(json.dumps({**META, "format_version": META_VERSION, "resize": None}))
    with pytest.raises(ToolkitError, match="not a valid meta.json"):  # no silent default from version 1 on
        read_meta(tmp_path)
    (ckpt / "meta.json").write_text(json.dumps({**META, "classes": ["a"]}))
    with pytest.raises(ToolkitError, match="lists 1 classes for num_classes=3"):
        read_meta(tmp_path)
