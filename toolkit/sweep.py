"""A sweep: the points of a grid (`--grid optim.lr=1e-3,3e-4`) or of random draws (`--random 8` with
`optim.lr=log_uniform(1e-4,1e-2)`), every one validated before anything runs, each a run named from its
values under one sweep directory, and sweep.json there: the points, how to train each, and their state.
How the points are run (here, one process each, or as a Slurm job array) is toolkit/sweep_launch.py.
Torch-free, like config.py."""

from __future__ import annotations

import fcntl
import itertools
import json
import math
import os
import random
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from toolkit.config_io import load_config, resolve_config_path
from toolkit.errors import ConfigError, ToolkitError
from toolkit.rundir import RunDir

SWEEP_FILE = "sweep.json"
STATES = ("pending", "running", "done", "stopped", "failed")  # stopped: saved mid-run, resumes on a rerun
RANGE = re.compile(r"^(log_uniform|uniform|int_uniform)\(\s*([^,]+?)\s*,\s*([^,]+?)\s*\)$")


@dataclass
class Axis:
    """One swept key: its values (a grid's, or a random choice among them) or a range to draw from."""
    key: str
    values: list[str]
    kind: str = "list"  # list, or a RANGE function name
    low: float = 0.0
    high: float = 0.0

    def draw(self, rng: random.Random) -> str:
        if self.kind == "list":
            return rng.choice(self.values)
        if self.kind == "log_uniform":
            return f"{math.exp(rng.uniform(math.log(self.low), math.log(self.high))):.3g}"
        if self.kind == "int_uniform":
            return str(rng.randint(int(self.low), int(self.high)))
        return f"{rng.uniform(self.low, self.high):.3g}"


def parse_axis(spec: str) -> Axis:
    """'optim.lr=1e-3,3e-4' or 'optim.lr=log_uniform(1e-4,1e-2)' -> Axis; a ConfigError says what is allowed."""
    key, sep, raw = spec.partition("=")
    key, raw = key.strip(), raw.strip()
    if not sep or not key or not raw:
        raise ConfigError([f"--grid {spec!r}: expected KEY=V1,V2,... or KEY=log_uniform(LOW,HIGH) "
                           "(also uniform, int_uniform), e.g. --grid optim.lr=1e-3,3e-4"])
    found = RANGE.match(raw)
    if not found:
        values = [v.strip() for v in raw.split(",")]
        if any(not v for v in values) or len(set(values)) != len(values):
            raise ConfigError([f"--grid {spec!r}: values must be distinct and not empty"])
        return Axis(key, values)
    kind, low, high = found.groups()
    try:
        lo, hi = float(low), float(high)
    except ValueError:
        raise ConfigError([f"--grid {spec!r}: {kind}'s bounds must be numbers"]) from None
    if not lo < hi or (kind == "log_uniform" and lo <= 0):
        raise ConfigError([f"--grid {spec!r}: {kind} needs LOW < HIGH{' and LOW > 0' if kind == 'log_uniform' else ''}"])
    return Axis(key, [], kind, lo, hi)


def short_names(keys: list[str]) -> dict[str, str]:
    """The last part of each dotted key (optim.lr -> lr), the whole key where two would clash."""
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last)}


def points(axes: list[Axis], random_count: int | None = None, seed: int = 0) -> list[dict[str, str]]:
    """Every combination of the axes (a grid), or `random_count` seeded draws. Values stay as typed, so a
    run's name is what it trained with."""
    ranged = [a.key for a in axes if a.kind != "list"]
    if random_count is None:
        if ranged:
            raise ConfigError([f"--grid {ranged[0]}: a range is drawn from, not listed: add --random N"])
        return [dict(zip([a.key for a in axes], combo)) for combo in itertools.product(*(a.values for a in axes))]
    rng = random.Random(seed)
    drawn: list[dict[str, str]] = []
    for _ in range(100 * random_count):  # distinct draws: a small choice list may repeat
        point = {a.key: a.draw(rng) for a in axes}
        if point not in drawn:
            drawn.append(point)
        if len(drawn) == random_count:
            break
    return drawn


def run_name(point: dict[str, str]) -> str:
    """lr=3e-4,batch_size=64: the run directory's name."""
    short = short_names(list(point))
    return ",".join(f"{short[k]}={v}" for k, v in point.items())


