#!/usr/bin/env bash
# Runs `python -m moe.main ARGS` as N jax processes on this machine, M fake
# CPU devices each, connected through jax.distributed (coordinator 127.0.0.1,
# CPU collectives). It exercises the multi-host code paths (per-process data
# slices, global arrays across processes, cooperative checkpoints, process-0
# logging) without a cluster; see launch/README.md.
#
# Usage:
#   bash launch/local.sh N M -- MOE_MAIN_ARGS...
# Example (2 processes x 4 devices = the 8-device mesh of the tests):
#   bash launch/local.sh 2 4 -- --config configs/digits_vmoe.py:runlocal \
#       --workdir /tmp/moe_local --config.mesh.expert=4
#
# Every process gets MOE_COORDINATOR_ADDRESS, MOE_NUM_PROCESSES and
# MOE_PROCESS_ID (read by moe.parallel.multihost), JAX_PLATFORMS=cpu and
# XLA_FLAGS=--xla_force_host_platform_device_count=M. Process 0 writes to this
# terminal; process i > 0 to $MOE_LOG_DIR/process_<i>.log (default: a new
# temporary directory). The coordinator port is $MOE_PORT or a free one; the
# interpreter is $PYTHON or `python`. The script exits with the first
# non-zero status of a process (and then stops the others), or 0.
set -euo pipefail

if [[ $# -lt 3 || $3 != "--" ]]; then
  sed -n '2,/^set /p' "$0" | sed '$d' | sed 's/^# \{0,1\}//' >&2
  exit 2
fi
num_processes=$1
devices_per_process=$2
shift 3
if ! [[ ${num_processes} =~ ^[1-9][0-9]*$ && ${devices_per_process} =~ ^[1-9][0-9]*$ ]]; then
  echo "launch/local.sh: N and M must be positive integers, got '${num_processes}' '${devices_per_process}'." >&2
  exit 2
fi

port=${MOE_PORT:-$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
log_dir=${MOE_LOG_DIR:-$(mktemp -d)}
mkdir -p "${log_dir}"
# Drop a device count inherited from the caller, keep its other XLA flags.
xla_flags="$(echo "${XLA_FLAGS:-}" | sed 's/--xla_force_host_platform_device_count=[0-9]*//g')"
xla_flags="${xla_flags} --xla_force_host_platform_device_count=${devices_per_process}"

pids=()
stop_all() {
  for pid in "${pids[@]}"; do
    kill "${pid}" 2>/dev/null || true
  done
}
trap stop_all INT TERM

for ((i = 0; i < num_processes; i++)); do
  env_vars=(MOE_COORDINATOR_ADDRESS="127.0.0.1:${port}"
            MOE_NUM_PROCESSES="${num_processes}" MOE_PROCESS_ID="${i}"
            JAX_PLATFORMS=cpu XLA_FLAGS="${xla_flags}")
  if [[ ${i} -eq 0 ]]; then
    env "${env_vars[@]}" "${PYTHON:-python}" -m moe.main "$@" &
  else
    env "${env_vars[@]}" "${PYTHON:-python}" -m moe.main "$@" \
        > "${log_dir}/process_${i}.log" 2>&1 &
  fi
  pids+=($!)
done
echo "launch/local.sh: ${num_processes} processes x ${devices_per_process} devices, coordinator 127.0.0.1:${port}, logs of processes 1..$((num_processes - 1)) in ${log_dir}" >&2

# Wait for the processes in the order they finish, so that a failure stops
# the others at once instead of leaving them blocked on a collective.
declare -A running
for ((i = 0; i < num_processes; i++)); do
  running[${pids[i]}]=${i}
done
status=0
while [[ ${#running[@]} -gt 0 ]]; do
  code=0
  wait -n -p finished "${!running[@]}" || code=$?
  i=${running[${finished}]}
  unset "running[${finished}]"
  if [[ ${code} -ne 0 && ${status} -eq 0 ]]; then
    status=${code}
    echo "launch/local.sh: process ${i} exited with status ${code}; stopping the others." >&2
    if [[ ${i} -gt 0 ]]; then
      tail -n 30 "${log_dir}/process_${i}.log" >&2
    fi
    stop_all
  fi
done
exit "${status}"
