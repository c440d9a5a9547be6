"""Cold start per export format: from `start_server` (what `toolkit serve start` runs) to every worker READY,
for one archive of each format of the same run, each on a TorchServe of its own, a few times each; then the
first request's latency (the first forward after READY). The model is an RGB 224x224 one (default
resnet18) trained one epoch on synthetic images, as in bench/serve_load.py (weights do not change the cost).

    python bench/cold_start.py [--model resnet18] [--formats torchscript,onnx,aoti] [--repeat 3]
"""

from __future__ import annotations

import argparse
import http.client
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_load import format_runs, make_images, train_run  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet18")
    p.add_argument("--formats", default="torchscript,onnx,aoti")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--port", type=int, default=18380)
    args = p.parse_args(argv)
    from toolkit.archive import build_archive
    from toolkit.server import read_token, start_server, stop_server

    with tempfile.TemporaryDirectory(prefix="cold-") as tmp:
        work = Path(tmp)
        runs = format_runs(train_run(work, args.model), work, args.formats.split(","))
        image = make_images(work / "images", 1)[0].read_bytes()
        print(f"{args.model}: TorchServe start to READY, and the first request after it, {args.repeat} times per "
              "format (one worker)")
        for fmt, run in runs.items():
            mar = build_archive(run, name=f"cold-{fmt}")
            ready, first = [], []
            for _ in range(args.repeat):
                started = time.perf_counter()
                info = start_server(mar.parent, port=args.port, models=[mar.stem], state_root=work / "state")
                ready.append(time.perf_counter() - started)
                try:
                    token = read_token(args.port, "inference", work / "state")
                    conn = http.client.HTTPConnection("127.0.0.1", args.port, timeout=60)
                    started = time.perf_counter()
                    conn.request("POST", f"/predictions/{mar.stem}", body=image,
                                 headers={"Authorization": f"Bearer {token}"})
                    response = conn.getresponse()
                    response.read()
                    first.append(time.perf_counter() - started)
                    assert response.status == 200, response.status
                finally:
                    stop_server(args.port, work / "state")
            print(f"  {fmt:<12} start to READY {statistics.median(ready):5.1f} s (runs: "
                  f"{', '.join(f'{r:.1f}' for r in ready)}); first request {statistics.median(first) * 1000:6.0f} ms "
                  f"(runs: {', '.join(f'{f * 1000:.0f}' for f in first)})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
