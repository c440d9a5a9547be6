"""The TorchServe model archive of a run: RUN/model-store/NAME.mar, built by the
torch-model-archiver CLI from RUN/export (whichever format it holds, and its copy of
toolkit/preprocess.py, which the handler imports from the archive: one definition of the
preprocessing, and no toolkit install needed where the archive is served), serve/handler.py and
the config's serve section, with the serve/ modules the handler loads from beside itself."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import yaml

import toolkit
from toolkit.errors import ToolkitError
from toolkit.export import FORMATS, HANDLER_FILES, export_is_current, export_model, model_file
from toolkit.rundir import RunDir, load_run_config

MODEL_CONFIG = "model-config.yaml"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
VERSION_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
# What a .mar must hold for serve/handler.py to load (extra files are flattened into the root), besides
# the model file of its export format, which the manifest names as its serializedFile.
HANDLER_MODULES = ("loaders.py", "request_body.py", "startup.py")  # serve/ modules beside handler.py, which loads them
REQUIRED_ENTRIES = ("handler.py", *HANDLER_MODULES, *HANDLER_FILES, "MAR-INF/MANIFEST.json", MODEL_CONFIG)


def handler_path() -> Path:
    """serve/handler.py of the repository the toolkit package sits in."""
    path = Path(toolkit.__file__).resolve().parent.parent / "serve" / "handler.py"
    if not path.is_file():
        raise ToolkitError(f"TorchServe handler not found at {path}: archives are built from a checkout of "
                           f"the toolkit repository (pip install -e .), which holds serve/handler.py")
    return path


def archiver_command() -> str:
    """torch-model-archiver of the running interpreter's environment (else the one on PATH)."""
    beside = Path(sys.executable).parent / "torch-model-archiver"
    if beside.is_file():
        return str(beside)
    found = shutil.which("torch-model-archiver")
    if found is None:
        raise ToolkitError(f"torch-model-archiver not found next to {sys.executable} nor on PATH: "
                           f"pip install torch-model-archiver")
    return found


def model_config(run_dir: Path) -> dict:
    """TorchServe's per-model settings (model-config.yaml) from the run config's serve section."""
    serve = load_run_config(run_dir).serve
    config = {
        "minWorkers": serve.min_workers,
        "maxWorkers": serve.max_workers,
        "batchSize": serve.batch_size,
        "maxBatchDelay": serve.max_batch_delay_ms,
        "responseTimeout": serve.response_timeout_s,
    }
    handler = {"profile": True} if serve.profile else {}  # TorchServe's own switch, read by the handler
    if serve.channels_last is not None:
        handler["channels_last"] = serve.channels_last
    if handler:
        config["handler"] = handler
    return config


def check_archive(mar: Path) -> dict:
    """Open the .mar (a zip) and check it holds what the handler needs; returns its manifest."""
    try:
        with zipfile.ZipFile(mar) as archive:
            names = set(archive.namelist())
            missing = [entry for entry in REQUIRED_ENTRIES if entry not in names]
            if not missing:
                manifest = json.loads(archive.read("MAR-INF/MANIFEST.json"))
                serialized = (manifest.get("model") or {}).get("serializedFile")
                model_files = [f.model_file for f in FORMATS.values()]
                if serialized not in model_files or serialized not in names:
                    missing.append(f"a model file ({' or '.join(model_files)}) named by the manifest")
            if missing:
                raise ToolkitError(f"{mar}: archive lacks {', '.join(missing)} (has: {', '.join(sorted(names))})")
            return manifest
    except (zipfile.BadZipFile, OSError) as exc:
        raise ToolkitError(f"{mar}: not a readable model archive: {exc}") from None


def build_archive(run_dir: str | Path, name: str | None = None, version: str = "1.0") -> Path:
    """Build RUN/model-store/NAME.mar (NAME = the run directory's name by default); returns its path.

    Exports first, in the run config's export.format, when RUN/export is missing, incomplete or older
    than checkpoints/best; otherwise packs the format the export holds.
    """
    run_dir = Path(run_dir).resolve()
    name = run_dir.name if name is None else name
    if not NAME_PATTERN.match(name):
        raise ToolkitError(f"archive name {name!r}: use letters, digits, '_' and '-', starting with a letter "
                           f"or digit (it becomes part of the URL /predictions/NAME); pass a name explicitly")
    if not VERSION_PATTERN.match(version):
        raise ToolkitError(f"archive version {version!r}: use letters, digits, '.', '_' and '-', e.g. 1.0")
    handler = handler_path()
    config = model_config(run_dir)  # reads config.yaml first: a clear error before any export work
    export_dir = RunDir(run_dir).export
    if not export_is_current(run_dir):
        export_dir = export_model(run_dir)
    serialized = model_file(export_dir)  # whichever format the export holds
    (export_dir / MODEL_CONFIG).write_text(yaml.safe_dump(config, sort_keys=False))

    store = RunDir(run_dir).model_store
    store.mkdir(parents=True, exist_ok=True)
    command = [
        archiver_command(),
        "--model-name", name,
        "--version", version,
        "--serialized-file", str(serialized),
        "--handler", str(handler),
        "--extra-files", ",".join([*(str(export_dir / f) for f in HANDLER_FILES),
                                   *(str(handler.parent / f) for f in HANDLER_MODULES)]),
        "--config-file", str(export_dir / MODEL_CONFIG),
        "--export-path", str(store),
        "--archive-format", "default",
        "-f",
    ]
    # The archiver stages files in $TMPDIR/<model name> and deletes that directory first and
    # after: with the default /tmp it would wipe a run at /tmp/NAME or a concurrent build of NAME.
    with tempfile.TemporaryDirectory(prefix="toolkit-archive-") as scratch:
        env = {**os.environ, "TMPDIR": scratch, "TEMP": scratch, "TMP": scratch}
        result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        output = (result.stderr.strip() or result.stdout.strip()).splitlines()[-20:]
        raise ToolkitError(f"torch-model-archiver failed (exit {result.returncode}) building {store / name}.mar:\n"
                           + "\n".join(output))
    mar = store / f"{name}.mar"
    if not mar.is_file():
        raise ToolkitError(f"torch-model-archiver reported success but wrote no {mar}")
    check_archive(mar)
    return mar
