"""train.log_with: which of Accelerate's experiment trackers a run logs to, each an optional extra of the
package (`pip install 'toolkit[mlflow]'`), checked before the run starts with a message naming the extra;
and how each is started: named after the toolkit's run, writing under the run directory unless its own
environment variables say otherwise (MLFLOW_TRACKING_URI, WANDB_DIR, WANDB_MODE=offline, ...)."""

from __future__ import annotations

import importlib.util
import os

from toolkit.config import RunConfig
from toolkit.errors import ConfigError

# tracker (as Accelerate names it) -> (module it imports, extra of this package that installs it)
TRACKERS = {"tensorboard": ("tensorboard", "tensorboard"), "mlflow": ("mlflow", "mlflow"),
            "wandb": ("wandb", "wandb"), "aim": ("aim", "aim"), "comet_ml": ("comet_ml", "comet_ml"),
            "clearml": ("clearml", "clearml"), "dvclive": ("dvclive", "dvclive")}
MLRUNS = "mlruns"  # MLflow's file store in the run directory, when MLFLOW_TRACKING_URI names none


def tracker_names(cfg: RunConfig) -> list[str] | None:
    """Accelerator(log_with=...): the trackers asked for, each checked to be installed (all missing ones
    named together, with the extra that installs them), or None for none."""
    missing = [name for name in cfg.train.log_with if importlib.util.find_spec(TRACKERS[name][0]) is None]
    if missing:
        extras = ",".join(TRACKERS[name][1] for name in missing)
        raise ConfigError([f"train.log_with: {name!r} needs the {TRACKERS[name][0]} package, which is not "
                           f"installed" for name in missing] + [f"install it with: pip install 'toolkit[{extras}]' "
                                                               f"(or pip install {' '.join(TRACKERS[n][0] for n in missing)})"])
    return list(cfg.train.log_with) or None


def project_name(cfg: RunConfig) -> str:
    """TensorBoard's subdirectory, MLflow's experiment, W&B's project: train.tracker_project, else the run."""
    return cfg.train.tracker_project or cfg.train.run_name or "run"


def init_kwargs(cfg: RunConfig) -> dict:
    """Accelerator.init_trackers' init_kwargs: each tracker's run named after the toolkit's run, its files
    (where it keeps any locally) under the run directory."""
    name, run_dir = cfg.train.run_name or "run", cfg.run_dir
    kwargs: dict = {}
    if "mlflow" in cfg.train.log_with:
        if not os.environ.get("MLFLOW_TRACKING_URI"):  # MLflow's own default is a file in the working directory
            os.environ["MLFLOW_TRACKING_URI"] = (run_dir / MLRUNS).resolve().as_uri()
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3.x asks for the opt-in
        kwargs["mlflow"] = {"run_name": name}
    if "wandb" in cfg.train.log_with:
        kwargs["wandb"] = {"name": name, "dir": os.environ.get("WANDB_DIR") or str(run_dir)}
    return kwargs  # the others (aim, comet_ml, clearml, dvclive) take the project name and their environment
