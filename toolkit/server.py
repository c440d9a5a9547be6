"""TorchServe process control: start an instance and wait until its models answer, stop it leaving
no process behind, report its state, send it images. Each instance owns a state directory
(config.properties, logs/, tmp/, key_file.json, info.json) and five ports from its inference port."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
from contextlib import suppress
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

import psutil  # a dependency of torchserve, whose launcher uses it the same way

from toolkit.client import HOST, parse_json, request
from toolkit.errors import ToolkitError
from toolkit.serve_files import instance_env, log_tail, state_dir_for, write_ts_config

TS_MAIN = "org.pytorch.serve.ModelServer"
SERVICES = ("inference", "management", "metrics", "grpc_inference", "grpc_management")  # port + 0..4
TOKEN_KINDS = {"inference": "inference", "management": "management", "api": "API"}
WORKER_DIED = "Backend worker process died"  # logged by ts/model_service_worker.py
MAX_WORKER_DEATHS = 2  # TorchServe restarts a worker that fails to load forever, with back-off
MAX_SOCKET_PATH = 100  # AF_UNIX paths are limited to 107 bytes


@dataclass
class ServerInfo:
    """One TorchServe instance as start_server left it (also saved as STATE/info.json)."""

    port: int
    state_dir: Path
    model_store: Path
    models: list[str] = field(default_factory=list)
    pid: int | None = None

    @property
    def ports(self) -> dict[str, int]:
        return {service: self.port + i for i, service in enumerate(SERVICES)}

    inference_url = property(lambda self: f"http://{HOST}:{self.port}")
    management_url = property(lambda self: f"http://{HOST}:{self.port + 1}")
    metrics_url = property(lambda self: f"http://{HOST}:{self.port + 2}/metrics")

    def predictions_url(self, model: str | None = None) -> str:
        return f"{self.inference_url}/predictions/{model or self.models[0]}"


def _bin(name: str) -> str:
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.is_file() else shutil.which(name)
    if not found:
        raise ToolkitError(f"{name} not found next to {sys.executable} nor on PATH: pip install torchserve")
    return found


# ---------------------------------------------------------------- processes


def _server_pid(state_dir: Path) -> int | None:
    """The java frontend's pid from the launcher's pid file, if that process still runs."""
    try:
        pid = int((state_dir / "tmp" / ".model_server.pid").read_text().split()[0])
        process = psutil.Process(pid)
        running = TS_MAIN in process.cmdline() and process.status() != psutil.STATUS_ZOMBIE
        return pid if running else None
    except (OSError, ValueError, IndexError, psutil.Error):
        return None


def instance_processes(state_dir: Path) -> list[psutil.Process]:
    """The frontend, its workers and any orphaned worker: every process naming STATE/tmp
    (java has -Djava.io.tmpdir=STATE/tmp, workers --sock-name STATE/tmp/.ts.sock.N)."""
    marker, found = str(state_dir / "tmp"), {}
    pid = _server_pid(state_dir)
    if pid is not None:
        with suppress(psutil.Error):
            parent = psutil.Process(pid)
            found = {p.pid: p for p in [parent, *parent.children(recursive=True)]}
    for proc in psutil.process_iter(["cmdline"]):
        if any(marker in part for part in proc.info["cmdline"] or []):
            found.setdefault(proc.pid, proc)
    found.pop(os.getpid(), None)
    return list(found.values())


def read_token(port: int, kind: str = "inference", state_root: str | Path | None = None, renew: bool = True) -> str:
    """A key from the instance's key_file.json: kind is inference, management or api.

    Inference and management keys expire (token_expiration_min); an expired one is renewed with
    the API key through the management API, which rewrites key_file.json."""
    name = TOKEN_KINDS.get(kind.lower())
    if name is None:
        raise ToolkitError(f"token kind {kind!r}: use one of {', '.join(TOKEN_KINDS)}")
    path = state_dir_for(port, state_root) / "key_file.json"
    try:
        keys = json.loads(path.read_text())
        entry, expires = keys[name], keys[name].get("expiration time")
        # "2026-11-23T19:11:59.467267168Z": nanoseconds, which fromisoformat refuses; seconds suffice
        if renew and expires and datetime.fromisoformat(expires[:19] + "+00:00") < _now() + timedelta(seconds=30):
            request(f"http://{HOST}:{port + 1}/token?type={name}", keys["API"]["key"], timeout=10)
            entry = json.loads(path.read_text())[name]
        return entry["key"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise ToolkitError(f"no {kind} key in {path}: is a server running on port {port}?") from None


def _now() -> datetime:
    return datetime.now(timezone.utc)


def curl_example(info: ServerInfo, image: str | Path, model: str | None = None) -> str:
    """A curl command line that sends `image` to the server, with its inference token."""
    header = "Authorization: Bearer " + read_token(info.port, "inference", info.state_dir.parent)
    return f"curl -sS -T {shlex.quote(str(image))} -H {shlex.quote(header)} {info.predictions_url(model)}"


# ---------------------------------------------------------------- status


def _model_states(info: ServerInfo, token: str, names: list[str] | None = None) -> dict[str, list[str]]:
    """{model: [worker status, ...]} from the management API ([] while a model is not registered)."""
    if names is None:  # every registered model
        status, text = request(f"{info.management_url}/models", token, timeout=5)
        names = [m["modelName"] for m in (parse_json(text) if status == 200 else {}).get("models", [])]
    states = {}
    for name in names:
        status, text = request(f"{info.management_url}/models/{name}", token, timeout=5)
        described = parse_json(text) if status == 200 else []
        states[name] = [w.get("status", "?") for d in described if isinstance(d, dict) for w in d.get("workers", [])]
    return states


def _healthy(info: ServerInfo, token: str) -> bool:
    with suppress(OSError):
        status, text = request(f"{info.inference_url}/ping", token, timeout=5)  # 0.12: /ping needs the key
        answer = parse_json(text)
        return status == 200 and isinstance(answer, dict) and answer.get("status") == "Healthy"
    return False


def load_info(port: int, state_root: str | Path | None = None) -> ServerInfo:
    state_dir = state_dir_for(port, state_root)
    with suppress(OSError, ValueError, KeyError):
        raw = json.loads((state_dir / "info.json").read_text())
        return ServerInfo(port, Path(raw["state_dir"]), Path(raw["model_store"]), list(raw["models"]), raw.get("pid"))
    return ServerInfo(port, state_dir, state_dir)


def server_status(port: int, state_root: str | Path | None = None) -> dict:
    """{"port", "state_dir", "running", "pid", "healthy", "models": {name: [worker status]}, "error"}."""
    info = load_info(port, state_root)
    pid = _server_pid(info.state_dir)
    status = {"port": port, "state_dir": str(info.state_dir), "running": pid is not None, "pid": pid,
              "healthy": False, "models": {}, "error": None}
    if pid is not None:
        try:
            status["models"] = _model_states(info, read_token(port, "management", state_root))
            status["healthy"] = _healthy(info, read_token(port, "inference", state_root))
        except (ToolkitError, OSError) as exc:
            status["error"] = str(exc)
    return status


# ---------------------------------------------------------------- start / stop


def _resolve_models(model_store: Path, models: str | list[str]) -> list[str]:
    available = sorted(p.stem for p in model_store.glob("*.mar"))
    if models == "all":
        if not available:
            raise ToolkitError(f"{model_store}: no .mar archives to serve (build one with `toolkit archive`)")
        return available
    names = [m.strip() for m in (models.split(",") if isinstance(models, str) else models) if m.strip()]
    missing = [n for n in names if n not in available]
    if missing or not names:
        raise ToolkitError(f"{model_store}: no archive {', '.join(f'{n}.mar' for n in missing) or 'named'}; "
                           f"available: {', '.join(available) or 'none'}")
    return names


def _prepare_state(state_dir: Path, port: int) -> None:
    """Refuse a running instance, a too-long path or a busy port; then clear the last run's files."""
    if instance_processes(state_dir):
        raise ToolkitError(f"a TorchServe instance already runs from {state_dir} (port {port}); "
                           f"stop it first (toolkit serve stop --port {port})")
    if len(str(state_dir / "tmp" / ".ts.sock.9000")) > MAX_SOCKET_PATH:
        raise ToolkitError(f"state directory {state_dir} is too long for TorchServe's unix sockets; "
                           f"choose a shorter state root")
    busy = []
    for offset, service in enumerate(SERVICES):
        with socket.socket() as probe:
            try:
                probe.bind((HOST, port + offset))
            except OSError:
                busy.append(f"{port + offset} ({service})")
    if busy:
        raise ToolkitError(f"port {', '.join(busy)} on {HOST} already in use; a server on port {port} "
                           f"needs {port}..{port + 4} free: choose another port")
    for stale in ("tmp", "logs"):  # unpacked models, sockets, pid file and logs of the last run
        shutil.rmtree(state_dir / stale, ignore_errors=True)
        (state_dir / stale).mkdir(parents=True)
    (state_dir / "key_file.json").unlink(missing_ok=True)


