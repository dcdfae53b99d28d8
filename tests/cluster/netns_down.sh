#!/usr/bin/env bash
# Remove the namespaces made by netns_up.sh (the veth pair goes with them) and their /etc/netns/NS. Ends the processes
# still running inside them first (by pid, from `ip netns pids`).
for ns in "$@"; do
  pids=$(ip netns pids "$ns" 2>/dev/null || true)
  [ -n "$pids" ] && kill $pids 2>/dev/null && sleep 1
  pids=$(ip netns pids "$ns" 2>/dev/null || true)
  [ -n "$pids" ] && kill -9 $pids 2>/dev/null
  ip netns del "$ns" 2>/dev/null || true
  rm -rf "/etc/netns/$ns"
done
exit 0
