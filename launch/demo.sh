#!/usr/bin/env bash
# `make demo`: train the built-in default (real 8x8 digits, no download) and show the summary.
set -euo pipefail
cd "$(dirname "$0")/.."
run_dir=runs/digits
toolkit train --config configs/digits.yaml --set train.overwrite=true
echo
echo "== summary ($run_dir/summary.json)"
cat "$run_dir/summary.json"
