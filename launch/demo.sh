#!/usr/bin/env bash
# `make demo`: the whole path on the built-in digits (no download): train -> export -> archive ->
# TorchServe -> predictions for held-out digits saved as PNG files -> stop the server.
# DEMO_RUN_DIR (default runs/digits) and DEMO_PORT (default: the first free block from 18080) move it.
set -euo pipefail
cd "$(dirname "$0")/.."
run_dir=${DEMO_RUN_DIR:-runs/digits}
port=${DEMO_PORT:-$(python - <<'PY'
import socket
# a free block of 5 ports (inference, management, metrics, 2 x gRPC) on loopback
for base in range(18080, 19000, 10):
    try:
        socks = [socket.create_server(("127.0.0.1", base + i)) for i in range(5)]
    except OSError:
        continue
    for s in socks:
        s.close()
    print(base)
    break
PY
)}

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "train configs/digits.yaml"
toolkit train --config configs/digits.yaml --set train.overwrite=true \
  --set train.output_dir="$(dirname "$run_dir")" --set train.run_name="$(basename "$run_dir")"
cat "$run_dir/summary.json"

step "export, archive"
toolkit export "$run_dir"
toolkit archive "$run_dir" --name digits

step "start TorchServe on 127.0.0.1:$port"
trap 'toolkit serve stop --port "$port" >/dev/null 2>&1 || true' EXIT
toolkit serve start --model-store "$run_dir/model-store" --port "$port"

step "predict 8 held-out digits (file names carry the true label)"
toolkit samples "$run_dir" --out "$run_dir/samples" -n 8 >/dev/null
toolkit predict --url "http://127.0.0.1:$port/predictions/digits" --topk 3 "$run_dir"/samples/*.png

step "stop the server"
toolkit serve stop --port "$port"
trap - EXIT
