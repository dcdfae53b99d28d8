#!/usr/bin/env bash
# Start a SLURM cluster on this machine, by hand (no systemd): munged, slurmctld, one slurmd per node.
#   usage: start_slurm.sh DIR [NODES] [CPUS_PER_NODE]      e.g. start_slurm.sh /tmp/slurm "nodeA nodeB" 1
# Writes DIR/slurm.conf; use it with `export SLURM_CONF=DIR/slurm.conf`. Needs root and the Debian
# packages slurmctld slurmd slurm-client munge. Stop with stop_slurm.sh DIR.
set -euo pipefail
DIR=$(realpath -m "${1:?usage: start_slurm.sh DIR [NODES] [CPUS_PER_NODE]}")
NODES=${2:-node1}
CPUS=${3:-$(nproc)}
HERE=$(cd "$(dirname "$0")" && pwd)
CTLD_PORT=${SLURM_TEST_CTLD_PORT:-16817}  # ports may be set from the environment
SLURMD_PORTS=(${SLURM_TEST_SLURMD_PORTS:-})  # one per node; default 16818, 16819, ...
mkdir -p "$DIR/state"
export SLURM_CONF="$DIR/slurm.conf"

# munge: reuse a running munged, else start one as the munge user
if ! (munge -n | unmunge) >/dev/null 2>&1; then
  [ -s /etc/munge/munge.key ] || { mungekey --create 2>/dev/null || create-munge-key; }
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge /etc/munge/munge.key
  chmod 0755 /run/munge
  runuser -u munge -- /usr/sbin/munged
  for _ in $(seq 50); do (munge -n | unmunge) >/dev/null 2>&1 && break; sleep 0.1; done
fi
(munge -n | unmunge) >/dev/null || { echo "munged did not start" >&2; exit 1; }

node_lines=""
i=0
for node in $NODES; do
  port=${SLURMD_PORTS[$i]:-$((16818 + i))}
  node_lines+="NodeName=$node NodeAddr=127.0.0.1 NodeHostname=$(hostname) Port=$port CPUs=$CPUS State=UNKNOWN"$'\n'
  i=$((i + 1))
done
sed -e "s|@HOST@|$(hostname)|" -e "s|@CTLD_PORT@|$CTLD_PORT|" -e "s|@DIR@|$DIR|g" "$HERE/slurm.conf.in" \
  | awk -v nodes="$node_lines" '{ if ($0 == "@NODES@") printf "%s", nodes; else print }' > "$SLURM_CONF"

/usr/sbin/slurmctld -c -i -f "$SLURM_CONF"
for node in $NODES; do
  mkdir -p "$DIR/spool-$node"
  /usr/sbin/slurmd -N "$node" -f "$SLURM_CONF"
done

# wait until every node is idle
want=$(echo $NODES | wc -w)
for _ in $(seq 100); do
  idle=$(sinfo -h -N -t idle -o "%N" 2>/dev/null | sort -u | wc -l)
  [ "$idle" -ge "$want" ] && { sinfo -N; exit 0; }
  sleep 0.2
done
echo "SLURM nodes did not become idle:" >&2
sinfo -N >&2 || true
tail -n 20 "$DIR"/slurmctld.log "$DIR"/slurmd-*.log >&2 || true
exit 1