def plan(config: str, overrides: list[str], grid: list[str], random_count: int | None = None, seed: int = 0,
         out: str | None = None) -> dict:
    """sweep.json's content for a new sweep: every point validated first (all problems reported together,
    naming the run), nothing written."""
    if not grid:
        raise ToolkitError("toolkit sweep needs at least one --grid KEY=V1,V2,...")
    if random_count is not None and random_count < 1:
        raise ToolkitError(f"--random {random_count}: give a number of runs, 1 or more")
    axes = [parse_axis(spec) for spec in grid]
    keys = [a.key for a in axes]
    if len(set(keys)) != len(keys):
        raise ConfigError([f"--grid: {k} is given twice" for k in sorted({k for k in keys if keys.count(k) > 1})])
    clash = [k for k in keys if k in ("train.run_name", "train.output_dir", "train.resume", "train.overwrite")]
    if clash:
        raise ConfigError([f"--grid {clash[0]}: the sweep names its runs and their directory itself"])
    base = load_config(config, overrides)  # the config itself first: one message, not one per point
    sweep_dir = Path(out) if out else Path(base.train.output_dir) / f"{base.train.run_name or 'run'}-sweep"
    runs, problems, bad = [], [], 0
    for point in points(axes, random_count, seed):
        name = run_name(point)
        sets = [*overrides, *(f"{k}={v}" for k, v in point.items())]
        try:
            load_config(config, [*sets, f"train.output_dir={sweep_dir}", f"train.run_name={name}"])
        except ConfigError as exc:
            problems += [f"run {name}: {line}" for line in exc.problems]
            bad += 1
            continue
        runs.append({"name": name, "values": point, "overrides": sets, "state": "pending"})
    if problems:
        raise ConfigError(problems + [f"nothing was started: {bad} of {bad + len(runs)} runs are not valid"])
    return {"config": str(resolve_config_path(config).resolve()), "dir": str(sweep_dir.resolve()),
            "keys": keys, "random": random_count, "seed": seed, "runs": runs}


class Sweep:
    """A sweep directory and its sweep.json; every change is a locked read-modify-write, so the tasks of a
    job array (on nodes sharing the directory) may record their states at the same time."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.file = self.path / SWEEP_FILE

    def exists(self) -> bool:
        return self.file.is_file()

    def read(self) -> dict:
        if not self.file.is_file():
            raise ToolkitError(f"{self.path}: no {SWEEP_FILE}; is this a sweep directory (made by toolkit sweep)?")
        try:
            return json.loads(self.file.read_text())
        except json.JSONDecodeError as exc:
            raise ToolkitError(f"{self.file}: not valid JSON: {exc}") from None

    @contextmanager
    def _locked(self):
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.path / ".sweep.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def create(self, planned: dict) -> dict:
        """Write a new sweep.json, or return the existing one (a rerun) if it plans the same runs."""
        with self._locked():
            if self.file.is_file():
                old = self.read()
                if [r["overrides"] for r in old["runs"]] != [r["overrides"] for r in planned["runs"]] \
                        or old["config"] != planned["config"]:
                    raise ToolkitError(f"{self.path} holds another sweep (its {SWEEP_FILE} lists other runs or "
                                       "another config): rerun it as it was started, or give --out NEW_DIR")
                return old
            self._write(planned)
            return planned

    def update(self, name: str, **fields) -> None:
        with self._locked():
            data = self.read()
            for run in data["runs"]:
                if run["name"] == name:
                    run.update(fields)
            self._write(data)

    def set_meta(self, **fields) -> None:
        with self._locked():
            self._write({**self.read(), **fields})

    def _write(self, data: dict) -> None:
        tmp = self.file.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2))
        tmp.replace(self.file)

    def run_dirs(self) -> list[Path]:
        return [self.path / r["name"] for r in self.read()["runs"]]

    def states(self) -> list[tuple[dict, str]]:
        """Each run with its state: done when its run directory says it finished, else as recorded, except
        that a run recorded as running whose process (on this host) is gone was stopped (a SIGKILL, say)."""
        return [(run, "done" if RunDir(self.path / run["name"]).is_finished() else
                 "stopped" if run.get("state") == "running" and _gone(run) else run.get("state", "pending"))
                for run in self.read()["runs"]]


def _gone(run: dict) -> bool:
    if run.get("host") != os.uname().nodename or not run.get("pid"):
        return False  # another machine's process: not ours to see
    try:
        os.kill(run["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def status_table(sweep: Sweep):
    """`toolkit sweep --status DIR`: a rich Table of the points and their states, and the counts."""
    from rich.table import Table

    data, states = sweep.read(), sweep.states()
    table = Table(title=f"sweep {sweep.path} ({len(states)} runs)")
    for column in ("run", "state", "epochs", "best val acc", "where"):
        table.add_column(column)
    for run, state in states:
        summary = RunDir(sweep.path / run["name"]).read_summary() or {}
        epochs = f"{summary.get('epochs_completed', 0)}/{summary.get('epochs', '?')}" if summary else "-"
        acc = f"{summary['best_val_acc']:.2%}" if "best_val_acc" in summary else "-"
        table.add_row(run["name"], state, epochs, acc, str(run.get("job") or run.get("pid") or ""))
    counts = {s: sum(1 for _, st in states if st == s) for s in STATES}
    line = ", ".join(f"{n} {s}" for s, n in counts.items() if n) + (f"; slurm job {data['slurm_job']}"
                                                                  if data.get("slurm_job") else "")
    return table, line
