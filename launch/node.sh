#!/usr/bin/env bash
# One machine of a run over several machines: one `accelerate launch` with this machine's rank, one process
# per GPU (or CPU process, with ACCELERATE_USE_CPU=1 and gloo). Run it on every machine, or let
# launch/slurm.sbatch run it through srun:
#   MAIN_ADDR=10.0.0.1 MAIN_PORT=29500 NODE_RANK=R NUM_NODES=2 PROCS_PER_NODE=8 launch/node.sh --config ...
# (NODE_RANK 0 on the machine at MAIN_ADDR). What it adds to a bare `accelerate launch`:
# - start-up: node 0 checks that it can listen at MAIN_ADDR:MAIN_PORT (its own address, a free port), the
#   other machines check that MAIN_ADDR:MAIN_PORT answers, for up to CONNECT_TIMEOUT_S
#   (60) seconds, and say so in one line (exit 2) instead of torchrun's 10-minute wait; node 0 waits as long
#   for the others to join (torchrun's rendezvous timeout);
# - preemption: torchrun ignores SIGUSR1 (it would die of it), the workers take it: checkpoints/last, exit 75;
# - a user error or a stop is said once, as the last line (TOOLKIT_ERROR_FILE), and sets the exit status:
#   0 finished, 2 user error (or a lost machine), 75 saved and stopped ("resume me"), else the launcher's.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
: "${MAIN_ADDR:?set MAIN_ADDR}" "${MAIN_PORT:?set MAIN_PORT}" "${NODE_RANK:?set NODE_RANK}" "${NUM_NODES:?set NUM_NODES}"
per_node="${PROCS_PER_NODE:-1}"
wait_s="${CONNECT_TIMEOUT_S:-60}"

if (( NODE_RANK == 0 )); then  # the main node listens at MAIN_ADDR:MAIN_PORT: is it this machine's, and free?
  if ! why="$("${PYTHON:-python3}" -c '
import socket, sys
try:
    socket.socket().bind((sys.argv[1], int(sys.argv[2])))
except OSError as exc:
    sys.exit(exc.strerror or str(exc))' "$MAIN_ADDR" "$MAIN_PORT" 2>&1)"; then
    echo "error: node 0 is the main node but cannot listen at $MAIN_ADDR:$MAIN_PORT ($why):" \
         "MAIN_ADDR/--main_process_ip must be an address of this machine, MAIN_PORT a free port" >&2
    exit 2
  fi
else
  deadline=$(( $(date +%s) + wait_s ))
  until timeout 3 bash -c "exec 3<>/dev/tcp/$MAIN_ADDR/$MAIN_PORT" 2>/dev/null; do
    if (( $(date +%s) >= deadline )); then
      echo "error: node $NODE_RANK cannot reach the main node at $MAIN_ADDR:$MAIN_PORT (tried for $wait_s s):" \
           "check --main_process_ip/MAIN_ADDR, MAIN_PORT and that node 0 has started and its port is open" >&2
      exit 2
    fi
    sleep 0.5
  done
fi

errors="${TOOLKIT_ERROR_FILE:-}"
own_errors=0
if [[ -z "$errors" ]]; then
  errors="$(mktemp)" && own_errors=1
  trap 'rm -f "$errors"' EXIT
fi
trap '' USR1
status=0
TOOLKIT_ERROR_FILE="$errors" "${ACCELERATE:-accelerate}" launch -q --config_file "${ACCELERATE_CONFIG:-$here/multi_node.yaml}" \
  --num_machines "$NUM_NODES" --num_processes "$(( NUM_NODES * per_node ))" --machine_rank "$NODE_RANK" \
  --main_process_ip "$MAIN_ADDR" --main_process_port "$MAIN_PORT" --rdzv_conf "timeout=$wait_s" \
  "$here/../toolkit/train.py" "$@" || status=$?
if (( own_errors )) && [[ -s "$errors" ]]; then  # else the caller (slurm.sbatch) says it
  cat "$errors" >&2
  grep -q '^error:' "$errors" && exit 2
  exit 75
fi
exit "$status"
