"""What the handler guarantees, for every export format: every image format and mode, a 4xx JSON per
bad request, one forward per batch, top-k, the fuzz corpus within the budget, the same answers as the
TorchScript archive; in process from the archives `toolkit archive` builds, and against a real
TorchServe whose workers cannot import the toolkit."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import fuzz_corpus
from test_fuzz import BUDGET_CPU_S, BUDGET_MB, check_answer, measured
from test_handler import ENCODED, encode, handle, load_handler_module, make_context, pil_image, png_header_only
from toolkit import archive, client, export, server

FORMATS = list(export.FORMATS)


@pytest.fixture(scope="module")
def archives(format_runs, tmp_path_factory) -> dict[str, Path]:
    """{format: its .mar}, built by toolkit archive from a copy of the session's exported runs."""
    base = tmp_path_factory.mktemp("archives")
    mars = {}
    for fmt, source in format_runs.items():
        run = base / fmt
        shutil.copytree(source, run)
        mars[fmt] = archive.build_archive(run, name=f"clf-{fmt}")
    return mars


@pytest.fixture(scope="module")
def handlers(archives, tmp_path_factory):
    """{format: (handler, model dir)}: each archive unpacked as TorchServe does, loaded by its manifest."""
    base = tmp_path_factory.mktemp("model-dirs")
    loaded = {}
    for fmt, mar in archives.items():
        model_dir = base / fmt
        with zipfile.ZipFile(mar) as zf:
            zf.extractall(model_dir)
        ctx = make_context(model_dir, 1)
        ctx.manifest = json.loads((model_dir / "MAR-INF" / "MANIFEST.json").read_text())
        handler = load_handler_module().ImageClassifierHandler()
        handler.initialize(ctx)
        loaded[fmt] = handler, model_dir
    return loaded


def same_answers(got: list, want: list) -> None:
    for a, b in zip(got, want, strict=True):
        assert list(a) == list(b), (a, b)
        if "error" not in a:
            assert list(a.values()) == pytest.approx(list(b.values()), abs=1e-5)


