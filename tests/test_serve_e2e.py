"""End to end: train a digit classifier, export, archive, serve it with a real TorchServe on free
ports, classify PNG and JPEG files over HTTP, and leave no server process behind."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import time
import urllib.request
import zipfile
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import psutil
import pytest
import torch
import yaml
from PIL import Image

from toolkit import archive, client, export, server
from toolkit.errors import ToolkitError

from conftest import run_cli

pytestmark = [pytest.mark.serve, pytest.mark.slow]

IMAGE_SIZE = 16
EPOCHS = 6


def train_digits_run(run_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """`toolkit train` on the built-in digits config into run_dir; returns the run's held-out
    validation digits as the original 8x8 uint8 images (N x 1 x 8 x 8) and their labels."""
    from sklearn.datasets import load_digits

    from toolkit.data import split_indices

    result = run_cli("train", "--config", "configs/digits.yaml", "--set", f"train.output_dir={run_dir.parent}",
                     "--set", f"train.run_name={run_dir.name}", "--set", f"train.epochs={EPOCHS}",
                     "--set", "serve.batch_size=4", "--set", "serve.max_batch_delay_ms=10", "--set", "serve.topk=3",
                     "--set", "serve.profile=true")
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["best_val_acc"] > 0.8, summary
    digits = load_digits()
    _, val_idx = split_indices(len(digits.target), 0.2, seed=0)  # configs/digits.yaml: val_fraction 0.2, split_seed 0
    images = torch.from_numpy(digits.images * (255 / 16)).round().to(torch.uint8).unsqueeze(1)
    return images[val_idx], torch.from_numpy(digits.target).long()[val_idx]


def free_port_block(size: int = 5) -> int:
    """A port p with p..p+size-1 all free on 127.0.0.1 (TorchServe takes five consecutive ports)."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base = probe.getsockname()[1]
        try:
            with ExitStack() as stack:
                for port in range(base + 1, base + size):
                    stack.enter_context(socket.socket()).bind(("127.0.0.1", port))
            return base
        except (OSError, OverflowError):
            continue
    raise RuntimeError(f"no block of {size} free ports found")


