#!/usr/bin/env bash
# Stop what start_slurm.sh DIR started (slurmd(s), slurmctld), by the pids in their pid files.
# munged is left running (other clusters on this machine may share it).
DIR=$(realpath -m "${1:?usage: stop_slurm.sh DIR}")
export SLURM_CONF="$DIR/slurm.conf"
scancel --quiet --user="$(id -un)" 2>/dev/null || true
for pidfile in "$DIR"/slurmd-*.pid "$DIR"/slurmctld.pid; do
  [ -s "$pidfile" ] || continue
  pid=$(cat "$pidfile")
  kill "$pid" 2>/dev/null || continue
  for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -9 "$pid" 2>/dev/null || true
done
exit 0
