"""End to end: train a digit classifier, export, archive, serve it with a real TorchServe on free
ports, classify PNG and JPEG files over HTTP, and leave no server process behind."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import urllib.request
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest
import torch
import yaml
from PIL import Image

from toolkit import archive, client, export, ports, server
from toolkit.errors import ToolkitError

from conftest import BIN, ROOT, run_cli

pytestmark = [pytest.mark.serve, pytest.mark.slow]

IMAGE_SIZE = 16
# The archive under test: the demo's run served with dynamic batching of 4 and profiling on
SERVE = {"batch_size": 4, "max_batch_delay_ms": 10, "topk": 3, "profile": True}


def held_out_digits(run_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The run's held-out validation digits as the original 8x8 uint8 images (N x 1 x 8 x 8) and labels."""
    from sklearn.datasets import load_digits

    from toolkit.data import split_indices

    digits = load_digits()
    _, val_idx = split_indices(len(digits.target), 0.2, seed=0)  # configs/digits.yaml: val_fraction 0.2, split_seed 0
    images = torch.from_numpy(digits.images * (255 / 16)).round().to(torch.uint8).unsqueeze(1)
    return images[val_idx], torch.from_numpy(digits.target).long()[val_idx]


def free_port_block(size: int = 5) -> int:
    """A port p with p..p+size-1 all free on 127.0.0.1 (TorchServe takes five consecutive ports)."""
    return ports.free_port_block(size)


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


def test_make_demo_trains_serves_and_answers(demo):
    """The README's first command does what it says: the shipped digits config reaches 95%, the
    archive is built, the server answers each of 8 held-out digits, and no server process is left."""
    run_dir, result = demo
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["best_val_acc"] >= 0.95 and summary["val_samples"] == 359, summary  # 20% of 1,797
    assert "Epoch [ 1/12] Train Loss" in result.stdout
    assert (run_dir / "model-store" / "digits.mar").is_file() and (run_dir / "export" / "model.pt").is_file()
    rows = [re.search(r"\b\d{3}_(\d)\.png\s+(\S+)\s", line) for line in result.stdout.splitlines()]
    rows = [row.groups() for row in rows if row]
    assert len(rows) == 8, result.stdout[-3000:]
    assert sum(true == top1 for true, top1 in rows) >= 7, rows  # file names carry the true label
    states = run_dir.parents[1] / "home" / ".cache" / "toolkit" / "serve"  # the default state root, under HOME
    assert [d for d in states.iterdir()] and not [p for d in states.iterdir() for p in server.instance_processes(d)]


