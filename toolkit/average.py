"""`toolkit average RUN`: the weights of checkpoints/top/ (train.save_top_k) averaged into a new release
checkpoint, checkpoints/average (loadable like checkpoints/best), evaluated on the run's validation set beside
checkpoints/best, saying which is better. checkpoints/best is left as it is."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from rich.console import Console

from toolkit.checkpoint import WEIGHTS, Keeper, load_best
from toolkit.errors import ToolkitError
from toolkit.rundir import Meta
from toolkit.topk import TopDir

AVERAGE = "average"


def average_states(states: list[dict]) -> dict:
    """The mean of each floating-point tensor (in float64, then its own dtype: one state gives itself back);
    other tensors (counters such as num_batches_tracked) taken from the first state."""
    out = {}
    for key, first in states[0].items():
        if first.is_floating_point():
            out[key] = (sum(s[key].double() for s in states) / len(states)).to(first.dtype)
        else:
            out[key] = first.clone()
    return out


def val_accuracy(run_dir: Path, checkpoint: Path) -> tuple[float, Meta]:
    """Accuracy of a checkpoint directory on the run's validation set, as `toolkit evaluate` computes it."""
    from toolkit.evaluate import predict_probs, run_validation_set
    from toolkit.preprocess import preprocess_from

    model, meta = load_best(checkpoint)
    data, batch_size = run_validation_set(run_dir, meta)
    with ThreadPoolExecutor(max_workers=4) as pool:
        probs = predict_probs(model, data, preprocess_from(meta.preprocess), batch_size, pool)
    return float((torch.from_numpy(probs).argmax(1) == data.labels).double().mean()), meta


def average_run(run_dir: str | Path, console: Console | None = None) -> dict:
    """Average checkpoints/top/ into checkpoints/average, evaluate it and checkpoints/best; returns the figures."""
    run_dir, console = Path(run_dir), console or Console(soft_wrap=True)
    entries = TopDir(run_dir).entries()
    if not entries:
        raise ToolkitError(f"{run_dir}: no checkpoints under checkpoints/top/ to average; train the run with "
                           f"train.save_top_k: K (K of 2 or more)")
    metas = [meta for _, meta in entries]
    if len({(m.model.name, str(m.model.args), m.num_classes) for m in metas}) > 1:
        raise ToolkitError(f"{run_dir}: checkpoints/top/ holds checkpoints of different models; cannot average them")
    states = [torch.load(path / WEIGHTS, map_location="cpu", weights_only=True) for path, _ in entries]
    epochs = [m.epoch for m in metas]
    meta = metas[0].model_copy(update={"epoch": max(e or 0 for e in epochs), "val_acc": None, "averaged_epochs": epochs})
    keeper = Keeper(run_dir)
    written = keeper.save_weights(AVERAGE, average_states(states), meta, step=0)
    (average_acc, _), (best_acc, best_meta) = val_accuracy(run_dir, written), val_accuracy(run_dir, keeper.dir / "best")
    better = average_acc > best_acc
    console.print(f"averaged {len(states)} checkpoint{'s' * (len(states) > 1)} of checkpoints/top/ (epochs "
                  f"{', '.join(map(str, epochs))}) into {keeper.dir / AVERAGE} ({written.name}): val acc "
                  f"{average_acc:.2%}, checkpoints/best (epoch {best_meta.epoch}) {best_acc:.2%}: "
                  + ("the average is better" if better else "the average is not better; checkpoints/best stays the one to serve"),
                  highlight=False)
    return {"average": str(written), "epochs": epochs, "val_acc": average_acc, "best_val_acc": best_acc,
            "best_epoch": best_meta.epoch, "better": better}
