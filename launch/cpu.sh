#!/usr/bin/env bash
# Several CPU processes on one machine (DDP over gloo), e.g. for a CPU-only box or to test a launch:
#   launch/cpu.sh --config configs/digits.yaml [--set KEY=VALUE ...]
#   NUM_PROCESSES=4 launch/cpu.sh --config configs/digits.yaml
#
# Why a script: `accelerate launch --cpu --num_processes N` starts ONE process (it expects mpirun),
# which the toolkit refuses at start-up. What works is the multi-GPU launcher (torchrun) with
# ACCELERATE_USE_CPU=1: N processes, distributed type MULTI_CPU, backend gloo. The config file and the
# flags are explicit, so a default accelerate config cannot change the launch behind your back.
#
# Threads: each process gets OMP_NUM_THREADS = cores / processes unless you set it. Several processes
# on one machine are for checking a launch; measured throughput is in launch/README.md.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
num_processes="${NUM_PROCESSES:-2}"
threads="${OMP_NUM_THREADS:-$(( $(nproc) / num_processes ))}"
(( threads >= 1 )) || threads=1

export ACCELERATE_USE_CPU=1
export OMP_NUM_THREADS="$threads"
exec "${ACCELERATE:-accelerate}" launch --config_file "$here/multi_gpu.yaml" --multi_gpu \
  --num_processes "$num_processes" --num_machines 1 \
  --mixed_precision no --dynamo_backend no \
  --main_process_port "${MAIN_PROCESS_PORT:-0}" \
  "$here/../toolkit/train.py" "$@"
