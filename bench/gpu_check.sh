#!/usr/bin/env bash
# The prepared GPU check: whenever a GPU machine is lent, from a fresh checkout,
#   bench/gpu_check.sh OUT_DIR                # about 5 minutes on one GPU, set-up included
#   bench/gpu_check.sh OUT_DIR --cpu-dry-run  # the same steps on the CPU, tiny (tests/test_bench.py runs it)
# It sets itself up as the README does (`make setup`: .venv with the tested set), shows the GPU, then runs
# bench/gpu_check.py: every check's figures in OUT_DIR/gpu_check.json and OUT_DIR/summary.txt; exit 1 if
# any check failed. Put the figures in docs/benchmarks.md with the GPU's name.
set -euo pipefail
out="${1:?usage: bench/gpu_check.sh OUT_DIR [--cpu-dry-run]}"
shift
cd "$(dirname "$0")/.."
t0=$(date +%s)
make --no-print-directory setup
echo "set-up: $(( $(date +%s) - t0 )) s"
if [[ "${1:-}" == "--cpu-dry-run" ]]; then
  echo "CPU dry run: no GPU is used"
elif command -v nvidia-smi >/dev/null; then
  nvidia-smi
else
  echo "nvidia-smi not found: is this a GPU machine? (--cpu-dry-run runs the steps on the CPU)" >&2
fi
.venv/bin/python -c 'import torch; print("torch", torch.__version__, "| CUDA", torch.version.cuda,
  "| devices:", [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])'
PATH="$PWD/.venv/bin:$PATH" .venv/bin/python bench/gpu_check.py "$out" "$@"
