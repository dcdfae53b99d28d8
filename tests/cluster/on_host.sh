#!/usr/bin/env bash
# Run a command as if on another host: inside network namespace NS, with its own hostname
# (a new UTS namespace; torchrun's c10d rendezvous hangs when both "hosts" share a hostname that
# maps to 127.0.0.1), and gloo bound to the namespace's veth interface.
#   usage: on_host.sh NS HOSTNAME COMMAND...
set -euo pipefail
NS=$1 NAME=$2
shift 2
exec ip netns exec "$NS" unshare --uts -- env GLOO_SOCKET_IFNAME="v-$NS" \
  bash -c 'hostname "$0" && exec "$@"' "$NAME" "$@"
