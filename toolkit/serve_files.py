"""The files of one TorchServe instance: its state directory (STATE = <state root>/<port>), the
environment that keeps its temporary files and logs there, its config.properties, its logs' tail."""

from __future__ import annotations

import os
import re
from pathlib import Path

from toolkit.client import HOST
from toolkit.errors import ToolkitError

DEFAULT_STATE_ROOT = Path.home() / ".cache" / "toolkit" / "serve"
TEMPLATE = Path(__file__).resolve().parent.parent / "serve" / "config.properties"
METRICS_CONFIG = TEMPLATE.parent / "metrics.yaml"


def state_dir_for(port: int, state_root: str | Path | None = None) -> Path:
    return Path(state_root or DEFAULT_STATE_ROOT).expanduser().resolve() / str(port)


def instance_env(state_dir: Path) -> dict[str, str]:
    """Environment of the launcher, the java frontend and its Python workers for one instance.

    TMPDIR holds the launcher's pid file (tempfile.gettempdir); TEMP becomes java.io.tmpdir, where
    the frontend puts worker sockets and unpacked archives; LOG_LOCATION is read by its log4j2.xml."""
    tmp, logs = str(state_dir / "tmp"), str(state_dir / "logs")
    return {**os.environ, "TMPDIR": tmp, "TEMP": tmp, "TMP": tmp, "LOG_LOCATION": logs, "METRICS_LOCATION": logs}


def write_ts_config(state_dir: Path, port: int, model_store: Path) -> Path:
    """STATE/config.properties: serve/config.properties with this instance's ports and paths."""
    for needed in (TEMPLATE, METRICS_CONFIG):
        if not needed.is_file():
            raise ToolkitError(f"TorchServe config file not found at {needed} (a repository checkout is needed)")
    # allowed_urls is a regex, and .properties values eat one level of backslashes
    allowed = ("file://" + re.escape(str(model_store)) + "/.*").replace("\\", "\\\\")
    values = {"inference_address": f"http://{HOST}:{port}", "management_address": f"http://{HOST}:{port + 1}",
              "metrics_address": f"http://{HOST}:{port + 2}",
              "grpc_inference_address": HOST, "grpc_inference_port": str(port + 3),
              "grpc_management_address": HOST, "grpc_management_port": str(port + 4),
              "model_store": str(model_store), "allowed_urls": allowed, "metrics_config": str(METRICS_CONFIG)}
    lines = []
    for line in TEMPLATE.read_text().splitlines():
        key = line.split("=", 1)[0].strip()
        if "=" in line and not line.lstrip().startswith("#") and key in values:
            line = f"{key}={values.pop(key)}"
        lines.append(line)
    lines += ["", f"# Per instance; logs go to {state_dir / 'logs'} (LOG_LOCATION)"]
    lines += [f"{key}={value}" for key, value in values.items()]
    path = state_dir / "config.properties"
    path.write_text("\n".join(lines) + "\n")
    return path


def log_tail(state_dir: Path, lines: int = 40) -> str:
    """The last lines of ts_log.log and model_log.log (console.log when neither exists)."""
    parts = []
    for name in ("ts_log.log", "model_log.log", "console.log"):
        path = state_dir / "logs" / name
        if path.is_file() and (name != "console.log" or not parts):
            tail = path.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {path} (last {len(tail)} lines)\n" + "\n".join(tail))
    return "\n".join(parts) or f"(no logs in {state_dir / 'logs'})"
