#!/usr/bin/env bash
# Stop the daemons that .ci/slurm_up.sh started, by their PID files (never by name).
set -uo pipefail

STATE=${MMGEN_SLURM_STATE:-/tmp/mmgen-slurm}

stop() {  # stop PIDFILE: SIGTERM, wait up to 10 s, then SIGKILL
  local f=$1 pid
  [[ -s $f ]] || return 0
  pid=$(cat "$f")
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid"
    for _ in $(seq 1 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
  fi
  rm -f "$f"
}

stop "$STATE/slurmd.pid"
stop "$STATE/slurmctld.pid"
stop "$STATE/munge/munged.pid"
echo "slurm_down: stopped daemons of $STATE" >&2
