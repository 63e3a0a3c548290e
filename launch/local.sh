#!/usr/bin/env bash
# A multi-process run on this one machine: the real multi-controller path of a TPU pod (jax.distributed, one
# process per "host", collectives between processes), with CPU devices and gloo instead of TPU chips.
#
#   launch/local.sh NUM_PROCESSES DEVICES_PER_PROCESS -- ARGS...
#   launch/local.sh 2 4 -- --config configs/smoke.py --workdir runs/smoke_2x4
#
# ARGS go to `python -m xsample_jax.main` in every process (ENTRY=module runs another entry point). Each
# process's output is prefixed with its index. When one process fails, the others are stopped and the launcher
# exits with the failing status; Ctrl-C or SIGTERM is passed on to every process, which save a checkpoint at one
# agreed step and exit 0 (rerun the same command to resume).
# Environment: PORT (coordinator port; default: a free one), PYTHON (default python), ENTRY (default
# xsample_jax.main).
set -euo pipefail

usage() {
  sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
}

[[ $# -ge 3 && $3 == "--" ]] || usage
num_processes=$1
devices=$2
shift 3
[[ $num_processes =~ ^[1-9][0-9]*$ ]] || { echo "error: NUM_PROCESSES must be a positive integer, got '$num_processes'" >&2; exit 2; }
[[ $devices =~ ^[1-9][0-9]*$ ]] || { echo "error: DEVICES_PER_PROCESS must be a positive integer, got '$devices'" >&2; exit 2; }

python=${PYTHON:-python}
entry=${ENTRY:-xsample_jax.main}
port=${PORT:-$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}

running=()  # the processes not yet reaped
stop_all() {  # $1: the signal
  for pid in "${running[@]}"; do
    kill "-$1" "$pid" 2>/dev/null || true
  done
}
trap 'stop_all TERM' INT TERM

for ((i = 0; i < num_processes; i++)); do
  # Each process's own group of CPU devices; the prefix is added by a subshell so $! is the python process.
  JAX_PLATFORMS=cpu \
  XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$devices" \
  JAX_COORDINATOR_ADDRESS="127.0.0.1:$port" JAX_NUM_PROCESSES="$num_processes" JAX_PROCESS_ID="$i" \
  PYTHONUNBUFFERED=1 \
    "$python" -m "$entry" "$@" > >(sed -u "s/^/[$i] /") 2> >(sed -u "s/^/[$i] /" >&2) &
  running+=("$!")
done

# The first process to fail takes the others down: they would otherwise wait for it in a collective until jax's
# heartbeat timeout. TERM first (a healthy single process saves a checkpoint), KILL after a grace period.
status=0
while ((${#running[@]} > 0)); do
  finished="" rc=0
  wait -n -p finished "${running[@]}" || rc=$?
  [[ -n ${finished:-} ]] || continue  # woken by a signal we passed on: keep waiting
  still=()
  for pid in "${running[@]}"; do
    [[ $pid == "$finished" ]] || still+=("$pid")
  done
  running=("${still[@]+"${still[@]}"}")
  if ((rc != 0 && status == 0)); then
    status=$rc
    echo "launch/local.sh: a process exited with status $rc; stopping the others" >&2
    stop_all TERM
    (sleep 10; stop_all KILL) >/dev/null 2>&1 &  # this copy of the list may name reaped ones: kill then fails quietly
  fi
done
exit "$status"
