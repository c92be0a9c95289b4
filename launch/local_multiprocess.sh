#!/usr/bin/env bash
# Runs N processes of cvgl_jax.main on this machine as ONE multi-process run
# with CPU collectives (gloo): a rehearsal of a multi-host job, or a test of
# the multi-process code paths without a cluster.
#
# Usage:
#   launch/local_multiprocess.sh N DEVICES_PER_PROCESS MAIN_ARGS...
#   launch/local_multiprocess.sh 2 2 --config=configs/synthetic_unsup.py \
#       --workdir=/tmp/demo_2x2
#
# Process i runs
#   python -m cvgl_jax.main MAIN_ARGS --coordinator_address=127.0.0.1:PORT \
#       --num_processes=N --process_id=i
# with XLA_FLAGS=--xla_force_host_platform_device_count=DEVICES_PER_PROCESS
# and JAX_PLATFORMS=cpu, so the run has N x DEVICES_PER_PROCESS devices.
# Process i logs to LOG_DIR/process_i.log (default LOG_DIR: a new folder
# under /tmp, printed); process 0's log is also shown here. When one
# process fails, the others are stopped and the script exits with its
# status; Ctrl-C stops them all.
#
# Environment: PYTHON (default: python3), PORT (coordinator port, default a
# free one), LOG_DIR. Needs bash >= 5.1 (wait -n with process ids).
set -euo pipefail

if [[ $# -lt 3 || ! "$1" =~ ^[1-9][0-9]*$ || ! "$2" =~ ^[1-9][0-9]*$ ]]; then
  sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
fi
num_processes=$1
devices=$2
shift 2
python=${PYTHON:-python3}
port=${PORT:-$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
log_dir=${LOG_DIR:-$(mktemp -d /tmp/cvgl_jax_multiprocess.XXXXXX)}
mkdir -p "$log_dir"
echo "$num_processes processes x $devices CPU devices, coordinator" \
     "127.0.0.1:$port, logs in $log_dir" >&2

pids=()
# JAX's preemption service turns SIGTERM into a "save and stop" request that
# a process stuck at a collective never acts on: TERM, then KILL after 10 s.
stop_all() {
  kill "${pids[@]}" 2>/dev/null || true
  for _ in {1..10}; do
    local alive=0
    for pid in "${pids[@]}"; do
      if kill -0 "$pid" 2>/dev/null; then alive=1; fi
    done
    if [[ $alive == 0 ]]; then return 0; fi
    sleep 1
  done
  kill -9 "${pids[@]}" 2>/dev/null || true
}
trap 'stop_all; exit 130' INT TERM

for ((i = 0; i < num_processes; i++)); do
  XLA_FLAGS="--xla_force_host_platform_device_count=$devices" \
  JAX_PLATFORMS=cpu \
    "$python" -m cvgl_jax.main "$@" \
      --coordinator_address="127.0.0.1:$port" \
      --num_processes="$num_processes" --process_id="$i" \
      > "$log_dir/process_$i.log" 2>&1 &
  pids+=($!)
done
tail -n +1 -f "$log_dir/process_0.log" --pid="${pids[0]}" >&2 &
tail_pid=$!

status=0
remaining=("${pids[@]}")
while ((${#remaining[@]})); do
  # The next process to end, whichever it is (-p: which one it was).
  code=0
  wait -n -p finished "${remaining[@]}" || code=$?
  rest=()
  for pid in "${remaining[@]}"; do
    if [[ $pid != "$finished" ]]; then rest+=("$pid"); fi
  done
  remaining=("${rest[@]}")
  if ((code != 0)); then
    status=$code
    echo "Process $finished failed with status $status; stopping the" \
         "others." >&2
    stop_all
    break
  fi
done
wait "${pids[@]}" 2>/dev/null || true
kill "$tail_pid" 2>/dev/null || true
if [[ $status -ne 0 ]]; then
  for ((i = 0; i < num_processes; i++)); do
    echo "--- $log_dir/process_$i.log (last lines)" >&2
    tail -n 20 "$log_dir/process_$i.log" >&2
  done
fi
exit "$status"