@pytest.fixture(scope="module")
def served(demo, tmp_path_factory):
    """(ServerInfo, [(image file, true label)]) of a server started by `toolkit serve start` on a copy of
    the demo's run archived with SERVE; stopped by `toolkit serve stop` after the module, which must
    leave no process. Tests read the token with `token(info)`: one test renews it."""
    demo_run, result = demo
    assert result.returncode == 0, result.stderr[-3000:]
    root = tmp_path_factory.mktemp("e2e")
    run = root / "digits"
    shutil.copytree(demo_run, run, symlinks=True, ignore=shutil.ignore_patterns("model-store", "export", "samples"))
    config = yaml.safe_load((run / "config.yaml").read_text())
    (run / "config.yaml").write_text(yaml.safe_dump({**config, "serve": {**config["serve"], **SERVE}}, sort_keys=False))

    out = export.export_torchscript(run)
    assert json.loads((out / "parity.json").read_text())["max_abs_diff"] <= 1e-4
    pre = json.loads((out / "preprocess.json").read_text())
    assert pre == {"channels": 1, "image_size": IMAGE_SIZE, "resize": "resize", "mean": [0.5], "std": [0.5],
                   "topk": 3, "max_pixels": 40_000_000, "max_side": 65_535, "preprocess_version": 2}
    mar = archive.build_archive(run)
    assert mar == run / "model-store" / "digits.mar"
    assert set(archive.REQUIRED_ENTRIES) <= set(zipfile.ZipFile(mar).namelist())

    state_root = root / "state"
    for _ in range(3):  # the ports were free when picked; another process may take one before java binds it
        port = free_port_block()
        # TS_* variables would switch token auth off and the model API on, were the template's
        # enable_envvars_config=false not honoured: the token and model-API tests below would then fail
        started = run_cli("serve", "start", "--model-store", str(mar.parent), "--port", str(port),
                          "--state-root", str(state_root),
                          env={"TS_DISABLE_TOKEN_AUTHORIZATION": "true", "TS_ENABLE_MODEL_API": "true"})
        if started.returncode == 0 or "already in use" not in started.stderr + started.stdout:
            break
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        assert f"http://127.0.0.1:{port}/predictions/digits" in started.stdout and "Authorization: Bearer" in started.stdout
        shown = run_cli("serve", "token", "--port", str(port), "--state-root", str(state_root)).stdout.strip()
        assert shown == server.read_token(port, "inference", state_root)
        yield server.load_info(port, state_root), write_images(root / "images", *held_out_digits(run))
    finally:
        info = server.load_info(port, state_root) if (state_root / str(port) / "info.json").is_file() else None
        pids = {p.pid for p in server.instance_processes(state_root / str(port))}
        stopped = run_cli("serve", "stop", "--port", str(port), "--state-root", str(state_root))
        assert not server.instance_processes(state_root / str(port))
    # after a clean module only: the CLI's own report, and nothing left, zombies aside
    assert info is not None and info.pid in pids and len(pids) >= 2  # the java frontend and a Python worker
    assert stopped.returncode == 0 and "stopped TorchServe" in stopped.stdout, stopped.stdout + stopped.stderr
    assert not [pid for pid in pids if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
    assert server.server_status(port, state_root)["running"] is False
    assert server.stop_server(port, state_root) is False  # idempotent


def key(info) -> str:
    """The current inference key (renewed by read_token when it has expired)."""
    return server.read_token(info.port, "inference", info.state_dir.parent)


def top1(answer: dict) -> int:
    return int(next(iter(answer)))  # answers are ordered, highest probability first


def test_server_is_ready_with_its_ports_and_status(served):
    info, _ = served
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
    info, files = served
    token = key(info)
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
    info, files = served
    token = key(info)
    paths = [str(path) for path, _ in files[:6]]
    remote = run_cli("predict", "--url", info.predictions_url(), f"--token={token}", "--topk", "3", *paths,
                     env={"COLUMNS": "200"})
    assert remote.returncode == 0, remote.stderr
    from toolkit.predict import predict_files

    run_dir = info.model_store.parent
    local = predict_files(run_dir, paths, topk=3)
    for path, answer in zip(paths, local):  # the same top-3 classes and probabilities, server vs checkpoint
        row = next(line for line in remote.stdout.splitlines() if Path(path).name in line)
        assert re.findall(r"(\S+)  ([\d.]+)%", row) == [(name, f"{p * 100:.2f}") for name, p in answer.items()], row


def test_bad_inputs_get_4xx_json_and_the_server_keeps_answering(served):
    info, files = served
    token = key(info)
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
    info, files = served
    png = files[0][0].read_bytes()
    for wrong in (None, "not-the-key", server.read_token(info.port, "management", info.state_dir.parent)):
        status, answer = client.send_bytes(info.predictions_url(), png, wrong)
        assert 400 <= status < 500 and "Token" in json.dumps(answer), (wrong, status, answer)


def test_parallel_requests_and_the_curl_example(served):
    info, files = served
    token = key(info)
    paths = [files[i][0] for i in (1, 2, 3, 4)]
    expected = client.predict_url(info.predictions_url(), paths, token)
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda p: client.predict_url(info.predictions_url(), [p], token)[0], paths))
    assert [top1(a) for a in results] == [top1(a) for a in expected]
    for got, want in zip(results, expected):
        assert got == pytest.approx(want, abs=1e-5)  # batched with others or not, the same answer



def test_the_printed_curl_command_answers(served):
    info, files = served
    command = server.curl_example(info, files[1][0])
    assert f"Authorization: Bearer {key(info)}" in command and info.predictions_url() in command
    if not shutil.which("curl"):
        pytest.skip("curl is not installed here: the README's curl command cannot be run")
    answer = json.loads(subprocess.run(command, shell=True, capture_output=True, text=True, check=True).stdout)
    assert answer == pytest.approx(client.predict_url(info.predictions_url(), [files[1][0]], key(info))[0], abs=1e-6)


def test_multipart_form_and_post_bodies_get_the_same_answer(served):
    """`curl -F data=@file` (a browser form) and a POST of the raw bytes answer like `curl -T` (PUT)."""
    info, files = served
    path = files[2][0]
    expected = client.predict_url(info.predictions_url(), [path], key(info))[0]
    boundary = "toolkit-test-boundary"
    form = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"data\"; filename=\"{path.name}\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + path.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
    for body, content_type in ((form, f"multipart/form-data; boundary={boundary}"),
                               (path.read_bytes(), "application/octet-stream")):
        req = urllib.request.Request(info.predictions_url(), data=body, method="POST", headers={
            "Authorization": f"Bearer {key(info)}", "Content-Type": content_type})
        with urllib.request.urlopen(req, timeout=30) as response:
            assert response.status == 200
            assert json.loads(response.read()) == pytest.approx(expected, abs=1e-6), content_type