def mixed_rows() -> list[dict]:
    png = encode(pil_image("RGB", 40, 30, seed=1), "PNG")
    tiff = encode(pil_image("RGB", 33, 21, seed=2), "TIFF")
    return [
        {"body": bytearray(png)}, {"body": bytearray()}, {"body": bytearray(b"hello, not an image")},
        {"body": bytearray(png[: len(png) // 2])}, {"body": bytearray(b'{"data": "abc')}, {"body": {"data": "!!"}},
        {"body": bytearray(png_header_only(20000, 20000))}, {"data": bytearray(tiff)},
        {"body": {"data": base64.b64encode(png).decode()}}, {"file": bytearray(png)}, {"body": [1, 2]},
    ]


MIXED_STATUSES = [200, 400, 415, 400, 400, 400, 413, 200, 200, 400, 400]


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_request_answered_alone_with_one_forward_per_batch(handlers, fmt):
    handler, model_dir = handlers[fmt]
    assert handler.model is not None and os.path.splitext(handler.model_path(None, str(model_dir)))[1] in (".pt", ".onnx", ".pt2")
    calls = []
    model = handler.model
    handler.model = lambda batch: calls.append(len(batch)) or model(batch)
    try:
        answers, ctx = handle(handler, model_dir, mixed_rows())
    finally:
        handler.model = model
    assert calls == [3]  # the three good requests, in one forward pass
    assert [ctx.get_response_status(i)[0] for i in range(len(answers))] == MIXED_STATUSES
    for answer, status in zip(answers, MIXED_STATUSES):
        check_answer(answer, status)
        if status == 200:
            assert len(answer) == 4  # top-k: serve.topk 5, capped at the model's four classes
    reference, _ = handle(*handlers["torchscript"], mixed_rows())
    same_answers(answers, reference)


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_image_format_and_mode_gets_the_torchscript_answer(handlers, fmt):
    rows = [{"body": bytearray(raw)} for _, raw, _ in ENCODED]
    answers, ctx = handle(*handlers[fmt], rows)
    assert [ctx.get_response_status(i)[0] for i in range(len(rows))] == [200] * len(rows)
    same_answers(answers, handle(*handlers["torchscript"], rows)[0])
    one, _ = handle(*handlers[fmt], rows[:1])  # a batch of one: the same answer as inside a batch
    same_answers(one, answers[:1])


@pytest.fixture(scope="module")
def corpus_answers(handlers):
    """The fuzz corpus (tests/fuzz_corpus.py) through the TorchScript archive: [(name, row, answers, statuses)]."""
    reference, model_dir = handlers["torchscript"]
    return [(name, row, *measured(reference, model_dir, [row])[:2])
            for category, name, row in fuzz_corpus.corpus(seed=0) if category != "huge/thin dimensions"]


@pytest.mark.parametrize("fmt", [f for f in FORMATS if f != "torchscript"])
def test_the_fuzz_corpus_within_the_budget(handlers, corpus_answers, fmt):
    """Refusals happen before the model, and the costliest images are costly to decode, whatever the
    format (tests/test_fuzz.py runs the whole corpus): here each request of the corpus but the huge and
    thin ones, alone and in mixed batches of eight, answered as by the TorchScript archive, within the
    budget."""
    handler, model_dir = handlers[fmt]
    accepted = 0
    for name, row, want, want_statuses in corpus_answers:
        answers, statuses, cpu, peak = measured(handler, model_dir, [row])
        assert statuses == want_statuses, name
        check_answer(answers[0], statuses[0])
        if statuses == [200]:
            assert cpu <= BUDGET_CPU_S and (peak is None or peak <= BUDGET_MB), (name, cpu, peak)
            accepted += 1
        same_answers(answers, want)
    assert accepted >= 20
    for start in range(0, 48, 8):
        batch = corpus_answers[start * 5: start * 5 + 8]
        answers, statuses, _, _ = measured(handler, model_dir, [row for _, row, _, _ in batch])
        assert statuses == [s[0] for _, _, _, s in batch]
        same_answers(answers, [a[0] for _, _, a, _ in batch])


NO_TOOLKIT_SITE = '''"""Started by tests/test_handler_formats.py: a TorchServe worker on a host without the toolkit."""
import importlib.abc, sys

class NoToolkit(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "toolkit" or name.startswith("toolkit."):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test's sitecustomize)")

sys.meta_path.insert(0, NoToolkit())
'''


@pytest.mark.serve
def test_real_torchserve_serves_every_format_without_the_toolkit(archives, handlers, short_tmp, tmp_path, monkeypatch):
    """One TorchServe holding the three archives; its workers cannot import the toolkit (a sitecustomize
    on PYTHONPATH blocks it). Every request of a concurrent burst gets its own status, and the good ones
    the in-process answer."""
    from test_serve_e2e import free_port_block

    store = tmp_path / "store"
    store.mkdir()
    for mar in archives.values():
        shutil.copy(mar, store / mar.name)
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(NO_TOOLKIT_SITE)
    monkeypatch.setenv("PYTHONPATH", str(site))
    port, state_root = free_port_block(), short_tmp / "state"
    started = time.perf_counter()
    info = server.start_server(store, port=port, state_root=state_root, timeout=240)
    try:
        print(f"three archives READY in {time.perf_counter() - started:.1f} s")
        token = server.read_token(port, "inference", state_root)
        png = encode(pil_image("RGB", 40, 30, seed=1), "PNG")
        cases = [(png, 200), (b"", 400), (b"hello, not an image", 415), (png[: len(png) // 2], 400),
                 (png_header_only(20000, 20000), 413), (encode(pil_image("RGB", 33, 21, seed=2), "TIFF"), 200),
                 (json.dumps({"data": base64.b64encode(png).decode()}).encode(), 200), (b'{"data": ', 400)]
        for fmt in FORMATS:
            url = info.predictions_url(f"clf-{fmt}")
            with ThreadPoolExecutor(len(cases)) as pool:  # concurrent: TorchServe batches them
                results = list(pool.map(lambda case: client.send_bytes(url, case[0], token), cases))
            expected, _ = handle(*handlers[fmt], [{"body": bytearray(body)} for body, _ in cases])
            for (_, want_status), (status, answer), want in zip(cases, results, expected):
                assert status == want_status, (fmt, status, answer)
                check_answer(answer, status)
                if status == 200:
                    assert list(answer) == list(want) and list(answer.values()) == pytest.approx(list(want.values()), abs=1e-5)
        log = (info.state_dir / "logs" / "model_log.log").read_text(errors="replace")
        for model_file in ("model.pt", "model.onnx", "model.pt2"):
            assert re.search(rf"loaded {re.escape(model_file)} \(fp32\) from", log), model_file
        assert "blocked by the test's sitecustomize" not in log
    finally:
        server.stop_server(port, state_root)
    assert not server.instance_processes(state_root / str(port))
