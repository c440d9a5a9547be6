"""What a resume may change. A resumed run starts from its own config.yaml (the command line need not
repeat how the run began); `--set` may change the keys that do not alter what the checkpoint holds
(RESUMABLE: applied, printed and kept in the run's resumes.jsonl) and is refused for the others, with the
way to get the change. A run directory never records what did not happen. Torch-free, like config.py."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, NamedTuple

from pydantic import BaseModel, ValidationError

from toolkit.config import RunConfig
from toolkit.config_io import merge_command_line, read_command_line, validate
from toolkit.errors import ConfigError, ToolkitError
from toolkit.rundir import RunDir

# Keys --set may change when a run resumes: how long it goes on, how it reports, where its data is read
# from, how fast it runs, and serving settings. Everything else shaped the weights, the optimizer or the
# schedule in checkpoints/last, or the data stream the run is part-way through.
RESUMABLE = (
    "train.epochs", "train.patience", "train.log_every", "train.log_every_s",
    "train.log_with", "train.tracker_project", "train.num_threads", "train.compile", "train.checkpoint_every", "train.preempt_signals",
    "train.collective_timeout_s", "data.root", "data.download", "data.num_workers", "data.skip_bad_samples",
    "data.eval_batch_size", "serve.",
)
# How this invocation starts and how long it goes on (train.stop_after cuts a run into jobs: each job says
# its own), and where the run directory is now (a run moved or copied elsewhere resumes there): taken from
# the command line, never from the run's config, and no change to the run.
INVOCATION = ("train.resume", "train.overwrite", "train.stop_after", "train.output_dir", "train.run_name")


class Change(NamedTuple):
    key: str
    old: Any
    new: Any

    def __str__(self) -> str:
        return f"{self.key}: {self.old!r} -> {self.new!r}"


def resumable(key: str) -> bool:
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in RESUMABLE)


def leaves(tree: dict, model: type[BaseModel] = RunConfig, prefix: str = "") -> dict[str, Any]:
    """Dotted key -> value for every key of the config tree that is not a section."""
    found = {}
    for key, value in tree.items():
        annotation = getattr(model.model_fields.get(str(key)), "annotation", None)
        if isinstance(value, dict) and isinstance(annotation, type) and issubclass(annotation, BaseModel):
            found.update(leaves(value, annotation, f"{prefix}{key}."))
        else:
            found[f"{prefix}{key}"] = value
    return found


def _get(tree: dict, key: str) -> Any:
    for part in key.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return None
        tree = tree[part]
    return tree


def _with(tree: dict, key: str, value: Any) -> dict:
    tree = copy.deepcopy(tree)
    node = tree
    *parents, last = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value
    return tree


def _as_validated(base: dict, key: str, value: Any) -> Any:
    """`value` as the config holds it (YAML's 1e-3 and 0.001 alike, null resolved), where it validates."""
    try:
        return _get(RunConfig.model_validate(_with(base, key, value)).resolved().to_dict(), key)
    except ValidationError:
        return value


def config_changes(old: RunConfig, new: RunConfig) -> list[Change]:
    """Every key whose resolved value differs between two configs."""
    before, after = leaves(old.resolved().to_dict()), leaves(new.resolved().to_dict())
    return [Change(k, before.get(k), v) for k, v in after.items() if k not in INVOCATION and before.get(k) != v]


def refuse(changes: list[Change], run_dir: Path, origin: str = "--set") -> None:
    """A ConfigError naming every change a resume cannot make, and what to do instead."""
    frozen = [c for c in changes if not resumable(c.key)]
    if not frozen:
        return
    lines = [f"{origin}: {c}: cannot change when {run_dir} resumes: checkpoints/last holds the weights, "
             "optimizer, schedule and data position of the old value" for c in frozen]
    best = Path(run_dir) / "checkpoints" / "best" / "weights.pt"
    lines.append(f"to train with {'these values' if len(frozen) > 1 else 'it'}, start a new run from this one's "
                 f"weights: --set train.run_name=NEW --set model.pretrained_weights={best} (without --resume). "
                 f"A resume can change: {', '.join(k + '*' if k.endswith('.') else k for k in RESUMABLE)}")
    raise ConfigError(lines)


def load_resume_config(path: str | Path | None, overrides: list[str],
                       run_dir: str | Path | None = None) -> tuple[RunConfig, list[str]]:
    """The config a resume runs with: the run directory's config.yaml with the command line's --set
    changes that a resume may make (others refused). `run_dir` is the run, or None for the one the config
    file and --set name. Returns the config and notes for the start-up lines (differences of the config
    file from the run's own, which the resume ignores). A directory without config.yaml starts afresh."""
    raw, extra, label, source = read_command_line(path, overrides)
    merged = merge_command_line(raw, extra, source)
    if run_dir is None:
        train = merged.get("train") if isinstance(merged.get("train"), dict) else {}
        run_dir = Path(train.get("output_dir") or "runs") / (train.get("run_name") or "run")
    run_dir = Path(run_dir)
    layout = RunDir(run_dir)
    if not layout.config_file.is_file():
        if path is None:
            raise ToolkitError(f"{run_dir}: nothing to resume there (no {layout.config_file.name}); "
                               "give the run directory of a run, or --config to start one")
        return validate(_with(merged, "train.resume", True), label, set(leaves(extra))), []
    base = layout.load_config().resolved().to_dict()
    from_set = leaves(extra)
    differing = {key: (value, now) for key, value in {**leaves(raw), **from_set}.items()
                 if key not in INVOCATION and (now := _as_validated(base, key, value)) != _get(base, key)}
    changes = [Change(k, _get(base, k), now) for k, (_, now) in differing.items() if k in from_set]
    kept = [f"{k}: {_get(base, k)!r} (the run's; {label} says {value!r})"
            for k, (value, _) in differing.items() if k not in from_set]
    refuse(changes, run_dir)
    tree = _with(_with(base, "train.output_dir", str(run_dir.parent)), "train.run_name", run_dir.name)
    tree = _with(tree, "train.stop_after", _get(merged, "train.stop_after"))
    # how the run was started, not what it is: a run begun with train.overwrite (over an older run) resumes
    tree = _with(tree, "train.overwrite", False)
    for change in changes:
        tree = _with(tree, change.key, _get(extra, change.key))
    cfg = validate(_with(tree, "train.resume", True), "--set", {c.key for c in changes})
    notes = [f"resuming from {layout.config_file}; kept, as the run was started: {'; '.join(kept)}"] if kept else []
    return cfg, notes


def finished(state, cfg: RunConfig) -> str | None:
    """Why a resumed run has nothing left to train (said instead of training), or None."""
    where = cfg.run_dir
    best = f"best val acc {state.best_val_acc:.2%} at epoch {state.best_epoch}"
    if state.epoch >= cfg.train.epochs:
        return (f"{where} is finished: {state.epoch} of {cfg.train.epochs} epochs trained ({best}). To train "
                f"longer: --resume --set train.epochs=N (the learning-rate schedule is re-planned over N)")
    if state.stopped_early:
        return (f"{where} stopped early after epoch {state.epoch}: no better val accuracy for "
                f"{state.bad_epochs} epochs (train.patience {cfg.train.patience}; {best}). To go on: --resume "
                f"--set train.patience=N with N above {state.bad_epochs}, or null")
    return None


def check_resume(changes: list[Change], epochs_done: int, cfg: RunConfig) -> None:
    """Refuse, before anything is loaded, the changes a resume cannot make (also when train() is given a
    config directly, not through load_resume_config)."""
    refuse(changes, cfg.run_dir, origin="resume")
    if any(c.key == "train.epochs" for c in changes):
        if cfg.train.epochs < epochs_done:
            raise ConfigError([f"resume: train.epochs: {cfg.train.epochs} is fewer than the {epochs_done} epochs "
                               f"{cfg.run_dir} has trained; its checkpoints/best is the model to use"])
        if cfg.schedule.name == "onecycle":
            raise ConfigError(["resume: train.epochs: a onecycle schedule's phases are fixed when the run starts; "
                               "start a new run (see above) to train longer with onecycle"])


def wants_resume(path: str | Path | None, overrides: list[str], flag: bool | str) -> bool:
    """--resume, or train.resume: true in the config file or --set."""
    if flag:
        return True
    raw, extra, _, source = read_command_line(path, overrides)
    train = merge_command_line(raw, extra, source).get("train")
    return isinstance(train, dict) and train.get("resume") is True
