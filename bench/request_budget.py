"""The per-request budget of serve/handler.py against the fuzz corpus (tests/fuzz_corpus.py), in process.

Budget, for any request the handler accepts (HTTP 200), one request per call on a 2-core CPU: at most
2 s and 400 MB of resident memory above the idle worker. Every request of the corpus is sent alone
to a handler built as TorchServe builds it (a small TorchScript model: the cost measured is the
request's decoding and preprocessing, which does not depend on the model), and the script prints
the answers per category (4xx / 200 / 5xx), the slowest and the largest accepted requests (wall and
CPU time, peak RSS above the start of the call), and a batch of eight of the heaviest.

    python bench/request_budget.py                                   # about 1-2 minutes
    python bench/request_budget.py --cases png-L-1x20000,png-L-1x100000 --handler OLD.py --cap-gb 8

`--handler` runs another copy of handler.py (e.g. `git show REV:serve/handler.py > old.py`) to
compare; `--cap-gb` caps the address space (RLIMIT_AS), so that a handler that asks for tens of GB
fails inside this process instead of the machine's memory. Wall times on a shared machine include
the neighbours: the load average is printed, and CPU time is the steadier figure.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import resource
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

BUDGET_S, BUDGET_MB = 2.0, 400
MODELS = {  # name: (channels, image_size, resize policy) -- the policies of the shipped configs
    "digits": (1, 8, "resize"),
    "imagenet": (3, 224, "resize_center_crop"),
    "imagenet-squash": (3, 224, "resize"),
}


def cpu_kind() -> str:
    import torch

    name = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    return f"{name}, {os.cpu_count()} CPUs, {torch.backends.cpu.get_cpu_capability()}"


def mb(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(f.read().split(f"{key}:")[1].split()[0]) // 1024


def timed(handler, model_dir, rows, make_context) -> tuple[list, list[int], float, float, int]:
    """One handle() call -> (answers, statuses, wall s, CPU s, MB of peak RSS above the start)."""
    ctx = make_context(model_dir, len(rows))
    with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM, the peak RSS, to the current RSS
        f.write("5")
    before, wall, cpu = mb("VmRSS"), time.perf_counter(), time.process_time()
    answers = handler.handle(rows, ctx)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return answers, [ctx.get_response_status(i)[0] for i in range(len(rows))], wall, cpu, mb("VmHWM") - before


def load_handler_class(path: Path):
    spec = importlib.util.spec_from_file_location("bench_handler", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.ImageClassifierHandler


def run_model(name: str, args, items) -> dict:
    import tempfile

    from test_handler import make_context, make_model_dir

    channels, size, policy = MODELS[name]
    model_dir = make_model_dir(Path(tempfile.mkdtemp(prefix=f"budget-{name}-")), channels=channels,
                               classes=3 if channels == 1 else 10, image_size=size, resize=policy)
    if args.max_side:  # to show the cost past the limit: the limit, not the work, is what refuses them
        pre = json.loads((model_dir / "preprocess.json").read_text())
        (model_dir / "preprocess.json").write_text(json.dumps({**pre, "max_side": args.max_side}))
    handler = load_handler_class(args.handler)()
    handler.initialize(make_context(model_dir, 1))
    counts, accepted = defaultdict(Counter), []
    for category, case, row in items:
        try:
            answers, statuses, wall, cpu, peak = timed(handler, model_dir, [row], make_context)
            status, message = statuses[0], answers[0].get("error", "") if isinstance(answers[0], dict) else ""
        except Exception as e:  # escaped from handle(): TorchServe would answer 503 for the whole batch
            status, message, wall, cpu, peak = 503, f"escaped {type(e).__name__}: {str(e)[:80]}", 0.0, 0.0, 0
        counts[category]["200" if status == 200 else "4xx" if 400 <= status < 500 else "5xx"] += 1
        if status == 200 or args.cases:
            accepted.append((wall, cpu, peak, status, category, case, message[:90]))
    return {"counts": counts, "accepted": accepted, "handler": handler, "model_dir": model_dir}


def report(name: str, result: dict, args) -> None:
    print(f"\n== model {name}: {MODELS[name]}")
    print(f"{'category':24} {'4xx':>5} {'200':>5} {'5xx':>5}")
    for category, c in result["counts"].items():
        print(f"{category:24} {c['4xx']:5d} {c['200']:5d} {c['5xx']:5d}")
    rows = sorted(result["accepted"], reverse=True)[: args.top]
    print(f"slowest (wall s, CPU s, MB above idle, status, case):")
    for wall, cpu, peak, status, category, case, message in rows:
        print(f"  {wall:6.2f} {cpu:6.2f} {peak:6d}  {status}  {case}  {message}")
    ok = [r for r in result["accepted"] if r[3] == 200]
    if ok:
        worst_cpu, worst_mb = max(ok, key=lambda r: r[1]), max(ok, key=lambda r: r[2])
        verdict = "within" if worst_cpu[1] <= BUDGET_S and worst_mb[2] <= BUDGET_MB else "OVER"
        print(f"budget {BUDGET_S} s / {BUDGET_MB} MB: {verdict} -- most CPU {worst_cpu[1]:.2f} s ({worst_cpu[5]}, "
              f"wall {worst_cpu[0]:.2f} s), most memory {worst_mb[2]} MB ({worst_mb[5]})")


def batch_of_heaviest(name: str, result: dict, items) -> None:
    """Eight of the costliest accepted requests in one batch, as dynamic batching could group them."""
    from test_handler import make_context

    heaviest = {r[5] for r in sorted((r for r in result["accepted"] if r[3] == 200), key=lambda r: -r[1])[:8]}
    rows = [row for _, case, row in items if case in heaviest]
    rows = (rows * 8)[:8]
    _, statuses, wall, cpu, peak = timed(result["handler"], result["model_dir"], rows, make_context)
    print(f"batch of 8 of the heaviest: {wall:.2f} s wall, {cpu:.2f} s CPU, {peak} MB above idle, statuses {sorted(Counter(statuses).items())}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--handler", type=Path, default=ROOT / "serve" / "handler.py")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    parser.add_argument("--cases", default="", help="only these corpus cases (comma-separated names)")
    parser.add_argument("--cap-gb", type=float, default=None, help="address-space limit for this process")
    parser.add_argument("--max-side", type=int, default=None, help="serve.max_side for the handler (default 65535)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--top", type=int, default=6)
    args = parser.parse_args()
    if args.cap_gb:
        cap = int(args.cap_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    logging.disable(logging.WARNING)  # the handler logs every refused request

    import fuzz_corpus

    items = fuzz_corpus.corpus(args.seed)
    if args.cases:
        wanted = args.cases.split(",")
        items = [item for item in items if item[1] in wanted]
        missing = set(wanted) - {item[1] for item in items}
        if missing:
            parser.error(f"no corpus cases named {sorted(missing)}")
    print(f"CPU: {cpu_kind()}; load average {os.getloadavg()[0]:.1f}; handler {args.handler}; {len(items)} requests")
    for name in args.models.split(","):
        result = run_model(name, args, items)
        report(name, result, args)
        if not args.cases:
            batch_of_heaviest(name, result, items)
    print(f"\nload average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
