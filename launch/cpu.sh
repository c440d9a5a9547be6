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
# A user error (bad config, missing data, a taken run directory, a refused launch) is written by the main
# process to TOOLKIT_ERROR_FILE instead of stderr: the launcher prints its own failure report when the
# processes end, so this script prints the message after it, as the last line, and exits 2 like
# `toolkit train`. -q keeps Accelerate's traceback of the launcher itself out.
errors="$(mktemp)"
trap 'rm -f "$errors"' EXIT
trap '' USR1  # the launcher inherits "ignore SIGUSR1" (torchrun would die of it); the workers set their own
TOOLKIT_ERROR_FILE="$errors" "${ACCELERATE:-accelerate}" launch -q --config_file "$here/multi_gpu.yaml" --multi_gpu \
  --num_processes "$num_processes" --num_machines 1 \
  --mixed_precision no --dynamo_backend no \
  --main_process_port "${MAIN_PROCESS_PORT:-0}" \
  "$here/../toolkit/train.py" "$@" &
launcher=$!
# The launcher runs in the background so that this script can speak after it; signals sent to the
# script reach it as they would have with exec (a terminal's Ctrl-C reaches both anyway). torchrun passes
# SIGTERM and SIGINT on to its workers, not SIGUSR1: a scheduler's SIGUSR1 goes on as SIGTERM, and both
# mean "save checkpoints/last and stop" (train.preempt_signals).
trap 'kill -s TERM "$launcher" 2>/dev/null' TERM HUP USR1
trap 'kill -s INT "$launcher" 2>/dev/null' INT
status=0
wait "$launcher" || status=$?
while (( status > 128 )) && kill -0 "$launcher" 2>/dev/null; do  # a forwarded signal ended the wait, not the run
  status=0
  wait "$launcher" || status=$?
done
# The main process's last word: `error: ...` (exit 2, as toolkit train) or `stopped: ...` (preempted or
# interrupted after saving checkpoints/last: exit 75, "resume me").
if [[ -s "$errors" ]]; then
  cat "$errors" >&2
  grep -q '^error:' "$errors" && exit 2
  exit 75
fi
exit "$status"