def test_unknown_model_oversized_body_and_model_api_are_refused(served, tmp_path):
    info, files = served
    status, answer = client.send_bytes(info.predictions_url("nosuchmodel"), files[0][0].read_bytes(), key(info))
    assert status == 404 and isinstance(answer, dict), (status, answer)
    # enable_model_api=false: no model can be registered or removed over the management API
    management = f"http://127.0.0.1:{info.port + 1}/models"
    api_key = server.read_token(info.port, "management", info.state_dir.parent)
    for method, url in (("POST", f"{management}?url=digits.mar&model_name=again"), ("DELETE", f"{management}/digits")):
        status, text = client.request(url, api_key, method=method)
        assert 400 <= status < 500 and "api" in text.lower(), (method, status, text)
    assert server.server_status(info.port, info.state_dir.parent)["models"] == {"digits": ["READY"]}
    # over max_request_size (6,553,500): 413, read by curl before it sends the body (Expect: 100-continue;
    # a client that pushes the whole body first finds the connection closed under it instead)
    big = tmp_path / "big.bin"
    big.write_bytes(b"\0" * 7_000_000)
    if not shutil.which("curl"):
        pytest.skip("curl is not installed here: the 413 check needs a client that reads the early answer")
    sent = subprocess.run(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "-T", str(big), "-H",
                           f"Authorization: Bearer {key(info)}", info.predictions_url()],
                          capture_output=True, text=True, timeout=60)
    assert sent.stdout == "413", (sent.stdout, sent.stderr)


def test_each_start_issues_its_own_keys(demo, served):
    """The demo's server (started and stopped before) printed its key; this server's differs."""
    _, result = demo
    info, _ = served
    demo_keys = re.findall(r"Authorization: Bearer (\S+?)[\"' ]", result.stdout)
    assert demo_keys and key(info) not in demo_keys


def test_busy_ports_and_too_long_state_paths_are_refused_before_starting(served, short_tmp, tmp_path):
    info, _ = served
    with pytest.raises(ToolkitError, match=rf"port {info.port} \(inference\).*already in use"):
        server.start_server(info.model_store, port=info.port, state_root=short_tmp / "other")
    with pytest.raises(ToolkitError, match="too long for TorchServe's unix sockets"):
        server.start_server(info.model_store, port=free_port_block(), state_root=tmp_path / ("x" * 120))
    assert not list((short_tmp / "other" / str(info.port) / "logs").glob("*"))  # nothing was started


def test_profiling_puts_the_handler_phase_times_in_torchserve_metrics(served):
    """serve.profile -> model-config.yaml `handler: {profile: true}` -> per batch, the handler's
    ts_handler_* metrics (the names TorchServe's @timed handlers use): one line each in ts_log.log,
    and the latest values at the metrics port's /metrics (defined in serve/metrics.yaml)."""
    info, files = served
    token = key(info)
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


def test_a_model_that_cannot_load_fails_fast_with_its_log(served, short_tmp, tmp_path):
    """Started next to the running server: its own ports, state and processes."""
    info, _ = served
    run = tmp_path / "broken"
    shutil.copytree(info.model_store.parent, run, symlinks=True, ignore=shutil.ignore_patterns("model-store"))
    pre = json.loads((run / "export" / "preprocess.json").read_text())
    (run / "export" / "preprocess.json").write_text(json.dumps({**pre, "channels": 5}))
    archive.build_archive(run, name="broken")
    port, state_root = free_port_block(), short_tmp / "state"
    try:
        with pytest.raises(ToolkitError, match="worker died") as failure:
            server.start_server(run / "model-store", port=port, state_root=state_root, timeout=90)
        assert "preprocess.json: bad channels" in str(failure.value)  # the handler's message, from model_log
        assert not server.instance_processes(state_root / str(port))
    finally:
        server.stop_server(port, state_root)  # had it started after all
    assert server.server_status(info.port, info.state_dir.parent)["models"] == {"digits": ["READY"]}


def test_an_expired_key_is_renewed(served):
    info, files = served
    token = key(info)
    key_file = info.state_dir / "key_file.json"
    keys = json.loads(key_file.read_text())
    keys["inference"]["expiration time"] = "2001-01-01T00:00:00.000000000Z"  # as if an hour had passed
    key_file.write_text(json.dumps(keys))
    renewed = server.read_token(info.port, "inference", info.state_dir.parent)
    assert renewed != token
    png = files[0][0].read_bytes()
    assert client.send_bytes(info.predictions_url(), png, renewed)[0] == 200
    assert client.send_bytes(info.predictions_url(), png, token)[0] == 400  # the old key is revoked
