"""A static file server on 127.0.0.1 for shard sets, in a thread: python's http.server with byte ranges (which its
own handler lacks; nginx, Apache, S3 and GCS answer them), or without them (`ranges=False`, as `python -m
http.server` serves). `break_after` cuts a file's answers after that many bytes: an HTTP error mid-shard.
Used by tests/test_shards.py and bench/shards_throughput.py.

    with serve(directory) as url: ...   # url = http://127.0.0.1:PORT/
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer


class RangeHandler(SimpleHTTPRequestHandler):
    ranges = True
    break_after: dict = {}  # file name -> bytes sent before the connection is dropped

    def log_message(self, *args) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        path = self.translate_path(self.path)
        if not os.path.isfile(path):
            return super().do_GET()
        size = os.path.getsize(path)
        start, end = 0, size - 1
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", "")) if self.ranges else None
        if match:
            start, end = int(match.group(1)), min(size - 1, int(match.group(2) or size - 1))
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(end - start + 1))
        self.send_header("Accept-Ranges", "bytes" if self.ranges else "none")
        self.end_headers()
        cut = self.break_after.get(os.path.basename(path))
        with open(path, "rb") as f:
            f.seek(start)
            left = end - start + 1
            if cut is not None:
                left = min(left, max(0, cut - start))
            while left > 0:
                chunk = f.read(min(left, 1 << 16))
                if not chunk:
                    break
                self.wfile.write(chunk)
                left -= len(chunk)
        if cut is not None:
            self.close_connection = True


@contextlib.contextmanager
def serve(directory, ranges: bool = True, break_after: dict | None = None):
    handler = type("Handler", (RangeHandler,), {"ranges": ranges, "break_after": dict(break_after or {})})
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(handler, directory=str(directory)))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