def write_images(folder: Path, images: torch.Tensor, labels: torch.Tensor) -> list[tuple[Path, int]]:
    """The first 10 held-out digits as 8x8 PNGs, the next 10 as 64x64 JPEGs (as a phone would send)."""
    folder.mkdir()
    files = []
    for i in range(20):
        img = Image.fromarray(images[i, 0].numpy())  # uint8 HxW: mode L
        if i < 10:
            path = folder / f"digit{i}.png"
            img.save(path)
        else:
            path = folder / f"digit{i}.jpg"
            img.resize((64, 64), Image.BILINEAR).convert("RGB").save(path, quality=92)
        files.append((path, int(labels[i])))
    return files


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(ServerInfo, token, [(image file, true label)]) of a running server; always stopped after."""
    root = tmp_path_factory.mktemp("e2e")
    run = root / "digits"
    held_images, held_labels = train_digits_run(run)

    out = export.export_torchscript(run)
    assert (out / "parity.json").is_file() and (out / "model.pt").is_file()
    assert json.loads((out / "parity.json").read_text())["max_abs_diff"] <= 1e-4
    assert json.loads((out / "preprocess.json").read_text()) == {
        "channels": 1, "image_size": IMAGE_SIZE, "resize": "resize", "mean": [0.5], "std": [0.5],
        "topk": 3, "max_pixels": 40_000_000, "max_side": 65_535, "preprocess_version": 2}  # version: from meta.json

    mar = archive.build_archive(run)
    assert mar == run / "model-store" / "digits.mar"
    assert set(archive.REQUIRED_ENTRIES) <= set(zipfile.ZipFile(mar).namelist())

    port = free_port_block()
    state_root = root / "state"
    try:
        started = run_cli("serve", "start", "--model-store", str(mar.parent), "--port", str(port),
                          "--state-root", str(state_root))
        assert started.returncode == 0, started.stdout + started.stderr
        assert f"http://127.0.0.1:{port}/predictions/digits" in started.stdout and "Authorization: Bearer" in started.stdout
        token = run_cli("serve", "token", "--port", str(port), "--state-root", str(state_root)).stdout.strip()
        assert token == server.read_token(port, "inference", state_root)
        info = server.load_info(port, state_root)
        yield info, token, write_images(root / "images", held_images, held_labels)
    finally:
        server.stop_server(port, state_root)  # test_stop_leaves_no_process stops it first when all goes well
        assert not server.instance_processes(state_root / str(port))


def top1(answer: dict) -> int:
    return int(next(iter(answer)))  # answers are ordered, highest probability first


def test_server_is_ready_with_its_ports_and_status(served):
    info, _, _ = served
    status = server.server_status(info.port, info.state_dir.parent)
    assert status["running"] and status["healthy"] and status["pid"] == info.pid
    assert status["models"] == {"digits": ["READY"]}
    props = (info.state_dir / "config.properties").read_text()
    for key, port in (("inference_address", info.port), ("management_address", info.port + 1),
                      ("metrics_address", info.port + 2), ("grpc_inference_port", info.port + 3),
                      ("grpc_management_port", info.port + 4)):
        assert f"{key}=" in props and str(port) in props.split(f"\n{key}=")[1].splitlines()[0]
    assert (info.state_dir / "logs" / "ts_log.log").is_file()
    with pytest.raises(ToolkitError, match="already runs"):  # a second start on the same port is refused
        server.start_server(info.model_store, port=info.port, state_root=info.state_dir.parent)


def test_classifies_held_out_png_and_jpeg_files(served):
    info, token, files = served
    answers = client.predict_url(info.predictions_url(), [path for path, _ in files], token)
    assert len(answers) == len(files)
    for answer in answers:
        assert len(answer) == 3 and 0 < sum(answer.values()) <= 1 + 1e-5  # top-3 of a softmax
        assert list(answer.values()) == sorted(answer.values(), reverse=True)
    png_hits = sum(top1(a) == label for a, (_, label) in zip(answers[:10], files[:10]))
    jpeg_hits = sum(top1(a) == label for a, (_, label) in zip(answers[10:], files[10:]))
    assert png_hits >= 8, f"PNG top-1 right for {png_hits}/10"
    assert jpeg_hits >= 8, f"JPEG top-1 right for {jpeg_hits}/10"


def test_predict_cli_against_the_server_agrees_with_local_predict(served):
    info, token, files = served
    paths = [str(path) for path, _ in files[:6]]
    remote = run_cli("predict", "--url", info.predictions_url(), f"--token={token}", "--topk", "3", *paths,
                     env={"COLUMNS": "200"})
    assert remote.returncode == 0, remote.stderr
    from toolkit.predict import predict_files

    run_dir = info.model_store.parent
    local = predict_files(run_dir, paths, topk=3)
    for path, answer in zip(paths, local):
        row = next(line for line in remote.stdout.splitlines() if Path(path).name in line)
        assert row.split()[1] == list(answer)[0], (row, answer)  # same top-1 class, server vs checkpoint


def test_bad_inputs_get_4xx_json_and_the_server_keeps_answering(served):
    info, token, files = served
    url = info.predictions_url()
    png = files[0][0].read_bytes()
    big = Image.open(files[0][0]).resize((256, 256))
    big_path = files[0][0].with_name("big.png")
    big.save(big_path)
    big_png = big_path.read_bytes()
    for label, body in (("empty", b""), ("garbage", b"\x00\x01garbage bytes" * 20),
                        ("truncated png", big_png[: len(big_png) // 2])):
        status, answer = client.send_bytes(url, body, token)
        assert 400 <= status < 500, f"{label}: HTTP {status} {answer}"
        assert isinstance(answer, dict) and answer.get("error"), f"{label}: {answer}"
    status, answer = client.send_bytes(url, png, token)
    assert status == 200 and top1(answer) == files[0][1]

    garbage = files[0][0].with_name("garbage.png")
    garbage.write_bytes(b"not an image at all")
    with pytest.raises(ToolkitError, match=r"HTTP 4\d\d"):
        client.predict_url(url, [garbage], token)


def test_requests_without_the_token_are_refused(served):
    info, token, files = served
    png = files[0][0].read_bytes()
    for wrong in (None, "not-the-key", server.read_token(info.port, "management", info.state_dir.parent)):
        status, answer = client.send_bytes(info.predictions_url(), png, wrong)
        assert 400 <= status < 500 and "Token" in json.dumps(answer), (wrong, status, answer)


def test_parallel_requests_and_the_curl_example(served):
    info, token, files = served
    paths = [files[i][0] for i in (1, 2, 3, 4)]
    expected = client.predict_url(info.predictions_url(), paths, token)
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda p: client.predict_url(info.predictions_url(), [p], token)[0], paths))
    assert [top1(a) for a in results] == [top1(a) for a in expected]
    for got, want in zip(results, expected):
        assert got == pytest.approx(want, abs=1e-5)  # batched with others or not, the same answer

    command = server.curl_example(info, paths[0])
    assert "Authorization: Bearer " in command and info.predictions_url() in command
    if shutil.which("curl"):
        answer = json.loads(subprocess.run(command, shell=True, capture_output=True, text=True, check=True).stdout)
        assert top1(answer) == top1(expected[0])


def test_profiling_puts_the_handler_phase_times_in_torchserve_metrics(served):
    """serve.profile -> model-config.yaml `handler: {profile: true}` -> per batch, the handler's
    ts_handler_* metrics (the names TorchServe's @timed handlers use): one line each in ts_log.log,
    and the latest values at the metrics port's /metrics (defined in serve/metrics.yaml)."""
    info, token, files = served
    log = info.state_dir / "logs" / "ts_log.log"
    pattern = re.compile(r"\[METRICS\]ts_handler_(preprocess|inference|postprocess)\.Milliseconds:([\d.]+)"
                         r"\|#ModelName:digits\S*")

    def logged() -> dict[str, list[float]]:
        found, seen = {"preprocess": [], "inference": [], "postprocess": []}, set()
        for match in pattern.finditer(log.read_text(errors="replace")):
            if match.group(0) not in seen:  # the frontend logs each worker line twice
                seen.add(match.group(0))
                found[match.group(1)].append(float(match.group(2)))
        return found

    before = {phase: len(values) for phase, values in logged().items()}
    for path, _ in files[:3]:  # one at a time: three batches of one
        client.predict_url(info.predictions_url(), [path], token)
    deadline = time.monotonic() + 10  # the frontend logs the worker's lines asynchronously
    found = logged()
    while any(len(v) - before[p] < 3 for p, v in found.items()) and time.monotonic() < deadline:
        time.sleep(0.2)
        found = logged()
    for phase, values in found.items():
        assert len(values) - before[phase] == 3, f"{phase}: {len(values) - before[phase]} new values, want 3"
        assert all(0 <= v < 10_000 for v in values), values
    assert min(found["inference"][-3:]) > 0  # a forward pass takes measurable time

    exported = {}
    with urllib.request.urlopen(info.metrics_url, timeout=10) as response:
        for line in response.read().decode().splitlines():
            if line.startswith("ts_handler_") and 'ModelName="digits"' in line:
                exported[line.split("{", 1)[0]] = float(line.rsplit(" ", 1)[1])
    assert set(exported) == {"ts_handler_preprocess", "ts_handler_inference", "ts_handler_postprocess"}, exported
    assert exported["ts_handler_inference"] == pytest.approx(found["inference"][-1], rel=1e-3)


def test_a_model_that_cannot_load_fails_fast_with_its_log(served, tmp_path):
    """Started next to the running server: its own ports, state and processes."""
    info, _, _ = served
    run = tmp_path / "broken"
    shutil.copytree(info.model_store.parent, run, symlinks=True, ignore=shutil.ignore_patterns("model-store"))
    pre = json.loads((run / "export" / "preprocess.json").read_text())
    (run / "export" / "preprocess.json").write_text(json.dumps({**pre, "channels": 5}))
    archive.build_archive(run, name="broken")
    port, state_root = free_port_block(), tmp_path / "state"
    try:
        with pytest.raises(ToolkitError, match="worker died") as failure:
            server.start_server(run / "model-store", port=port, state_root=state_root, timeout=90)
        assert "preprocess.json: bad channels" in str(failure.value)  # the handler's message, from model_log
        assert not server.instance_processes(state_root / str(port))
    finally:
        server.stop_server(port, state_root)  # had it started after all
    assert server.server_status(info.port, info.state_dir.parent)["models"] == {"digits": ["READY"]}


def test_an_expired_key_is_renewed(served):
    info, token, files = served
    key_file = info.state_dir / "key_file.json"
    keys = json.loads(key_file.read_text())
    keys["inference"]["expiration time"] = "2001-01-01T00:00:00.000000000Z"  # as if an hour had passed
    key_file.write_text(json.dumps(keys))
    renewed = server.read_token(info.port, "inference", info.state_dir.parent)
    assert renewed != token
    png = files[0][0].read_bytes()
    assert client.send_bytes(info.predictions_url(), png, renewed)[0] == 200
    assert client.send_bytes(info.predictions_url(), png, token)[0] == 400  # the old key is revoked


def test_stop_leaves_no_process(served):
    info, _, _ = served
    processes = server.instance_processes(info.state_dir)
    pids = {p.pid for p in processes}
    assert info.pid in pids and len(pids) >= 2  # the java frontend and at least one Python worker
    stopped = run_cli("serve", "stop", "--port", str(info.port), "--state-root", str(info.state_dir.parent))
    assert stopped.returncode == 0 and "stopped TorchServe" in stopped.stdout, stopped.stdout + stopped.stderr
    assert not [pid for pid in pids if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
    assert server.server_status(info.port, info.state_dir.parent)["running"] is False
    assert server.stop_server(info.port, info.state_dir.parent) is False  # idempotent