def start_server(model_store: str | Path, port: int = 8080, models: str | list[str] = "all",
                 state_root: str | Path | None = None, timeout: float = 120) -> ServerInfo:
    """Start TorchServe in the background and wait until every model's workers are READY."""
    model_store = Path(model_store).expanduser().resolve()
    if not model_store.is_dir():
        raise ToolkitError(f"model store {model_store} is not a directory")
    if shutil.which("java") is None and not os.environ.get("JAVA_HOME"):
        raise ToolkitError("java not found: TorchServe needs a Java 17 runtime on PATH (or JAVA_HOME)")
    names = _resolve_models(model_store, models)
    state_dir = state_dir_for(port, state_root)
    state_dir.mkdir(parents=True, exist_ok=True)
    _prepare_state(state_dir, port)
    config = write_ts_config(state_dir, port, model_store)
    command = [_bin("torchserve"), "--start", "--ncs", "--ts-config", str(config), "--model-store", str(model_store),
               "--models", *[f"{n}={n}.mar" for n in names]]
    info = ServerInfo(port, state_dir, model_store, names)
    try:
        # java inherits the launcher's stdout: a file, never a pipe, which would stay open until java exits
        with open(state_dir / "logs" / "console.log", "wb") as console:
            launched = subprocess.run(command, cwd=state_dir, env=instance_env(state_dir), stdout=console,
                                      stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        if launched.returncode != 0:
            raise ToolkitError(f"torchserve --start failed (exit {launched.returncode}):\n{log_tail(state_dir)}")
        info.pid = wait_ready(info, timeout)
    except BaseException:  # including Ctrl-C: never leave a half-started server behind
        stop_server(port, state_root)
        raise
    (state_dir / "info.json").write_text(json.dumps({**asdict(info), "state_dir": str(state_dir),
                                                     "model_store": str(model_store)}, indent=2))
    return info


def wait_ready(info: ServerInfo, timeout: float) -> int:
    """Poll until /ping is Healthy and every model has all its workers READY; returns the java pid."""
    deadline = time.monotonic() + timeout
    states: dict[str, list[str]] = {}
    while time.monotonic() < deadline:
        pid = _server_pid(info.state_dir)  # written by the launcher before it returned
        if pid is None:
            raise ToolkitError(f"TorchServe on port {info.port} exited during start-up:\n{log_tail(info.state_dir)}")
        model_log = info.state_dir / "logs" / "model_log.log"
        deaths = model_log.read_text(errors="replace").count(WORKER_DIED) if model_log.is_file() else 0
        if deaths >= MAX_WORKER_DEATHS:
            raise ToolkitError(f"TorchServe on port {info.port}: a worker died {deaths} times while loading its "
                               f"model (traceback in model_log.log):\n{log_tail(info.state_dir)}")
        with suppress(ToolkitError, OSError):  # not listening yet, or no key_file.json yet
            states = _model_states(info, read_token(info.port, "management", info.state_dir.parent), info.models)
            ready = all(s and all(w == "READY" for w in s) for s in states.values())
            if ready and _healthy(info, read_token(info.port, "inference", info.state_dir.parent)):
                return pid
        time.sleep(0.5)
    raise ToolkitError(f"TorchServe on port {info.port} not ready after {timeout:g} s (workers: {states or 'none'}):\n"
                       f"{log_tail(info.state_dir)}")


def stop_server(port: int, state_root: str | Path | None = None, timeout: float = 60) -> bool:
    """Stop the instance and make sure none of its processes remain; False if nothing ran."""
    state_dir = state_dir_for(port, state_root)
    processes = instance_processes(state_dir)
    if not processes:
        return False
    if _server_pid(state_dir) is not None:
        # The launcher finds the pid file through TMPDIR and SIGTERMs java, which stops its workers.
        subprocess.run([_bin("torchserve"), "--stop"], cwd=state_dir, env=instance_env(state_dir),
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, timeout=timeout)
    _, alive = psutil.wait_procs(processes, timeout=timeout)
    # A stuck frontend, or a worker that was restarting while java stopped: signal them directly.
    alive = list({p.pid: p for p in [*alive, *instance_processes(state_dir)]}.values())
    for signal_name in ("terminate", "kill"):
        for proc in alive:
            with suppress(psutil.Error):
                getattr(proc, signal_name)()
        _, alive = psutil.wait_procs(alive, timeout=5)
    if alive:
        raise ToolkitError(f"could not stop TorchServe processes {[p.pid for p in alive]} of {state_dir}")
    for leftover in ("tmp/.model_server.pid", "key_file.json"):
        (state_dir / leftover).unlink(missing_ok=True)
    return True
