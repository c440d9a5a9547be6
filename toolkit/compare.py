"""`toolkit compare RUN_OR_SWEEP...`: runs side by side. The config values that differ between them, their
best and final validation accuracy, best epoch, training images/s, wall time and status, sorted by best
accuracy (a rich table, or JSON); and compare.png, every run's validation accuracy and loss per epoch
overlaid, each line labelled by its differing values. Reads only what runs wrote (toolkit/rundir.py)."""

from __future__ import annotations

import json
from pathlib import Path

from toolkit.errors import ToolkitError
from toolkit.resume import INVOCATION, leaves
from toolkit.rundir import RunDir
from toolkit.sweep import SWEEP_FILE, Sweep, short_names

PICTURE = "compare.png"
IGNORED = (*INVOCATION, "train.log_with")  # how a run was invoked or logged, not what it trained


def collect_runs(paths: list[Path]) -> list[Path]:
    """Run directories: each path given, or the runs of a sweep directory (sweep.json's, in its order)."""
    runs: list[Path] = []
    for path in paths:
        if (path / SWEEP_FILE).is_file():
            runs += [d for d in Sweep(path).run_dirs() if RunDir(d).config_file.is_file()]
        elif RunDir(path).config_file.is_file():
            runs.append(path)
        else:
            raise ToolkitError(f"{path}: neither a run directory (no config.yaml) nor a sweep directory "
                               f"(no {SWEEP_FILE})")
    if not runs:
        raise ToolkitError(f"nothing to compare in {', '.join(map(str, paths))}: no run has started yet")
    return list(dict.fromkeys(runs))


def read_run(run_dir: Path) -> dict:
    layout = RunDir(run_dir)
    history = [json.loads(line) for line in layout.metrics_file.read_text().splitlines() if line.strip()] \
        if layout.metrics_file.is_file() else []
    summary = layout.read_summary() or {}
    best = max(history, key=lambda m: m["val_acc"]) if history else None  # first on ties, like the run's own
    status = summary.get("status") or ("running or stopped" if history else "not started")
    return {"run": str(run_dir), "name": run_dir.name, "config": leaves(layout.load_config().to_dict()),
            "history": history, "status": status,
            "best_val_acc": best["val_acc"] if best else None, "best_epoch": best["epoch"] if best else None,
            "final_val_acc": history[-1]["val_acc"] if history else None,
            "epochs": len(history),
            "images_per_s": sum(m["images_per_s"] for m in history) / len(history) if history else None,
            "wall_s": summary.get("wall_s", sum(m.get("epoch_s", 0) for m in history) if history else None)}


def differing_keys(runs: list[dict]) -> list[str]:
    """Config keys whose values are not the same in every run (in config order)."""
    keys = [k for k in runs[0]["config"] if k not in IGNORED]
    keys += [k for r in runs[1:] for k in r["config"] if k not in keys and k not in IGNORED]
    return [k for k in keys if len({json.dumps(r["config"].get(k)) for r in runs}) > 1]


def compare(paths: list[Path]) -> dict:
    runs = [read_run(d) for d in collect_runs(paths)]
    keys = differing_keys(runs) if len(runs) > 1 else []
    short = short_names(keys)
    for run in runs:
        run["values"] = {k: run["config"].get(k) for k in keys}
        run["label"] = ", ".join(f"{short[k]}={_show(v)}" for k, v in run["values"].items()) or run["name"]
    runs.sort(key=lambda r: -1 if r["best_val_acc"] is None else r["best_val_acc"], reverse=True)
    return {"differing": keys, "runs": runs}


def _show(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _pct(value) -> str:
    return "-" if value is None else f"{value:.2%}"


def table(result: dict):
    from rich.table import Table

    short = short_names(result["differing"])
    out = Table(title=f"{len(result['runs'])} runs, best validation accuracy first")
    out.add_column("run")
    for key in result["differing"]:
        out.add_column(short[key])
    for column in ("best val acc", "final val acc", "best epoch", "images/s", "wall", "status"):
        out.add_column(column, justify="right" if column != "status" else "left")
    for run in result["runs"]:
        out.add_row(run["name"], *(_show(v) for v in run["values"].values()), _pct(run["best_val_acc"]),
                    _pct(run["final_val_acc"]), str(run["best_epoch"] or "-"),
                    "-" if run["images_per_s"] is None else f"{run['images_per_s']:,.0f}",
                    "-" if run["wall_s"] is None else f"{run['wall_s']:.1f} s", run["status"])
    return out


def figure(result: dict):
    """Validation accuracy (%) and loss per epoch, one line per run: a colour and a marker of its own, and
    its differing values as its label in the legend below the panels."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 5.2), layout="constrained")
    acc_ax, loss_ax = fig.subplots(1, 2)
    colours = [f"C{i}" for i in range(10)]
    markers = "osD^vP*Xh<>p"
    styles = ("-", "--", "-.", ":")
    for i, run in enumerate(result["runs"]):
        epochs = [m["epoch"] for m in run["history"]]
        style = dict(color=colours[i % 10], marker=markers[i % len(markers)], linestyle=styles[(i // 10) % 4],
                     markersize=5, linewidth=1.6)
        label = f"{run['label']} (best {_pct(run['best_val_acc'])})"
        acc_ax.plot(epochs, [m["val_acc"] * 100 for m in run["history"]], label=label, **style)
        loss_ax.plot(epochs, [m["val_loss"] for m in run["history"]], **style)
    for ax, title in ((acc_ax, "Validation accuracy (%)"), (loss_ax, "Validation loss")):
        ax.set_title(title)
        ax.set_xlabel("Epoch")
        ax.grid(True, alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    longest = max(len(line.get_label()) for line in acc_ax.get_lines())
    columns = max(1, min(len(result["runs"]), int(1100 // (7.5 * longest + 50))))  # as many as fit the width
    fig.legend(loc="outside lower center", ncols=columns, fontsize=9,
               title=", ".join(result["differing"]) or None)
    return fig


def compare_command(paths: list[Path], as_json: bool = False, out: Path | None = None) -> dict:
    result = compare(paths)
    if as_json:
        print(json.dumps({"differing": result["differing"],
                          "runs": [{k: v for k, v in r.items() if k != "config"} for r in result["runs"]]}, indent=2))
        return result
    from rich.console import Console

    Console(width=160).print(table(result))
    if out is None:
        sweeps = [p for p in paths if (p / SWEEP_FILE).is_file()]
        out = (sweeps[0] if len(sweeps) == 1 else Path.cwd()) / PICTURE
    elif out.suffix.lower() != ".png":  # a directory, existing or not
        out = out / PICTURE
    out.parent.mkdir(parents=True, exist_ok=True)
    figure(result).savefig(out, dpi=100)
    print(f"curves of {len(result['runs'])} runs: {out}")
    result["picture"] = str(out)
    return result
